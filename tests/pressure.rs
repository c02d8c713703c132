//! Exactly once under pressure, on the memory store, against a real server: a full store,
//! handlers slower than their lease, store faults around the reservation, and durations at the
//! edge of what a clock can hold.

use std::{sync::atomic::Ordering, time::Duration};

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::StatusCode,
    middleware::{from_fn, Next},
    post, web, App, HttpResponse,
};
use futures_util::future::join_all;
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, MemoryStore,
};
use idempotency_actix_workspace::{
    faulty::FaultyStore,
    post_keyed,
    work::{
        check_a_handler_slower_than_its_lease, check_durations_past_the_clock, fresh_client,
        request_and_duplicate, work, work_server, Delay,
    },
    Received, Runs, TestServer,
};

/// A quick handler whose records fill the store.
#[idempotent]
#[post("/fill")]
async fn fill(body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(body)
}

fn server(builder: IdempotencyMiddlewareBuilder, runs: &Runs, delay: Duration) -> TestServer {
    work_server(builder, runs, delay, |config| {
        config.service(fill);
    })
}

fn is_first_run(answer: &Received) -> bool {
    answer.status == StatusCode::CREATED && !answer.is_replay()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_memory_store_never_lets_an_in_flight_duplicate_run() {
    let store = MemoryStore::builder().max_bytes(64 * 1024).build();
    let runs = Runs::default();
    let server = server(
        IdempotencyMiddleware::builder(store.clone()),
        &runs,
        Duration::from_millis(800),
    );

    // Fill the store well past its bound with records that were each used twice.
    let kilobyte = "x".repeat(1024);
    for n in 0..200 {
        let key = format!("fill-{n}");
        let first = post_keyed(
            &fresh_client(),
            &server.url("/fill"),
            &key,
            kilobyte.clone(),
        )
        .await;
        let again = post_keyed(
            &fresh_client(),
            &server.url("/fill"),
            &key,
            kilobyte.clone(),
        )
        .await;
        assert!(
            is_first_run(&first) && again.is_replay(),
            "{first:?} {again:?}"
        );
    }
    assert!(
        store.capacity_evictions() > 0,
        "the store must have been full: {store:?}"
    );

    let pairs = (0..5).map(|n| {
        let url = server.url("/work");
        tokio::spawn(request_and_duplicate(
            url,
            format!("slow-{n}"),
            Duration::from_millis(300),
        ))
    });
    let pairs: Vec<_> = join_all(pairs)
        .await
        .into_iter()
        .map(|pair| pair.unwrap_or_else(|e| panic!("{e}")))
        .collect();

    assert_eq!(runs.count(), 5, "one run per key: {pairs:?}");
    for (first, duplicate) in &pairs {
        assert!(is_first_run(first), "{first:?}");
        assert_eq!(duplicate.status, StatusCode::CONFLICT, "{duplicate:?}");
    }
    for n in 0..5 {
        let retry = post_keyed(
            &fresh_client(),
            &server.url("/work"),
            &format!("slow-{n}"),
            "order",
        )
        .await;
        assert!(retry.is_replay(), "the newest records are kept: {retry:?}");
    }
    assert_eq!(runs.count(), 5);
}

/// The lease is a crash timeout: a handler that runs past it keeps its key, and its response
/// is stored and replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_slower_than_its_lease_runs_once() {
    check_a_handler_slower_than_its_lease(MemoryStore::builder().build()).await;
}

/// `Duration::MAX` says "wait for the first request" or "keep forever": no panic, and the
/// guarantees hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durations_past_the_clock_saturate_instead_of_panicking() {
    check_durations_past_the_clock(MemoryStore::builder().build()).await;
}

/// The first two completions fail (a store blip after the handler ran): the client still gets
/// its response, the completion is retried, and the retry of the request is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_completion_is_retried_and_the_retry_is_replayed() {
    let (store, faults) = FaultyStore::new();
    faults.failing_completions.store(2, Ordering::SeqCst);
    let runs = Runs::default();
    let server = server(
        IdempotencyMiddleware::builder(store),
        &runs,
        Duration::from_millis(50),
    );

    let first = post_keyed(&fresh_client(), &server.url("/work"), "blip", "order").await;
    assert!(is_first_run(&first), "{first:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = post_keyed(&fresh_client(), &server.url("/work"), "blip", "order").await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.count(), 1);
    assert_eq!(faults.failing_completions.load(Ordering::SeqCst), 0);
}

/// A reservation that was made but whose answer was lost: the client gets 503, and the key is
/// freed at once instead of answering 409 for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_whose_answer_was_lost_is_released() {
    let (store, faults) = FaultyStore::new();
    faults
        .reservations_answered_with_error
        .store(1, Ordering::SeqCst);
    let runs = Runs::default();
    let server = server(
        IdempotencyMiddleware::builder(store),
        &runs,
        Duration::from_millis(50),
    );

    let refused = post_keyed(&fresh_client(), &server.url("/work"), "lost", "order").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = post_keyed(&fresh_client(), &server.url("/work"), "lost", "order").await;
    assert!(
        is_first_run(&retry),
        "the key must be free again: {retry:?}"
    );
    assert_eq!(runs.count(), 1);
}

/// An outer timeout drops the request while its reservation is being made. The keyed request
/// runs in its own task, so its reservation, handler and record complete all the same: the
/// retry gets the replay, and nothing is left locked or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_dropped_while_reserving_still_settles_its_key() {
    async fn give_up_after_300_ms(
        req: ServiceRequest,
        next: Next<impl MessageBody>,
    ) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
        match tokio::time::timeout(Duration::from_millis(300), next.call(req)).await {
            Ok(answer) => answer,
            Err(_) => Err(actix_web::error::ErrorGatewayTimeout("gave up")),
        }
    }

    let (store, faults) = FaultyStore::new();
    faults
        .reservation_answer_delay_ms
        .store(1500, Ordering::SeqCst);
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::new(store);
    let server = {
        let runs = runs.clone();
        TestServer::start(2, move || {
            App::new()
                .wrap(middleware.clone())
                .wrap(from_fn(give_up_after_300_ms))
                .app_data(web::Data::new(runs.clone()))
                .app_data(web::Data::new(Delay(Duration::from_millis(50))))
                .service(work)
        })
        .unwrap_or_else(|e| panic!("server: {e}"))
    };

    let gave_up = post_keyed(&fresh_client(), &server.url("/work"), "abandoned", "order").await;
    assert_eq!(gave_up.status, StatusCode::GATEWAY_TIMEOUT, "{gave_up:?}");
    faults
        .reservation_answer_delay_ms
        .store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1800)).await;

    let retry = post_keyed(&fresh_client(), &server.url("/work"), "abandoned", "order").await;
    assert!(
        retry.is_replay(),
        "the dropped request completed: {retry:?}"
    );
    assert_eq!(runs.count(), 1);
}
