//! The idempotency flow for one keyed request: reserve, replay or refuse; then store.

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use actix_web::{
    body::{BoxBody, EitherBody, MessageBody},
    dev::{Payload, ServiceResponse},
    http::header::{HeaderMap, CONTENT_TYPE},
    Error, HttpResponse,
};
use futures_util::{future::LocalBoxFuture, FutureExt};
use sha2::{Digest, Sha256};
use tracing::{instrument::Instrumented, Instrument, Span};

use crate::{
    body::{read_request_body, Recorded, RecordingBody, RequestBodyError},
    config::{Config, StoreOutage},
    context::RequestFacts,
    encoder::KeyParts,
    joined::{reserve_in_transaction, ActiveReservation, Joined, JoinedWork},
    manual::{ManualIdempotency, PriorResponse},
    observe::{
        keyed_request_span, record_key, record_outcome, timed_completion, timed_reservation,
        Outcome,
    },
    replay::{replay_response, replayable_headers},
    scope_check::{ScopeAtSettling, ScopeLatches, SCOPE_CHANGED_LATER},
    storage::{
        CompletedRecord, Completion, DynStore, Reservation, ReservationToken, StoredResponse,
    },
    upkeep::{
        deadline_after, release_in_background, retry_within, Renewals, UnansweredReservation,
    },
    Fingerprint, IdempotencyError, IdempotencyKey, StoreError,
};
use bytes::Bytes;

/// How soon a waiting duplicate looks again (unless its store signals a change sooner):
/// quickly at first, then backing off so that many waiting duplicates do not hammer a store.
const FIRST_WAIT: Duration = Duration::from_millis(5);
const LONGEST_WAIT: Duration = Duration::from_millis(50);
/// What in-flight refusals suggest in `Retry-After`.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a route asks of keyed requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyedPolicy {
    Required,
    Optional,
    Manual,
}

/// Where a key is being settled: the route's policy, its store, and the routes on which this
/// settle point saw the caller scope change after it.
#[derive(Debug, Clone)]
pub(crate) struct SettlePoint {
    pub(crate) policy: KeyedPolicy,
    pub(crate) store: Option<Arc<str>>,
    pub(crate) latches: Arc<ScopeLatches>,
    /// The route whose latch to check ([`ScopeLatches::route_to_check`]).
    pub(crate) route: Option<String>,
    /// The handler takes a transaction from the store: a store that can reserves the key in
    /// that transaction ([`IdempotencyPolicy::in_transaction`](crate::IdempotencyPolicy::in_transaction)).
    pub(crate) in_transaction: bool,
}

/// The outcome of [`start`].
// Returned once per request and matched at once: boxing the common variant would cost an
// allocation on every fresh request to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Start {
    /// Answer with this response; the handler does not run.
    Respond(HttpResponse),
    /// Run the handler with this payload, then hand its response to the pending record (if any).
    Proceed {
        payload: Payload,
        pending: Option<PendingRecord>,
        manual: Option<ManualIdempotency>,
    },
}

fn refuse(config: &Config, error: IdempotencyError) -> Start {
    decided(Outcome::of_refusal(&error));
    Start::Respond(error.to_response(&config.problem_base))
}

/// Decides what a request under a keyed policy gets, reserving its key if it runs.
///
/// (A plain function around one async one: each async layer would copy the whole state
/// machine once more before it starts, on every keyed request.)
pub(crate) fn start(
    config: Arc<Config>,
    point: SettlePoint,
    facts: RequestFacts,
    payload: Payload,
) -> Instrumented<impl Future<Output = Start>> {
    let span = keyed_request_span(facts.method.as_str(), &facts.route);
    decide(config, point, facts, payload).instrument(span)
}

