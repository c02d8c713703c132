//! The storage trait every backend implements.

use std::{
    any::Any,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::future::LocalBoxFuture;

use super::{CompletedRecord, Completion, KeyState, Renewal, Reservation, ReservationToken};
use crate::{Fingerprint, StoreError};

/// A backend that keeps idempotency records.
///
/// The contract every implementation must keep (and the shared store test suite checks):
/// - [`reserve`](Self::reserve) is one atomic step: of any number of concurrent calls for a free
///   key, exactly one gets [`Reservation::Acquired`];
/// - a reservation is never evicted or refused admission to make room for records: it lasts
///   until it is completed or released, or until its `lease` runs out without a
///   [`renew`](Self::renew). A store that cannot take one more answers
///   [`StoreError::Full`], never a reservation it may drop;
/// - [`complete`](Self::complete), [`renew`](Self::renew) and [`release`](Self::release) act
///   only for the token that owns the key, or (complete and renew) on a key nobody holds, so an
///   owner whose lease ran out can never overwrite a newer owner's reservation or record;
/// - completed records expire after the `ttl` given to [`complete`](Self::complete); a store
///   with a memory bound may evict them earlier, and must document in what order;
/// - a value the store cannot decode is reported as [`Reservation::Unreadable`], not as an
///   error: it is a fact about the key, not an outage;
/// - [`inspect`](Self::inspect) reads a key without changing it, and [`purge`](Self::purge)
///   deletes whatever it holds: these are the operator's tools, not the middleware's.
///
/// Build a store once, outside `HttpServer::new`: that closure runs once per worker, and a
/// per-worker in-memory store would let each worker run the same request once.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically claims `key` for `token` (the request with `fingerprint`) for `lease`, or
    /// reports who holds it.
    ///
    /// The caller makes the token first, so that when the answer is lost (an error after the
    /// command may have run, a dropped future) it can free the key with
    /// [`release`](Self::release) instead of leaving it locked for a lease. For the same
    /// reason, a reservation asked for again with the token that holds it (a client that
    /// re-sent the command) is [`Reservation::Acquired`].
    fn reserve(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>>;

    /// Extends the reservation held by `token` to `lease` from now, while its handler runs.
    ///
    /// If the reservation is gone and nobody else holds or completed the key, it is made again
    /// (with `fingerprint`) and [`Renewal::Restored`] says so: that is how a reservation survives
    /// a store that lost it. A reservation that was freed on purpose ([`release`](Self::release)
    /// or [`purge`](Self::purge)) is never made again by its old owner, at least until its lease
    /// would have ended: [`Renewal::Lost`].
    fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, StoreError>>;

    /// Replaces the reservation held by `token` with `record`, kept for `ttl`. If the reservation
    /// is gone and nobody else holds or completed the key, the record is stored all the same
    /// ([`Completion::StoredWithoutReservation`]), unless it was purged:
    /// [`Completion::LostReservation`].
    fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>>;

    /// Frees `key` if `token` still holds it, so that a retry runs the handler again.
    fn release(
        &self,
        key: &str,
        token: ReservationToken,
    ) -> impl Future<Output = Result<(), StoreError>>;

    /// What `key` holds, without changing it: `None` when it is free (never reserved, released,
    /// expired, or its lease ran out), [`KeyState::InFlight`] for a live reservation,
    /// [`KeyState::Completed`] for a live record, [`KeyState::Unreadable`] for a value the
    /// store cannot decode.
    ///
    /// For support tooling ("did this request run, and what did it answer?"); the middleware
    /// never calls it.
    fn inspect(&self, key: &str) -> impl Future<Output = Result<Option<KeyState>, StoreError>>;

    /// Deletes whatever `key` holds (a reservation, live or not, or a record, readable or not)
    /// and says whether something was there. The next request with the key runs its handler.
    ///
    /// Purging a reservation whose handler still runs lets a retry run while it runs: the
    /// protection is gone for that request. The purge sticks: the purged handler's renewals
    /// are [`Renewal::Lost`] and its completion [`Completion::LostReservation`], so its response
    /// is never stored. That is the operator's call, for a key stuck behind a handler that will
    /// never finish. A store that wakes waiting duplicates on [`release`](Self::release) wakes
    /// them on a purge too.
    fn purge(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>>;

    /// Whether the store answers, for readiness probes: one cheap round trip (a Redis `PING`,
    /// a PostgreSQL `SELECT 1` on the store's own connections), bounded by the store's
    /// timeouts; it changes nothing. The default, for a store in the process's own memory,
    /// always answers.
    fn health(&self) -> impl Future<Output = Result<(), StoreError>> {
        std::future::ready(Ok(()))
    }

    /// Waits until the reservation on `key` may have been completed or freed, for at most
    /// `within`; a duplicate request then looks again with [`reserve`](Self::reserve).
    ///
    /// The default sleeps for `within` (polling). A store that can signal completion should
    /// return as soon as it happens.
    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        let _ = key;
        tokio::time::sleep(within)
    }

    /// The longest one [`wait_for_change`](Self::wait_for_change) may last, for a store that
    /// wakes waiting duplicates itself when a reservation is completed or released: a waiting
    /// duplicate looks again after at most this (or when the owner's lease runs out), which
    /// bounds what a lost wake-up costs.
    ///
    /// The default, `None`, is for a store that cannot: its waiting duplicates poll, every
    /// 5 ms backing off to 50 ms.
    fn longest_notified_wait(&self) -> Option<Duration> {
        None
    }
}

/// Object-safe twin of [`IdempotencyStore`], so one middleware can hold stores of several types.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Reservation, StoreError>>;

    fn renew<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Renewal, StoreError>>;

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> LocalBoxFuture<'a, Result<Completion, StoreError>>;

    fn release<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
    ) -> LocalBoxFuture<'a, Result<(), StoreError>>;

    fn inspect<'a>(
        &'a self,
        key: &'a str,
    ) -> LocalBoxFuture<'a, Result<Option<KeyState>, StoreError>>;

    fn purge<'a>(&'a self, key: &'a str) -> LocalBoxFuture<'a, Result<bool, StoreError>>;

    fn health(&self) -> LocalBoxFuture<'_, Result<(), StoreError>>;

    fn wait_for_change<'a>(&'a self, key: &'a str, within: Duration) -> LocalBoxFuture<'a, ()>;

    fn longest_notified_wait(&self) -> Option<Duration>;

    /// The store itself, for an extractor that works only with its own kind of store.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    fn as_any(&self) -> &dyn Any;

    /// A slot for one job in the background on this store (freeing a key, retrying a
    /// completion), or `None` when as many as a store runs at once are under way.
    fn background_slot(&self) -> Option<BackgroundSlot>;
}

