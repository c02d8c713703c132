//! Key validation and header handling, seen from a client.

use actix_web::{
    body::MessageBody,
    dev::{Service, ServiceResponse},
    http::StatusCode,
    test, web, App, HttpResponse,
};
use idempotency_actix::{
    IdempotencyMiddleware, IdempotencyMiddlewareBuilder, IdempotencyPolicy, MemoryStore,
};
use idempotency_actix_workspace::{respond, Received, Runs};

/// An app with one route that requires a key and counts its runs.
async fn pay_app(
    builder: IdempotencyMiddlewareBuilder,
    runs: &Runs,
) -> impl Service<
    actix_http::Request,
    Response = ServiceResponse<impl MessageBody>,
    Error = actix_web::Error,
> {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    test::init_service(
        App::new()
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .service(
                web::resource("/pay")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(|runs: web::Data<Runs>| async move {
                        HttpResponse::Created().body(runs.record().to_string())
                    })),
            ),
    )
    .await
}

async fn send(
    builder: IdempotencyMiddlewareBuilder,
    runs: &Runs,
    request: test::TestRequest,
) -> Received {
    respond(&pay_app(builder, runs).await, request.to_request()).await
}

fn builder() -> IdempotencyMiddlewareBuilder {
    IdempotencyMiddleware::builder(MemoryStore::builder().build())
}

fn pay() -> test::TestRequest {
    test::TestRequest::post().uri("/pay")
}

async fn assert_refused(request: test::TestRequest, slug: &str) {
    let runs = Runs::default();
    let received = send(builder(), &runs, request).await;
    assert_eq!(
        received.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        received.body
    );
    assert_eq!(
        received
            .problem_type()
            .as_deref()
            .and_then(|t| t.rsplit('#').next().map(str::to_owned)),
        Some(slug.to_owned())
    );
    assert_eq!(runs.count(), 0, "the handler must not run");
}

#[actix_rt::test]
async fn missing_key_is_refused_with_400_problem() {
    assert_refused(pay(), "missing-key").await;
}

#[actix_rt::test]
async fn empty_key_is_refused() {
    assert_refused(pay().insert_header(("Idempotency-Key", "")), "invalid-key").await;
    assert_refused(
        pay().insert_header(("Idempotency-Key", "\"\"")),
        "invalid-key",
    )
    .await;
}

#[actix_rt::test]
async fn key_over_255_characters_is_refused_and_255_is_accepted() {
    assert_refused(
        pay().insert_header(("Idempotency-Key", "k".repeat(256))),
        "invalid-key",
    )
    .await;
    let runs = Runs::default();
    let accepted = send(
        builder(),
        &runs,
        pay().insert_header(("Idempotency-Key", "k".repeat(255))),
    )
    .await;
    assert_eq!(accepted.status, StatusCode::CREATED);
}

#[actix_rt::test]
async fn control_and_non_ascii_characters_are_refused() {
    let tab =
        actix_web::http::header::HeaderValue::from_bytes(b"a\tb").unwrap_or_else(|e| panic!("{e}"));
    assert_refused(pay().insert_header(("Idempotency-Key", tab)), "invalid-key").await;
    let latin1 = actix_web::http::header::HeaderValue::from_bytes(b"caf\xe9")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(
        pay().insert_header(("Idempotency-Key", latin1)),
        "invalid-key",
    )
    .await;
}

#[actix_rt::test]
async fn two_key_header_fields_are_refused() {
    let request = pay()
        .append_header(("Idempotency-Key", "a"))
        .append_header(("Idempotency-Key", "b"));
    assert_refused(request, "invalid-key").await;
}

#[actix_rt::test]
async fn unterminated_structured_field_string_is_refused() {
    assert_refused(
        pay().insert_header(("Idempotency-Key", "\"abc")),
        "invalid-key",
    )
    .await;
}

