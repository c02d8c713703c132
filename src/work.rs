//! A keyed handler that takes its time, on a real server: what the fault tests send requests to.

use std::time::Duration;

use actix_web::{http::StatusCode, post, web, App, HttpResponse};
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, IdempotencyStore,
};

use crate::{post_keyed, Received, Runs, TestServer};

/// How long `/work` takes.
#[derive(Debug, Clone, Copy)]
pub struct Delay(pub Duration);

/// `POST /work`: counts its run, takes its [`Delay`], answers `run N: M bytes`.
#[allow(unreachable_pub)] // the lint misreads the route macro's expansion; tests use it
#[idempotent]
#[post("/work")]
pub async fn work(
    runs: web::Data<Runs>,
    delay: web::Data<Delay>,
    body: web::Bytes,
) -> HttpResponse {
    perform(&runs, *delay.get_ref(), &body).await
}

/// `POST /plain-work`: [`work`] on a route without a policy, whose key the enforce-mode default
/// settles right after routing.
pub async fn plain_work(
    runs: web::Data<Runs>,
    delay: web::Data<Delay>,
    body: web::Bytes,
) -> HttpResponse {
    perform(&runs, *delay.get_ref(), &body).await
}

/// What `/work` and `/plain-work` do.
async fn perform(runs: &Runs, delay: Delay, body: &[u8]) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(delay.0).await;
    HttpResponse::Created().body(format!("run {run}: {} bytes", body.len()))
}

/// A server with two workers behind the middleware from `builder`, serving `/work` (taking
/// `delay`, counting into `runs`) and whatever `more` registers.
pub fn work_server(
    builder: IdempotencyMiddlewareBuilder,
    runs: &Runs,
    delay: Duration,
    more: fn(&mut web::ServiceConfig),
) -> TestServer {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    let runs = runs.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .app_data(web::Data::new(runs.clone()))
            .app_data(web::Data::new(Delay(delay)))
            .service(work)
            .route("/plain-work", web::post().to(plain_work))
            .configure(more)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// A client that opens a new connection for every request and gives up after ten seconds.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"))
}

/// Sends `key` to `url` now and a duplicate `after` later, each on its own connection.
pub async fn request_and_duplicate(
    url: String,
    key: String,
    after: Duration,
) -> (Received, Received) {
    let first = {
        let (url, key) = (url.clone(), key.clone());
        tokio::spawn(async move { post_keyed(&fresh_client(), &url, &key, "order").await })
    };
    tokio::time::sleep(after).await;
    let duplicate = post_keyed(&fresh_client(), &url, &key, "order").await;
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    (first, duplicate)
}

/// On `store`: a 2.5 s handler under a 1 s lease keeps its key (a duplicate at 1.6 s gets 409)
/// and its response is replayed; it runs once.
pub async fn check_a_handler_slower_than_its_lease(store: impl IdempotencyStore) {
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(store).reservation_lease(Duration::from_secs(1));
    let server = work_server(builder, &runs, Duration::from_millis(2500), |_| {});
    // A route with a policy, and one whose key the enforce-mode default settles: each renews
    // its reservation its own way.
    for (path, runs_after) in [("/work", 1), ("/plain-work", 2)] {
        let url = server.url(path);
        let (first, duplicate) =
            request_and_duplicate(url.clone(), "slow".to_owned(), Duration::from_millis(1600))
                .await;
        assert!(
            first.status == StatusCode::CREATED && !first.is_replay(),
            "{path}: {first:?}"
        );
        assert_eq!(
            duplicate.status,
            StatusCode::CONFLICT,
            "{path}: the reservation outlived its first lease: {duplicate:?}"
        );
        let retry = post_keyed(&fresh_client(), &url, "slow", "order").await;
        assert!(retry.is_replay(), "{path}: {retry:?}");
        assert_eq!(retry.body, first.body);
        assert_eq!(runs.count(), runs_after, "{path} ran once");
    }
}

/// On `store`: `Duration::MAX` says "wait for the first request" and "keep for ever"; nothing
/// panics, the duplicate waits for the first response, and the handler runs once.
pub async fn check_durations_past_the_clock(store: impl IdempotencyStore) {
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(store)
        .lock_timeout(Duration::MAX)
        .record_ttl(Duration::MAX)
        .reservation_lease(Duration::MAX / 2);
    let server = work_server(builder, &runs, Duration::from_millis(300), |_| {});
    let url = server.url("/work");
    let (first, duplicate) =
        request_and_duplicate(url.clone(), "k".to_owned(), Duration::from_millis(100)).await;
    assert!(
        first.status == StatusCode::CREATED && !first.is_replay(),
        "{first:?}"
    );
    assert!(
        duplicate.is_replay(),
        "the duplicate waits for the first response: {duplicate:?}"
    );
    assert_eq!(duplicate.body, first.body);
    let retry = post_keyed(&fresh_client(), &url, "k", "order").await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(runs.count(), 1);
}
