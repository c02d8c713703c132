//! What the app-level middleware and a route's policy marker share about one request.

use std::{
    cell::{Cell, RefCell},
    sync::Arc,
};

use actix_web::{
    dev::{Payload, ServiceRequest},
    http::{
        header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE},
        Method,
    },
    HttpResponse,
};

use crate::{
    config::Config, flow::PendingRecord, key::parse_key_header, key::InvalidKey, IdempotencyKey,
};

/// Who settles a request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nobody yet: no route policy was reached, and the handler has not read its body.
    Pending,
    /// A route policy claimed the request: it settles the key itself, after every middleware
    /// on its route has run.
    ClaimedByRoute,
    /// The handler (or a middleware) began reading the body of a request no route policy
    /// claimed, so the mode's default settled the key.
    DefaultStarted,
    /// Another `IdempotencyMiddleware` registered further in (on a scope) took the request
    /// over: it runs later, after the middleware between the two.
    HandedInward,
}

/// What the enforce-mode default decided, for the app-level middleware to apply when the
/// routed request comes back.
#[derive(Default)]
pub(crate) enum DefaultOutcome {
    /// Nothing (yet).
    #[default]
    None,
    /// Answer with this instead of the handler's response; the handler did not run.
    Answer(HttpResponse),
    /// The handler runs under this reservation.
    Running(PendingRecord),
    /// The handler runs without a reservation (a store outage under fail-open).
    Unprotected,
}

/// Put in the request extensions by the app-level middleware before routing.
///
/// A route policy reached at any time before the handler reads its body claims the slot and
/// settles the key; a handler that reads the body of an unclaimed request starts the mode's
/// default (through the stand-in payload). A policy that finds the default already started
/// was reached after something read the body, and reports the setup.
pub(crate) struct RouteSlot {
    pub(crate) config: Arc<Config>,
    pub(crate) decision: Cell<Decision>,
    /// The real payload, held back while the request carries the stand-in (enforce mode).
    pub(crate) held_payload: RefCell<Option<Payload>>,
    /// The request's facts as captured before routing, for the default.
    pub(crate) facts: RefCell<Option<RequestFacts>>,
    /// The caller scope the default settled the key under, checked again once the route's
    /// middleware have run.
    pub(crate) default_scope: RefCell<Option<String>>,
    /// The default's decision.
    pub(crate) outcome: RefCell<DefaultOutcome>,
    /// Whether the app-level middleware already runs the routed request in its own task, so
    /// that a route policy need not spawn another.
    pub(crate) detached: Cell<bool>,
}

impl RouteSlot {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            decision: Cell::new(Decision::Pending),
            held_payload: RefCell::new(None),
            facts: RefCell::new(None),
            default_scope: RefCell::new(None),
            outcome: RefCell::new(DefaultOutcome::None),
            detached: Cell::new(false),
        }
    }

    /// Claims the request for a route policy, handing back the real payload it held.
    pub(crate) fn claim_for_route(&self) -> Option<Payload> {
        self.decision.set(Decision::ClaimedByRoute);
        self.held_payload.borrow_mut().take()
    }
}

/// The parts of a request the idempotency flow needs, captured while the request is at hand.
#[derive(Debug)]
pub(crate) struct RequestFacts {
    pub(crate) method: Method,
    /// The path as routing matches it (percent-encoded unreserved characters decoded), so
    /// that every spelling reaching one handler is one operation.
    pub(crate) path: String,
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
        if !matches!(key, Ok(Some(_))) {
            return Self {
                method: req.method().clone(),
                path: String::new(),
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
