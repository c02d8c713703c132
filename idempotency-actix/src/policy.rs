//! Per-route policies and the marker middleware the handler attributes attach.

use std::{
    future::{ready, Ready},
    rc::Rc,
    sync::Arc,
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform},
    Error, HttpMessage, ResponseError,
};
use futures_util::{
    future::{Either, LocalBoxFuture, MapOk},
    TryFutureExt,
};

use crate::{
    config::is_store_name_registered,
    context::{is_safe, Decision, RequestFacts, RouteSlot},
    flow::{self, KeyedPolicy, Start},
    IdempotencyError, IdempotencyOutcome, ManualIdempotency,
};

/// What a route does with idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyKind {
    /// A key is required (400 without one); the first storable response is replayed.
    Required,
    /// With a key, as [`Required`](Self::Required); without one the handler runs every time.
    Optional,
    /// Keys are ignored: the handler runs every time and nothing is stored.
    Exempt,
    /// A key is required; the handler always runs and decides, through
    /// [`ManualIdempotency`](crate::ManualIdempotency).
    Manual,
}

/// A route's idempotency policy, as a route- or resource-level middleware.
///
/// The handler attributes (`#[idempotent]`, `#[idempotent(optional)]`,
/// `#[idempotency_exempt]`, `#[idempotency_manual]`) attach it for you. For routes registered
/// by hand, wrap the route or resource with it:
///
/// ```
/// use actix_web::{web, App, HttpResponse};
/// use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore};
///
/// let middleware = IdempotencyMiddleware::new(MemoryStore::default());
/// let app = App::new()
///     .wrap(middleware)
///     .service(
///         web::resource("/payments")
///             .wrap(IdempotencyPolicy::required())
///             .route(web::post().to(HttpResponse::Created)),
///     )
///     .route("/health", web::post().to(HttpResponse::Ok).wrap(IdempotencyPolicy::exempt()));
/// # let _ = app;
/// ```
///
/// The policy settles the key when routing reaches it, after every middleware on the route has
/// run (authentication on a scope included, whether it defers routing or not), so the caller
/// scope sees what authentication inserted. It needs
/// [`IdempotencyMiddleware`](crate::IdempotencyMiddleware) registered on the app (or an
/// enclosing scope); without it, or if a middleware read the body before the policy was
/// reached, it answers 500 (`misconfigured`) and logs why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyPolicy {
    kind: PolicyKind,
    store: Option<Arc<str>>,
}

impl IdempotencyPolicy {
    /// `#[idempotent]`: a key is required.
    pub fn required() -> Self {
        Self::new(PolicyKind::Required)
    }

    /// `#[idempotent(optional)]`: a key is used when present.
    pub fn optional() -> Self {
        Self::new(PolicyKind::Optional)
    }

    /// `#[idempotency_exempt]`: keys are ignored.
    pub fn exempt() -> Self {
        Self::new(PolicyKind::Exempt)
    }

    /// `#[idempotency_manual]`: the handler decides.
    pub fn manual() -> Self {
        Self::new(PolicyKind::Manual)
    }

    /// A policy of the given kind.
    pub fn new(kind: PolicyKind) -> Self {
        Self { kind, store: None }
    }

    /// Uses the store registered under `name` with
    /// [`named_store`](crate::IdempotencyMiddlewareBuilder::named_store). An unknown name makes
    /// the app fail at start-up.
    #[must_use]
    pub fn store(mut self, name: &str) -> Self {
        self.store = Some(Arc::from(name));
        self
    }

    /// The policy's kind.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }
}

impl<S, B> Transform<S, ServiceRequest> for IdempotencyPolicy
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = IdempotencyPolicyService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        if let Some(name) = self.store.as_deref() {
            if !is_store_name_registered(name) {
                crate::startup::refuse_start(format!(
                    "a route uses the store `{name}`, but no IdempotencyMiddleware registers a \
                     store under that name (see IdempotencyMiddlewareBuilder::named_store)"
                ));
                return ready(Err(()));
            }
        }
        ready(Ok(IdempotencyPolicyService {
            service: Rc::new(service),
            policy: self.clone(),
        }))
    }
}

