//! Exactly-once under real concurrency, against a real server with several workers.

use std::{sync::Arc, time::Duration};

use actix_web::{http::StatusCode, post, web, App, HttpResponse};
use futures_util::future::join_all;
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, InFlightStatus, MemoryStore,
};
use idempotency_actix_workspace::{
    post_keyed, start_up_error, work::fresh_client, Received, Runs, TestServer,
};
use tokio::sync::Barrier;

const DUPLICATES: usize = 48;

#[idempotent]
#[post("/slow")]
async fn slow(runs: web::Data<Runs>, body: web::Bytes) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    HttpResponse::Created().body(format!("run {run} of {}", String::from_utf8_lossy(&body)))
}

#[idempotent]
#[post("/rendezvous")]
async fn rendezvous(barrier: web::Data<Arc<Barrier>>, runs: web::Data<Runs>) -> HttpResponse {
    runs.record();
    barrier.wait().await;
    HttpResponse::Created().finish()
}

fn server(builder: IdempotencyMiddlewareBuilder, runs: &Runs, barrier: Arc<Barrier>) -> TestServer {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    let runs = runs.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .app_data(web::Data::new(runs.clone()))
            .app_data(web::Data::new(Arc::clone(&barrier)))
            .service(slow)
            .service(rendezvous)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// Sends `DUPLICATES` requests with one key at once, each on its own connection.
async fn stampede(url: String, key: &'static str) -> Vec<Received> {
    let start = Arc::new(Barrier::new(DUPLICATES));
    let tasks = (0..DUPLICATES).map(|_| {
        let url = url.clone();
        let start = Arc::clone(&start);
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap_or_else(|e| panic!("client: {e}"));
            start.wait().await;
            post_keyed(&client, &url, key, "payload").await
        })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_that_wait_all_get_the_one_response() {
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .lock_timeout(Duration::from_secs(10));
    let server = server(builder, &runs, Arc::new(Barrier::new(1)));

    let answers = stampede(server.url("/slow"), "same").await;

    assert_eq!(runs.count(), 1, "the handler must run exactly once");
    assert!(
        answers.iter().all(|a| a.status == StatusCode::CREATED),
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|a| a.body == "run 1 of payload"),
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|a| !a.is_replay()).count(),
        1,
        "one first response, the rest replays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_past_the_lock_timeout_get_409_with_retry_after() {
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .lock_timeout(Duration::from_millis(20));
    let server = server(builder, &runs, Arc::new(Barrier::new(1)));

    let answers = stampede(server.url("/slow"), "same").await;

    assert_eq!(runs.count(), 1, "the handler must run exactly once");
    let created: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.is_replay())
        .collect();
    let conflicts: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert!(!conflicts.is_empty(), "{answers:?}");
    assert!(
        conflicts.iter().all(|a| a.header("retry-after").is_some()
            && a.problem_type().is_some_and(|t| t.ends_with("#in-flight"))),
        "{conflicts:?}"
    );
    assert_eq!(
        created.len() + conflicts.len() + answers.iter().filter(|a| a.is_replay()).count(),
        DUPLICATES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_timeout_status_can_be_423_locked() {
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .lock_enabled(false)
        .lock_timeout_status(InFlightStatus::Locked);
    let server = server(builder, &runs, Arc::new(Barrier::new(1)));

    let answers = stampede(server.url("/slow"), "same").await;

    assert_eq!(runs.count(), 1);
    let locked: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::LOCKED)
        .collect();
    assert!(!locked.is_empty(), "{answers:?}");
    assert!(
        locked
            .iter()
            .all(|a| a.problem_type().is_some_and(|t| t.ends_with("#locked"))),
        "{locked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_with_different_keys_run_concurrently() {
    const PARALLEL: usize = 8;
    let runs = Runs::default();
    // Every handler waits until all of them are inside: that only happens if the middleware
    // lets unrelated keys run at the same time. Serialised, they would wait forever.
    let barrier = Arc::new(Barrier::new(PARALLEL));
    let server = server(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()),
        &runs,
        barrier,
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"));
    let keys: Vec<String> = (0..PARALLEL).map(|i| format!("key-{i}")).collect();
    let url = server.url("/rendezvous");
    let answers = join_all(keys.iter().map(|key| post_keyed(&client, &url, key, ""))).await;
    assert!(
        answers.iter().all(|a| a.status == StatusCode::CREATED),
        "{answers:?}"
    );
    assert_eq!(runs.count(), PARALLEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_gets_the_replay_when_it_retries() {
    let runs = Runs::default();
    let server = server(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()),
        &runs,
        Arc::new(Barrier::new(1)),
    );
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"));
    let gave_up = impatient
        .post(server.url("/slow"))
        .header("Idempotency-Key", "k")
        .header("content-type", "application/json")
        .body("x")
        .send()
        .await;
    assert!(gave_up.is_err(), "the first attempt must time out");

    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = post_keyed(&reqwest::Client::new(), &server.url("/slow"), "k", "x").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(
        retry.is_replay(),
        "the handler finished despite the disconnect: {retry:?}"
    );
    assert_eq!(retry.body, "run 1 of x");
    assert_eq!(runs.count(), 1);
}

/// The mistake the docs warn about: the middleware built inside `HttpServer::new`, whose
/// closure runs once per worker. `MemoryStore::default()` is one store per process, so the two
/// workers still share it: ten parallel requests and ten sequential retries, each on a new
/// connection (so spread over both workers), run the handler once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_store_built_inside_the_server_factory_is_still_one_store() {
    let runs = Runs::default();
    let server = {
        let runs = runs.clone();
        TestServer::start(2, move || {
            App::new()
                .wrap(IdempotencyMiddleware::new(MemoryStore::default()))
                .app_data(web::Data::new(runs.clone()))
                .app_data(web::Data::new(Arc::new(Barrier::new(1))))
                .service(slow)
        })
        .unwrap_or_else(|e| panic!("server: {e}"))
    };
    let key = "built-inside-the-factory";
    let url = server.url("/slow");
    let parallel: Vec<Received> =
        join_all((0..10).map(|_| async { post_keyed(&fresh_client(), &url, key, "order").await }))
            .await;
    for received in &parallel {
        assert!(
            received.status == StatusCode::CREATED || received.status == StatusCode::CONFLICT,
            "{received:?}"
        );
    }
    for _ in 0..10 {
        let retry = post_keyed(&fresh_client(), &url, key, "order").await;
        assert!(retry.is_replay(), "{retry:?}");
    }
    assert_eq!(runs.count(), 1, "one store for both workers");
}

/// A store from the builder, built inside `HttpServer::new`, would be one store per worker:
/// the server refuses to start, and its error says why.
#[test]
fn a_store_built_by_each_worker_stops_the_server_at_start_up() {
    let refused = start_up_error(2, || {
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .app_data(web::Data::new(Runs::default()))
            .service(slow)
    });
    let refused = refused.unwrap_or_else(|| panic!("the server must refuse to start"));
    assert!(
        refused
            .to_string()
            .contains("a MemoryStore was built inside HttpServer::new"),
        "{refused}"
    );
}
