//! Per-route policies and the marker middleware the handler attributes attach.

use std::{
    cell::Cell,
    future::{ready, Ready},
    rc::Rc,
    sync::Arc,
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform},
    Error, HttpMessage,
};
use futures_util::{
    future::{Either, LocalBoxFuture, MapOk},
    TryFutureExt,
};

use crate::{
    config::is_store_name_registered,
    context::{is_safe, RequestFacts, RouteSlot},
    flow::{self, KeyedPolicy, SettlePoint, Start},
    scope_check::ScopeLatches,
    IdempotencyError, IdempotencyOutcome, ManualIdempotency, PROBLEM_TYPE_BASE,
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
/// **Where it settles.** A policy settles the key where it is registered: register it *first*
/// on the route or resource (actix runs the first-registered middleware innermost), so that it
/// runs after the route's other middleware, authentication included, and the caller scope sees
/// who the caller is. The handler attributes always put it there. Registered outside a
/// middleware that changes the caller scope, it notices when the first response comes back,
/// does not store it, and refuses the route's keyed requests from then on (500
/// `misconfigured`, with the fix in the log) rather than scope them wrongly.
///
/// It needs [`IdempotencyMiddleware`](crate::IdempotencyMiddleware) registered on the app (or
/// an enclosing scope); without it, it answers 500 (`misconfigured`) and logs why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyPolicy {
    kind: PolicyKind,
    store: Option<Arc<str>>,
    /// `false` for the claim the handler attributes put outermost on their route: it only tells
    /// enforce mode that the route settles its key itself.
    settles: bool,
    in_transaction: bool,
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
        Self {
            kind,
            store: None,
            settles: true,
            in_transaction: false,
        }
    }

    /// What the handler attributes put outermost on their route, besides the policy they put
    /// innermost: it is reached while routing runs, before any middleware of the route can
    /// defer, and tells enforce mode that the route settles its key itself.
    #[doc(hidden)]
    pub fn route_claim() -> Self {
        Self {
            kind: PolicyKind::Exempt,
            store: None,
            settles: false,
            in_transaction: false,
        }
    }

    /// Uses the store registered under `name` with
    /// [`named_store`](crate::IdempotencyMiddlewareBuilder::named_store). An unknown name makes
    /// the app fail at start-up.
    #[must_use]
    pub fn store(mut self, name: &str) -> Self {
        self.store = Some(Arc::from(name));
        self
    }

    /// The handler takes an `IdempotentTransaction` (or a `MaybeIdempotentTransaction`): on a
    /// `PostgresStore`,
    /// the key is then reserved in that very transaction, under a transaction-scoped advisory
    /// lock, instead of by a row committed beforehand. One commit per request instead of two,
    /// and a request whose process dies frees its key at once (see `PostgresStore`). On any
    /// other store it changes nothing.
    ///
    /// `#[idempotent]` and `#[idempotency_manual]` set it themselves when the handler takes
    /// one of those types.
    #[must_use]
    pub fn in_transaction(mut self) -> Self {
        self.in_transaction = true;
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
            latches: Arc::default(),
            reported: Cell::new(false),
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
    /// Set once the caller scope was seen changing after this policy settled a key.
    latches: Arc<ScopeLatches>,
    /// Whether the log already told what is wrong with this route's setup: once is enough, a
    /// request must not be able to flood the log.
    reported: Cell<bool>,
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
        let Some(slot) = req.extensions().get::<Rc<RouteSlot>>().cloned() else {
            if !self.reported.replace(true) {
                tracing::error!(
                    "idempotency: the route {} has an idempotency policy but \
                     IdempotencyMiddleware is not registered on the app (App::wrap)",
                    req.match_pattern().as_deref().unwrap_or("(unmatched)")
                );
            }
            return misconfigured(
                req,
                PROBLEM_TYPE_BASE,
                "IdempotencyMiddleware is not registered on the app",
            );
        };
        let superseded = slot.claim(&mut req);
        let keyed = match (self.policy.settles, self.policy.kind) {
            (false, _) | (true, PolicyKind::Exempt) => {
                return match superseded {
                    None => Either::Left(self.service.call(req).map_ok(pass_through)),
                    Some(superseded) => {
                        let service = Rc::clone(&self.service);
                        Either::Right(Box::pin(async move {
                            superseded.abandon().await;
                            service.call(req).await.map(pass_through)
                        }))
                    }
                };
            }
            (true, PolicyKind::Required) => KeyedPolicy::Required,
            (true, PolicyKind::Optional) => KeyedPolicy::Optional,
            (true, PolicyKind::Manual) => KeyedPolicy::Manual,
        };
        if !slot.apply_policy() {
            if !self.reported.replace(true) {
                tracing::error!(
                    "idempotency: the route {} carries two idempotency policies (on a scope or \
                     resource and on the route); keep one",
                    req.match_pattern().as_deref().unwrap_or("(unmatched)")
                );
            }
            return misconfigured(
                req,
                &slot.config.problem_base,
                "two idempotency policies apply to this route",
            );
        }
        let config = Arc::clone(&slot.config);
        // Captured here, where the policy sits: for the attributes, after every middleware on
        // the route, so the caller scope sees what authentication put in the request.
        let facts = RequestFacts::capture(&req, &config);
        let has_key = matches!(facts.key, Ok(Some(_)));
        let detached = slot.detached.get();
        let service = Rc::clone(&self.service);
        let point = SettlePoint {
            policy: keyed,
            store: self.policy.store.clone(),
            latches: Arc::clone(&self.latches),
            route: self.latches.route_to_check(req.request()),
            in_transaction: self.policy.in_transaction,
        };
        Either::Right(Box::pin(async move {
            if let Some(superseded) = superseded {
                superseded.abandon().await;
            }
            let payload = req.take_payload();
            match flow::start(config, point, facts, payload).await {
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

fn misconfigured<L, B>(
    req: ServiceRequest,
    base: &str,
    why: &'static str,
) -> Either<L, BoxedResponse<B>>
where
    B: 'static,
{
    let response = IdempotencyError::Misconfigured(why).to_response(base);
    Either::Right(Box::pin(ready(Ok(req
        .into_response(response)
        .map_into_right_body()))))
}
