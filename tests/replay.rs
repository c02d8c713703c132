//! Replays, stored statuses, payload fingerprints and caller scopes, through the full app.

use std::time::Duration;

use actix_web::{
    body::MessageBody,
    dev::{Service, ServiceResponse},
    http::{header, StatusCode},
    post, test, web, App, HttpResponse,
};
use bytes::Bytes;
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, MemoryStore, ReplayStatus,
    REPLAYED_HEADER,
};
use idempotency_actix_workspace::Runs;
use serde_json::{json, Value};

#[idempotent]
#[post("/orders")]
async fn create_order(runs: web::Data<Runs>, body: web::Bytes) -> HttpResponse {
    let run = runs.record();
    HttpResponse::Created()
        .insert_header(("x-run", run.to_string()))
        .insert_header(("set-cookie", "session=abc"))
        .json(json!({ "run": run, "bytes": body.len() }))
}

#[idempotent]
#[post("/flaky")]
async fn flaky(runs: web::Data<Runs>) -> HttpResponse {
    match runs.record() {
        1 => HttpResponse::InternalServerError().body("try again"),
        2 => HttpResponse::Accepted().body("queued"),
        _ => HttpResponse::Ok().body("later"),
    }
}

#[idempotent]
#[post("/big")]
async fn big_response(runs: web::Data<Runs>) -> HttpResponse {
    runs.record();
    HttpResponse::Ok().body(vec![b'x'; 4096])
}

#[idempotent]
#[post("/stream")]
async fn streamed_response(runs: web::Data<Runs>) -> HttpResponse {
    let run = runs.record();
    let chunks = (0..3).map(move |i| Ok::<_, actix_web::Error>(Bytes::from(format!("{run}-{i};"))));
    HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
}

/// No attribute: enforce mode requires a key (settled right after routing).
#[post("/notes")]
async fn create_note(runs: web::Data<Runs>, _note: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(format!("note {}", runs.record()))
}

async fn app(
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
            .service(create_order)
            .service(flaky)
            .service(big_response)
            .service(streamed_response)
            .service(create_note),
    )
    .await
}

fn default_builder() -> IdempotencyMiddlewareBuilder {
    IdempotencyMiddleware::builder(MemoryStore::builder().build())
}

fn keyed(path: &str, key: &str, body: &'static str) -> test::TestRequest {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", key.to_owned()))
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(body)
}

async fn json_of(response: ServiceResponse<impl MessageBody>) -> Value {
    serde_json::from_slice(&test::read_body(response).await).unwrap_or(Value::Null)
}

