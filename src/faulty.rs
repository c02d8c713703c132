//! A real [`MemoryStore`] behind a link that fails the way networks do, and that counts what
//! it is asked: for tests of store faults and of requests that must not reach the store.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use idempotency_actix::{
    storage::{CompletedRecord, Completion, KeyState, Renewal, Reservation, ReservationToken},
    Fingerprint, IdempotencyStore, MemoryStore, StoreError,
};

/// Which store operations fail, and how; what was asked.
#[derive(Debug, Default)]
pub struct Faults {
    /// Completions that fail before reaching the store.
    pub failing_completions: AtomicUsize,
    /// Reservations that are made but answered with an error (a timeout after the command ran).
    pub reservations_answered_with_error: AtomicUsize,
    /// Reservations that are made but answered only after this many milliseconds.
    pub reservation_answer_delay_ms: AtomicUsize,
    /// How many reservations were asked for.
    pub reservations: AtomicUsize,
}

impl Faults {
    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// A [`MemoryStore`] whose answers fail as its [`Faults`] say.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    store: MemoryStore,
    faults: Arc<Faults>,
}

impl FaultyStore {
    /// A store on a fresh [`MemoryStore`], and the handle that sets its faults.
    pub fn new() -> (Self, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let store = Self {
            store: MemoryStore::builder().build(),
            faults: Arc::clone(&faults),
        };
        (store, faults)
    }
}

fn lost() -> StoreError {
    StoreError::Backend("timed out waiting for the store's answer".into())
}

impl IdempotencyStore for FaultyStore {
    fn reserve(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        self.faults.reservations.fetch_add(1, Ordering::SeqCst);
        let answer = self.store.reserve(key, token, fingerprint, lease);
        let faults = Arc::clone(&self.faults);
        async move {
            let answer = answer.await;
            let delay = faults.reservation_answer_delay_ms.load(Ordering::SeqCst) as u64;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if Faults::take(&faults.reservations_answered_with_error) {
                return Err(lost());
            }
            answer
        }
    }

    fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, StoreError>> {
        self.store.renew(key, token, fingerprint, lease)
    }

    fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> {
        let failing = Faults::take(&self.faults.failing_completions);
        let answer = self.store.complete(key, token, record, ttl);
        async move {
            if failing {
                return Err(lost());
            }
            answer.await
        }
    }

    fn release(
        &self,
        key: &str,
        token: ReservationToken,
    ) -> impl Future<Output = Result<(), StoreError>> {
        self.store.release(key, token)
    }

    fn inspect(&self, key: &str) -> impl Future<Output = Result<Option<KeyState>, StoreError>> {
        self.store.inspect(key)
    }

    fn purge(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> {
        self.store.purge(key)
    }

    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        self.store.wait_for_change(key, within)
    }
}
