//! The app-level middleware: registered once with `App::wrap`.

use std::{
    future::{ready, Future, Ready},
    rc::Rc,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform},
    http::header::{HeaderMap, HeaderName, HeaderValue},
    Error, HttpMessage,
};
use futures_util::{
    future::{Either, LocalBoxFuture, MapOk},
    TryFutureExt,
};

use crate::{
    config::{Config, Mode},
    context::{is_safe, RequestFacts, RouteSlot},
    flow::{self, PendingRecord},
    unclaimed, IdempotencyMiddlewareBuilder, IdempotencyStore, MemoryStore,
};

/// The idempotency middleware, registered once on the app with [`App::wrap`](actix_web::App::wrap).
///
/// In [`Mode::Enforce`] every unsafe-method request needs a key unless its handler is
/// `#[idempotency_exempt]`; in [`Mode::OptIn`] only annotated handlers use keys.
///
/// Build it once, outside `HttpServer::new`, and clone it into the app factory: the clones
/// share one configuration and one store. (Built inside the factory, each worker gets its own
/// middleware; only a [`MemoryStore::default()`](crate::MemoryStore) store is still shared
/// then, because it is one store per process.)
///
/// **Ordering.** Register it *before* any other `wrap` (actix runs the first-registered
/// middleware innermost), and the middleware that authenticates after it. Routes with a policy
/// settle their key innermost on the route, after every middleware on it. In enforce mode, a
/// route without a policy is settled right after routing, before its handler runs, where this
/// middleware sits; its refusals and replays for such routes are the routed request's error,
/// which middleware registered outside it pass on. A middleware that defers its call (`from_fn`,
/// sessions) on a scope or inside this one hides the routes' policies from enforce mode: use
/// [`opt_in`](Self::opt_in) there. See [`IdempotencyPolicy`](crate::IdempotencyPolicy).
///
/// ```no_run
/// use actix_web::{middleware::Logger, post, web, App, HttpResponse, HttpServer};
/// use idempotency_actix::{idempotent, IdempotencyMiddleware, MemoryStore};
///
/// #[idempotent]
/// #[post("/orders")]
/// async fn create_order(body: web::Bytes) -> HttpResponse {
///     HttpResponse::Created().body(body)
/// }
///
/// #[actix_web::main]
/// async fn main() -> std::io::Result<()> {
///     let idempotency = IdempotencyMiddleware::new(MemoryStore::default());
///     HttpServer::new(move || {
///         App::new()
///             .wrap(idempotency.clone())
///             .wrap(Logger::default())
///             .service(create_order)
///     })
///     .bind("127.0.0.1:8080")?
///     .run()
///     .await
/// }
/// ```
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    config: Arc<Config>,
}

impl std::fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("mode", &self.config.mode)
            .field("header", &self.config.header)
            .finish_non_exhaustive()
    }
}

impl IdempotencyMiddleware {
    /// The middleware in enforce mode with every default, on `store`.
    pub fn new(store: impl IdempotencyStore) -> Self {
        Self::with_defaults(store, Mode::Enforce)
    }

    /// The middleware in opt-in mode (only annotated handlers use keys) with every default.
    pub fn opt_in(store: impl IdempotencyStore) -> Self {
        Self::with_defaults(store, Mode::OptIn)
    }

    /// The former name of [`opt_in`](Self::opt_in), easy to confuse with
    /// `#[idempotency_exempt]` (which turns keys off for one route).
    #[deprecated(since = "0.1.0", note = "renamed `IdempotencyMiddleware::opt_in`")]
    pub fn exempt(store: impl IdempotencyStore) -> Self {
        Self::opt_in(store)
    }

    /// A builder to configure the middleware; [`build`](IdempotencyMiddlewareBuilder::build)
    /// validates it.
    pub fn builder(store: impl IdempotencyStore) -> IdempotencyMiddlewareBuilder {
        IdempotencyMiddlewareBuilder::new(store)
    }

