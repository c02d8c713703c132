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
};

use crate::{config::Config, key::parse_key_header, key::InvalidKey, IdempotencyKey};

/// Who decided how a request is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Routing has not reached a policy marker (yet).
    Pending,
    /// A route marker claimed the request during routing.
    ClaimedByRoute,
    /// The app-level middleware found no marker and applied the mode's default.
    DefaultApplied,
}

/// Put in the request extensions by the app-level middleware before routing.
///
/// Routing is synchronous, so a marker on the matched route claims the slot before the
/// middleware looks at it; a marker that finds the slot already decided was reached late,
/// through a middleware that defers routing, and reports the misordered setup.
pub(crate) struct RouteSlot {
    pub(crate) config: Arc<Config>,
    pub(crate) decision: Cell<Decision>,
    /// The real payload, held back while routing runs in enforce mode (the routed request
    /// carries a stand-in until someone decides who reads the body).
    pub(crate) held_payload: RefCell<Option<Payload>>,
    /// The request's facts, captured before routing in enforce mode (the default flow needs
    /// them after routing, when the request is out of reach); a marker takes them instead of
    /// capturing them again.
    pub(crate) facts: RefCell<Option<RequestFacts>>,
}

impl RouteSlot {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            decision: Cell::new(Decision::Pending),
            held_payload: RefCell::new(None),
            facts: RefCell::new(None),
        }
    }
}

/// The parts of a request the idempotency flow needs, captured while the request is at hand.
#[derive(Debug)]
pub(crate) struct RequestFacts {
    pub(crate) method: Method,
    pub(crate) path: String,
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
                key,
                scope: None,
                content_type: None,
                content_length: None,
                authorization: None,
            };
        }
        Self {
            method: req.method().clone(),
            path: req.path().to_owned(),
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