#[actix_rt::test]
async fn quoted_and_bare_forms_name_the_same_operation() {
    let runs = Runs::default();
    let app = pay_app(builder(), &runs).await;
    let bare = respond(
        &app,
        pay().insert_header(("Idempotency-Key", "abc")).to_request(),
    )
    .await;
    let quoted = respond(
        &app,
        pay()
            .insert_header(("Idempotency-Key", "\"abc\""))
            .to_request(),
    )
    .await;
    assert!(!bare.is_replay());
    assert!(quoted.is_replay());
    assert_eq!(quoted.body, bare.body);
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn header_name_is_configurable_and_matched_case_insensitively() {
    let runs = Runs::default();
    let custom = builder().header_name("X-Request-Token");
    let received = send(custom, &runs, pay().insert_header(("x-REQUEST-token", "k"))).await;
    assert_eq!(received.status, StatusCode::CREATED);

    let django = builder().header_name("HTTP_X_REQUEST_TOKEN");
    let received = send(django, &runs, pay().insert_header(("X-Request-Token", "k"))).await;
    assert_eq!(received.status, StatusCode::CREATED);

    let other = builder().header_name("X-Request-Token");
    let received = send(other, &runs, pay().insert_header(("Idempotency-Key", "k"))).await;
    assert_eq!(
        received.status,
        StatusCode::BAD_REQUEST,
        "the default header is not read then"
    );
}

/// A handler reads the key its request is settled under, whatever the header's name or form;
/// without a key on an optional route it gets `None`; in enforce mode, an unannotated route
/// reads it too.
#[actix_rt::test]
async fn handlers_read_the_key_their_request_is_settled_under() {
    use idempotency_actix::IdempotencyKey;

    async fn echo(key: Option<IdempotencyKey>) -> HttpResponse {
        HttpResponse::Created().body(key.map_or_else(|| "none".to_owned(), |k| k.to_string()))
    }
    let app = test::init_service(
        App::new()
            .wrap(
                IdempotencyMiddleware::builder(MemoryStore::builder().build())
                    .header_name("X-Request-Token")
                    .build()
                    .unwrap_or_else(|e| panic!("config: {e}")),
            )
            .service(
                web::resource("/required")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(echo)),
            )
            .service(
                web::resource("/optional")
                    .wrap(IdempotencyPolicy::optional())
                    .route(web::post().to(echo)),
            )
            .route(
                "/default",
                web::post().to(|key: IdempotencyKey, _body: web::Bytes| async move {
                    HttpResponse::Created().body(key.to_string())
                }),
            ),
    )
    .await;
    let post = |path: &str, key: Option<&str>| {
        let mut request = test::TestRequest::post().uri(path);
        if let Some(key) = key {
            request = request.insert_header(("x-request-token", key.to_owned()));
        }
        request.to_request()
    };
    let body = |received: Received| String::from_utf8_lossy(&received.body).into_owned();

    let quoted = respond(&app, post("/required", Some("\"order-7\""))).await;
    assert_eq!(quoted.status, StatusCode::CREATED);
    assert_eq!(body(quoted), "order-7");
    let replay = respond(&app, post("/required", Some("order-7"))).await;
    assert!(replay.is_replay(), "the same key, bare: {replay:?}");
    assert_eq!(body(replay), "order-7");
    assert_eq!(body(respond(&app, post("/optional", None)).await), "none");
    assert_eq!(
        body(respond(&app, post("/optional", Some("opt-1"))).await),
        "opt-1"
    );
    assert_eq!(
        body(respond(&app, post("/default", Some("d-1"))).await),
        "d-1"
    );
}

/// Without the middleware, a handler asking for the key is told what is wrong, as problem+json.
#[actix_rt::test]
async fn reading_the_key_without_the_middleware_is_a_misconfiguration() {
    use idempotency_actix::IdempotencyKey;

    let app = test::init_service(
        App::new().route(
            "/pay",
            web::post()
                .to(|key: IdempotencyKey| async move { HttpResponse::Ok().body(key.to_string()) }),
        ),
    )
    .await;
    let received = respond(
        &app,
        test::TestRequest::post()
            .uri("/pay")
            .insert_header(("Idempotency-Key", "k"))
            .to_request(),
    )
    .await;
    assert_eq!(received.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        received
            .problem_type()
            .is_some_and(|kind| kind.ends_with("#misconfigured")),
        "{received:?}"
    );
}
