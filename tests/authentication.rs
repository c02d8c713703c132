//! Authentication before idempotency: no replay, refusal or reservation before every
//! middleware on the route has run, and callers kept apart by a scope that sees who they are.
//!
//! The matrix: authentication at app level (outside or inside the idempotency middleware) or on
//! a `web::scope`, through `middleware::from_fn` (which defers routing) or a hand-written
//! `Transform` (which does not); a route with a policy or without; enforce and exempt mode.

use std::future::{ready, Ready};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform},
    http::StatusCode,
    middleware::{from_fn, Next},
    post, test, web, App, Error, HttpMessage, HttpResponse,
};
use futures_util::future::{Either, LocalBoxFuture};
use idempotency_actix::{
    idempotency_exempt, idempotency_manual, idempotent, ExtensionScope, IdempotencyMiddleware,
    IdempotencyPolicy, ManualIdempotency, MemoryStore, Mode,
};
use idempotency_actix_workspace::{respond, Received, Runs};

/// Who the authentication middleware says the caller is.
#[derive(Debug, Clone)]
struct User(String);

fn caller(req: &ServiceRequest) -> Option<User> {
    let name = req.headers().get("x-user")?.to_str().ok()?;
    Some(User(name.to_owned()))
}

/// Authentication as most services write it now: `from_fn`, which defers routing.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    actix_web::rt::task::yield_now().await;
    let Some(user) = caller(&req) else {
        let refused = HttpResponse::Unauthorized().body("who are you?");
        return Ok(req.into_response(refused).map_into_right_body());
    };
    req.extensions_mut().insert(user);
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Authentication as a hand-written middleware that calls through at once.
struct RequireUser;

impl<S, B> Transform<S, ServiceRequest> for RequireUser
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = RequireUserService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequireUserService { service }))
    }
}

struct RequireUserService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for RequireUserService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<
        LocalBoxFuture<'static, Result<Self::Response, Error>>,
        Ready<Result<Self::Response, Error>>,
    >;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let Some(user) = caller(&req) else {
            let refused = HttpResponse::Unauthorized().body("who are you?");
            return Either::Right(ready(Ok(req.into_response(refused).map_into_right_body())));
        };
        req.extensions_mut().insert(user);
        let routed = self.service.call(req);
        Either::Left(Box::pin(async move {
            routed.await.map(ServiceResponse::map_into_left_body)
        }))
    }
}

async fn pay(user: web::ReqData<User>, runs: web::Data<Runs>, _body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(format!("payment {} for {}", runs.record(), user.0))
}

/// `/pay` has no policy; `/pay-marked` carries what `#[idempotent]` attaches.
fn payments(config: &mut web::ServiceConfig) {
    config
        .service(web::resource("/pay").route(web::post().to(pay)))
        .service(
            web::resource("/pay-marked")
                .wrap(IdempotencyPolicy::required())
                .route(web::post().to(pay)),
        );
}

fn idempotency(mode: Mode) -> IdempotencyMiddleware {
    IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .mode(mode)
        .caller_scope(ExtensionScope::new(|user: &User| user.0.clone()))
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"))
}

/// What a layout must give the four requests of [`exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Each caller's operation runs once; retries are replayed to their own caller only.
    OncePerCaller,
    /// No idempotency on this route: every request runs.
    EveryTime,
    /// The layout cannot scope callers for this route, so keyed requests are refused (500
    /// `misconfigured`) from the first one whose scope changed after the middleware ran: before
    /// authentication, which would otherwise run after the key was settled.
    RefusedLoudly,
}

fn keyed(path: &str, user: Option<&str>) -> actix_http::Request {
    let mut request = test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", "pay-1"))
        .insert_header(("content-type", "application/json"))
        .set_payload("{\"amount\":100}");
    if let Some(user) = user {
        request = request.insert_header(("x-user", user));
    }
    request.to_request()
}