/// [`start`], inside the request's span.
async fn decide(
    config: Arc<Config>,
    point: SettlePoint,
    mut facts: RequestFacts,
    payload: Payload,
) -> Start {
    let SettlePoint {
        policy,
        store: store_name,
        latches,
        route,
        in_transaction,
    } = point;
    let header = || config.header.as_str().to_owned();
    let key = match std::mem::replace(&mut facts.key, Ok(None)) {
        Ok(Some(key)) => key,
        Ok(None) if policy == KeyedPolicy::Optional => {
            return Start::Proceed {
                payload,
                pending: None,
                manual: None,
            }
        }
        Ok(None) => return refuse(&config, IdempotencyError::MissingKey { header: header() }),
        Err(invalid) => {
            return refuse(
                &config,
                IdempotencyError::InvalidKey {
                    header: header(),
                    reason: invalid,
                },
            )
        }
    };
    let store_name = store_name.as_deref();
    let Some(store) = config.store(store_name).cloned() else {
        crate::config::report_once(&config.unknown_store_reported, || {
            tracing::error!("idempotency: no store is registered under the name {store_name:?}");
        });
        return refuse(
            &config,
            IdempotencyError::Misconfigured("unknown store name"),
        );
    };
    let body = match read_body(&config, facts.content_length, payload).await {
        Ok(body) => body,
        Err(error) => return refuse(&config, error),
    };
    let operation = Operation {
        fingerprint: request_fingerprint(&config, &facts, &body),
        storage_key: config.encoder.encode(
            &KeyParts::new(&key, &facts.method, &facts.path, &body)
                .scope(facts.scope.as_deref())
                .authorization(facts.authorization.as_ref().map(|v| v.as_bytes())),
        ),
        key,
        body,
        store,
        manual: policy == KeyedPolicy::Manual,
        scope: ScopeAtSettling::new(facts.scope.take(), latches, route),
        in_transaction,
    };
    record_key(&Span::current(), &operation.storage_key);
    operation.settle(&config).await
}

/// What identifies the request's payload: the configured fingerprint of its content type and
/// body, combined with its query string unless configured otherwise.
fn request_fingerprint(config: &Config, facts: &RequestFacts, body: &[u8]) -> Fingerprint {
    let payload = config
        .fingerprinter
        .fingerprint(facts.content_type.as_deref(), body);
    if !config.query_in_fingerprint || facts.query.is_empty() {
        return payload;
    }
    let mut hasher = Sha256::new();
    hasher.update(payload.0);
    hasher.update(facts.query.as_bytes());
    Fingerprint(hasher.finalize().into())
}

/// Buffers a keyed request's body, refusing one over the limit before reading it if its
/// `Content-Length` says so.
async fn read_body(
    config: &Config,
    content_length: Option<u64>,
    payload: Payload,
) -> Result<Bytes, IdempotencyError> {
    let limit = config.request_body_limit;
    let too_large = IdempotencyError::BodyTooLarge { limit };
    if content_length.is_some_and(|length| length > limit as u64) {
        return Err(too_large);
    }
    read_request_body(payload, limit)
        .await
        .map_err(|error| match error {
            RequestBodyError::TooLarge => too_large,
            RequestBodyError::Unreadable => IdempotencyError::BodyUnreadable,
        })
}

/// One keyed request, identified: what it is stored under and what it asked for.
struct Operation {
    key: IdempotencyKey,
    storage_key: String,
    fingerprint: Fingerprint,
    body: Bytes,
    store: Arc<dyn DynStore>,
    manual: bool,
    scope: ScopeAtSettling,
    /// Reserve the key in the handler's transaction, where the store can.
    in_transaction: bool,
}

