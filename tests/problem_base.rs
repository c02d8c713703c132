//! The problem `type` base, configurable for the service's own documentation (its own test
//! binary: the base is one setting for the process).

use actix_web::{http::StatusCode, test, web, App, HttpResponse};
use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore};
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
