//! The app-level middleware: registered once with `App::wrap`.

use std::{
    future::{ready, Ready},
    pin::Pin,
    rc::Rc,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform},
    error::InternalError,
    error::PayloadError,
    http::header::{HeaderMap, HeaderName, HeaderValue},
    Error, HttpMessage,
};
use bytes::Bytes;
use futures_util::Stream;
use futures_util::{
    future::{Either, LocalBoxFuture, MapOk},
    stream, StreamExt, TryFutureExt,
};
use tokio::sync::oneshot;

use crate::{
    config::{Config, Mode},
    context::{is_safe, Decision, RequestFacts, RouteSlot},
    flow::{self, KeyedPolicy, Start},
    IdempotencyMiddlewareBuilder, IdempotencyStore,
};

/// The idempotency middleware, registered once on the app with [`App::wrap`](actix_web::App::wrap).
///
/// In [`Mode::Enforce`] every unsafe-method request needs a key unless its handler is
/// `#[idempotency_exempt]`; in [`Mode::Exempt`] only annotated handlers use keys.
///
/// Build it once, outside `HttpServer::new`, and clone it into the app factory: the clones
/// share one configuration and one store.
///
/// **Ordering.** Register it *before* any other `wrap` (actix runs the first-registered
/// middleware innermost), so that it runs after authentication and nothing that defers routing
/// sits between it and the routes. See [`IdempotencyPolicy`](crate::IdempotencyPolicy).
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

    /// The middleware in exempt mode (only annotated handlers use keys) with every default.
    pub fn exempt(store: impl IdempotencyStore) -> Self {
        Self::with_defaults(store, Mode::Exempt)
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
        ready(Ok(InnerIdempotencyMiddleware {
            service: Rc::new(service),
            config: Arc::clone(&self.config),
        }))
    }
}

type MapIntoLeft<B> = fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>;
type BoxedResponse<B> = LocalBoxFuture<'static, Result<ServiceResponse<EitherBody<B>>, Error>>;

/// The service behind [`IdempotencyMiddleware`]; not used directly.
#[doc(hidden)]
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
    type Future = Either<MapOk<S::Future, MapIntoLeft<B>>, BoxedResponse<B>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let telemetry = self.config.telemetry.then(Telemetry::start);
        let untouched: Either<MapOk<S::Future, MapIntoLeft<B>>, BoxedResponse<B>> =
            match self.route(req, telemetry) {
                Routed::PassThrough(future) => {
                    Either::Left(future.map_ok(ServiceResponse::map_into_left_body))
                }
                Routed::Keyed(future) => Either::Right(future),
            };
        let Some(started) = telemetry else {
            return untouched;
        };
        Either::Right(Box::pin(async move {
            untouched.await.map(|mut response| {
                started.stamp(response.headers_mut());
                response
            })
        }))
    }
}

enum Routed<F, B> {
    /// Nothing for this middleware to do: the inner service's own future.
    PassThrough(F),
    /// The mode's default policy applies to a route without a marker.
    Keyed(BoxedResponse<B>),
}

impl<S, B> InnerIdempotencyMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    fn route(&self, mut req: ServiceRequest, telemetry: Option<Telemetry>) -> Routed<S::Future, B> {
        if is_safe(req.method()) {
            return Routed::PassThrough(self.service.call(req));
        }
        let slot = Rc::new(RouteSlot::new(Arc::clone(&self.config)));
        req.extensions_mut().insert(Rc::clone(&slot));
        let feed = match self.config.mode {
            Mode::Enforce => self.prepare_default(&mut req, &slot),
            Mode::Exempt => None,
        };
        // Routing runs synchronously inside this call: a marker on the matched route has
        // claimed the slot by the time it returns.
        let routed = self.service.call(req);
        if slot.decision.get() == Decision::ClaimedByRoute {
            return Routed::PassThrough(routed);
        }
        slot.decision.set(Decision::DefaultApplied);
        let Some(facts) = slot.facts.borrow_mut().take() else {
            return Routed::PassThrough(routed);
        };
        let payload = slot
            .held_payload
            .borrow_mut()
            .take()
            .unwrap_or(Payload::None);
        let config = Arc::clone(&self.config);
        Routed::Keyed(Box::pin(async move {
            match flow::start(&config, KeyedPolicy::Required, None, facts, payload).await {
                // The routed request is out of reach now: the answer travels as an error
                // carrying the complete response, and the handler never runs.
                Start::Respond(mut response) => {
                    drop(routed);
                    if let Some(telemetry) = telemetry {
                        telemetry.stamp(response.headers_mut());
                    }
                    Err(InternalError::from_response("idempotency", response).into())
                }
                Start::Proceed {
                    payload, pending, ..
                } => {
                    // The receiver only goes away with the routed request itself.
                    if let Some(feed) = feed {
                        let _ = feed.send(payload);
                    }
                    flow::run_handler(pending, routed).await
                }
            }
        }))
    }
}

impl<S> InnerIdempotencyMiddleware<S> {
    /// Readies the enforce-mode default for a route that turns out to have no marker.
    ///
    /// A keyed request's body is held back until routing says who reads it: a route marker
    /// takes it back; otherwise the default flow hashes it and feeds the handler through the
    /// stand-in. A request without a usable key is refused by the default without reading its
    /// body, so it keeps its payload and costs no more than the key lookup.
    fn prepare_default(
        &self,
        req: &mut ServiceRequest,
        slot: &RouteSlot,
    ) -> Option<oneshot::Sender<Payload>> {
        let facts = RequestFacts::capture(req, &self.config);
        let keyed = matches!(facts.key, Ok(Some(_)));
        *slot.facts.borrow_mut() = Some(facts);
        if !keyed {
            return None;
        }
        *slot.held_payload.borrow_mut() = Some(req.take_payload());
        let (feed, stand_in) = stand_in_payload();
        req.set_payload(stand_in);
        Some(feed)
    }
}

/// A payload that yields whatever payload is later sent through the returned sender.
fn stand_in_payload() -> (oneshot::Sender<Payload>, Payload) {
    let (feed, receive) = oneshot::channel::<Payload>();
    let stream = stream::once(receive).flat_map(|received| match received {
        Ok(payload) => Either::Left(payload),
        Err(_) => Either::Right(stream::empty()),
    });
    let boxed: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(stream);
    (feed, Payload::from(boxed))
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