impl Operation {
    /// Reserves the key, or answers from its record; a duplicate of a running request waits
    /// for its record up to the lock timeout.
    async fn settle(self, config: &Arc<Config>) -> Start {
        // Read from the clock only once a duplicate has to wait: most requests never do.
        let mut give_up_at = None;
        let lease = config.reservation_lease;
        let token = ReservationToken::generate();
        let mut wait = FIRST_WAIT;
        // Only the first look may begin the handler's transaction: a duplicate that waits looks
        // again on the store's own connections, never taking one from the handlers' pool for
        // each look. (If it then finds the key free, it reserves it like any other route.)
        let mut in_transaction = self.in_transaction;
        loop {
            // A duplicate that waited while its settle point learned that the caller scope
            // changes later on is refused like every request after it.
            if self.scope.is_latched() {
                return refuse(config, IdempotencyError::Misconfigured(SCOPE_CHANGED_LATER));
            }
            let unanswered =
                UnansweredReservation::arm(&self.store, &self.storage_key, token, lease);
            let mut held_by = None;
            let reserving = in_transaction.then(|| {
                reserve_in_transaction(
                    self.store.as_ref(),
                    &self.storage_key,
                    token,
                    self.fingerprint,
                    lease,
                )
            });
            let reservation = match reserving.flatten() {
                Some(reserving) => {
                    timed_reservation(reserving)
                        .await
                        .map(|(reservation, transaction)| {
                            held_by = transaction;
                            reservation
                        })
                }
                None => {
                    self.store
                        .reserve(&self.storage_key, token, self.fingerprint, lease)
                        .await
                }
            };
            let (in_flight_fingerprint, remaining_lease) = match reservation {
                Err(error) => {
                    // A full store refused outright: nothing was written, nothing to free.
                    if matches!(error, StoreError::Full(_)) {
                        unanswered.answered();
                    } else {
                        drop(unanswered);
                    }
                    return self.store_unavailable(config, &error);
                }
                Ok(answer) => {
                    unanswered.answered();
                    match answer {
                        Reservation::InFlight {
                            fingerprint,
                            remaining_lease,
                        } => (fingerprint, remaining_lease),
                        Reservation::Acquired => return self.run_reserved(config, token, held_by),
                        Reservation::Completed(record) => return self.answer_from(&record, config),
                        Reservation::Unreadable { reason } => {
                            return self.answer_unreadable(config, &reason)
                        }
                    }
                }
            };
            if in_flight_fingerprint != self.fingerprint && !self.manual {
                return refuse(config, IdempotencyError::PayloadMismatch);
            }
            let now = Instant::now();
            let give_up_at = *give_up_at.get_or_insert_with(|| deadline_after(config.lock_wait));
            let left = give_up_at.map_or(wait, |at| at.saturating_duration_since(now));
            if left.is_zero() {
                return refuse(
                    config,
                    IdempotencyError::InFlight {
                        status: config.in_flight_status,
                        retry_after: RETRY_AFTER,
                    },
                );
            }
            // A store that wakes waiters is asked again when its bound or the owner's lease
            // runs out (an owner that died wakes nobody); any other store is polled.
            let within = self
                .store
                .longest_notified_wait()
                .map_or(wait, |longest| longest.min(remaining_lease.max(FIRST_WAIT)));
            self.store
                .wait_for_change(&self.storage_key, within.min(left))
                .await;
            wait = (wait * 2).min(LONGEST_WAIT);
            in_transaction = false;
        }
    }

    /// Runs the handler under the reservation `token` holds, or under the transaction
    /// `held_by` that holds the key.
    fn run_reserved(
        self,
        config: &Arc<Config>,
        token: ReservationToken,
        held_by: Option<Box<dyn JoinedWork>>,
    ) -> Start {
        decided(Outcome::Fresh);
        let manual = self
            .manual
            .then(|| ManualIdempotency::new(self.key, false, true, None));
        let pending = PendingRecord::new(
            config,
            self.store,
            self.storage_key,
            token,
            self.fingerprint,
            self.scope,
            held_by,
        );
        Start::Proceed {
            payload: Payload::from(self.body),
            pending: Some(pending),
            manual,
        }
    }

    fn answer_from(self, record: &CompletedRecord, config: &Config) -> Start {
        let matches = record.fingerprint == self.fingerprint;
        if self.manual {
            let prior = record.response.as_ref().map(PriorResponse::from_stored);
            return Start::Proceed {
                payload: Payload::from(self.body),
                pending: None,
                manual: Some({
                    decided(Outcome::Replayed);
                    ManualIdempotency::new(self.key, true, matches, prior)
                }),
            };
        }
        match (&record.response, matches) {
            (_, false) => refuse(config, IdempotencyError::PayloadMismatch),
            (Some(stored), true) => {
                decided(Outcome::Replayed);
                Start::Respond(replay_response(stored, config.replay_status))
            }
            (None, true) => refuse(config, IdempotencyError::ResponseNotReplayable),
        }
    }

    /// The key holds a record nobody here can read. The operation may have run, so it does not
    /// run again; a manual handler is told the key exists and decides.
    fn answer_unreadable(self, config: &Config, reason: &str) -> Start {
        tracing::error!(
            "idempotency: a key's record cannot be read ({reason}); answering 409 \
             record-unreadable until it expires"
        );
        if self.manual {
            return Start::Proceed {
                payload: Payload::from(self.body),
                pending: None,
                manual: Some({
                    decided(Outcome::Replayed);
                    ManualIdempotency::new(self.key, true, false, None)
                }),
            };
        }
        refuse(config, IdempotencyError::RecordUnreadable)
    }

