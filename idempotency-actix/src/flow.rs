//! The idempotency flow for one keyed request: reserve, replay or refuse; then store.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    body::{BoxBody, EitherBody, MessageBody},
    dev::{Payload, ServiceResponse},
    Error, HttpResponse, ResponseError,
};

use crate::{
    body::{capture_response_body, read_request_body, CapturedBody, RequestBodyError},
    config::{Config, StoreOutage},
    context::RequestFacts,
    encoder::KeyParts,
    manual::{ManualIdempotency, PriorResponse},
    replay::{replay_response, replayable_headers},
    storage::{
        CompletedRecord, Completion, DynStore, Reservation, ReservationToken, StoredResponse,
    },
    upkeep::{
        deadline_after, keep_reserved, release_in_background, retry_within, UnansweredReservation,
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

/// The outcome of [`start`].
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

fn refuse(error: IdempotencyError) -> Start {
    Start::Respond(error.error_response())
}

/// Decides what a request under a keyed policy gets, reserving its key if it runs.
pub(crate) async fn start(
    config: &Arc<Config>,
    policy: KeyedPolicy,
    store_name: Option<&str>,
    facts: RequestFacts,
    payload: Payload,
) -> Start {
    let header = || config.header.as_str().to_owned();
    let key = match facts.key {
        Ok(Some(key)) => key,
        Ok(None) if policy == KeyedPolicy::Optional => {
            return Start::Proceed {
                payload,
                pending: None,
                manual: None,
            }
        }
        Ok(None) => return refuse(IdempotencyError::MissingKey { header: header() }),
        Err(invalid) => {
            return refuse(IdempotencyError::InvalidKey {
                header: header(),
                reason: invalid,
            })
        }
    };
    let Some(store) = config.store(store_name).cloned() else {
        log::error!("idempotency: no store is registered under the name {store_name:?}");
        return refuse(IdempotencyError::Misconfigured("unknown store name"));
    };
    let body = match read_body(config, facts.content_length, payload).await {
        Ok(body) => body,
        Err(error) => return refuse(error),
    };
    let operation = Operation {
        fingerprint: config
            .fingerprinter
            .fingerprint(facts.content_type.as_deref(), &body),
        storage_key: config.encoder.encode(
            &KeyParts::new(&key, &facts.method, &facts.path, &body)
                .scope(facts.scope.as_deref())
                .authorization(facts.authorization.as_ref().map(|v| v.as_bytes())),
        ),
        key,
        body,
        store,
        manual: policy == KeyedPolicy::Manual,
    };
    operation.settle(config).await
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
}

impl Operation {
    /// Reserves the key, or answers from its record; a duplicate of a running request waits
    /// for its record up to the lock timeout.
    async fn settle(self, config: &Arc<Config>) -> Start {
        let give_up_at = deadline_after(config.lock_wait);
        let lease = config.reservation_lease;
        let token = ReservationToken::generate();
        let mut wait = FIRST_WAIT;
        loop {
            let unanswered =
                UnansweredReservation::arm(&self.store, &self.storage_key, token, lease);
            let reservation = self
                .store
                .reserve(&self.storage_key, token, self.fingerprint, lease)
                .await;
            let in_flight_fingerprint = match reservation {
                Err(error) => {
                    drop(unanswered);
                    return self.store_unavailable(config, &error);
                }
                Ok(answer) => {
                    unanswered.answered();
                    match answer {
                        Reservation::InFlight { fingerprint, .. } => fingerprint,
                        Reservation::Acquired => return self.run_reserved(config, token),
                        Reservation::Completed(record) => return self.answer_from(&record, config),
                        Reservation::Unreadable { reason } => {
                            return self.answer_unreadable(&reason)
                        }
                    }
                }
            };
            if in_flight_fingerprint != self.fingerprint && !self.manual {
                return refuse(IdempotencyError::PayloadMismatch);
            }
            let now = Instant::now();
            let left = give_up_at.map_or(wait, |at| at.saturating_duration_since(now));
            if left.is_zero() {
                return refuse(IdempotencyError::InFlight {
                    status: config.in_flight_status,
                    retry_after: RETRY_AFTER,
                });
            }
            self.store
                .wait_for_change(&self.storage_key, wait.min(left))
                .await;
            wait = (wait * 2).min(LONGEST_WAIT);
        }
    }

    fn run_reserved(self, config: &Arc<Config>, token: ReservationToken) -> Start {
        let manual = self
            .manual
            .then(|| ManualIdempotency::new(self.key, false, true, None));
        let pending = PendingRecord::new(
            config,
            self.store,
            self.storage_key,
            token,
            self.fingerprint,
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
                manual: Some(ManualIdempotency::new(self.key, true, matches, prior)),
            };
        }
        match (&record.response, matches) {
            (_, false) => refuse(IdempotencyError::PayloadMismatch),
            (Some(stored), true) => Start::Respond(replay_response(stored, config.replay_status)),
            (None, true) => refuse(IdempotencyError::ResponseNotReplayable),
        }
    }

    /// The key holds a record nobody here can read. The operation may have run, so it does not
    /// run again; a manual handler is told the key exists and decides.
    fn answer_unreadable(self, reason: &str) -> Start {
        log::error!(
            "idempotency: a key's record cannot be read ({reason}); answering 409 \
             record-unreadable until it expires"
        );
        if self.manual {
            return Start::Proceed {
                payload: Payload::from(self.body),
                pending: None,
                manual: Some(ManualIdempotency::new(self.key, true, false, None)),
            };
        }
        refuse(IdempotencyError::RecordUnreadable)
    }

    fn store_unavailable(self, config: &Config, error: &StoreError) -> Start {
        log::error!("idempotency: store unavailable while reserving a key: {error}");
        // A full store answered: it works, it just cannot protect one more request, and
        // running it unprotected is never the answer to that.
        let outage = match error {
            StoreError::Full(_) => StoreOutage::FailClosed,
            _ => config.store_outage,
        };
        match outage {
            StoreOutage::FailClosed => refuse(IdempotencyError::StoreUnavailable),
            StoreOutage::FailOpen => {
                log::warn!("idempotency: running the handler unprotected (fail-open)");
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

/// Runs the handler; with a reservation, to completion in its own task, storing its response.
pub(crate) async fn run_handler<F, B>(
    pending: Option<PendingRecord>,
    handler: F,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>> + 'static,
    B: MessageBody + 'static,
{
    match pending {
        Some(pending) => pending.run_to_completion(handler).await,
        None => handler.await.map(ServiceResponse::map_into_left_body),
    }
}

/// A reservation whose handler is running. Dropped without being settled (the handler
/// panicked), it frees its key in the background; the lease covers the case where even that
/// cannot run.
pub(crate) struct PendingRecord {
    config: Arc<Config>,
    store: Arc<dyn DynStore>,
    key: String,
    token: ReservationToken,
    fingerprint: Fingerprint,
    settled: bool,
}

/// What the handler's run left to settle.
enum Outcome<B> {
    /// A storable response, its body buffered (or too large to be).
    Store(Option<StoredResponse>, ServiceResponse<EitherBody<B>>),
    /// Anything else: the key is freed and this goes to the client.
    Release(Result<ServiceResponse<EitherBody<B>>, Error>),
}

impl PendingRecord {
    fn new(
        config: &Arc<Config>,
        store: Arc<dyn DynStore>,
        key: String,
        token: ReservationToken,
        fingerprint: Fingerprint,
    ) -> Self {
        Self {
            config: Arc::clone(config),
            store,
            key,
            token,
            fingerprint,
            settled: false,
        }
    }

    /// Runs the handler to completion in its own task, then stores its response (when its
    /// status is storable) or frees the key.
    ///
    /// The task outlives the request: a client that disconnects mid-way does not cancel the
    /// handler, so its retry gets the replay instead of a second, possibly half-done, run.
    async fn run_to_completion<F, B>(
        self,
        handler: F,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        F: Future<Output = Result<ServiceResponse<B>, Error>> + 'static,
        B: MessageBody + 'static,
    {
        let task = actix_web::rt::spawn(self.finish(handler));
        match task.await {
            Ok(result) => result,
            Err(error) => {
                // The handler panicked; unwinding dropped the reservation, which frees the key.
                log::error!("idempotency: the handler of a keyed request panicked: {error}");
                Err(actix_web::error::ErrorInternalServerError(
                    "the handler panicked",
                ))
            }
        }
    }

    /// Runs the handler and buffers its response while renewing the reservation, then stores
    /// the response or frees the key.
    async fn finish<F, B>(mut self, handler: F) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        F: Future<Output = Result<ServiceResponse<B>, Error>> + 'static,
        B: MessageBody + 'static,
    {
        let work = run_and_capture(handler, &self.config);
        let keep_alive = keep_reserved(
            self.store.as_ref(),
            &self.key,
            self.token,
            self.fingerprint,
            self.config.reservation_lease,
        );
        let outcome = tokio::select! {
            biased;
            outcome = work => outcome,
            never = keep_alive => match never {},
        };
        match outcome {
            Outcome::Store(response, to_client) => {
                self.complete(response).await;
                Ok(to_client)
            }
            Outcome::Release(to_client) => {
                self.release().await;
                to_client
            }
        }
    }

    /// Stores the record. A store fault is retried in the background within the lease, so the
    /// client gets its response now and a retry finds the record once the store answers.
    async fn complete(&mut self, response: Option<StoredResponse>) {
        self.settled = true;
        let record = CompletedRecord::new(self.fingerprint, response);
        let ttl = self.config.record_ttl;
        let first = self
            .store
            .complete(&self.key, self.token, record.clone(), ttl)
            .await;
        let error = match first {
            Ok(completion) => return log_completion(completion),
            Err(error) => error,
        };
        log::warn!("idempotency: could not store a response, retrying: {error}");
        let (store, key, token) = (Arc::clone(&self.store), self.key.clone(), self.token);
        let lease = self.config.reservation_lease;
        actix_web::rt::spawn(async move {
            let stored =
                retry_within(lease, || store.complete(&key, token, record.clone(), ttl)).await;
            match stored {
                Ok(completion) => log_completion(completion),
                Err(error) => log::error!(
                    "idempotency: gave up storing a response after {lease:?}: {error}; once \
                     its reservation expires, a retry of this key runs the handler again"
                ),
            }
        });
    }

    async fn release(&mut self) {
        self.settled = true;
        let released = self.store.release(&self.key, self.token).await;
        if let Err(error) = released {
            log::warn!("idempotency: could not free a key, retrying: {error}");
            release_in_background(
                Arc::clone(&self.store),
                self.key.clone(),
                self.token,
                self.config.reservation_lease,
            );
        }
    }
}

fn log_completion(completion: Completion) {
    match completion {
        Completion::Stored => {}
        Completion::StoredWithoutReservation => log::warn!(
            "idempotency: a reservation had vanished before its handler finished (renewals \
             failed for a whole lease, or the store lost it: a Redis restart without \
             persistence, an eviction); nobody else had taken the key, so the response was \
             stored"
        ),
        _ => log::error!(
            "idempotency: a response was not stored: another request took the key after this \
             one's reservation vanished (renewals failed for a whole lease, or the store lost \
             it), so the handler may have run twice"
        ),
    }
}

/// Runs the handler and buffers its response body for storage when its status is storable.
async fn run_and_capture<F, B>(handler: F, config: &Config) -> Outcome<B>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
    B: MessageBody + 'static,
{
    let response = match handler.await {
        Ok(response) if config.is_storable(response.status()) => response,
        other => return Outcome::Release(other.map(ServiceResponse::map_into_left_body)),
    };
    let (request, response) = response.into_parts();
    let (head, body) = response.into_parts();
    let (stored, body) = match capture_response_body(body, config.response_body_limit).await {
        CapturedBody::Complete(bytes) => {
            let stored = StoredResponse::new(
                head.status().as_u16(),
                replayable_headers(head.headers()),
                bytes.clone(),
            );
            (Some(stored), BoxBody::new(bytes))
        }
        CapturedBody::TooLarge(body) => (None, body),
        CapturedBody::Failed(error) => {
            log::error!("idempotency: the response body failed while it was stored: {error}");
            return Outcome::Release(Err(actix_web::error::ErrorInternalServerError(
                "the response body failed",
            )));
        }
    };
    let to_client = ServiceResponse::new(request, head.set_body(body)).map_into_right_body();
    Outcome::Store(stored, to_client)
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if !self.settled {
            release_in_background(
                Arc::clone(&self.store),
                std::mem::take(&mut self.key),
                self.token,
                self.config.reservation_lease,
            );
        }
    }
}
