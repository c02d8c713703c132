//! The problem `type` base, configurable for the service's own documentation, per middleware.

use actix_web::{http::StatusCode, test, web, App, HttpResponse};
use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore, PROBLEM_TYPE_BASE};
use idempotency_actix_workspace::respond;

#[actix_rt::test]
async fn problem_types_use_the_configured_base() {
    let app = test::init_service(
        App::new()
            .wrap(
                IdempotencyMiddleware::builder(MemoryStore::builder().build())
                    .problem_type_base("https://api.example.com/errors/idempotency#")
                    .build()
                    .unwrap_or_else(|e| panic!("config: {e}")),
            )
            .service(
                web::resource("/pay")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(HttpResponse::Created)),
            ),
    )
    .await;
    let refused = respond(&app, test::TestRequest::post().uri("/pay").to_request()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.problem_type().as_deref(),
        Some("https://api.example.com/errors/idempotency#missing-key")
    );
}

/// Two apps in one process, one with its own base: each answers with its own.
#[actix_rt::test]
async fn each_middleware_answers_with_its_own_base() {
    let custom = test::init_service(
        App::new()
            .wrap(
                IdempotencyMiddleware::builder(MemoryStore::builder().build())
                    .problem_type_base("https://api.example.com/errors#")
                    .build()
                    .unwrap_or_else(|e| panic!("config: {e}")),
            )
            .route("/pay", web::post().to(HttpResponse::Created)),
    )
    .await;
    let default = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .route("/pay", web::post().to(HttpResponse::Created)),
    )
    .await;
    let keyless = || test::TestRequest::post().uri("/pay").to_request();
    let from_custom = respond(&custom, keyless()).await;
    let from_default = respond(&default, keyless()).await;
    assert_eq!(
        from_custom.problem_type().as_deref(),
        Some("https://api.example.com/errors#missing-key")
    );
    assert_eq!(
        from_default.problem_type(),
        Some(format!("{PROBLEM_TYPE_BASE}missing-key"))
    );
}
