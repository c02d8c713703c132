//! The middleware's builder and its resolved configuration.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix_web::http::{header::HeaderName, StatusCode};
use parking_lot::Mutex;

use crate::{
    key::normalise_header_name, scope_check::ScopeLatches, storage::DynStore, AuthorizationScope,
    BodyFingerprint, CallerScope, ConfigError, DefaultKeyEncoder, Fingerprinter,
    IdempotencyMiddleware, IdempotencyStore, KeyEncoder,
};

/// Which requests need a key when their handler carries no attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Every unsafe-method request needs a key unless its handler is `#[idempotency_exempt]`
    /// (the Python `IdempotencyKeyMiddleware`).
    Enforce,
    /// Only handlers marked `#[idempotent]`, `#[idempotent(optional)]` or
    /// `#[idempotency_manual]` use keys: routes opt in (the Python
    /// `ExemptIdempotencyKeyMiddleware`).
    OptIn,
}

impl Mode {
    /// The former name of [`Mode::OptIn`], easy to confuse with `#[idempotency_exempt]`
    /// (which turns keys off for one route).
    #[deprecated(since = "0.1.0", note = "renamed `Mode::OptIn`")]
    #[allow(non_upper_case_globals)]
    pub const Exempt: Mode = Mode::OptIn;
}

/// The status a replayed response is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayStatus {
    /// The stored response's own status.
    Original,
    /// A fixed status, such as the Python package's default 409 (`CONFLICT_STATUS_CODE`).
    Fixed(StatusCode),
}

/// What a keyed request gets when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOutage {
    /// Answer 503 problem+json without running the handler: no request can run twice.
    FailClosed,
    /// Run the handler without idempotency protection, and log it.
    FailOpen,
}

/// The status a duplicate gets when the first request is still running past the lock timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightStatus {
    /// 409 Conflict, as the IETF draft says.
    Conflict,
    /// 423 Locked, the Python package's status.
    Locked,
}

impl InFlightStatus {
    fn status(self) -> StatusCode {
        match self {
            Self::Conflict => StatusCode::CONFLICT,
            Self::Locked => StatusCode::LOCKED,
        }
    }
}

/// The resolved, validated configuration shared by every worker.
pub(crate) struct Config {
    pub(crate) mode: Mode,
    pub(crate) header: HeaderName,
    pub(crate) replay_status: ReplayStatus,
    pub(crate) storable_statuses: Vec<u16>,
    pub(crate) lock_wait: Duration,
    pub(crate) in_flight_status: StatusCode,
    pub(crate) record_ttl: Duration,
    pub(crate) reservation_lease: Duration,
    pub(crate) encoder: Box<dyn KeyEncoder>,
    pub(crate) fingerprinter: Box<dyn Fingerprinter>,
    pub(crate) scope: Box<dyn CallerScope>,
    pub(crate) timing_headers: bool,
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) named_stores: HashMap<String, Arc<dyn DynStore>>,
    pub(crate) request_body_limit: usize,
    pub(crate) response_body_limit: usize,
    pub(crate) store_outage: StoreOutage,
    pub(crate) query_in_fingerprint: bool,
    pub(crate) replay_set_cookie: bool,
    /// The routes on which the enforce-mode default saw the caller scope change after it
    /// settled a key (an authentication middleware runs further in): it refuses their keyed
    /// requests instead of scoping them wrongly.
    pub(crate) default_latches: Arc<ScopeLatches>,
    /// The base of the problem `type` URIs this middleware answers with.
    pub(crate) problem_base: Arc<str>,
    /// Whether the log already said that a middleware between this one and a route defers
    /// routing (said once per middleware: it is a setup, not a request, that is wrong).
    deferred_routing_reported: AtomicBool,
    /// Whether the log already said that a route names a store this middleware lacks.
    pub(crate) unknown_store_reported: AtomicBool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("header", &self.header)
            .field("replay_status", &self.replay_status)
            .field("storable_statuses", &self.storable_statuses)
            .field("lock_wait", &self.lock_wait)
            .field("record_ttl", &self.record_ttl)
            .field("reservation_lease", &self.reservation_lease)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Logs, once, that a route with a policy (or a registration of this middleware further in)
    /// was reached after the enforce-mode default settled its request: a middleware between the
    /// two defers routing, so the default answers such routes' requests without knowing their
    /// policy (keyless requests to exempt or optional routes get 400, for instance).
    pub(crate) fn report_deferred_routing(&self) {
        if self.mode != Mode::Enforce {
            return;
        }
        report_once(&self.deferred_routing_reported, || {
            tracing::error!(
                "idempotency: a route with an idempotency policy was reached after \
                 IdempotencyMiddleware settled its request as a route without one: a middleware \
                 between them (from_fn, a session or authentication middleware, on the app \
                 inside IdempotencyMiddleware or on a scope) defers routing. Requests to such \
                 routes are answered by the enforce-mode default (400 without a key, even on \
                 exempt routes). Register IdempotencyMiddleware inside that middleware (after \
                 it on the app), or use opt-in mode (IdempotencyMiddleware::opt_in) and mark \
                 the routes"
            );
        });
    }

    pub(crate) fn is_storable(&self, status: StatusCode) -> bool {
        self.storable_statuses
            .binary_search(&status.as_u16())
            .is_ok()
    }

    /// Every store, the default and the named ones.
    pub(crate) fn stores(&self) -> impl Iterator<Item = &Arc<dyn DynStore>> {
        std::iter::once(&self.store).chain(self.named_stores.values())
    }

    pub(crate) fn store(&self, name: Option<&str>) -> Option<&Arc<dyn DynStore>> {
        match name {
            None => Some(&self.store),
            Some(name) => self.named_stores.get(name),
        }
    }
}