/// alice pays, a caller without credentials replays her key, bob uses the same key and body,
/// alice retries.
async fn exchange<S, B>(app: &S, path: &str, runs: &Runs, expect: Expect, case: &str)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody + 'static,
{
    let alice = respond(app, keyed(path, Some("alice"))).await;
    let anonymous = respond(app, keyed(path, None)).await;
    let bob = respond(app, keyed(path, Some("bob"))).await;
    let alice_again = respond(app, keyed(path, Some("alice"))).await;
    let is_fresh = |answer: &Received, body: &str| {
        answer.status == StatusCode::CREATED && !answer.is_replay() && answer.body == body
    };

    assert!(is_fresh(&alice, "payment 1 for alice"), "{case}: {alice:?}");
    let refused_for_the_layout = expect == Expect::RefusedLoudly && is_misconfigured(&anonymous);
    assert!(
        anonymous.status == StatusCode::UNAUTHORIZED || refused_for_the_layout,
        "{case}: authentication (or, where the layout cannot scope callers, the middleware) \
         answers before any replay: {anonymous:?}"
    );
    match expect {
        Expect::OncePerCaller => {
            assert!(is_fresh(&bob, "payment 2 for bob"), "{case}: {bob:?}");
            assert!(alice_again.is_replay(), "{case}: {alice_again:?}");
            assert_eq!(alice_again.body, alice.body, "{case}");
            assert_eq!(runs.count(), 2, "{case}");
        }
        Expect::EveryTime => {
            assert!(is_fresh(&bob, "payment 2 for bob"), "{case}: {bob:?}");
            assert!(
                is_fresh(&alice_again, "payment 3 for alice"),
                "{case}: {alice_again:?}"
            );
            assert_eq!(runs.count(), 3, "{case}");
        }
        Expect::RefusedLoudly => {
            for refused in [&bob, &alice_again] {
                assert_eq!(
                    refused.status,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "{case}: {refused:?}"
                );
                assert!(is_misconfigured(refused), "{case}: {refused:?}");
            }
            assert_eq!(runs.count(), 1, "{case}");
        }
    }
}

fn is_misconfigured(answer: &Received) -> bool {
    answer.status == StatusCode::INTERNAL_SERVER_ERROR
        && answer
            .problem_type()
            .is_some_and(|t| t.ends_with("#misconfigured"))
}

/// Where authentication sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `App::new().wrap(idempotency).wrap(auth)`: authentication runs first (the
    /// advice of `docs/modes-and-attributes.md`).
    AppOutside,
    /// `App::new().wrap(auth).wrap(idempotency)`: authentication runs between the
    /// idempotency middleware and the routes.
    AppInside,
    /// `App::new().wrap(idempotency)` and authentication on `web::scope("/api")`.
    Scope,
    /// As `Scope`, with the idempotency middleware registered on the scope as well, inside
    /// its authentication.
    ScopeAndInside,
}

fn expected(layout: Layout, marked: bool, mode: Mode) -> Expect {
    match (marked, mode, layout) {
        (true, _, _) => Expect::OncePerCaller,
        (false, Mode::OptIn, _) => Expect::EveryTime,
        (false, _, Layout::AppOutside | Layout::ScopeAndInside) => Expect::OncePerCaller,
        (false, _, Layout::AppInside | Layout::Scope) => Expect::RefusedLoudly,
    }
}

macro_rules! check {
    ($layout:ident, $auth:expr, $auth_name:expr) => {
        for mode in [Mode::Enforce, Mode::OptIn] {
            for marked in [true, false] {
                let runs = Runs::default();
                let idempotency = idempotency(mode);
                let data = web::Data::new(runs.clone());
                let route = if marked { "/pay-marked" } else { "/pay" };
                let case = format!("{:?}, {}, {mode:?}, {route}", Layout::$layout, $auth_name);
                let expect = expected(Layout::$layout, marked, mode);
                match Layout::$layout {
                    Layout::AppOutside => {
                        let app = test::init_service(
                            App::new()
                                .wrap(idempotency)
                                .wrap($auth)
                                .app_data(data)
                                .configure(payments),
                        )
                        .await;
                        exchange(&app, route, &runs, expect, &case).await;
                    }
                    Layout::AppInside => {
                        let app = test::init_service(
                            App::new()
                                .wrap($auth)
                                .wrap(idempotency)
                                .app_data(data)
                                .configure(payments),
                        )
                        .await;
                        exchange(&app, route, &runs, expect, &case).await;
                    }
                    Layout::Scope => {
                        let app = test::init_service(
                            App::new()
                                .wrap(idempotency)
                                .app_data(data)
                                .service(web::scope("/api").wrap($auth).configure(payments)),
                        )
                        .await;
                        let path = format!("/api{route}");
                        exchange(&app, &path, &runs, expect, &case).await;
                    }
                    Layout::ScopeAndInside => {
                        let app = test::init_service(
                            App::new().wrap(idempotency.clone()).app_data(data).service(
                                web::scope("/api")
                                    .wrap(idempotency)
                                    .wrap($auth)
                                    .configure(payments),
                            ),
                        )
                        .await;
                        let path = format!("/api{route}");
                        exchange(&app, &path, &runs, expect, &case).await;
                    }
                }
            }
        }
    };
}

#[actix_rt::test]
async fn authentication_with_from_fn_runs_before_any_replay_in_every_layout() {
    check!(AppOutside, from_fn(authenticate), "from_fn");
    check!(AppInside, from_fn(authenticate), "from_fn");
    check!(Scope, from_fn(authenticate), "from_fn");
    check!(ScopeAndInside, from_fn(authenticate), "from_fn");
}