/// How many jobs in the background one store runs at once: during an outage, every failed
/// request would start one; past this many, a job is left to the lease instead.
const MOST_BACKGROUND_JOBS: usize = 1024;

/// A job in the background on a store, counted while it runs.
#[derive(Debug)]
pub(crate) struct BackgroundSlot(Option<Arc<AtomicUsize>>);

impl BackgroundSlot {
    /// A slot among the `running` jobs of one store, if there is room.
    pub(crate) fn take(running: &Arc<AtomicUsize>) -> Option<Self> {
        if running.fetch_add(1, Ordering::AcqRel) >= MOST_BACKGROUND_JOBS {
            running.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Some(Arc::clone(running))))
    }
}

impl Drop for BackgroundSlot {
    fn drop(&mut self) {
        if let Some(running) = self.0.take() {
            running.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<S: IdempotencyStore> DynStore for S {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(IdempotencyStore::reserve(
            self,
            key,
            token,
            fingerprint,
            lease,
        ))
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Renewal, StoreError>> {
        Box::pin(IdempotencyStore::renew(
            self,
            key,
            token,
            fingerprint,
            lease,
        ))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> LocalBoxFuture<'a, Result<Completion, StoreError>> {
        Box::pin(IdempotencyStore::complete(self, key, token, record, ttl))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
    ) -> LocalBoxFuture<'a, Result<(), StoreError>> {
        Box::pin(IdempotencyStore::release(self, key, token))
    }

    fn inspect<'a>(
        &'a self,
        key: &'a str,
    ) -> LocalBoxFuture<'a, Result<Option<KeyState>, StoreError>> {
        Box::pin(IdempotencyStore::inspect(self, key))
    }

    fn purge<'a>(&'a self, key: &'a str) -> LocalBoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(IdempotencyStore::purge(self, key))
    }

    fn health(&self) -> LocalBoxFuture<'_, Result<(), StoreError>> {
        Box::pin(IdempotencyStore::health(self))
    }

    fn wait_for_change<'a>(&'a self, key: &'a str, within: Duration) -> LocalBoxFuture<'a, ()> {
        Box::pin(IdempotencyStore::wait_for_change(self, key, within))
    }

    fn longest_notified_wait(&self) -> Option<Duration> {
        IdempotencyStore::longest_notified_wait(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn background_slot(&self) -> Option<BackgroundSlot> {
        // Not counted: the middleware holds its stores observed, which count.
        Some(BackgroundSlot(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_jobs_are_bounded_per_store_and_counted_while_they_run() {
        let running = Arc::new(AtomicUsize::new(0));
        let slots: Vec<_> = (0..MOST_BACKGROUND_JOBS)
            .map(|_| BackgroundSlot::take(&running))
            .collect();
        assert!(slots.iter().all(Option::is_some));
        assert!(BackgroundSlot::take(&running).is_none(), "one too many");
        drop(slots);
        assert_eq!(running.load(Ordering::Acquire), 0);
        assert!(BackgroundSlot::take(&running).is_some());
    }
}
