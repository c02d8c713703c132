//! The store timings of routes whose key is held by the handler's transaction, which the store
//! reserves and completes outside its `IdempotencyStore` methods. (A binary of its own: the
//! metrics recorder is the process's.)

use actix_web::{http::StatusCode, post, test, App, HttpResponse};
use idempotency_actix::{idempotent, IdempotencyMiddleware, IdempotentTransaction};
use idempotency_actix_workspace::{
    orders::{metrics_route, prometheus},
    postgres::{postgres_url_or_skip, FreshDatabase},
    prometheus_sample, respond,
};

#[idempotent]
#[post("/notes")]
async fn note(mut tx: IdempotentTransaction) -> HttpResponse {
    match sqlx::query("SELECT 1").execute(&mut *tx).await {
        Ok(_) => HttpResponse::Created().body("noted"),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}

#[actix_rt::test]
async fn reservations_and_commits_in_the_handlers_transaction_are_timed() {
    let test = "metrics_of_held_keys";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let metrics = prometheus().unwrap_or_else(|e| panic!("{e}"));
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(database.store().await))
            .service(note)
            .configure(metrics_route(metrics)),
    )
    .await;
    let post = || {
        test::TestRequest::post()
            .uri("/notes")
            .insert_header(("Idempotency-Key", "k"))
            .to_request()
    };
    assert_eq!(respond(&app, post()).await.status, StatusCode::CREATED);
    assert!(respond(&app, post()).await.is_replay());

    let scrape = respond(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    let scrape = String::from_utf8_lossy(&scrape.body).into_owned();
    let count = |operation: &str| {
        prometheus_sample(
            &scrape,
            &format!("idempotency_store_duration_seconds_count{{operation=\"{operation}\"}}"),
        )
    };
    assert_eq!(count("reserve"), Some(2.0), "{scrape}");
    assert_eq!(count("complete"), Some(1.0), "{scrape}");
}