/// Runs `report` (a log line about the setup) the first time only: what is wrong with a setup is
/// said once, so that no stream of requests can flood the log with it.
pub(crate) fn report_once(reported: &AtomicBool, report: impl FnOnce()) {
    if !reported.swap(true, Ordering::Relaxed) {
        report();
    }
}

/// Names registered by any middleware built in this process: a route policy naming a store checks
/// it when the app starts, so that a typo fails at start-up instead of on the first request.
/// Bounded by the configuration (never by requests). It cannot be one middleware's own list:
/// actix-web builds a route's policy without telling it which middleware it will run under.
/// A name only another app registers passes here; that route then answers 500
/// `misconfigured` (unknown store) and logs it.
static REGISTERED_STORE_NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub(crate) fn is_store_name_registered(name: &str) -> bool {
    REGISTERED_STORE_NAMES
        .lock()
        .iter()
        .any(|known| known == name)
}

/// Configures an [`IdempotencyMiddleware`]; start from [`IdempotencyMiddleware::builder`].
#[must_use]
pub struct IdempotencyMiddlewareBuilder {
    mode: Mode,
    header: String,
    replay_status: ReplayStatus,
    storable_statuses: Vec<u16>,
    lock_enabled: bool,
    lock_timeout: Duration,
    in_flight_status: InFlightStatus,
    record_ttl: Duration,
    reservation_lease: Duration,
    encoder: Box<dyn KeyEncoder>,
    fingerprinter: Box<dyn Fingerprinter>,
    scope: Box<dyn CallerScope>,
    timing_headers: bool,
    problem_type_base: Option<String>,
    store: Arc<dyn DynStore>,
    named_stores: Vec<(String, Arc<dyn DynStore>)>,
    request_body_limit: usize,
    response_body_limit: usize,
    store_outage: StoreOutage,
    query_in_fingerprint: bool,
    replay_set_cookie: bool,
}