    fn store_unavailable(self, config: &Config, error: &StoreError) -> Start {
        tracing::error!("idempotency: store unavailable while reserving a key: {error}");
        // A full store answered: it works, it just cannot protect one more request, and
        // running it unprotected is never the answer to that.
        let outage = match error {
            StoreError::Full(_) => StoreOutage::FailClosed,
            _ => config.store_outage,
        };
        match outage {
            StoreOutage::FailClosed => refuse(config, IdempotencyError::StoreUnavailable),
            StoreOutage::FailOpen => {
                decided(Outcome::Unprotected);
                tracing::warn!("idempotency: running the handler unprotected (fail-open)");
                Start::Proceed {
                    payload: Payload::from(self.body),
                    pending: None,
                    manual: self
                        .manual
                        .then(|| ManualIdempotency::new(self.key, false, true, None)),
                }
            }
        }
    }
}

/// Runs the handler; with a reservation, to completion, storing its response.
///
/// The work outlives the request (see [`spawn_detached`]): a client that disconnects mid-way
/// does not cancel the handler, so its retry gets the replay instead of a second, possibly
/// half-done, run.
///
/// `detached` says the caller's work already outlives its request (the app-level middleware
/// runs the routed request that way), so nothing more is needed.
pub(crate) async fn run_handler<F, B>(
    pending: Option<PendingRecord>,
    handler: F,
    detached: bool,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>> + 'static,
    B: MessageBody + 'static,
{
    let Some(pending) = pending else {
        return handler.await.map(ServiceResponse::map_into_left_body);
    };
    if detached {
        return pending.run(handler).await;
    }
    spawn_detached(pending.run(handler)).await
}

/// Runs `work` as part of the request, and moves it into a task of its own if the request is
/// dropped half-way (a client gone, an outer timeout), so that it is not cancelled; a panic in
/// it becomes a 500. Most requests finish where they run: no task is spawned for them.
pub(crate) fn spawn_detached<F, T>(work: F) -> Detached<T>
where
    F: Future<Output = Result<T, Error>> + 'static,
    T: 'static,
{
    Detached {
        work: Some(Box::pin(AssertUnwindSafe(work).catch_unwind())),
    }
}

/// The result of a keyed request that must run to its end: dropping it before then moves the
/// rest of the work into a task of its own. (The future of
/// [`InnerIdempotencyMiddleware`](crate::dev::InnerIdempotencyMiddleware).)
pub struct Detached<T: 'static> {
    work: Option<LocalBoxFuture<'static, std::thread::Result<Result<T, Error>>>>,
}

impl<T: 'static> std::fmt::Debug for Detached<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached")
            .field("running", &self.work.is_some())
            .finish()
    }
}

impl<T: 'static> Future for Detached<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(work) = self.work.as_mut() else {
            return Poll::Ready(Err(actix_web::error::ErrorInternalServerError(
                "the request was already answered",
            )));
        };
        let finished = ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(match finished {
            Ok(result) => result,
            Err(_panic) => {
                // Unwinding dropped its reservation, which frees the key.
                tracing::error!("idempotency: the handler of a keyed request panicked");
                Err(actix_web::error::ErrorInternalServerError(
                    "the handler panicked",
                ))
            }
        })
    }
}

impl<T: 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // Outside a runtime (one shutting down) the work ends here, as a crash would end it.
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(actix_web::rt::spawn(async move {
                let _finished = work.await;
            }));
        }
    }
}

/// A reservation whose handler is running, renewed in the background until it is settled.
/// Dropped without being settled (the handler panicked), it frees its key in the background;
/// the lease covers the case where even that cannot run.
pub(crate) struct PendingRecord {
    config: Arc<Config>,
    store: Arc<dyn DynStore>,
    key: String,
    token: ReservationToken,
    fingerprint: Fingerprint,
    renewal: Renewals,
    settled: bool,
    replayable: bool,
    scope: ScopeAtSettling,
    active: Rc<ActiveReservation>,
    /// The key is held by the handler's transaction, not by a reservation in the store: it is
    /// freed by rolling that transaction back, and has no lease to renew.
    held_by_transaction: bool,
    /// The request's span, for what is logged while settling.
    span: Span,
}

