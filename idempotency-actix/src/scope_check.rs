//! The caller scope, checked again when a handler's response comes back: a settle point that
//! sees it change (authentication runs further in than it) refuses that route's keyed requests
//! from then on, rather than scope them wrongly.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use actix_web::HttpRequest;
use parking_lot::Mutex;

use crate::config::Config;

/// Why a settle point refuses a route's keyed requests once it latched it.
pub(crate) const SCOPE_CHANGED_LATER: &str =
    "the caller scope changes after this request's key is settled (authentication runs further \
     in than the idempotency middleware or policy)";

/// The routes (by pattern) on which a settle point saw the caller scope change after it. Bounded
/// by the app's routes: only the pattern of a route that answered is ever added.
#[derive(Debug, Default)]
pub(crate) struct ScopeLatches {
    any: AtomicBool,
    routes: Mutex<HashSet<String>>,
}

impl ScopeLatches {
    /// The pattern of `request`'s route, when some route is latched and it may matter; `None`
    /// (and no lookup) on the common path.
    pub(crate) fn route_to_check(&self, request: &HttpRequest) -> Option<String> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        Some(request.match_pattern().unwrap_or_default())
    }

    fn holds(&self, route: &str) -> bool {
        self.routes.lock().contains(route)
    }

    /// Latches `route`; `true` the first time.
    fn latch(&self, route: String) -> bool {
        let added = self.routes.lock().insert(route);
        self.any.store(true, Ordering::Relaxed);
        added
    }
}

/// The caller scope a key was settled under, checked again when the handler's response comes
/// back: by then every middleware on the route has run.
#[derive(Debug)]
pub(crate) struct ScopeAtSettling {
    scope: Option<String>,
    latches: Arc<ScopeLatches>,
    /// The route to check the latches for, if any is set.
    route: Option<String>,
}

impl ScopeAtSettling {
    pub(crate) fn new(
        scope: Option<String>,
        latches: Arc<ScopeLatches>,
        route: Option<String>,
    ) -> Self {
        Self {
            scope,
            latches,
            route,
        }
    }

    /// Whether the request's route was latched (checked before every reservation attempt, so
    /// that a duplicate that waited meanwhile is refused too). A request that started before
    /// any route was latched does not know its route: it is refused once any is, which only
    /// the requests under way at the first latch can meet.
    pub(crate) fn is_latched(&self) -> bool {
        match self.route.as_deref() {
            Some(route) => self.latches.holds(route),
            None => self.latches.any.load(Ordering::Relaxed),
        }
    }

    /// Whether the caller scope of `request`, as the handler saw it, differs from the one the
    /// key was settled under. If so, the route is latched, and the log says why once.
    pub(crate) fn changed_for(&self, config: &Config, request: &HttpRequest) -> bool {
        if config.scope.scope(request) == self.scope {
            return false;
        }
        let route = request.match_pattern().unwrap_or_default();
        if self.latches.latch(route.clone()) {
            tracing::error!(
                "idempotency: the caller scope of the route {route} changed after a key was \
                 settled: an authentication middleware runs further in than the idempotency \
                 middleware (or the route's policy). Its keyed requests are refused (500 \
                 misconfigured) from now on. Register IdempotencyMiddleware first, inside the \
                 authentication, or mark the route #[idempotent]"
            );
        }
        true
    }
}
