//! What operators see: one `tracing` span per keyed request with its outcome, and `metrics`
//! counters and histograms (names below), through the ecosystem's facades: without a
//! subscriber or a recorder installed they cost next to nothing.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `idempotency_requests_total` | counter | `outcome` |
//! | `idempotency_store_errors_total` | counter | `operation` |
//! | `idempotency_store_duration_seconds` | histogram | `operation` |

use std::{
    any::Any,
    future::Future,
    sync::{atomic::AtomicUsize, Arc},
    time::{Duration, Instant},
};

use futures_util::future::LocalBoxFuture;
use metrics::{Key, Label, Metadata};
use sha2::{Digest, Sha256};
use tracing::Span;

use crate::{
    storage::{
        BackgroundSlot, CompletedRecord, Completion, DynStore, KeyState, Renewal, Reservation,
        ReservationToken,
    },
    Fingerprint, IdempotencyError, IdempotencyStore, StoreError,
};

/// A metric key with one label, built at compile time: recording under it builds no label set
/// and allocates nothing, as a macro call with a label value chosen at run time would.
macro_rules! static_key {
    ($name:expr, $label:literal => $value:expr) => {{
        static LABELS: [Label; 1] = [Label::from_static_parts($label, $value)];
        static KEY: Key = Key::from_static_parts($name, &LABELS);
        &KEY
    }};
}

/// The counter of keyed requests, by outcome.
pub(crate) const REQUESTS: &str = "idempotency_requests_total";
/// The counter of failed store operations, by operation.
pub(crate) const STORE_ERRORS: &str = "idempotency_store_errors_total";
/// The histogram of store operation durations in seconds, by operation.
pub(crate) const STORE_DURATION: &str = "idempotency_store_duration_seconds";

/// How a keyed request was answered: the `outcome` of its span and of the request counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It reserved its key and its handler ran.
    Fresh,
    /// It was answered from a stored record (or, in manual mode, its handler saw one).
    Replayed,
    /// Another request with its key was still running.
    InFlight,
    /// Its key was used before with another payload.
    Mismatch,
    /// Refused before anything was looked up or run: a missing or invalid key, a body too large
    /// or unreadable, a record that cannot be replayed or read, a misconfiguration.
    Refused,
    /// The store failed or was full; the request was refused.
    StoreError,
    /// The store failed and the handler ran unprotected (fail-open).
    Unprotected,
}

impl Outcome {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Refused => "refused",
            Self::StoreError => "store_error",
            Self::Unprotected => "unprotected",
        }
    }

    /// The outcome of a request refused with `error`.
    pub(crate) fn of_refusal(error: &IdempotencyError) -> Self {
        match error {
            IdempotencyError::PayloadMismatch => Self::Mismatch,
            IdempotencyError::InFlight { .. } => Self::InFlight,
            IdempotencyError::StoreUnavailable => Self::StoreError,
            _ => Self::Refused,
        }
    }

    fn requests_key(self) -> &'static Key {
        match self {
            Self::Fresh => static_key!(REQUESTS, "outcome" => Outcome::Fresh.as_str()),
            Self::Replayed => static_key!(REQUESTS, "outcome" => Outcome::Replayed.as_str()),
            Self::InFlight => static_key!(REQUESTS, "outcome" => Outcome::InFlight.as_str()),
            Self::Mismatch => static_key!(REQUESTS, "outcome" => Outcome::Mismatch.as_str()),
            Self::Refused => static_key!(REQUESTS, "outcome" => Outcome::Refused.as_str()),
            Self::StoreError => static_key!(REQUESTS, "outcome" => Outcome::StoreError.as_str()),
            Self::Unprotected => static_key!(REQUESTS, "outcome" => Outcome::Unprotected.as_str()),
        }
    }
}

/// A store operation, as the `operation` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreOperation {
    Reserve,
    Renew,
    Complete,
    Release,
    Inspect,
    Purge,
}

impl StoreOperation {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Renew => "renew",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Inspect => "inspect",
            Self::Purge => "purge",
        }
    }

    fn duration_key(self) -> &'static Key {
        use StoreOperation as Op;
        match self {
            Op::Reserve => static_key!(STORE_DURATION, "operation" => Op::Reserve.as_str()),
            Op::Renew => static_key!(STORE_DURATION, "operation" => Op::Renew.as_str()),
            Op::Complete => static_key!(STORE_DURATION, "operation" => Op::Complete.as_str()),
            Op::Release => static_key!(STORE_DURATION, "operation" => Op::Release.as_str()),
            Op::Inspect => static_key!(STORE_DURATION, "operation" => Op::Inspect.as_str()),
            Op::Purge => static_key!(STORE_DURATION, "operation" => Op::Purge.as_str()),
        }
    }

    fn errors_key(self) -> &'static Key {
        use StoreOperation as Op;
        match self {
            Op::Reserve => static_key!(STORE_ERRORS, "operation" => Op::Reserve.as_str()),
            Op::Renew => static_key!(STORE_ERRORS, "operation" => Op::Renew.as_str()),
            Op::Complete => static_key!(STORE_ERRORS, "operation" => Op::Complete.as_str()),
            Op::Release => static_key!(STORE_ERRORS, "operation" => Op::Release.as_str()),
            Op::Inspect => static_key!(STORE_ERRORS, "operation" => Op::Inspect.as_str()),
            Op::Purge => static_key!(STORE_ERRORS, "operation" => Op::Purge.as_str()),
        }
    }
}