impl PendingRecord {
    fn new(
        config: &Arc<Config>,
        store: Arc<dyn DynStore>,
        key: String,
        token: ReservationToken,
        fingerprint: Fingerprint,
        scope: ScopeAtSettling,
        held_by: Option<Box<dyn JoinedWork>>,
    ) -> Self {
        let held_by_transaction = held_by.is_some();
        let renewal = if held_by_transaction {
            Renewals::none()
        } else {
            Renewals::start(
                Arc::clone(&store),
                key.clone(),
                token,
                fingerprint,
                config.reservation_lease,
            )
        };
        Self {
            config: Arc::clone(config),
            active: Rc::new(ActiveReservation::new(Arc::clone(&store), held_by)),
            held_by_transaction,
            span: Span::current(),
            store,
            key,
            token,
            fingerprint,
            renewal,
            settled: false,
            replayable: true,
            scope,
        }
    }

    /// Runs the handler, renewing the reservation meanwhile, then settles the key.
    async fn run<F, B>(mut self, handler: F) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        F: Future<Output = Result<ServiceResponse<B>, Error>>,
        B: MessageBody + 'static,
    {
        let result = self.renewal.during(handler).await;
        self.settle(result).await
    }

    /// Renews the reservation if a renewal is due, for the caller that polls its handler.
    pub(crate) fn poll_renewal(&mut self, cx: &mut Context<'_>) {
        self.renewal.poll_due(cx);
    }

    /// The reservation as the handler's extractors see it, for the request's extensions.
    pub(crate) fn active(&self) -> Rc<ActiveReservation> {
        Rc::clone(&self.active)
    }

    /// Frees the key without running anything: a route reached later settles it itself.
    pub(crate) async fn abandon(mut self) {
        self.release().await;
    }

