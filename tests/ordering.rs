//! The idempotency middleware among other common middleware, ordered right and wrong.

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::StatusCode,
    middleware::{from_fn, DefaultHeaders, Logger, Next},
    post, test, web, App, Error, HttpResponse,
};
use idempotency_actix::{idempotency_exempt, idempotent, IdempotencyMiddleware, MemoryStore, Mode};
use idempotency_actix_workspace::{respond, Runs};

#[idempotent]
#[post("/orders")]
async fn orders(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

#[idempotency_exempt]
#[post("/ping")]
async fn ping(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Ok().body(runs.record().to_string())
}

/// An async middleware, like an authentication layer: it defers calling the next service.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    actix_web::rt::task::yield_now().await;
    next.call(req).await
}

fn keyed(path: &str, key: &str) -> test::TestRequest {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", key.to_owned()))
}

#[actix_rt::test]
async fn replays_pass_through_outer_logger_default_headers_and_async_middleware() {
    let runs = Runs::default();
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .wrap(Logger::default())
            .wrap(DefaultHeaders::new().add(("x-served-by", "test")))
            .wrap(from_fn(authenticate))
            .app_data(web::Data::new(runs.clone()))
            .service(orders)
            .service(ping),
    )
    .await;
    let first = respond(&app, keyed("/orders", "k").to_request()).await;
    let replay = respond(&app, keyed("/orders", "k").to_request()).await;
    let missing = respond(&app, test::TestRequest::post().uri("/orders").to_request()).await;
    let pinged = respond(&app, test::TestRequest::post().uri("/ping").to_request()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replay.is_replay());
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        pinged.status,
        StatusCode::OK,
        "exempt routes need no key in enforce mode"
    );
    for received in [&first, &replay, &missing, &pinged] {
        assert_eq!(
            received.header("x-served-by"),
            Some("test"),
            "outer middleware must see every answer"
        );
    }
    assert_eq!(runs.count(), 2);
}

/// An async middleware registered first runs between the idempotency middleware and the
/// routes: the route's policy settles the key after it, so nothing is misapplied.
#[actix_rt::test]
async fn an_async_middleware_between_idempotency_and_routes_runs_before_the_key_is_settled() {
    for mode in [Mode::Enforce, Mode::OptIn] {
        let runs = Runs::default();
        let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
            .mode(mode)
            .build()
            .unwrap_or_else(|e| panic!("config: {e}"));
        let app = test::init_service(
            App::new()
                .wrap(from_fn(authenticate)) // registered first: it runs innermost, after idempotency
                .wrap(middleware)
                .app_data(web::Data::new(runs.clone()))
                .service(orders)
                .service(ping),
        )
        .await;
        let first = respond(&app, keyed("/orders", "k").to_request()).await;
        let replay = respond(&app, keyed("/orders", "k").to_request()).await;
        assert_eq!(first.status, StatusCode::CREATED, "{mode:?}: {first:?}");
        assert!(replay.is_replay(), "{mode:?}: {replay:?}");
        assert_eq!(replay.body, first.body);
        let exempt_with_key = respond(&app, keyed("/ping", "p").to_request()).await;
        assert_eq!(exempt_with_key.status, StatusCode::OK, "{mode:?}");
        assert_eq!(runs.count(), 2, "{mode:?}");
    }
}

/// No attribute: enforce mode applies its default right after routing, before the handler runs.
#[post("/notes")]
async fn notes(runs: web::Data<Runs>, _note: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

/// A route without a policy is settled after routing, when the request already belongs to the
/// route: the default's refusals and replays reach the client whole, as the error of the routed
/// request, which middleware registered outside pass on without adding to it. (Routes with a
/// policy answer with ordinary responses: see the first test.)
#[actix_rt::test]
async fn unannotated_route_answers_reach_the_client_whole_behind_outer_middleware() {
    let runs = Runs::default();
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .wrap(Logger::default())
            .wrap(DefaultHeaders::new().add(("x-served-by", "test")))
            .app_data(web::Data::new(runs.clone()))
            .service(notes),
    )
    .await;
    let first = respond(&app, keyed("/notes", "n").to_request()).await;
    let replay = respond(&app, keyed("/notes", "n").to_request()).await;
    let missing = respond(&app, test::TestRequest::post().uri("/notes").to_request()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("x-served-by"), Some("test"), "{first:?}");
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, first.body);
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing
        .problem_type()
        .is_some_and(|t| t.ends_with("#missing-key")));
    assert_eq!(runs.count(), 1);
}