    #[allow(clippy::expect_used)] // start-up only; the defaults are covered by tests
    fn with_defaults(store: impl IdempotencyStore, mode: Mode) -> Self {
        Self::builder(store)
            .mode(mode)
            .build()
            .expect("the default configuration is valid")
    }

    pub(crate) fn from_config(config: Arc<Config>) -> Self {
        Self { config }
    }

    /// The configuration, shared (for [`IdempotencyAdmin`](crate::IdempotencyAdmin)).
    pub(crate) fn shared_config(&self) -> Arc<Config> {
        Arc::clone(&self.config)
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }
}

impl<S, B> Transform<S, ServiceRequest> for IdempotencyMiddleware
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = InnerIdempotencyMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        if let Err(why) = refuse_per_worker_stores(&self.config) {
            crate::startup::refuse_start(why.to_owned());
            return ready(Err(()));
        }
        ready(Ok(InnerIdempotencyMiddleware {
            service: Rc::new(service),
            config: Arc::clone(&self.config),
        }))
    }
}

/// Refuses to start a worker whose in-memory store was built by that worker: inside
/// `HttpServer::new`, whose closure runs once per worker, every worker would get a store of its
/// own and run each request once. (`MemoryStore::default()` is one store per process, so it is
/// never refused.)
fn refuse_per_worker_stores(config: &Config) -> Result<(), &'static str> {
    // actix-server runs each worker on an arbiter thread of its own, named after it.
    let on_a_worker = std::thread::current().name().is_some_and(|name| {
        name.starts_with("actix-rt|system:") || name.starts_with("actix-server worker")
    });
    let built_here = config.stores().any(|store| {
        store
            .as_any()
            .downcast_ref::<MemoryStore>()
            .is_some_and(MemoryStore::built_on_this_thread)
    });
    if on_a_worker && built_here {
        return Err(
            "a MemoryStore was built inside HttpServer::new, whose closure runs once per \
             worker: each worker would have its own store and run every request once. Build \
             the store (and the middleware) before HttpServer::new and clone them into the \
             closure, or use MemoryStore::default(), which is one store per process",
        );
    }
    Ok(())
}

type MapIntoLeft<B> = fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>;
type BoxedResponse<B> = LocalBoxFuture<'static, Result<ServiceResponse<EitherBody<B>>, Error>>;
/// A keyed request routed so that its work outlives it.
type Detached<B> = flow::Detached<ServiceResponse<EitherBody<B>>>;

/// The service behind [`IdempotencyMiddleware`](crate::IdempotencyMiddleware); not used directly.
#[derive(Debug)]
pub struct InnerIdempotencyMiddleware<S> {
    service: Rc<S>,
    config: Arc<Config>,
}

impl<S, B> Service<ServiceRequest> for InnerIdempotencyMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<MapOk<S::Future, MapIntoLeft<B>>, Either<Detached<B>, BoxedResponse<B>>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let telemetry = self.config.timing_headers.then(Telemetry::start);
        let untouched = self.route(req);
        let Some(started) = telemetry else {
            return untouched;
        };
        Either::Right(Either::Right(Box::pin(async move {
            match untouched.await {
                Ok(mut response) => {
                    started.stamp(response.headers_mut());
                    Ok(response)
                }
                Err(error) => {
                    if let Some(answered) = error.as_error::<unclaimed::Answered>() {
                        answered.edit_headers(|headers| started.stamp(headers));
                    }
                    Err(error)
                }
            }
        })))
    }
}