    /// Settles the key with the handler's result: a storable response is stored (a streamed
    /// one once it has been sent), anything else frees the key.
    pub(crate) async fn settle<B>(
        self,
        result: Result<ServiceResponse<B>, Error>,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        B: MessageBody + 'static,
    {
        let span = self.span.clone();
        self.settle_in_span(result).instrument(span).await
    }

    async fn settle_in_span<B>(
        mut self,
        result: Result<ServiceResponse<B>, Error>,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        B: MessageBody + 'static,
    {
        if let Ok(response) = &result {
            if self.scope.changed_for(&self.config, response.request()) {
                // It ran, under a key space that may be shared with other callers: its response
                // must never be replayed to anyone.
                self.replayable = false;
            }
        }
        if self.active.has_failed() {
            return self.after_a_failed_transaction(result).await;
        }
        let response = match result {
            Ok(response) if self.is_kept(response.status()) => response,
            other => {
                self.release().await;
                return other.map(ServiceResponse::map_into_left_body);
            }
        };
        if is_event_stream(response.headers()) {
            // An event stream is a live feed, not a result: the operation is done, but there
            // is nothing to replay.
            if let Err(refusal) = self.complete(|| None).await {
                let refusal = refusal.to_response(&self.config.problem_base);
                return Ok(response.into_response(refusal).map_into_right_body());
            }
            return Ok(response.map_into_left_body());
        }
        let (request, response) = response.into_parts();
        let (head, body) = response.into_parts();
        let status = head.status().as_u16();
        let set_cookie = self.config.replay_set_cookie;
        let limit = self.config.response_body_limit;
        let body = match body.try_into_bytes() {
            Ok(bytes) => {
                let fits = bytes.len() <= limit;
                // The record gets a copy of its own: the body may be a slice of a larger buffer
                // (a handler echoing what `web::Bytes` read into an 8 KiB one), which a record
                // holding the slice would keep whole, past what the store weighs.
                let stored = || {
                    fits.then(|| {
                        let headers = replayable_headers(head.headers(), set_cookie);
                        StoredResponse::new(status, headers, Bytes::copy_from_slice(&bytes))
                    })
                };
                if let Err(refusal) = self.complete(stored).await {
                    return Ok(refused(request, &refusal, &self.config));
                }
                BoxBody::new(bytes)
            }
            Err(stream) if self.active.is_joined() => {
                // The handler's transaction commits before any of its response is sent, so
                // the record cannot wait for the stream's end: the operation is recorded as
                // done, without a replayable response.
                if let Err(refusal) = self.complete(|| None).await {
                    return Ok(refused(request, &refusal, &self.config));
                }
                BoxBody::new(stream)
            }
            Err(stream) => {
                let headers = replayable_headers(head.headers(), set_cookie);
                let (body, recorded) = RecordingBody::new(stream, limit);
                actix_web::rt::spawn(
                    async move {
                        match self.renewal.during(recorded).await {
                            Ok(Recorded::Whole(bytes)) => {
                                let stored = || {
                                    Some(StoredResponse::new(
                                        status,
                                        headers.clone(),
                                        bytes.clone(),
                                    ))
                                };
                                let _nothing_joined = self.complete(stored).await;
                            }
                            Ok(Recorded::TooLarge | Recorded::Abandoned) | Err(_) => {
                                let _nothing_joined = self.complete(|| None).await;
                            }
                            Ok(Recorded::Failed) => {
                                // The handler ran and answered: its effect is done, whatever
                                // became of the body. The key stays done, with nothing to
                                // replay, so a retry is refused rather than run again.
                                tracing::error!(
                                    "idempotency: a response body failed while it was sent; its \
                                     key is kept as done, without a response to replay"
                                );
                                let _nothing_joined = self.complete(|| None).await;
                            }
                        }
                    }
                    .in_current_span(),
                );
                BoxBody::new(body)
            }
        };
        Ok(ServiceResponse::new(request, head.set_body(body)).map_into_right_body())
    }

    /// Stores the record, with the response `response` builds. A store fault is retried in the
    /// background within the lease, while the reservation is still renewed, so the client gets
    /// its response now and a retry finds the record once the store answers. (The response is
    /// built again for the retries, rather than copied on every request in case of one.)
    ///
    /// When the handler did its work in a transaction of its own, the record is committed in
    /// it instead, at once: if that fails, none of the handler's effects happened, and the
    /// client is told so in place of the handler's response.
    async fn complete(
        &mut self,
        response: impl Fn() -> Option<StoredResponse>,
    ) -> Result<(), IdempotencyError> {
        self.settled = true;
        let (fingerprint, replayable) = (self.fingerprint, self.replayable);
        let record = || CompletedRecord::new(fingerprint, response().filter(|_| replayable));
        let ttl = self.config.record_ttl;
        match self.active.take() {
            Joined::No | Joined::Failed => {}
            Joined::Yes(work) => return self.commit_joined(work, record(), ttl).await,
            Joined::StillLent => {
                tracing::error!(
                    "idempotency: a handler kept its transaction past its own end (moved it \
                     into a task?); it cannot commit with the key's record, so nothing is \
                     committed and the key is freed"
                );
                self.release().await;
                return Err(IdempotencyError::Misconfigured(
                    "the handler kept its idempotent transaction past its end",
                ));
            }
        }
        let first = self
            .renewal
            .during(self.store.complete(&self.key, self.token, record(), ttl))
            .await;
        let error = match first {
            Ok(completion) => {
                self.stop_renewing();
                log_completion(completion);
                return Ok(());
            }
            Err(error) => error,
        };
        let Some(slot) = self.store.background_slot() else {
            tracing::error!(
                "idempotency: could not store a response ({error}), and too many are being \
                 retried already; once its reservation expires, a retry of this key runs the \
                 handler again"
            );
            return Ok(());
        };
        tracing::warn!("idempotency: could not store a response, retrying: {error}");
        let (store, key, token) = (Arc::clone(&self.store), self.key.clone(), self.token);
        let lease = self.config.reservation_lease;
        let mut renewal = self.renewal.take();
        let record = record();
        actix_web::rt::spawn(
            async move {
                let _slot = slot;
                let stored = renewal
                    .during(retry_within(lease, || {
                        store.complete(&key, token, record.clone(), ttl)
                    }))
                    .await;
                renewal.stop();
                match stored {
                    Ok(completion) => log_completion(completion),
                    Err(error) => tracing::error!(
                        "idempotency: gave up storing a response: {error}; once its reservation \
                     expires, a retry of this key runs the handler again"
                    ),
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    /// Commits the handler's transaction with the record. Whatever goes wrong, nothing of the
    /// handler's is committed: the key is freed for a retry (a commit whose outcome is unknown
    /// is safe too: freeing touches only a reservation, never a record).
    async fn commit_joined(
        &mut self,
        work: Box<dyn JoinedWork>,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Result<(), IdempotencyError> {
        let committed = self
            .renewal
            .during(timed_completion(work.commit_with_record(
                self.key.clone(),
                self.token,
                record,
                ttl,
            )))
            .await;
        match committed {
            Ok(Completion::LostReservation) => {
                self.stop_renewing();
                tracing::error!(
                    "idempotency: a handler's reservation lapsed and another request took its \
                     key before it committed; its transaction was rolled back"
                );
                Err(IdempotencyError::ReservationLost)
            }
            Ok(completion) => {
                self.stop_renewing();
                log_completion(completion);
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    "idempotency: a handler's transaction could not commit with its record \
                     ({error}); its effects were rolled back and its key is freed"
                );
                self.release().await;
                Err(IdempotencyError::StoreUnavailable)
            }
        }
    }

    /// Whether a response with `status` settles the key for good. A handler that wrote in its
    /// transaction decided: anything but a server error (a decline, a refusal it recorded)
    /// commits with its record, rather than being rolled back under a response that says it
    /// happened. Elsewhere, the configured statuses.
    fn is_kept(&self, status: actix_web::http::StatusCode) -> bool {
        self.config.is_storable(status) || (self.active.was_used() && !status.is_server_error())
    }

    /// The handler's transaction could not be begun. If the handler ran all the same (it took
    /// `Option<IdempotentTransaction>`, which turns the failure into `None`) and answered, it
    /// wrote outside any transaction: its effect may exist without a record to show for it.
    /// It must not run again, and its client must not take its answer for a recorded one.
    async fn after_a_failed_transaction<B>(
        mut self,
        result: Result<ServiceResponse<B>, Error>,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        B: MessageBody + 'static,
    {
        match result {
            Ok(response) if !response.status().is_server_error() => {
                tracing::error!(
                    "idempotency: a handler ran without its transaction: the database could not \
                     begin it, and the handler took Option<IdempotentTransaction>, which turns \
                     that failure into None. What it wrote is not committed with its key's \
                     record: the key is kept done, not replayable, and the client gets 503. \
                     Take MaybeIdempotentTransaction, which fails instead"
                );
                let _nothing_to_replay = self.complete(|| None).await;
                let request = response.into_parts().0;
                Ok(refused(
                    request,
                    &IdempotencyError::StoreUnavailable,
                    &self.config,
                ))
            }
            other => {
                self.release().await;
                other.map(ServiceResponse::map_into_left_body)
            }
        }
    }

    async fn release(&mut self) {
        // The handler's own transaction, if any, rolls back first.
        if let Joined::Yes(work) = self.active.take() {
            work.roll_back().await;
        }
        self.stop_renewing();
        if self.held_by_transaction {
            return;
        }
        let released = self.store.release(&self.key, self.token).await;
        if let Err(error) = released {
            tracing::warn!("idempotency: could not free a key, retrying: {error}");
            release_in_background(
                Arc::clone(&self.store),
                self.key.clone(),
                self.token,
                self.config.reservation_lease,
            );
        }
    }

    fn stop_renewing(&mut self) {
        self.settled = true;
        self.renewal.stop();
    }
}

/// Records how the current request's key was settled, on its span and in the metrics.
fn decided(outcome: Outcome) {
    record_outcome(&Span::current(), outcome);
}

/// The response that replaces the handler's when its outcome could not be recorded.
fn refused<B>(
    request: actix_web::HttpRequest,
    refusal: &IdempotencyError,
    config: &Config,
) -> ServiceResponse<EitherBody<B>> {
    ServiceResponse::new(request, refusal.to_response(&config.problem_base)).map_into_right_body()
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("text/event-stream"))
}

fn log_completion(completion: Completion) {
    match completion {
        Completion::Stored => {}
        Completion::StoredWithoutReservation => tracing::warn!(
            "idempotency: a reservation had vanished before its handler finished (renewals \
             failed for a whole lease, or the store lost it: a Redis restart without \
             persistence, an eviction); nobody else had taken the key, so the response was \
             stored"
        ),
        _ => tracing::error!(
            "idempotency: a response was not stored: another request took the key after this \
             one's reservation vanished (renewals failed for a whole lease, or the store lost \
             it), so the handler may have run twice"
        ),
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        // A transaction that holds the key frees it as it is dropped.
        if !self.settled && !self.held_by_transaction {
            release_in_background(
                Arc::clone(&self.store),
                std::mem::take(&mut self.key),
                self.token,
                self.config.reservation_lease,
            );
        }
    }
}
