//! The four handler attributes, both modes, hand-registered routes, and misconfiguration.

use std::{future::Future, time::Duration};

use actix_service::{IntoServiceFactory, ServiceFactory};
use actix_web::{dev::AppConfig, http::StatusCode, post, test, web, App, HttpResponse};
use idempotency_actix::{
    idempotency_exempt, idempotency_manual, idempotent,
    storage::{CompletedRecord, Completion, KeyState, Renewal, Reservation, ReservationToken},
    Fingerprint, IdempotencyMiddleware, IdempotencyPolicy, IdempotencyStore, ManualIdempotency,
    MemoryStore, Mode, StoreError, StoreOutage,
};
use idempotency_actix_workspace::{respond, start_up_error, Received, Runs};

#[idempotent]
#[post("/required")]
async fn required(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

#[idempotent(optional)]
#[post("/optional")]
async fn optional(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

#[idempotency_exempt]
#[post("/exempt")]
async fn exempt(runs: web::Data<Runs>, body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok().body(format!(
        "{} {}",
        runs.record(),
        String::from_utf8_lossy(&body)
    ))
}

#[idempotency_manual]
#[post("/manual")]
async fn manual(runs: web::Data<Runs>, idempotency: ManualIdempotency) -> HttpResponse {
    let run = runs.record();
    let prior = idempotency.prior_response().map(|prior| {
        format!(
            "{} {} {}",
            prior.status().as_u16(),
            prior
                .headers()
                .get("x-run")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            String::from_utf8_lossy(prior.body())
        )
    });
    HttpResponse::Created()
        .insert_header(("x-run", run.to_string()))
        .body(format!(
            "run={run} key={} exists={} prior={}",
            idempotency.key(),
            idempotency.key_exists(),
            prior.unwrap_or_else(|| "none".to_owned())
        ))
}

#[idempotent(store = "payments")]
#[post("/payments")]
async fn payments(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

/// No attribute; in enforce mode the default settles the key right after routing.
#[post("/plain")]
async fn plain(runs: web::Data<Runs>, _body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(runs.record().to_string())
}

#[post("/plain-manual-extractor")]
async fn plain_with_manual_extractor(_idempotency: ManualIdempotency) -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn configure(runs: &Runs) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |config| {
        config
            .app_data(web::Data::new(runs.clone()))
            .service(required)
            .service(optional)
            .service(exempt)
            .service(manual)
            .service(plain)
            .service(plain_with_manual_extractor)
            .service(
                web::resource("/by-hand/resource")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(|runs: web::Data<Runs>| async move {
                        HttpResponse::Created().body(runs.record().to_string())
                    })),
            )
            .route(
                "/by-hand/exempt",
                web::post()
                    .to(|runs: web::Data<Runs>| async move {
                        HttpResponse::Ok().body(runs.record().to_string())
                    })
                    .wrap(IdempotencyPolicy::exempt()),
            )
            .route(
                "/by-hand/optional",
                web::post()
                    .to(|runs: web::Data<Runs>| async move {
                        HttpResponse::Ok().body(runs.record().to_string())
                    })
                    .wrap(IdempotencyPolicy::optional()),
            );
    }
}

/// Sends each request in turn to one app in the given mode and returns what the client got.
async fn exchange(mode: Mode, runs: &Runs, requests: Vec<test::TestRequest>) -> Vec<Received> {
    let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .mode(mode)
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let app = test::init_service(App::new().wrap(middleware).configure(configure(runs))).await;
    let mut received = Vec::new();
    for request in requests {
        received.push(respond(&app, request.to_request()).await);
    }
    received
}

fn post_to(path: &str) -> test::TestRequest {
    test::TestRequest::post().uri(path)
}

fn keyed(path: &str, key: &str) -> test::TestRequest {
    post_to(path).insert_header(("Idempotency-Key", key.to_owned()))
}

fn slug(received: &Received) -> Option<String> {
    received
        .problem_type()
        .and_then(|t| t.rsplit('#').next().map(str::to_owned))
}

#[actix_rt::test]
async fn enforce_mode_requires_a_key_on_unannotated_handlers() {
    let runs = Runs::default();
    let got = exchange(
        Mode::Enforce,
        &runs,
        vec![
            post_to("/plain"),
            keyed("/plain", "k"),
            keyed("/plain", "k"),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::BAD_REQUEST);
    assert_eq!(slug(&got[0]).as_deref(), Some("missing-key"));
    assert_eq!(got[1].status, StatusCode::CREATED);
    assert!(got[2].is_replay());
    assert_eq!(got[2].body, got[1].body);
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn exempt_handler_runs_every_time_with_or_without_a_key() {
    for mode in [Mode::Enforce, Mode::OptIn] {
        let runs = Runs::default();
        let got = exchange(
            mode,
            &runs,
            vec![
                post_to("/exempt").set_payload("first"),
                keyed("/exempt", "k").set_payload("second"),
                keyed("/exempt", "k").set_payload("third"),
            ],
        )
        .await;
        assert!(
            got.iter()
                .all(|r| r.status == StatusCode::OK && !r.is_replay()),
            "{mode:?}"
        );
        // Each run read its own request's body, keyed or not.
        let bodies: Vec<_> = got.iter().map(|r| r.body.clone()).collect();
        assert_eq!(bodies, ["1 first", "2 second", "3 third"], "{mode:?}");
        assert_eq!(runs.count(), 3, "{mode:?}");
    }
}

#[actix_rt::test]
async fn idempotent_handler_requires_a_key_in_both_modes() {
    for mode in [Mode::Enforce, Mode::OptIn] {
        let runs = Runs::default();
        let got = exchange(
            mode,
            &runs,
            vec![
                post_to("/required"),
                keyed("/required", "k"),
                keyed("/required", "k"),
            ],
        )
        .await;
        assert_eq!(got[0].status, StatusCode::BAD_REQUEST, "{mode:?}");
        assert!(!got[1].is_replay() && got[2].is_replay(), "{mode:?}");
        assert_eq!(runs.count(), 1, "{mode:?}");
    }
}

#[actix_rt::test]
async fn optional_handler_runs_every_time_without_a_key_and_once_with_one() {
    let runs = Runs::default();
    let got = exchange(
        Mode::Enforce,
        &runs,
        vec![
            post_to("/optional"),
            post_to("/optional"),
            keyed("/optional", "k"),
            keyed("/optional", "k"),
        ],
    )
    .await;
    assert_eq!(got[0].body, "1");
    assert_eq!(got[1].body, "2");
    assert!(!got[1].is_replay());
    assert_eq!(got[2].body, "3");
    assert!(got[3].is_replay());
    assert_eq!(got[3].body, "3");
    assert_eq!(runs.count(), 3);
}

#[actix_rt::test]
async fn exempt_mode_leaves_unannotated_handlers_alone() {
    let runs = Runs::default();
    let got = exchange(
        Mode::OptIn,
        &runs,
        vec![
            post_to("/plain"),
            keyed("/plain", "k"),
            keyed("/plain", "k"),
        ],
    )
    .await;
    assert!(got
        .iter()
        .all(|r| r.status == StatusCode::CREATED && !r.is_replay()));
    assert_eq!(runs.count(), 3);
}

#[actix_rt::test]
async fn manual_handler_sees_whether_the_key_exists_and_the_prior_response() {
    let runs = Runs::default();
    let got = exchange(
        Mode::OptIn,
        &runs,
        vec![
            post_to("/manual"),
            keyed("/manual", "m"),
            keyed("/manual", "m"),
            keyed("/manual", "m"),
        ],
    )
    .await;
    assert_eq!(
        got[0].status,
        StatusCode::BAD_REQUEST,
        "manual mode requires a key"
    );
    assert_eq!(got[1].body, "run=1 key=m exists=false prior=none");
    assert_eq!(
        got[2].body,
        "run=2 key=m exists=true prior=201 1 run=1 key=m exists=false prior=none"
    );
    assert!(!got[2].is_replay(), "the manual handler answers itself");
    // The second run's response did not overwrite the first one.
    assert_eq!(
        got[3].body,
        "run=3 key=m exists=true prior=201 1 run=1 key=m exists=false prior=none"
    );
    assert_eq!(runs.count(), 3);
}

#[actix_rt::test]
async fn hand_registered_routes_take_the_same_policies() {
    let runs = Runs::default();
    let got = exchange(
        Mode::Enforce,
        &runs,
        vec![
            post_to("/by-hand/resource"),
            keyed("/by-hand/resource", "k"),
            keyed("/by-hand/resource", "k"),
            post_to("/by-hand/exempt"),
            post_to("/by-hand/optional"),
            keyed("/by-hand/optional", "o"),
            keyed("/by-hand/optional", "o"),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::BAD_REQUEST);
    assert!(got[2].is_replay());
    assert_eq!(
        got[3].status,
        StatusCode::OK,
        "exempt in enforce mode needs no key"
    );
    assert_eq!(got[4].status, StatusCode::OK);
    assert!(!got[5].is_replay() && got[6].is_replay());
    assert_eq!(runs.count(), 4);
}

#[actix_rt::test]
async fn a_policy_without_the_middleware_is_a_500_problem_not_a_silent_pass() {
    let runs = Runs::default();
    let app = test::init_service(App::new().configure(configure(&runs))).await;
    let received = respond(&app, keyed("/required", "k").to_request()).await;
    assert_eq!(received.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(slug(&received).as_deref(), Some("misconfigured"));
    assert_eq!(runs.count(), 0);
}

#[actix_rt::test]
async fn manual_extractor_outside_a_manual_handler_is_a_typed_error() {
    let runs = Runs::default();
    let got = exchange(
        Mode::OptIn,
        &runs,
        vec![keyed("/plain-manual-extractor", "k")],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(slug(&got[0]).as_deref(), Some("misconfigured"));
}

#[actix_rt::test]
async fn a_handler_can_use_a_named_store() {
    let runs = Runs::default();
    let payments_store = MemoryStore::builder().build();
    let first = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .named_store("payments", payments_store.clone())
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let app = test::init_service(
        App::new()
            .wrap(first)
            .app_data(web::Data::new(runs.clone()))
            .service(payments),
    )
    .await;
    assert_eq!(
        respond(&app, keyed("/payments", "p").to_request())
            .await
            .status,
        StatusCode::CREATED
    );

    // Another app whose *default* store is the same one sees the record.
    let second = IdempotencyMiddleware::builder(payments_store)
        .named_store("payments", MemoryStore::builder().build())
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let other = test::init_service(
        App::new()
            .wrap(second)
            .app_data(web::Data::new(runs.clone()))
            .service(
                web::resource("/payments")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(HttpResponse::Gone)),
            ),
    )
    .await;
    let replay = respond(&other, keyed("/payments", "p").to_request()).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, "1");
}

#[actix_rt::test]
async fn an_unknown_store_name_fails_at_start_up() {
    let middleware = IdempotencyMiddleware::new(MemoryStore::builder().build());
    let app = App::new().wrap(middleware).service(
        web::resource("/x")
            .wrap(IdempotencyPolicy::required().store("no-such-store-anywhere"))
            .route(web::post().to(HttpResponse::Ok)),
    );
    let app = app.into_factory().new_service(AppConfig::default()).await;
    assert!(app.is_err(), "the app must refuse to start");

    // A real server's error names the store.
    let idempotency = IdempotencyMiddleware::new(MemoryStore::builder().build());
    let refused = start_up_error(1, move || {
        App::new().wrap(idempotency.clone()).service(
            web::resource("/x")
                .wrap(IdempotencyPolicy::required().store("no-such-store-anywhere"))
                .route(web::post().to(HttpResponse::Ok)),
        )
    })
    .unwrap_or_else(|| panic!("the server must refuse to start"));
    assert!(
        refused.to_string().contains("`no-such-store-anywhere`"),
        "{refused}"
    );
}

/// A store whose backend is always down.
#[derive(Debug, Clone, Copy)]
struct DownStore;

fn down() -> StoreError {
    StoreError::Backend("connection refused".into())
}

impl IdempotencyStore for DownStore {
    fn reserve(
        &self,
        _: &str,
        _: ReservationToken,
        _: Fingerprint,
        _: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        std::future::ready(Err(down()))
    }

    fn renew(
        &self,
        _: &str,
        _: ReservationToken,
        _: Fingerprint,
        _: Duration,
    ) -> impl Future<Output = Result<Renewal, StoreError>> {
        std::future::ready(Err(down()))
    }

    fn complete(
        &self,
        _: &str,
        _: ReservationToken,
        _: CompletedRecord,
        _: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> {
        std::future::ready(Err(down()))
    }

    fn release(
        &self,
        _: &str,
        _: ReservationToken,
    ) -> impl Future<Output = Result<(), StoreError>> {
        std::future::ready(Err(down()))
    }
    fn inspect(&self, _: &str) -> impl Future<Output = Result<Option<KeyState>, StoreError>> {
        std::future::ready(Err(down()))
    }

    fn purge(&self, _: &str) -> impl Future<Output = Result<bool, StoreError>> {
        std::future::ready(Err(down()))
    }
}

#[actix_rt::test]
async fn store_outage_fails_closed_with_503_by_default_and_open_when_configured() {
    let runs = Runs::default();
    let closed = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(DownStore))
            .configure(configure(&runs)),
    )
    .await;
    let refused = respond(&closed, keyed("/required", "k").to_request()).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(slug(&refused).as_deref(), Some("store-unavailable"));
    assert!(refused.header("retry-after").is_some());
    assert_eq!(runs.count(), 0);

    let open = IdempotencyMiddleware::builder(DownStore)
        .store_outage(StoreOutage::FailOpen)
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let open = test::init_service(App::new().wrap(open).configure(configure(&runs))).await;
    let ran = respond(&open, keyed("/required", "k").to_request()).await;
    assert_eq!(ran.status, StatusCode::CREATED);
    assert_eq!(runs.count(), 1);
}

/// An enforce-mode app with one route at `path` that requires a key.
async fn required_route_app(
    path: &str,
    runs: &Runs,
    route: actix_web::Route,
) -> impl actix_web::dev::Service<
    actix_http::Request,
    Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
    Error = actix_web::Error,
> {
    test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .app_data(web::Data::new(runs.clone()))
            .service(
                web::resource(path)
                    .wrap(IdempotencyPolicy::required())
                    .route(route),
            ),
    )
    .await
}

#[actix_rt::test]
async fn a_panicking_handler_frees_its_key() {
    let runs = Runs::default();
    let app = required_route_app(
        "/explode",
        &runs,
        web::post().to(|runs: web::Data<Runs>| async move {
            if runs.record() == 1 {
                panic!("the first run blows up");
            }
            HttpResponse::Created().body("second time lucky")
        }),
    )
    .await;
    let first = respond(&app, keyed("/explode", "k").to_request()).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    // The key is freed in the background; give that task a turn.
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    let retry = respond(&app, keyed("/explode", "k").to_request()).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn a_cancelled_request_still_completes_and_its_retry_gets_the_replay() {
    let runs = Runs::default();
    let app = required_route_app(
        "/slow",
        &runs,
        web::post().to(|runs: web::Data<Runs>| async move {
            actix_rt::time::sleep(Duration::from_millis(100)).await;
            HttpResponse::Created().body(runs.record().to_string())
        }),
    )
    .await;
    // An outer timeout (or a reset HTTP/2 stream) drops the request's future mid-handler.
    let cancelled = actix_rt::time::timeout(
        Duration::from_millis(20),
        actix_web::dev::Service::call(&app, keyed("/slow", "k").to_request()),
    )
    .await;
    assert!(cancelled.is_err(), "the first attempt must be cut off");
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    let retry = respond(&app, keyed("/slow", "k").to_request()).await;
    assert!(
        retry.is_replay(),
        "the handler ran to completion and its response was stored"
    );
    assert_eq!(retry.body, "1");
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn non_standard_methods_are_unsafe_and_need_a_key_in_enforce_mode() {
    let runs = Runs::default();
    let propfind =
        actix_web::http::Method::from_bytes(b"PROPFIND").unwrap_or_else(|e| panic!("{e}"));
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .app_data(web::Data::new(runs.clone()))
            .route(
                "/dav",
                web::method(propfind.clone()).to(
                    |runs: web::Data<Runs>, _body: web::Bytes| async move {
                        HttpResponse::MultiStatus().body(runs.record().to_string())
                    },
                ),
            ),
    )
    .await;
    let without_key = test::TestRequest::default()
        .method(propfind.clone())
        .uri("/dav");
    assert_eq!(
        respond(&app, without_key.to_request()).await.status,
        StatusCode::BAD_REQUEST
    );
    let keyed_request = || {
        test::TestRequest::default()
            .method(propfind.clone())
            .uri("/dav")
            .insert_header(("Idempotency-Key", "d"))
            .to_request()
    };
    assert_eq!(
        respond(&app, keyed_request()).await.status,
        StatusCode::MULTI_STATUS
    );
    assert!(respond(&app, keyed_request()).await.is_replay());
    assert_eq!(runs.count(), 1);
}

/// A handler reads why it runs: with its key reserved, without a key on an optional route,
/// with an existing key in manual mode, or unprotected while the store is down (fail-open).
#[actix_rt::test]
async fn handlers_read_why_they_run() {
    use idempotency_actix::{IdempotencyOutcome, StoreOutage};
    use idempotency_actix_workspace::faulty::FaultyStore;

    async fn why(outcome: IdempotencyOutcome) -> HttpResponse {
        HttpResponse::Created().body(format!("{outcome:?}"))
    }
    let (store, faults) = FaultyStore::new();
    let app = test::init_service(
        App::new()
            .wrap(
                IdempotencyMiddleware::builder(store)
                    .store_outage(StoreOutage::FailOpen)
                    .build()
                    .unwrap_or_else(|e| panic!("config: {e}")),
            )
            .service(
                web::resource("/required")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(why)),
            )
            .service(
                web::resource("/optional")
                    .wrap(IdempotencyPolicy::optional())
                    .route(web::post().to(why)),
            )
            .service(
                web::resource("/manual")
                    .wrap(IdempotencyPolicy::manual())
                    .route(web::post().to(why)),
            ),
    )
    .await;
    let post = |path: &str, key: Option<&str>| {
        let mut request = test::TestRequest::post().uri(path);
        if let Some(key) = key {
            request = request.insert_header(("Idempotency-Key", key.to_owned()));
        }
        request.to_request()
    };
    let body = |received: Received| String::from_utf8_lossy(&received.body).into_owned();

    assert_eq!(
        body(respond(&app, post("/required", Some("a"))).await),
        "Fresh"
    );
    assert_eq!(
        body(respond(&app, post("/optional", None)).await),
        "Unkeyed"
    );
    assert_eq!(
        body(respond(&app, post("/manual", Some("m"))).await),
        "Fresh"
    );
    assert_eq!(
        body(respond(&app, post("/manual", Some("m"))).await),
        "Existing"
    );
    faults
        .reservations_answered_with_error
        .store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        body(respond(&app, post("/required", Some("b"))).await),
        "Unprotected"
    );
}
