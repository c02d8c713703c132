//! Authentication on the route itself: the route attribute's `wrap =` (one or two), a resource's
//! `wrap` and a route's `wrap`, registered inside or outside the route's policy, with the
//! extension scope and the default `Authorization` scope, in both modes, on a real server.
//!
//! Each route must keep callers apart: an unauthenticated retry never gets a replay, bob never
//! gets alice's response, alice gets her own replay; or, where the layout cannot scope callers,
//! keyed requests are refused (500 `misconfigured`). Never a leak.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::{header::AUTHORIZATION, StatusCode},
    middleware::{from_fn, Logger, Next},
    post, web, App, Error, HttpMessage, HttpRequest, HttpResponse,
};
use idempotency_actix::{
    idempotent, ExtensionScope, IdempotencyMiddleware, IdempotencyPolicy, MemoryStore, Mode,
};
use idempotency_actix_workspace::{received, work::fresh_client, Received, TestServer};

/// Who the authentication middleware says the caller is.
#[derive(Debug, Clone)]
struct User(String);

/// `Authorization: Bearer NAME` is the user NAME; anything else is refused with 401. Written
/// with `from_fn`, as most services write it now: it defers calling the route.
async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    actix_web::rt::task::yield_now().await;
    let name = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(name) = name else {
        let refused = HttpResponse::Unauthorized().body("who are you?");
        return Ok(req.into_response(refused).map_into_right_body());
    };
    req.extensions_mut().insert(User(name));
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// How many times each route's handler ran.
#[derive(Debug, Clone, Default)]
struct Tally(Arc<Mutex<HashMap<String, usize>>>);

impl Tally {
    fn record(&self, route: &str) -> usize {
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = runs.entry(route.to_owned()).or_default();
        *count += 1;
        *count
    }

    fn count(&self, route: &str) -> usize {
        let runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        runs.get(route).copied().unwrap_or(0)
    }
}

/// The payment every route makes: it reads no body, as capture and confirm endpoints do.
fn payment(req: &HttpRequest, user: &User, tally: &Tally) -> HttpResponse {
    let route = req.match_pattern().unwrap_or_default();
    let run = tally.record(&route);
    HttpResponse::Created().body(format!("payment {run} for {}", user.0))
}

async fn pay(req: HttpRequest, user: web::ReqData<User>, tally: web::Data<Tally>) -> HttpResponse {
    payment(&req, &user, &tally)
}

#[idempotent]
#[post("/attribute-one-wrap", wrap = "from_fn(authenticate)")]
async fn attribute_one_wrap(
    req: HttpRequest,
    user: web::ReqData<User>,
    tally: web::Data<Tally>,
) -> HttpResponse {
    payment(&req, &user, &tally)
}

#[idempotent]
#[post(
    "/attribute-two-wraps",
    wrap = "from_fn(authenticate)",
    wrap = "Logger::default()"
)]
async fn attribute_two_wraps(
    req: HttpRequest,
    user: web::ReqData<User>,
    tally: web::Data<Tally>,
) -> HttpResponse {
    payment(&req, &user, &tally)
}

#[idempotent]
#[post(
    "/attribute-two-wraps-reversed",
    wrap = "Logger::default()",
    wrap = "from_fn(authenticate)"
)]
async fn attribute_two_wraps_reversed(
    req: HttpRequest,
    user: web::ReqData<User>,
    tally: web::Data<Tally>,
) -> HttpResponse {
    payment(&req, &user, &tally)
}

/// No policy: in enforce mode the default settles it.
#[post("/unmarked", wrap = "from_fn(authenticate)")]
async fn unmarked(
    req: HttpRequest,
    user: web::ReqData<User>,
    tally: web::Data<Tally>,
) -> HttpResponse {
    payment(&req, &user, &tally)
}

fn routes(config: &mut web::ServiceConfig) {
    config
        .service(attribute_one_wrap)
        .service(attribute_two_wraps)
        .service(attribute_two_wraps_reversed)
        .service(unmarked)
        .service(
            // The policy registered first: innermost, after the authentication.
            web::resource("/resource-policy-inside")
                .wrap(IdempotencyPolicy::required())
                .wrap(from_fn(authenticate))
                .route(web::post().to(pay)),
        )
        .service(
            // The policy registered last: outermost, before the authentication.
            web::resource("/resource-policy-outside")
                .wrap(from_fn(authenticate))
                .wrap(IdempotencyPolicy::required())
                .route(web::post().to(pay)),
        )
        .route(
            "/route-wrap",
            web::post()
                .to(pay)
                .wrap(IdempotencyPolicy::required())
                .wrap(from_fn(authenticate)),
        );
}

