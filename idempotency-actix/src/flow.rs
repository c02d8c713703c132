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
        let give_up_at = Instant::now() + config.lock_wait;
        let mut wait = FIRST_WAIT;
        loop {
            let reservation = self
                .store
                .reserve(
                    &self.storage_key,
                    self.fingerprint,
                    config.reservation_lease,
                )
                .await;
            let in_flight_fingerprint = match reservation {
                Ok(Reservation::InFlight { fingerprint, .. }) => fingerprint,
                Ok(Reservation::Acquired(token)) => return self.run_reserved(config, token),
                Ok(Reservation::Completed(record)) => return self.answer_from(&record, config),
                Err(error) => return self.store_unavailable(config, &error),
            };
            if in_flight_fingerprint != self.fingerprint && !self.manual {
                return refuse(IdempotencyError::PayloadMismatch);
            }
            let now = Instant::now();
            if now >= give_up_at {
                return refuse(IdempotencyError::InFlight {
                    status: config.in_flight_status,
                    retry_after: RETRY_AFTER,
                });
            }
            self.store
                .wait_for_change(&self.storage_key, wait.min(give_up_at - now))
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

    fn store_unavailable(self, config: &Config, error: &StoreError) -> Start {
        log::error!("idempotency: store unavailable while reserving a key: {error}");
        match config.store_outage {
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

/// A reservation whose handler is running. Dropped without [`finish`](Self::finish) (the
/// client went away, the handler panicked), it frees its key in the background; the lease
/// covers the case where even that cannot run.
pub(crate) struct PendingRecord {
    config: Arc<Config>,
    store: Arc<dyn DynStore>,
    key: String,
    token: ReservationToken,
    fingerprint: Fingerprint,
    settled: bool,
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
        let task = actix_web::rt::spawn(async move { self.finish(handler.await).await });
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

    /// Stores the handler's response (when its status is storable) or frees the key.
    async fn finish<B>(
        mut self,
        result: Result<ServiceResponse<B>, Error>,
    ) -> Result<ServiceResponse<EitherBody<B>>, Error>
    where
        B: MessageBody + 'static,
    {
        let response = match result {
            Ok(response) if self.config.is_storable(response.status()) => response,
            other => {
                self.release().await;
                return other.map(ServiceResponse::map_into_left_body);
            }
        };
        let (request, response) = response.into_parts();
        let (head, body) = response.into_parts();
        let (record, body) = match capture_response_body(body, self.config.response_body_limit)
            .await
        {
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
                self.release().await;
                return Err(actix_web::error::ErrorInternalServerError(
                    "the response body failed",
                ));
            }
        };
        self.complete(record).await;
        Ok(ServiceResponse::new(request, head.set_body(body)).map_into_right_body())
    }

    async fn complete(&mut self, response: Option<StoredResponse>) {
        self.settled = true;
        let record = CompletedRecord::new(self.fingerprint, response);
        let ttl = self.config.record_ttl;
        match self
            .store
            .complete(&self.key, self.token, record, ttl)
            .await
        {
            Ok(Completion::Stored) => {}
            Ok(_) => log::warn!(
                "idempotency: the reservation lease ran out before the handler finished; \
                 its response was not stored (raise reservation_lease)"
            ),
            Err(error) => log::error!("idempotency: could not store a response: {error}"),
        }
    }

    async fn release(&mut self) {
        self.settled = true;
        if let Err(error) = self.store.release(&self.key, self.token).await {
            log::error!("idempotency: could not free a key (its lease will): {error}");
        }
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let store = Arc::clone(&self.store);
        let key = std::mem::take(&mut self.key);
        let token = self.token;
        // A drop outside a runtime (a shutting-down worker) leaves the key to its lease.
        if tokio::runtime::Handle::try_current().is_ok() {
            actix_web::rt::spawn(async move {
                if let Err(error) = store.release(&key, token).await {
                    log::error!("idempotency: could not free an abandoned key: {error}");
                }
            });
        }
    }
}