#[actix_rt::test]
async fn authentication_as_a_transform_runs_before_any_replay_in_every_layout() {
    check!(AppOutside, RequireUser, "Transform");
    check!(AppInside, RequireUser, "Transform");
    check!(Scope, RequireUser, "Transform");
    check!(ScopeAndInside, RequireUser, "Transform");
}

/// Authentication that lets anonymous callers through, as public-and-private APIs do.
async fn identify_if_possible(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    actix_web::rt::task::yield_now().await;
    if let Some(user) = caller(&req) {
        req.extensions_mut().insert(user);
    }
    next.call(req).await
}

async fn pay_slowly(
    user: Option<web::ReqData<User>>,
    runs: web::Data<Runs>,
    _body: web::Bytes,
) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(std::time::Duration::from_millis(300)).await;
    let who = user.map_or_else(|| "nobody".to_owned(), |user| user.0.clone());
    HttpResponse::Created().body(format!("payment {run} for {who}"))
}

/// alice's request runs under the scope computed before her identity was known; an anonymous
/// caller waiting on the same key meanwhile must not be handed her response, and nobody gets
/// it later either.
#[actix_rt::test]
async fn a_scope_seen_too_early_never_hands_a_response_to_another_caller() {
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .caller_scope(ExtensionScope::new(|user: &User| user.0.clone()))
        .lock_timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let app = test::init_service(
        App::new()
            .wrap(from_fn(identify_if_possible))
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .route("/pay", web::post().to(pay_slowly)),
    )
    .await;
    let eve_later = async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
        respond(&app, keyed("/pay", None)).await
    };
    let (alice, eve) =
        futures_util::future::join(respond(&app, keyed("/pay", Some("alice"))), eve_later).await;
    let eve_again = respond(&app, keyed("/pay", None)).await;
    assert_eq!(alice.body, "payment 1 for alice", "{alice:?}");
    for answer in [&eve, &eve_again] {
        assert!(
            !answer.body.windows(5).any(|w| w == b"alice"),
            "another caller got alice's response: {answer:?}"
        );
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{answer:?}"
        );
    }
    assert_eq!(runs.count(), 1);
}

#[idempotent]
#[post("/required")]
async fn required_payment(user: web::ReqData<User>, runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(format!("payment {} for {}", runs.record(), user.0))
}

#[idempotent(optional)]
#[post("/optional")]
async fn optional_payment(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Created().body(format!("payment {}", runs.record()))
}

#[idempotency_exempt]
#[post("/exempt")]
async fn exempt_hook(runs: web::Data<Runs>) -> HttpResponse {
    HttpResponse::Ok().body(format!("hook {}", runs.record()))
}

#[idempotency_manual]
#[post("/manual")]
async fn manual_payment(manual: ManualIdempotency, runs: web::Data<Runs>) -> HttpResponse {
    runs.record();
    HttpResponse::Ok().body(format!("seen before: {}", manual.key_exists()))
}

/// The advice of `docs/modes-and-attributes.md` for a scope whose authentication defers: opt-in
/// mode, routes marked.
/// Every attribute keeps its meaning, and every key is settled after the authentication.
#[actix_rt::test]
async fn a_scope_whose_authentication_defers_keeps_every_attribute_in_opt_in_mode() {
    let runs = Runs::default();
    let app = test::init_service(
        App::new()
            .wrap(
                IdempotencyMiddleware::builder(MemoryStore::builder().build())
                    .mode(Mode::OptIn)
                    .build()
                    .unwrap_or_else(|e| panic!("config: {e}")),
            )
            .app_data(web::Data::new(runs.clone()))
            .service(
                web::scope("/api")
                    .wrap(from_fn(authenticate))
                    .service(required_payment)
                    .service(optional_payment)
                    .service(exempt_hook)
                    .service(manual_payment),
            ),
    )
    .await;
    let keyless = |path: &str| {
        test::TestRequest::post()
            .uri(path)
            .insert_header(("x-user", "alice"))
            .to_request()
    };
    let first = respond(&app, keyed("/api/required", Some("alice"))).await;
    let unauthenticated_retry = respond(&app, keyed("/api/required", None)).await;
    let retry = respond(&app, keyed("/api/required", Some("alice"))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(unauthenticated_retry.status, StatusCode::UNAUTHORIZED);
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, first.body);

    let optional = respond(&app, keyless("/api/optional")).await;
    let exempt = respond(&app, keyless("/api/exempt")).await;
    assert_eq!(optional.status, StatusCode::CREATED, "{optional:?}");
    assert_eq!(exempt.status, StatusCode::OK, "{exempt:?}");

    let manual_first = respond(&app, keyed("/api/manual", Some("alice"))).await;
    let manual_again = respond(&app, keyed("/api/manual", Some("alice"))).await;
    assert_eq!(manual_first.body, "seen before: false");
    assert_eq!(manual_again.body, "seen before: true");
    assert_eq!(runs.count(), 5);
}
