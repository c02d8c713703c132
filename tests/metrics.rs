//! The library's metrics, as the demo exposes them in Prometheus' text format on `GET /metrics`.

use actix_web::{http::StatusCode, test, web, App};
use idempotency_actix::{IdempotencyMiddleware, MemoryStore};
use idempotency_actix_workspace::{
    faulty::FaultyStore,
    orders::{metrics_route, prometheus, routes, Orders},
    prometheus_sample as sample, respond,
};
use serde_json::json;

fn order(key: Option<&str>, item: &str) -> actix_http::Request {
    let mut request = test::TestRequest::post()
        .uri("/orders")
        .set_json(json!({ "item": item }));
    if let Some(key) = key {
        request = request.insert_header(("Idempotency-Key", key.to_owned()));
    }
    request.to_request()
}

/// One request of each outcome, then the scrape: a counter per outcome, the store's calls
/// timed per operation, and no key anywhere in it.
#[actix_rt::test]
async fn outcomes_and_store_timings_are_exported() {
    let metrics = prometheus().unwrap_or_else(|e| panic!("{e}"));
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .configure(routes(web::Data::new(Orders::default())))
            .configure(metrics_route(metrics)),
    )
    .await;
    let key = "metrics-secret-key";
    assert_eq!(
        respond(&app, order(Some(key), "book")).await.status,
        StatusCode::CREATED
    );
    assert!(respond(&app, order(Some(key), "book")).await.is_replay());
    assert_eq!(
        respond(&app, order(Some(key), "pen")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        respond(&app, order(None, "book")).await.status,
        StatusCode::BAD_REQUEST
    );

    let scrape = respond(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(scrape.status, StatusCode::OK);
    let scrape = String::from_utf8_lossy(&scrape.body).into_owned();
    for (outcome, count) in [
        ("fresh", 1.0),
        ("replayed", 1.0),
        ("mismatch", 1.0),
        ("refused", 1.0),
    ] {
        assert_eq!(
            sample(
                &scrape,
                &format!("idempotency_requests_total{{outcome=\"{outcome}\"}}")
            ),
            Some(count),
            "{outcome} in\n{scrape}"
        );
    }
    // Three requests looked their key up (the keyless one was refused before); one completed.
    assert_eq!(
        sample(
            &scrape,
            "idempotency_store_duration_seconds_count{operation=\"reserve\"}"
        ),
        Some(3.0),
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "idempotency_store_duration_seconds_count{operation=\"complete\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    assert!(
        sample(
            &scrape,
            "idempotency_store_duration_seconds_bucket{operation=\"reserve\",le=\"0.001\"}"
        )
        .is_some(),
        "a histogram with buckets: {scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "idempotency_store_errors_total{operation=\"reserve\"}"
        ),
        None
    );
    assert!(!scrape.contains(key), "keys never reach the metrics");

    // A store that fails: the error is counted per operation, the request as a store error.
    let (faulty, faults) = FaultyStore::new();
    faults
        .reservations_answered_with_error
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let failing = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(faulty))
            .configure(routes(web::Data::new(Orders::default())))
            .configure(metrics_route(
                prometheus().unwrap_or_else(|e| panic!("{e}")),
            )),
    )
    .await;
    assert_eq!(
        respond(&failing, order(Some("fails"), "book")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let scrape = respond(
        &failing,
        test::TestRequest::get().uri("/metrics").to_request(),
    )
    .await;
    let scrape = String::from_utf8_lossy(&scrape.body).into_owned();
    assert_eq!(
        sample(
            &scrape,
            "idempotency_store_errors_total{operation=\"reserve\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "idempotency_requests_total{outcome=\"store_error\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
}