impl std::fmt::Debug for IdempotencyMiddlewareBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyMiddlewareBuilder")
            .field("mode", &self.mode)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl IdempotencyMiddlewareBuilder {
    pub(crate) fn new(store: impl IdempotencyStore) -> Self {
        Self {
            mode: Mode::Enforce,
            header: "Idempotency-Key".to_owned(),
            replay_status: ReplayStatus::Original,
            storable_statuses: (200..=207).collect(),
            lock_enabled: true,
            lock_timeout: Duration::from_millis(100),
            in_flight_status: InFlightStatus::Conflict,
            record_ttl: Duration::from_secs(24 * 60 * 60),
            reservation_lease: Duration::from_secs(60),
            encoder: Box::new(DefaultKeyEncoder),
            fingerprinter: Box::new(BodyFingerprint),
            scope: Box::new(AuthorizationScope),
            timing_headers: false,
            problem_type_base: None,
            store: crate::observe::observed(store),
            named_stores: Vec::new(),
            request_body_limit: 1024 * 1024,
            response_body_limit: 1024 * 1024,
            store_outage: StoreOutage::FailClosed,
            query_in_fingerprint: true,
            replay_set_cookie: false,
        }
    }

    /// Whether unannotated handlers need a key.
    ///
    /// Defaults to [`Mode::Enforce`].
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The request header carrying the key, matched case-insensitively. The Django `META`
    /// spelling (`HTTP_IDEMPOTENCY_KEY`) is accepted and converted.
    ///
    /// Defaults to `Idempotency-Key`.
    pub fn header_name(mut self, name: impl Into<String>) -> Self {
        self.header = name.into();
        self
    }

    /// The status replays are sent with.
    ///
    /// Defaults to [`ReplayStatus::Original`].
    pub fn replay_status(mut self, status: ReplayStatus) -> Self {
        self.replay_status = status;
        self
    }

    /// The response statuses that are stored and replayed; any other response frees the key so
    /// that a retry runs the handler again. A handler that wrote in an `IdempotentTransaction`
    /// (feature `postgres`) also keeps any answer but a server error: its writes commit with it.
    ///
    /// Defaults to 200–207 (the Python `STORE_ON_STATUSES`).
    pub fn store_on_statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.storable_statuses = statuses.into_iter().collect();
        self
    }

    /// Whether a duplicate that arrives while the first request runs waits for its response.
    /// Disabling it only skips the wait (the duplicate gets 409 at once): reservation stays
    /// atomic, so a handler still never runs twice.
    ///
    /// Defaults to `true`.
    pub fn lock_enabled(mut self, enabled: bool) -> Self {
        self.lock_enabled = enabled;
        self
    }

    /// How long a duplicate waits for the first request's response before it is answered with
    /// [`lock_timeout_status`](Self::lock_timeout_status).
    ///
    /// Defaults to 100 ms (the Python `LOCK_TIMEOUT`).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The status a duplicate gets past the lock timeout, with `Retry-After`.
    ///
    /// Defaults to [`InFlightStatus::Conflict`] (409, IETF).
    pub fn lock_timeout_status(mut self, status: InFlightStatus) -> Self {
        self.in_flight_status = status;
        self
    }

    /// How long a completed record is kept and replayed.
    ///
    /// Defaults to 24 hours.
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = ttl;
        self
    }

    /// How long a key stays reserved after its process stopped renewing it (a crash, a store
    /// out of reach). It is not a limit on the handler: while the handler runs, its reservation
    /// is renewed every third of the lease. Must be shorter than the TTL.
    ///
    /// Defaults to 60 seconds.
    pub fn reservation_lease(mut self, lease: Duration) -> Self {
        self.reservation_lease = lease;
        self
    }

    /// How (scope, method, path, key) become the storage key.
    ///
    /// Defaults to [`DefaultKeyEncoder`].
    pub fn key_encoder(mut self, encoder: impl KeyEncoder) -> Self {
        self.encoder = Box::new(encoder);
        self
    }

    /// How a request's payload is fingerprinted to detect a reused key (422).
    ///
    /// [`JsonFingerprint`](crate::JsonFingerprint) compares JSON bodies as values (key order and
    /// whitespace do not matter); switching a running service to it answers 422 to retries of
    /// JSON requests stored before the switch, until their records expire.
    ///
    /// Defaults to [`BodyFingerprint`] (exact bytes).
    pub fn fingerprint(mut self, fingerprinter: impl Fingerprinter) -> Self {
        self.fingerprinter = Box::new(fingerprinter);
        self
    }

    /// Whose key space a request's key belongs to: the caller, so that two callers' equal
    /// keys never meet.
    ///
    /// Defaults to [`AuthorizationScope`].
    pub fn caller_scope(mut self, scope: impl CallerScope) -> Self {
        self.scope = Box::new(scope);
        self
    }

    /// The former name of [`caller_scope`](Self::caller_scope), easy to confuse with actix's
    /// `web::scope`.
    #[deprecated(since = "0.1.0", note = "renamed `caller_scope`")]
    pub fn scope(self, scope: impl CallerScope) -> Self {
        self.caller_scope(scope)
    }

    /// Adds `x-request-duration-ms` and `x-request-start-time` to every response, for
    /// clients (the Python fork's `TELEMETRY`). Operators' telemetry is the `tracing` span
    /// and the `metrics` the middleware always reports.
    ///
    /// Defaults to `false`.
    pub fn timing_headers(mut self, enabled: bool) -> Self {
        self.timing_headers = enabled;
        self
    }

    /// The base of the `type` URI of every problem+json answer (the slug follows it), to point
    /// clients at the service's own documentation of these errors. It applies to the answers
    /// of this middleware and of the route policies under it; the extractors' own errors
    /// ([`IdempotencyOutcome`](crate::IdempotencyOutcome) and friends used on a route without
    /// a policy) keep [`PROBLEM_TYPE_BASE`](crate::PROBLEM_TYPE_BASE).
    ///
    /// Defaults to [`PROBLEM_TYPE_BASE`](crate::PROBLEM_TYPE_BASE), this crate's `problems`
    /// documentation page.
    pub fn problem_type_base(mut self, base: impl Into<String>) -> Self {
        self.problem_type_base = Some(base.into());
        self
    }

    /// The former name of [`timing_headers`](Self::timing_headers), which are not telemetry.
    #[deprecated(since = "0.1.0", note = "renamed `timing_headers`")]
    pub fn telemetry(self, enabled: bool) -> Self {
        self.timing_headers(enabled)
    }

    /// Registers another store under `name`, for handlers marked
    /// `#[idempotent(store = "name")]`. A route naming a store that no middleware registers
    /// makes the app fail at start-up.
    ///
    /// Defaults to none.
    pub fn named_store(mut self, name: impl Into<String>, store: impl IdempotencyStore) -> Self {
        self.named_stores
            .push((name.into(), crate::observe::observed(store)));
        self
    }

    /// The largest request body read for a keyed request; a larger one gets 413.
    ///
    /// Defaults to 1 MiB.
    pub fn request_body_limit(mut self, bytes: usize) -> Self {
        self.request_body_limit = bytes;
        self
    }

    /// The largest response body stored for replay. A larger response is still sent, and its
    /// key is marked done-but-not-replayable, so retries get 409 instead of running again.
    ///
    /// Defaults to 1 MiB.
    pub fn response_body_limit(mut self, bytes: usize) -> Self {
        self.response_body_limit = bytes;
        self
    }

    /// What a keyed request gets when the store cannot be reached.
    ///
    /// Defaults to [`StoreOutage::FailClosed`] (503).
    pub fn store_outage(mut self, policy: StoreOutage) -> Self {
        self.store_outage = policy;
        self
    }

    /// Whether the query string is part of what a retry must repeat: with it, `POST /pay?to=a`
    /// and `POST /pay?to=b` under one key are a reused key (422).
    ///
    /// Defaults to `true`.
    pub fn query_in_fingerprint(mut self, enabled: bool) -> Self {
        self.query_in_fingerprint = enabled;
        self
    }

    /// Whether `Set-Cookie` headers are stored and replayed. Off, a replay carries every other
    /// header but no cookie: a session cookie replayed to whoever retries would hand them the
    /// original caller's session.
    ///
    /// Defaults to `false`.
    pub fn replay_set_cookie(mut self, enabled: bool) -> Self {
        self.replay_set_cookie = enabled;
        self
    }

    /// Validates the configuration and builds the middleware.
    pub fn build(self) -> Result<IdempotencyMiddleware, ConfigError> {
        let header = normalise_header_name(&self.header)
            .ok_or_else(|| ConfigError::InvalidHeaderName(self.header.clone()))?;
        let mut storable = self.storable_statuses;
        if let Some(bad) = storable.iter().find(|s| StatusCode::from_u16(**s).is_err()) {
            return Err(ConfigError::InvalidStatus(*bad));
        }
        storable.sort_unstable();
        storable.dedup();
        if storable.is_empty() {
            return Err(ConfigError::NoStorableStatus);
        }
        if self.record_ttl.is_zero() {
            return Err(ConfigError::ZeroDuration("record_ttl"));
        }
        if self.reservation_lease.is_zero() {
            return Err(ConfigError::ZeroDuration("reservation_lease"));
        }
        if self.reservation_lease >= self.record_ttl {
            return Err(ConfigError::LeaseNotShorterThanTtl {
                lease: self.reservation_lease,
                ttl: self.record_ttl,
            });
        }
        let mut named_stores = HashMap::new();
        for (name, store) in self.named_stores {
            if named_stores.insert(name.clone(), store).is_some() {
                return Err(ConfigError::DuplicateStoreName(name));
            }
        }
        {
            let mut registered = REGISTERED_STORE_NAMES.lock();
            for name in named_stores.keys() {
                if !registered.contains(name) {
                    registered.push(name.clone());
                }
            }
        }
        let config = Config {
            mode: self.mode,
            header,
            replay_status: self.replay_status,
            storable_statuses: storable,
            lock_wait: if self.lock_enabled {
                self.lock_timeout
            } else {
                Duration::ZERO
            },
            in_flight_status: self.in_flight_status.status(),
            record_ttl: self.record_ttl,
            reservation_lease: self.reservation_lease,
            encoder: self.encoder,
            fingerprinter: self.fingerprinter,
            scope: self.scope,
            timing_headers: self.timing_headers,
            store: self.store,
            named_stores,
            request_body_limit: self.request_body_limit,
            response_body_limit: self.response_body_limit,
            store_outage: self.store_outage,
            query_in_fingerprint: self.query_in_fingerprint,
            replay_set_cookie: self.replay_set_cookie,
            default_latches: Arc::default(),
            deferred_routing_reported: AtomicBool::new(false),
            unknown_store_reported: AtomicBool::new(false),
            problem_base: Arc::from(
                self.problem_type_base
                    .as_deref()
                    .unwrap_or(crate::PROBLEM_TYPE_BASE),
            ),
        };
        Ok(IdempotencyMiddleware::from_config(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn builder() -> IdempotencyMiddlewareBuilder {
        IdempotencyMiddleware::builder(MemoryStore::builder().build())
    }

    #[test]
    fn refuses_invalid_configuration_at_build_time() {
        assert_eq!(
            builder().header_name("bad header").build().err(),
            Some(ConfigError::InvalidHeaderName("bad header".to_owned()))
        );
        assert_eq!(
            builder().store_on_statuses([]).build().err(),
            Some(ConfigError::NoStorableStatus)
        );
        assert_eq!(
            builder().store_on_statuses([42]).build().err(),
            Some(ConfigError::InvalidStatus(42))
        );
        assert!(matches!(
            builder()
                .reservation_lease(Duration::from_secs(10))
                .record_ttl(Duration::from_secs(5))
                .build(),
            Err(ConfigError::LeaseNotShorterThanTtl { .. })
        ));
        assert_eq!(
            builder()
                .named_store("a", MemoryStore::default())
                .named_store("a", MemoryStore::default())
                .build()
                .err(),
            Some(ConfigError::DuplicateStoreName("a".to_owned()))
        );
    }

    #[test]
    fn django_meta_header_name_is_converted() {
        let middleware = builder().header_name("HTTP_X_IDEMPOTENCY_KEY").build();
        let header = middleware.map(|m| m.config().header.clone());
        assert_eq!(
            header.ok(),
            Some(HeaderName::from_static("x-idempotency-key"))
        );
    }
}
