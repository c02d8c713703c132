//! The in-process store, on moka.

use std::{
    future::{ready, Future},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moka::{
    ops::compute::{CompResult, Op},
    sync::Cache,
    Expiry,
};
use tokio::sync::Notify;

use super::{CompletedRecord, Completion, IdempotencyStore, Reservation, ReservationToken};
use crate::{Fingerprint, StoreError};

/// What one key holds.
#[derive(Debug, Clone)]
enum Slot {
    InFlight {
        token: ReservationToken,
        fingerprint: Fingerprint,
        expires_at: Instant,
        /// Wakes the duplicates waiting for this reservation to end.
        ended: Arc<Notify>,
    },
    Completed {
        record: Arc<CompletedRecord>,
        ttl: Duration,
    },
}

/// Each slot expires on its own clock: a reservation after its lease, a record after its TTL.
struct SlotExpiry;

impl Expiry<String, Slot> for SlotExpiry {
    fn expire_after_create(&self, _key: &String, slot: &Slot, now: Instant) -> Option<Duration> {
        Some(slot_lifetime(slot, now))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        slot: &Slot,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot_lifetime(slot, now))
    }
}

fn slot_lifetime(slot: &Slot, now: Instant) -> Duration {
    match slot {
        Slot::InFlight { expires_at, .. } => expires_at.saturating_duration_since(now),
        Slot::Completed { ttl, .. } => *ttl,
    }
}

/// The default store: bounded, in-process, on [moka](https://docs.rs/moka).
///
/// Right for one process. Several instances behind a load balancer each keep their own records
/// and would each run a retried request once: use a shared store (Redis) there.
///
/// Create it once, outside `HttpServer::new`, and hand clones to the middleware: clones share
/// their records.
///
/// ```
/// use idempotency_actix::MemoryStore;
///
/// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
/// let shared = store.clone(); // same records
/// # let _ = shared;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Slot>,
    next_token: Arc<AtomicU64>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl MemoryStore {
    /// A builder to set the store's memory bound.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: 256 * 1024 * 1024,
        }
    }

    fn reserve_now(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let token = ReservationToken(self.next_token.fetch_add(1, Ordering::Relaxed));
        let now = Instant::now();
        // One atomic step per key: moka runs the closure under the key's lock.
        let result = self
            .cache
            .entry(key.to_owned())
            .and_compute_with(|existing| match existing.map(|entry| entry.into_value()) {
                Some(Slot::InFlight { expires_at, .. }) if expires_at > now => Op::Nop,
                Some(Slot::Completed { .. }) => Op::Nop,
                _ => Op::Put(Slot::InFlight {
                    token,
                    fingerprint,
                    expires_at: now + lease,
                    ended: Arc::new(Notify::new()),
                }),
            });
        match result {
            CompResult::Inserted(_) | CompResult::ReplacedWith(_) => {
                Ok(Reservation::Acquired(token))
            }
            CompResult::Unchanged(entry) => Ok(match entry.into_value() {
                Slot::InFlight {
                    fingerprint,
                    expires_at,
                    ..
                } => Reservation::InFlight {
                    fingerprint,
                    remaining_lease: expires_at.saturating_duration_since(now),
                },
                Slot::Completed { record, .. } => Reservation::Completed(record),
            }),
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(StoreError::Corrupt(
                "the reservation vanished while it was being made".to_owned(),
            )),
        }
    }

    fn complete_now(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Completion {
        let record = Arc::new(record);
        let ended = self.end_reservation(key, token, Op::Put(Slot::Completed { record, ttl }));
        if ended {
            Completion::Stored
        } else {
            Completion::LostReservation
        }
    }

    /// Applies `op` to `key` if `token` still holds its reservation, and wakes its waiters.
    fn end_reservation(&self, key: &str, token: ReservationToken, op: Op<Slot>) -> bool {
        let mut waiters = None;
        self.cache
            .entry(key.to_owned())
            .and_compute_with(|existing| match existing.map(|entry| entry.into_value()) {
                Some(Slot::InFlight {
                    token: owner,
                    ended,
                    ..
                }) if owner == token => {
                    waiters = Some(ended);
                    op
                }
                _ => Op::Nop,
            });
        match waiters {
            Some(ended) => {
                ended.notify_waiters();
                true
            }
            None => false,
        }
    }

    async fn wait_for_end(&self, key: &str, within: Duration) {
        let ended = match self.cache.get(key) {
            Some(Slot::InFlight { ended, .. }) => ended,
            _ => return,
        };
        // Registered on creation: a notification between the lookup and the await is not lost.
        let notified = ended.notified();
        let _ = tokio::time::timeout(within, notified).await;
    }
}

impl IdempotencyStore for MemoryStore {
    fn reserve(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        ready(self.reserve_now(key, fingerprint, lease))
    }

    fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> {
        ready(Ok(self.complete_now(key, token, record, ttl)))
    }

    fn release(
        &self,
        key: &str,
        token: ReservationToken,
    ) -> impl Future<Output = Result<(), StoreError>> {
        self.end_reservation(key, token, Op::Remove);
        ready(Ok(()))
    }

    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        self.wait_for_end(key, within)
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
}

impl MemoryStoreBuilder {
    /// The approximate memory bound: stored bodies and headers plus a fixed cost per key.
    /// Least recently used records are evicted past it.
    ///
    /// Defaults to 256 MiB.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        const PER_KEY_COST: usize = 128;
        let cache = Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(|key: &String, slot: &Slot| {
                let payload = match slot {
                    Slot::InFlight { .. } => 0,
                    Slot::Completed { record, .. } => {
                        record.response.as_ref().map_or(0, |r| r.size_hint())
                    }
                };
                u32::try_from(key.len() + payload + PER_KEY_COST).unwrap_or(u32::MAX)
            })
            .expire_after(SlotExpiry)
            .build();
        MemoryStore {
            cache,
            next_token: Arc::new(AtomicU64::new(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    #[actix_rt::test]
    async fn memory_store_keeps_the_store_contract() {
        conformance::run_all(MemoryStore::default).await;
    }

    /// Waiters are woken by the end of the reservation, not by their own deadline: the
    /// deadlines here are far longer than the test allows.
    #[actix_rt::test]
    async fn waiters_wake_when_the_reservation_completes_or_is_freed() {
        let store = MemoryStore::default();
        let lease = Duration::from_secs(30);
        for complete in [true, false] {
            let key = format!("k-{complete}");
            let Ok(Reservation::Acquired(token)) =
                store.reserve_now(&key, Fingerprint([1; 32]), lease)
            else {
                panic!("expected to acquire");
            };
            let waiter = {
                let (store, key) = (store.clone(), key.clone());
                actix_rt::spawn(
                    async move { store.wait_for_end(&key, Duration::from_secs(60)).await },
                )
            };
            actix_rt::task::yield_now().await;
            if complete {
                let record = CompletedRecord::new(Fingerprint([1; 32]), None);
                assert_eq!(
                    store.complete_now(&key, token, record, lease * 2),
                    Completion::Stored
                );
            } else {
                IdempotencyStore::release(&store, &key, token)
                    .await
                    .unwrap_or_default();
            }
            let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(
                woken.is_ok(),
                "the waiter must be woken when the reservation ends"
            );
        }
    }
}