/// What a route must give the four requests of [`exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Each caller's operation runs once; retries are replayed to their own caller only.
    OncePerCaller,
    /// No idempotency on this route: every request runs.
    EveryTime,
    /// The layout cannot scope callers, so keyed requests are refused from the first one whose
    /// scope changed after its key was settled.
    RefusedLoudly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `ExtensionScope` over the user the authentication inserted.
    Extension,
    /// The default: the `Authorization` header.
    Authorization,
}

fn expected(route: &str, scope: Scope, mode: Mode) -> Expect {
    match (route, scope, mode) {
        ("/unmarked", _, Mode::OptIn) => Expect::EveryTime,
        ("/unmarked" | "/resource-policy-outside", Scope::Extension, _) => Expect::RefusedLoudly,
        _ => Expect::OncePerCaller,
    }
}

const ROUTES: [&str; 7] = [
    "/attribute-one-wrap",
    "/attribute-two-wraps",
    "/attribute-two-wraps-reversed",
    "/unmarked",
    "/resource-policy-inside",
    "/resource-policy-outside",
    "/route-wrap",
];

async fn send(url: &str, caller: Option<&str>) -> Received {
    let mut request = fresh_client()
        .post(url)
        .header("Idempotency-Key", "pay-1")
        .header("content-type", "application/json")
        .body("{\"amount\":100}");
    if let Some(caller) = caller {
        request = request.header(AUTHORIZATION.as_str(), format!("Bearer {caller}"));
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    received(response).await
}

fn is_misconfigured(answer: &Received) -> bool {
    answer.status == StatusCode::INTERNAL_SERVER_ERROR
        && answer
            .problem_type()
            .is_some_and(|t| t.ends_with("#misconfigured"))
}

/// alice pays, a caller without credentials retries her key, bob uses the same key and body,
/// alice retries.
async fn exchange(server: &TestServer, route: &str, tally: &Tally, expect: Expect, case: &str) {
    let url = server.url(route);
    let alice = send(&url, Some("alice")).await;
    let anonymous = send(&url, None).await;
    let bob = send(&url, Some("bob")).await;
    let alice_again = send(&url, Some("alice")).await;
    let is_fresh = |answer: &Received, body: &str| {
        answer.status == StatusCode::CREATED && !answer.is_replay() && answer.body == body
    };
    for answer in [&anonymous, &bob] {
        assert!(
            !answer.body.windows(5).any(|w| w == b"alice"),
            "{case}: another caller got alice's response: {answer:?}"
        );
    }
    assert!(is_fresh(&alice, "payment 1 for alice"), "{case}: {alice:?}");
    assert!(
        anonymous.status == StatusCode::UNAUTHORIZED
            || (expect == Expect::RefusedLoudly && is_misconfigured(&anonymous)),
        "{case}: no replay before authentication: {anonymous:?}"
    );
    match expect {
        Expect::OncePerCaller => {
            assert!(is_fresh(&bob, "payment 2 for bob"), "{case}: {bob:?}");
            assert!(alice_again.is_replay(), "{case}: {alice_again:?}");
            assert_eq!(alice_again.body, alice.body, "{case}");
            assert_eq!(tally.count(route), 2, "{case}");
        }
        Expect::EveryTime => {
            assert!(is_fresh(&bob, "payment 2 for bob"), "{case}: {bob:?}");
            assert!(
                is_fresh(&alice_again, "payment 3 for alice"),
                "{case}: {alice_again:?}"
            );
            assert_eq!(tally.count(route), 3, "{case}");
        }
        Expect::RefusedLoudly => {
            for refused in [&bob, &alice_again] {
                assert!(is_misconfigured(refused), "{case}: {refused:?}");
            }
            assert_eq!(tally.count(route), 1, "{case}");
        }
    }
}

#[actix_rt::test]
async fn route_level_authentication_runs_before_any_replay_whatever_the_order() {
    for scope in [Scope::Extension, Scope::Authorization] {
        for mode in [Mode::Enforce, Mode::OptIn] {
            let builder = IdempotencyMiddleware::builder(MemoryStore::builder().build()).mode(mode);
            let builder = match scope {
                Scope::Extension => {
                    builder.caller_scope(ExtensionScope::new(|user: &User| user.0.clone()))
                }
                Scope::Authorization => builder,
            };
            let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
            let tally = Tally::default();
            let data = web::Data::new(tally.clone());
            let server = TestServer::start(1, move || {
                App::new()
                    .wrap(middleware.clone())
                    .app_data(data.clone())
                    .configure(routes)
            })
            .unwrap_or_else(|e| panic!("server: {e}"));
            for route in ROUTES {
                let case = format!("{route}, {scope:?} scope, {mode:?}");
                exchange(&server, route, &tally, expected(route, scope, mode), &case).await;
            }
        }
    }
}