impl<S, B> InnerIdempotencyMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    /// Routes the request with a slot for its route's policy; in enforce mode, a request that
    /// no policy claimed while routing ran is settled by the default before anything is polled.
    fn route(&self, mut req: ServiceRequest) -> <Self as Service<ServiceRequest>>::Future {
        let pass_through: MapIntoLeft<B> = ServiceResponse::map_into_left_body;
        if is_safe(req.method()) {
            return Either::Left(self.service.call(req).map_ok(pass_through));
        }
        let outer = take_over_from_outer(&mut req);
        let slot = Rc::new(RouteSlot::new(Arc::clone(&self.config)));
        req.extensions_mut().insert(Rc::clone(&slot));
        if self.config.mode == Mode::OptIn {
            slot.detached.set(outer.detached);
            let routed = self.service.call(req);
            return match outer.superseded {
                None => Either::Left(routed.map_ok(pass_through)),
                Some(superseded) => Either::Right(Either::Right(Box::pin(async move {
                    superseded.abandon().await;
                    routed.await.map(pass_through)
                }))),
            };
        }
        let facts = RequestFacts::capture(&req, &self.config);
        let keyed = matches!(facts.key, Ok(Some(_)));
        let route = self.config.default_latches.route_to_check(req.request());
        if keyed {
            // Held for whoever settles the key. A request without a usable key needs no stand-in:
            // the default refuses it without reading its body, and a route that claims it reads
            // the body where it is.
            slot.hold(req.take_payload());
            req.set_payload(slot.stand_in());
        }
        // A keyed request's work outlives the request (unless an outer registration already
        // sees to that): a client that goes away does not cancel it half-way, and its retry
        // gets the replay.
        slot.detached.set(keyed || outer.detached);
        // Routing runs now, synchronously: a route that declares a policy claims the slot.
        let routed = self.service.call(req);
        let detach = keyed && !outer.detached;
        if slot.claimed_by_route() && outer.superseded.is_none() {
            // The route settles the key: nothing is left to do here but, for a keyed request,
            // to make its work outlive it.
            let routed = routed.map_ok(pass_through);
            return if detach {
                Either::Right(Either::Left(flow::spawn_detached(routed)))
            } else {
                Either::Left(routed)
            };
        }
        let settle = unclaimed::settle(slot, facts, route, routed);
        Either::Right(match outer.superseded {
            None => outliving(settle, detach),
            // Rare (a second registration further out), and kept apart: freeing the outer
            // reservation first would make the common future larger, and it is moved whole.
            Some(superseded) => outliving(
                async move {
                    superseded.abandon().await;
                    settle.await
                },
                detach,
            ),
        })
    }
}

/// The routed request's `work`: moved into a task of its own if the request is dropped before
/// it ends (`detach`), or boxed.
fn outliving<B, F>(work: F, detach: bool) -> Either<Detached<B>, BoxedResponse<B>>
where
    F: Future<Output = Result<ServiceResponse<EitherBody<B>>, Error>> + 'static,
    B: 'static,
{
    if detach {
        Either::Left(flow::spawn_detached(work))
    } else {
        Either::Right(Box::pin(work))
    }
}

/// What a registration further out left for this one.
struct Outer {
    /// It already makes the request's work outlive the request.
    detached: bool,
    /// Its default's reservation, made before this registration was reached.
    superseded: Option<PendingRecord>,
}

/// With a second `IdempotencyMiddleware` registered further out (app and scope), the inner one
/// acts: it runs after the middleware between the two, authentication included. It claims the
/// outer registration's slot as a route would, and takes back the body.
fn take_over_from_outer(req: &mut ServiceRequest) -> Outer {
    let Some(outer) = req.extensions().get::<Rc<RouteSlot>>().cloned() else {
        return Outer {
            detached: false,
            superseded: None,
        };
    };
    Outer {
        detached: outer.detached.get(),
        superseded: outer.claim(req),
    }
}

/// The Python fork's `TELEMETRY` headers.
#[derive(Debug, Clone, Copy)]
struct Telemetry {
    started: Instant,
    started_at: SystemTime,
}

impl Telemetry {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }

    fn stamp(&self, headers: &mut HeaderMap) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let start_time = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs_f64())
            .unwrap_or_default();
        for (name, value) in [
            ("x-request-duration-ms", format!("{duration_ms:.3}")),
            ("x-request-start-time", format!("{start_time:.6}")),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }
}
