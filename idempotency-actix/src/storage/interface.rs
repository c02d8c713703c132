//! The storage trait every backend implements.

use std::{future::Future, time::Duration};

use futures_util::future::LocalBoxFuture;

use super::{CompletedRecord, Completion, Reservation, ReservationToken};
use crate::{Fingerprint, StoreError};

/// A backend that keeps idempotency records.
///
/// The contract every implementation must keep (and the shared store test suite checks):
/// - [`reserve`](Self::reserve) is one atomic step: of any number of concurrent calls for a free
///   key, exactly one gets [`Reservation::Acquired`];
/// - a reservation expires after its `lease` unless completed, freeing the key;
/// - [`complete`](Self::complete) and [`release`](Self::release) act only when the token still
///   owns the key, so an owner whose lease ran out cannot overwrite a newer owner's record;
/// - completed records expire after the `ttl` given to [`complete`](Self::complete).
///
/// Build a store once, outside `HttpServer::new`: that closure runs once per worker, and a
/// per-worker in-memory store would let each worker run the same request once.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically claims `key` for the request with `fingerprint`, or reports who holds it.
    fn reserve(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>>;

    /// Replaces the reservation held by `token` with `record`, kept for `ttl`.
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

    /// Waits until the reservation on `key` may have been completed or freed, for at most
    /// `within`; a duplicate request then looks again with [`reserve`](Self::reserve).
    ///
    /// The default sleeps for `within` (polling). A store that can signal completion should
    /// return as soon as it happens.
    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        let _ = key;
        tokio::time::sleep(within)
    }
}

/// Object-safe twin of [`IdempotencyStore`], so one middleware can hold stores of several types.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Reservation, StoreError>>;

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

    fn wait_for_change<'a>(&'a self, key: &'a str, within: Duration) -> LocalBoxFuture<'a, ()>;
}

impl<S: IdempotencyStore> DynStore for S {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> LocalBoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(IdempotencyStore::reserve(self, key, fingerprint, lease))
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

    fn wait_for_change<'a>(&'a self, key: &'a str, within: Duration) -> LocalBoxFuture<'a, ()> {
        Box::pin(IdempotencyStore::wait_for_change(self, key, within))
    }
}