type MapIntoLeft<B> = fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>;
type BoxedResponse<B> = LocalBoxFuture<'static, Result<ServiceResponse<EitherBody<B>>, Error>>;

/// The service behind [`IdempotencyPolicy`](crate::IdempotencyPolicy); not used directly.
#[derive(Debug)]
pub struct IdempotencyPolicyService<S> {
    service: Rc<S>,
    policy: IdempotencyPolicy,
}

impl<S, B> Service<ServiceRequest> for IdempotencyPolicyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = Either<MapOk<S::Future, MapIntoLeft<B>>, BoxedResponse<B>>;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        let pass_through: MapIntoLeft<B> = ServiceResponse::map_into_left_body;
        if is_safe(req.method()) {
            return Either::Left(self.service.call(req).map_ok(pass_through));
        }
        let slot = match claim(&req) {
            Ok(slot) => slot,
            Err(why) => return misconfigured(req, why),
        };
        if let Some(payload) = slot.claim_for_route() {
            req.set_payload(payload);
        }
        let keyed = match self.policy.kind {
            PolicyKind::Exempt => return Either::Left(self.service.call(req).map_ok(pass_through)),
            PolicyKind::Required => KeyedPolicy::Required,
            PolicyKind::Optional => KeyedPolicy::Optional,
            PolicyKind::Manual => KeyedPolicy::Manual,
        };
        let config = Arc::clone(&slot.config);
        // Captured here, after every middleware on the route ran: the caller scope sees what
        // authentication put in the request.
        let facts = RequestFacts::capture(&req, &config);
        let has_key = matches!(facts.key, Ok(Some(_)));
        let detached = slot.detached.get();
        let service = Rc::clone(&self.service);
        let store = self.policy.store.clone();
        Either::Right(Box::pin(async move {
            let payload = req.take_payload();
            match flow::start(config, keyed, store, facts, payload).await {
                Start::Respond(response) => Ok(req.into_response(response).map_into_right_body()),
                Start::Proceed {
                    payload,
                    pending,
                    manual,
                } => {
                    req.set_payload(payload);
                    req.extensions_mut().insert(IdempotencyOutcome::of(
                        pending.is_some(),
                        manual.as_ref().map(ManualIdempotency::key_exists),
                        has_key,
                    ));
                    if let Some(manual) = manual {
                        req.extensions_mut().insert(manual);
                    }
                    if let Some(pending) = &pending {
                        req.extensions_mut().insert(pending.active());
                    }
                    flow::run_handler(pending, service.call(req), detached).await
                }
            }
        }))
    }
}

/// Claims the request's slot for this route, or says (and logs) why the setup is wrong.
fn claim(req: &ServiceRequest) -> Result<Rc<RouteSlot>, &'static str> {
    let slot = req.extensions().get::<Rc<RouteSlot>>().cloned();
    match slot {
        Some(slot) if slot.decision.get() == Decision::Pending => Ok(slot),
        Some(slot) if slot.decision.get() == Decision::ClaimedByRoute => {
            tracing::error!(
                "idempotency: {} {} carries two idempotency policies (on a scope or resource and \
                 on the route); keep one",
                req.method(),
                req.path()
            );
            Err("two idempotency policies apply to this route")
        }
        Some(_) => {
            tracing::error!(
                "idempotency: the route policy of {} {} was reached after something read the \
                 request body (a middleware between IdempotencyMiddleware and the route), so \
                 the key was already settled by the default. Read the body after the route's \
                 policy, or register IdempotencyMiddleware inside that middleware.",
                req.method(),
                req.path()
            );
            Err("a middleware read the request body before this route's idempotency policy")
        }
        None => {
            tracing::error!(
                "idempotency: {} {} has an idempotency policy but IdempotencyMiddleware is not \
                 registered on the app (App::wrap)",
                req.method(),
                req.path()
            );
            Err("IdempotencyMiddleware is not registered on the app")
        }
    }
}

fn misconfigured<L, B>(req: ServiceRequest, why: &'static str) -> Either<L, BoxedResponse<B>>
where
    B: 'static,
{
    let response = IdempotencyError::Misconfigured(why).error_response();
    Either::Right(Box::pin(ready(Ok(req
        .into_response(response)
        .map_into_right_body()))))
}