/// Where the metrics are registered from, for recorders that filter on it.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The span of one keyed request, at DEBUG: one per request is too many for a log at INFO.
/// The key is never in it: only the first 12 hex digits of a SHA-256 of its storage key,
/// enough to follow one key through the logs; the route is the matched pattern.
pub(crate) fn keyed_request_span(method: &str, route: &str) -> Span {
    tracing::debug_span!(
        "idempotency",
        method,
        route,
        key = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// Records the storage key's digest on the current span, if it is enabled.
pub(crate) fn record_key(span: &Span, storage_key: &str) {
    if span.is_disabled() {
        return;
    }
    let digest = Sha256::digest(storage_key.as_bytes());
    let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    span.record("key", short.as_str());
}

/// Records how the request was answered, on its span and in the request counter.
pub(crate) fn record_outcome(span: &Span, outcome: Outcome) {
    span.record("outcome", outcome.as_str());
    metrics::with_recorder(|recorder| {
        recorder
            .register_counter(outcome.requests_key(), &METADATA)
            .increment(1);
    });
}

/// A store with every operation timed and counted.
pub(crate) struct Observed<S> {
    inner: S,
    /// Its jobs in the background under way.
    background: Arc<AtomicUsize>,
}

impl<S: IdempotencyStore> Observed<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            background: Arc::default(),
        }
    }
}

/// Times a reservation the store makes outside its [`IdempotencyStore`] methods (in the
/// handler's transaction), as the reservations through them are.
pub(crate) async fn timed_reservation<T>(
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    timed(StoreOperation::Reserve, call).await
}

/// Times a completion committed with the handler's own unit of work, as the completions
/// through [`IdempotencyStore::complete`] are.
pub(crate) async fn timed_completion<T>(
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    timed(StoreOperation::Complete, call).await
}

async fn timed<T>(
    operation: StoreOperation,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = call.await;
    let elapsed = started.elapsed();
    metrics::with_recorder(|recorder| {
        recorder
            .register_histogram(operation.duration_key(), &METADATA)
            .record(elapsed.as_secs_f64());
        if result.is_err() {
            recorder
                .register_counter(operation.errors_key(), &METADATA)
                .increment(1);
        }
    });
    let operation = operation.as_str();
    if let Err(error) = &result {
        tracing::debug!(operation, elapsed_ms = millis(elapsed), %error, "store call failed");
    } else {
        tracing::trace!(operation, elapsed_ms = millis(elapsed), "store call");
    }
    result
}

fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

// The inner store's own futures are awaited inside the timing: one boxed future per call.
impl<S: IdempotencyStore> DynStore for Observed<S> {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(timed(
            StoreOperation::Reserve,
            IdempotencyStore::reserve(&self.inner, key, token, fingerprint, lease),
        ))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Renewal, StoreError>> {
        Box::pin(timed(
            StoreOperation::Renew,
            IdempotencyStore::renew(&self.inner, key, token, fingerprint, lease),
        ))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> LocalBoxFuture<'a, Result<Completion, StoreError>> {
        Box::pin(timed(
            StoreOperation::Complete,
            IdempotencyStore::complete(&self.inner, key, token, record, ttl),
        ))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
    ) -> LocalBoxFuture<'a, Result<(), StoreError>> {
        Box::pin(timed(
            StoreOperation::Release,
            IdempotencyStore::release(&self.inner, key, token),
        ))
    }

    fn inspect<'a>(
        &'a self,
        key: &'a str,
    ) -> LocalBoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(timed(
            StoreOperation::Inspect,
            IdempotencyStore::inspect(&self.inner, key),
        ))
    }

    fn purge<'a>(&'a self, key: &'a str) -> LocalBoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(timed(
            StoreOperation::Purge,
            IdempotencyStore::purge(&self.inner, key),
        ))
    }

    fn health(&self) -> LocalBoxFuture<'_, Result<(), StoreError>> {
        Box::pin(IdempotencyStore::health(&self.inner))
    }

    fn wait_for_change<'a>(&'a self, key: &'a str, within: Duration) -> LocalBoxFuture<'a, ()> {
        Box::pin(IdempotencyStore::wait_for_change(&self.inner, key, within))
    }

    fn longest_notified_wait(&self) -> Option<Duration> {
        IdempotencyStore::longest_notified_wait(&self.inner)
    }

    fn as_any(&self) -> &dyn Any {
        &self.inner
    }

    fn background_slot(&self) -> Option<BackgroundSlot> {
        BackgroundSlot::take(&self.background)
    }
}

/// The store as the middleware holds it: observed.
pub(crate) fn observed<S: crate::IdempotencyStore>(store: S) -> Arc<dyn DynStore> {
    Arc::new(Observed::new(store))
}
