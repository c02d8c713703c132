//! What the middleware and the route it routes to share about one request: who settles its
//! key, and the body while that is being decided.

use std::{
    cell::{Cell, RefCell},
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll},
};

use actix_web::{
    dev::{Payload, ServiceRequest},
    error::PayloadError,
    http::{
        header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE},
        Method,
    },
};
use bytes::Bytes;
use futures_util::Stream;

use crate::{
    config::Config, flow::PendingRecord, key::parse_key_header, key::InvalidKey, IdempotencyKey,
};

/// Who settles a request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settler {
    /// Nobody yet: routing has not reached a route that declares a policy.
    Undecided,
    /// The route declares a policy (or a registration further in took the request over): it
    /// settles the key itself, after the route's own middleware.
    Route,
    /// Routing returned without reaching a policy, so the enforce-mode default settled the key.
    Default,
}

/// Put in the request extensions by [`IdempotencyMiddleware`](crate::IdempotencyMiddleware)
/// before routing.
///
/// Routing runs synchronously inside the middleware's call, so a route that declares a policy
/// [claims](Self::claim) the request before the middleware looks: a request nobody claimed goes
/// to a route without a policy, and the enforce-mode default settles it before its handler can
/// run. A route reached later (a middleware between deferred routing) takes the request over
/// from the default.
pub(crate) struct RouteSlot {
    pub(crate) config: Arc<Config>,
    settler: Cell<Settler>,
    /// The request's body while routing decides who reads it: the real payload, or the body the
    /// default buffered.
    held: RefCell<Option<Payload>>,
    /// The reservation the default runs the handler under.
    default_run: RefCell<Option<PendingRecord>>,
    /// Whether a route policy settles the key (a second one on the route is a mistake).
    policy_applied: Cell<bool>,
    /// Whether the middleware already makes the routed request's work outlive it, so that a
    /// route policy need not do it again.
    pub(crate) detached: Cell<bool>,
}

impl RouteSlot {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            settler: Cell::new(Settler::Undecided),
            held: RefCell::new(None),
            default_run: RefCell::new(None),
            policy_applied: Cell::new(false),
            detached: Cell::new(false),
        }
    }

    /// Declares that the route of `req` settles the key itself, and puts the body back in
    /// `req` (unless an earlier claim did). Returns the default's reservation if the default
    /// settled the request before this route was reached: the claimer frees it before it
    /// settles the key itself.
    pub(crate) fn claim(&self, req: &mut ServiceRequest) -> Option<PendingRecord> {
        if self.settler.replace(Settler::Route) == Settler::Default {
            self.config.report_deferred_routing();
        }
        if let Some(payload) = self.held.borrow_mut().take() {
            req.set_payload(payload);
        }
        self.default_run.borrow_mut().take()
    }

    /// Whether a route (or a registration further in) has claimed the request.
    pub(crate) fn claimed_by_route(&self) -> bool {
        self.settler.get() == Settler::Route
    }

    /// Records that a route policy settles the key; `false` if one already does.
    pub(crate) fn apply_policy(&self) -> bool {
        !self.policy_applied.replace(true)
    }

    /// The default takes an unclaimed request; `false` if a route claimed it meanwhile.
    pub(crate) fn settle_by_default(&self) -> bool {
        if self.settler.get() != Settler::Undecided {
            return false;
        }
        self.settler.set(Settler::Default);
        true
    }

    /// Holds the request's body until whoever settles the key takes it.
    pub(crate) fn hold(&self, payload: Payload) {
        *self.held.borrow_mut() = Some(payload);
    }

    /// The held body, for the default to read.
    pub(crate) fn take_held(&self) -> Payload {
        self.held.borrow_mut().take().unwrap_or(Payload::None)
    }

    /// The reservation the default runs the handler under, unless a route took it over.
    pub(crate) fn default_run(&self) -> std::cell::RefMut<'_, Option<PendingRecord>> {
        self.default_run.borrow_mut()
    }

    /// The payload the request carries through routing: it streams whatever body is held once
    /// the key is settled (a route that claims the request puts the body back itself).
    pub(crate) fn stand_in(self: &Rc<Self>) -> Payload {
        let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(HeldBody {
            slot: Rc::clone(self),
            body: None,
        });
        Payload::from(stream)
    }
}

/// The payload of [`RouteSlot::stand_in`].
struct HeldBody {
    slot: Rc<RouteSlot>,
    body: Option<Payload>,
}

impl Stream for HeldBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let body = this
            .body
            .get_or_insert_with(|| this.slot.held.borrow_mut().take().unwrap_or(Payload::None));
        Pin::new(body).poll_next(cx)
    }
}

/// The parts of a request the idempotency flow needs, captured while the request is at hand.
#[derive(Debug)]
pub(crate) struct RequestFacts {
    pub(crate) method: Method,
    /// The path as routing matches it (percent-encoded unreserved characters decoded), so
    /// that every spelling reaching one handler is one operation.
    pub(crate) path: String,
    /// The route's pattern (`/users/{id}`), for the request's span: never the concrete path,
    /// which may carry identifiers and has no bound. Empty when no span is recorded.
    pub(crate) route: String,
    pub(crate) query: String,
    pub(crate) key: Result<Option<IdempotencyKey>, InvalidKey>,
    pub(crate) scope: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) content_length: Option<u64>,
    pub(crate) authorization: Option<HeaderValue>,
}

impl RequestFacts {
    /// Captures what the flow needs. Without a usable key the flow answers 400 at once, so
    /// the rest (scope, body headers) is skipped.
    pub(crate) fn capture(req: &ServiceRequest, config: &Config) -> Self {
        let headers = req.headers();
        let key = parse_key_header(headers, &config.header);
        // Looked up only for a span that is recorded: it walks the app's routes.
        let route = if tracing::span_enabled!(tracing::Level::DEBUG) {
            req.match_pattern().unwrap_or_default()
        } else {
            String::new()
        };
        if !matches!(key, Ok(Some(_))) {
            return Self {
                method: req.method().clone(),
                path: String::new(),
                route,
                query: String::new(),
                key,
                scope: None,
                content_type: None,
                content_length: None,
                authorization: None,
            };
        }
        Self {
            method: req.method().clone(),
            path: req.match_info().as_str().to_owned(),
            route,
            query: req.query_string().to_owned(),
            key,
            scope: config.scope.scope(req.request()),
            content_type: headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            content_length: headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            authorization: headers.get(AUTHORIZATION).cloned(),
        }
    }
}

/// Safe methods never need a key and are never stored.
pub(crate) fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}