#[actix_rt::test]
async fn replays_stored_response_for_same_key() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;

    let first = test::call_service(&app, keyed("/orders", "k1", r#"{"a":1}"#).to_request()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(
        first.headers().get(REPLAYED_HEADER).is_none(),
        "a first response is no replay"
    );
    let first_body = test::read_body(first).await;

    for _ in 0..3 {
        let replay =
            test::call_service(&app, keyed("/orders", "k1", r#"{"a":1}"#).to_request()).await;
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(
            replay.headers().get(REPLAYED_HEADER).map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert_eq!(
            replay.headers().get("x-run").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        assert!(
            replay.headers().get(header::SET_COOKIE).is_none(),
            "a cookie is never replayed to whoever retries, unless configured"
        );
        assert_eq!(
            replay
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        assert_eq!(test::read_body(replay).await, first_body);
    }
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn same_key_with_another_payload_is_refused_with_422() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;
    test::call_service(&app, keyed("/orders", "k", r#"{"a":1}"#).to_request()).await;

    let reused = test::call_service(&app, keyed("/orders", "k", r#"{"a":2}"#).to_request()).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..])
    );
    let problem = json_of(reused).await;
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("#payload-mismatch")),
        "{problem}"
    );
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn same_key_on_another_path_or_method_is_another_operation() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;
    test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    let other_path = test::call_service(&app, keyed("/notes", "k", "{}").to_request()).await;
    assert_eq!(other_path.status(), StatusCode::CREATED);
    assert!(other_path.headers().get(REPLAYED_HEADER).is_none());
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn unstored_statuses_leave_the_key_free() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;
    let failed = test::call_service(&app, keyed("/flaky", "k", "").to_request()).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retried = test::call_service(&app, keyed("/flaky", "k", "").to_request()).await;
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    assert!(retried.headers().get(REPLAYED_HEADER).is_none());
    let replayed = test::call_service(&app, keyed("/flaky", "k", "").to_request()).await;
    assert_eq!(replayed.status(), StatusCode::ACCEPTED);
    assert_eq!(test::read_body(replayed).await, "queued");
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn stored_statuses_are_configurable() {
    let runs = Runs::default();
    let app = app(default_builder().store_on_statuses([500]), &runs).await;
    test::call_service(&app, keyed("/flaky", "k", "").to_request()).await;
    let replayed = test::call_service(&app, keyed("/flaky", "k", "").to_request()).await;
    assert_eq!(replayed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        replayed
            .headers()
            .get(REPLAYED_HEADER)
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn replay_status_can_be_fixed_like_the_python_package() {
    let runs = Runs::default();
    let builder = default_builder().replay_status(ReplayStatus::Fixed(StatusCode::CONFLICT));
    let app = app(builder, &runs).await;
    let first = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert_eq!(replay.status(), StatusCode::CONFLICT);
    assert_eq!(json_of(replay).await["run"], 1);
}

#[actix_rt::test]
async fn callers_with_different_authorization_never_share_records() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;
    let alice = keyed("/orders", "k", "{}").insert_header((header::AUTHORIZATION, "Bearer alice"));
    let bob = keyed("/orders", "k", "{}").insert_header((header::AUTHORIZATION, "Bearer bob"));
    let for_alice = test::call_service(&app, alice.to_request()).await;
    let for_bob = test::call_service(&app, bob.to_request()).await;
    assert!(
        for_bob.headers().get(REPLAYED_HEADER).is_none(),
        "bob must not get alice's response"
    );
    assert_eq!(json_of(for_alice).await["run"], 1);
    assert_eq!(json_of(for_bob).await["run"], 2);
}

#[actix_rt::test]
async fn custom_scope_closure_decides_who_shares_keys() {
    let runs = Runs::default();
    let tenant = |req: &actix_web::HttpRequest| {
        req.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let app = app(default_builder().caller_scope(tenant), &runs).await;
    let send = |tenant: &'static str, auth: &'static str| {
        keyed("/orders", "k", "{}")
            .insert_header(("x-tenant", tenant))
            .insert_header((header::AUTHORIZATION, auth))
            .to_request()
    };
    test::call_service(&app, send("t1", "Bearer a")).await;
    let same_tenant = test::call_service(&app, send("t1", "Bearer b")).await;
    assert_eq!(
        same_tenant
            .headers()
            .get(REPLAYED_HEADER)
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let other_tenant = test::call_service(&app, send("t2", "Bearer a")).await;
    assert!(other_tenant.headers().get(REPLAYED_HEADER).is_none());
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn oversized_request_body_is_refused_before_the_handler() {
    let runs = Runs::default();
    let app = app(default_builder().request_body_limit(8), &runs).await;
    let response = test::call_service(&app, keyed("/orders", "k", "0123456789").to_request()).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json_of(response).await["type"]
        .as_str()
        .is_some_and(|t| t.ends_with("#body-too-large")));
    assert_eq!(runs.count(), 0);
    // Nothing was reserved: a body within the limit runs.
    let fits = test::call_service(&app, keyed("/orders", "k", "01").to_request()).await;
    assert_eq!(fits.status(), StatusCode::CREATED);
}

#[actix_rt::test]
async fn oversized_response_is_sent_but_retries_get_not_replayable() {
    let runs = Runs::default();
    let app = app(default_builder().response_body_limit(1024), &runs).await;
    let first = test::call_service(&app, keyed("/big", "k", "").to_request()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(test::read_body(first).await.len(), 4096);
    let retry = test::call_service(&app, keyed("/big", "k", "").to_request()).await;
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert!(json_of(retry).await["type"]
        .as_str()
        .is_some_and(|t| t.ends_with("#response-not-replayable")));
    assert_eq!(runs.count(), 1, "the side effect must not run again");
}

#[actix_rt::test]
async fn streamed_responses_are_captured_and_replayed() {
    let runs = Runs::default();
    let app = app(default_builder(), &runs).await;
    let first = test::call_service(&app, keyed("/stream", "k", "").to_request()).await;
    assert_eq!(test::read_body(first).await, "1-0;1-1;1-2;");
    let replay = test::call_service(&app, keyed("/stream", "k", "").to_request()).await;
    assert_eq!(
        replay.headers().get(REPLAYED_HEADER).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(test::read_body(replay).await, "1-0;1-1;1-2;");
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn streamed_response_over_the_limit_reaches_the_client_whole() {
    let runs = Runs::default();
    let app = app(default_builder().response_body_limit(5), &runs).await;
    let first = test::call_service(&app, keyed("/stream", "k", "").to_request()).await;
    assert_eq!(test::read_body(first).await, "1-0;1-1;1-2;");
    let retry = test::call_service(&app, keyed("/stream", "k", "").to_request()).await;
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn records_expire_after_their_ttl_and_replays_do_not_extend_it() {
    let runs = Runs::default();
    let builder = default_builder()
        .record_ttl(Duration::from_millis(1200))
        .reservation_lease(Duration::from_millis(600));
    let app = app(builder, &runs).await;
    test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    actix_rt::time::sleep(Duration::from_millis(700)).await;
    let replay = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert_eq!(
        replay.headers().get(REPLAYED_HEADER).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    actix_rt::time::sleep(Duration::from_millis(1000)).await;
    let after_ttl = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert!(
        after_ttl.headers().get(REPLAYED_HEADER).is_none(),
        "the replay must not extend the TTL"
    );
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn safe_methods_are_never_stored() {
    let runs = Runs::default();
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .app_data(web::Data::new(runs.clone()))
            .route(
                "/things",
                web::get().to(|runs: web::Data<Runs>| async move {
                    HttpResponse::Ok().body(runs.record().to_string())
                }),
            ),
    )
    .await;
    for expected in ["1", "2"] {
        let request = test::TestRequest::get()
            .uri("/things")
            .insert_header(("Idempotency-Key", "k"));
        let response = test::call_service(&app, request.to_request()).await;
        assert!(response.headers().get(REPLAYED_HEADER).is_none());
        assert_eq!(test::read_body(response).await, expected);
    }
}

#[actix_rt::test]
async fn telemetry_headers_are_added_when_enabled() {
    let runs = Runs::default();
    let app = app(default_builder().timing_headers(true), &runs).await;
    let response = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    let duration = response
        .headers()
        .get("x-request-duration-ms")
        .and_then(|v| v.to_str().ok());
    let start = response
        .headers()
        .get("x-request-start-time")
        .and_then(|v| v.to_str().ok());
    assert!(
        duration
            .and_then(|d| d.parse::<f64>().ok())
            .is_some_and(|d| d >= 0.0),
        "{duration:?}"
    );
    assert!(
        start
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|s| s > 1.7e9),
        "{start:?}"
    );
    // Also on the answers the enforce-mode default gives unannotated handlers.
    let refused = idempotency_actix_workspace::respond(
        &app,
        test::TestRequest::post().uri("/notes").to_request(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.header("x-request-duration-ms").is_some());
    let without = app_without_telemetry(&runs).await;
    let plain = test::call_service(&without, keyed("/orders", "k2", "{}").to_request()).await;
    assert!(plain.headers().get("x-request-duration-ms").is_none());
}

async fn app_without_telemetry(
    runs: &Runs,
) -> impl Service<
    actix_http::Request,
    Response = ServiceResponse<impl MessageBody>,
    Error = actix_web::Error,
> {
    app(default_builder(), runs).await
}

#[actix_rt::test]
async fn set_cookie_is_replayed_only_when_configured() {
    let runs = Runs::default();
    let app = app(default_builder().replay_set_cookie(true), &runs).await;
    let first = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = test::call_service(&app, keyed("/orders", "k", "{}").to_request()).await;
    assert_eq!(
        replay
            .headers()
            .get(header::SET_COOKIE)
            .map(|v| v.as_bytes()),
        Some(&b"session=abc"[..])
    );
    assert_eq!(runs.count(), 1);
}
