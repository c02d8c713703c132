//! The in-process store.
//!
//! Reservations and completed records live apart. Reservations are few (one per request in
//! flight) and must never be dropped to make room: they sit in a sharded map and leave it only
//! when completed, released, or when their lease runs out. Records are many and may be dropped,
//! oldest use first, when the memory bound is reached: they sit in LRU lists. Every
//! operation on a key runs under its shard's lock, which is what makes "no reservation and no
//! record, so reserve" one atomic step across the two.

use std::{
    future::{ready, Future},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{
    in_flight::{deadline, InFlight, InFlightMap},
    memory_key::MemoryKey,
    records::Records,
    CompletedRecord, Completion, IdempotencyStore, KeyState, Renewal, Reservation,
    ReservationToken,
};
use crate::{Fingerprint, StoreError};

/// How often, at most, record evictions are logged.
const EVICTION_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Counts records evicted before their TTL, and warns about them at a bounded rate.
#[derive(Debug, Default)]
struct Evictions {
    total: AtomicU64,
    /// When the last warning went out, and how many evictions it had counted.
    last_warning: Mutex<Option<(Instant, u64)>>,
}

impl Evictions {
    fn record(&self, evicted: u64) {
        if evicted == 0 {
            return;
        }
        let total = self.total.fetch_add(evicted, Ordering::Relaxed) + evicted;
        let now = Instant::now();
        let mut last = self.last_warning.lock();
        let since = match *last {
            Some((at, _)) if now.duration_since(at) < EVICTION_WARNING_INTERVAL => return,
            Some((_, counted)) => total.saturating_sub(counted),
            None => total,
        };
        *last = Some((now, total));
        drop(last);
        tracing::warn!(
            "idempotency: the memory store is full and evicted {since} record(s) before their \
             TTL ({total} in all); a retry of an evicted key runs its handler again. \
             Raise MemoryStore::builder().max_bytes(..) or shorten record_ttl"
        );
    }
}

/// The default store: bounded, in-process.
///
/// Right for one process. Several instances behind a load balancer each keep their own records
/// and would each run a retried request once: use a shared store (Redis) there.
///
/// [`MemoryStore::default()`] is **one store per process**: every call returns a handle to the
/// same records, so a middleware built inside `HttpServer::new` (whose closure runs once per
/// worker) still gives every worker one store. [`MemoryStore::builder()`] makes a new, separate
/// store: build that one once, outside `HttpServer::new`, and hand clones to the middleware
/// (clones share their records). In tests that must not see each other's keys, give each test
/// a store of its own with `MemoryStore::builder().build()`.
///
/// # Capacity
///
/// Reservations (requests whose handler is running) are kept apart from completed records and
/// are never evicted: they leave only when their request completes, or when their lease runs
/// out without renewal. Past [`max_in_flight`](MemoryStoreBuilder::max_in_flight) of them, new
/// keyed requests get 503 and do not run.
///
/// Completed records share [`max_bytes`](MemoryStoreBuilder::max_bytes). When it is reached,
/// the least recently used records (written or replayed longest ago; from 8 MiB on, the bound
/// is split between up to 16 shards, each evicting its own least recently used) are evicted
/// before their
/// TTL. That is the capacity trade-off: a retry whose record was evicted runs its handler
/// again. Evictions are counted ([`capacity_evictions`](Self::capacity_evictions)) and logged
/// as a warning at most once a minute.
///
/// ```
/// use idempotency_actix::MemoryStore;
///
/// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
/// let shared = store.clone(); // same records
/// assert_eq!(shared.capacity_evictions(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    /// The thread a store from the builder was built on; `None` for the process-wide default.
    built_on: Option<std::thread::ThreadId>,
    in_flight: Arc<InFlightMap>,
    records: Arc<Records>,
    max_in_flight: u64,
    evictions: Arc<Evictions>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("in_flight", &self.in_flight.len())
            .field("records", &self.records.len())
            .field("weighted_size", &self.records.weight())
            .field("capacity_evictions", &self.capacity_evictions())
            .finish()
    }
}

/// The process's one default store: `HttpServer::new` runs its closure once per worker, so a
/// `MemoryStore::default()` written inside it must still be one store, or each worker would run
/// the same request once.
static PROCESS_DEFAULT: OnceLock<MemoryStore> = OnceLock::new();

impl Default for MemoryStore {
    /// The process-wide default store: every call returns a handle to the same records, with
    /// the default bounds. Build a separate store with [`MemoryStore::builder`].
    fn default() -> Self {
        PROCESS_DEFAULT
            .get_or_init(|| Self {
                built_on: None,
                ..Self::builder().build()
            })
            .clone()
    }
}

impl MemoryStore {
    /// A builder for a new store of its own, to set its bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: 256 * 1024 * 1024,
            max_in_flight: 100_000,
        }
    }

    /// Whether this store was built by [`MemoryStore::builder`] on the calling thread: on an
    /// actix worker, that means it was built inside `HttpServer::new`, once per worker.
    pub(crate) fn built_on_this_thread(&self) -> bool {
        self.built_on == Some(std::thread::current().id())
    }

    /// How many completed records were evicted before their TTL because the store was full.
    pub fn capacity_evictions(&self) -> u64 {
        self.evictions.total.load(Ordering::Relaxed)
    }

    fn record(&self, key: &MemoryKey, now: Instant) -> Option<Arc<CompletedRecord>> {
        self.records.get(key, now)
    }

    fn reserve_now(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let key = &MemoryKey::new(key);
        let now = Instant::now();
        if self.in_flight.len() >= self.max_in_flight {
            // Expired reservations still count until swept: sweep before refusing anyone.
            self.in_flight.sweep_expired(now);
        }
        let mut locked = self.in_flight.lock(key);
        if let Some(owner) = locked.get(key).filter(|owner| owner.is_live(now)) {
            // The same reservation asked for again (its first answer was lost): it is ours.
            if owner.token == token {
                return Ok(Reservation::Acquired);
            }
            return Ok(Reservation::InFlight {
                fingerprint: owner.fingerprint,
                remaining_lease: owner.expires_at.saturating_duration_since(now),
            });
        }
        if let Some(record) = self.record(key, now) {
            return Ok(Reservation::Completed(record));
        }
        // Replacing this key's own expired reservation adds nothing.
        if locked.get(key).is_none() && self.in_flight.len() >= self.max_in_flight {
            return Err(StoreError::Full(format!(
                "{} requests are in flight (max_in_flight)",
                self.max_in_flight
            )));
        }
        locked.put(key, in_flight(token, fingerprint, now, lease), now);
        Ok(Reservation::Acquired)
    }

    fn renew_now(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Renewal {
        let key = &MemoryKey::new(key);
        let now = Instant::now();
        let mut locked = self.in_flight.lock(key);
        match locked.get(key) {
            Some(freed) if freed.freed_for(token, now) => Renewal::Lost,
            // Freed, and its lease over since: the key is free, made again like any lost one.
            Some(ours) if ours.token == token && ours.freed => {
                locked.put(key, in_flight(token, fingerprint, now, lease), now);
                Renewal::Restored
            }
            Some(ours) if ours.token == token => {
                let renewal = if ours.is_live(now) {
                    Renewal::Renewed
                } else {
                    Renewal::Restored
                };
                locked.extend(key, deadline(now, lease));
                renewal
            }
            Some(other) if other.is_live(now) => Renewal::Lost,
            _ if self.records.contains(key) => Renewal::Lost,
            _ => {
                locked.put(key, in_flight(token, fingerprint, now, lease), now);
                Renewal::Restored
            }
        }
    }

    fn complete_now(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Completion {
        let key = &MemoryKey::new(key);
        let now = Instant::now();
        let weight = resident_size(&record);
        let record = Arc::new(record);
        let mut locked = self.in_flight.lock(key);
        let mut evicted = 0;
        let completion = match locked.get(key) {
            Some(freed) if freed.freed_for(token, now) => Completion::LostReservation,
            Some(ours) if ours.token == token => {
                let completion = if ours.is_live(now) {
                    Completion::Stored
                } else {
                    Completion::StoredWithoutReservation
                };
                // The record goes in before the reservation goes out, both under the shard's
                // lock: a concurrent reserve sees one or the other.
                evicted = self.records.insert(key, record, ttl, weight, now);
                locked.remove(key);
                completion
            }
            Some(other) if other.is_live(now) => Completion::LostReservation,
            _ => match self.record(key, now) {
                // A repeated completion finds its own record.
                Some(stored) if *stored == *record => Completion::Stored,
                Some(_) => Completion::LostReservation,
                None => {
                    evicted = self.records.insert(key, record, ttl, weight, now);
                    locked.remove(key);
                    Completion::StoredWithoutReservation
                }
            },
        };
        drop(locked);
        // Counted (and perhaps logged) after the locks are released.
        self.evictions.record(evicted);
        completion
    }

    fn release_now(&self, key: &str, token: ReservationToken) {
        let key = &MemoryKey::new(key);
        let mut locked = self.in_flight.lock(key);
        if locked.get(key).is_some_and(|ours| ours.token == token) {
            locked.free(key);
        }
    }

    fn inspect_now(&self, key: &str) -> Option<KeyState> {
        let key = &MemoryKey::new(key);
        let now = Instant::now();
        let locked = self.in_flight.lock(key);
        if let Some(owner) = locked.get(key).filter(|owner| owner.is_live(now)) {
            return Some(KeyState::InFlight {
                fingerprint: owner.fingerprint,
                remaining_lease: owner.expires_at.saturating_duration_since(now),
            });
        }
        self.records.peek(key).map(KeyState::Completed)
    }

    fn purge_now(&self, key: &str) -> bool {
        let key = &MemoryKey::new(key);
        let now = Instant::now();
        let mut locked = self.in_flight.lock(key);
        let reserved = locked.get(key).is_some_and(|owner| owner.is_live(now));
        // Freeing the reservation wakes its waiting duplicates, as a release does; kept as
        // freed until its lease's end, it cannot be made again by its old owner.
        if reserved {
            locked.free(key);
        }
        let recorded = self.records.remove(key);
        reserved || recorded
    }

    async fn wait_for_end(&self, key: &str, within: Duration) {
        let key = &MemoryKey::new(key);
        let ended = {
            let locked = self.in_flight.lock(key);
            match locked.get(key) {
                Some(owner) if !owner.freed => Arc::clone(&owner.ended),
                _ => return,
            }
        };
        // Registered before the lock is taken again: an end after this point is not missed,
        // and one before it is seen by looking again.
        let notified = ended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let still_held = self
            .in_flight
            .lock(key)
            .get(key)
            .is_some_and(|owner| !owner.freed && Arc::ptr_eq(&owner.ended, &ended));
        if still_held {
            let _ = tokio::time::timeout(within, notified).await;
        }
    }
}

fn in_flight(
    token: ReservationToken,
    fingerprint: Fingerprint,
    now: Instant,
    lease: Duration,
) -> InFlight {
    InFlight {
        token,
        fingerprint,
        expires_at: deadline(now, lease),
        ended: Arc::new(Notify::new()),
        freed: false,
    }
}

impl IdempotencyStore for MemoryStore {
    fn reserve(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        ready(self.reserve_now(key, token, fingerprint, lease))
    }

    fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, StoreError>> {
        ready(Ok(self.renew_now(key, token, fingerprint, lease)))
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
        self.release_now(key, token);
        ready(Ok(()))
    }

    fn inspect(&self, key: &str) -> impl Future<Output = Result<Option<KeyState>, StoreError>> {
        ready(Ok(self.inspect_now(key)))
    }

    fn purge(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> {
        ready(Ok(self.purge_now(key)))
    }

    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        self.wait_for_end(key, within)
    }
}

/// What one record holds in resident memory, measured (`cargo bench --bench record_memory`)
/// rather than guessed, so that `max_bytes` bounds the process's memory: the LRU entry and its
/// table slot, the record's allocations, and the allocator's rounding of each.
fn resident_size(record: &CompletedRecord) -> u64 {
    const ENTRY: usize = 230;
    const PER_HEADER: usize = 96;
    let response = record.response.as_ref().map_or(0, |response| {
        response.size_hint() + response.headers.len() * PER_HEADER
    });
    u64::try_from(ENTRY + response).unwrap_or(u64::MAX)
}

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    max_in_flight: u64,
}

impl MemoryStoreBuilder {
    /// The memory bound of completed records, as resident memory: bodies, headers and keys plus
    /// the measured cost of an entry (about 620 bytes in all for a record of a 200-byte JSON
    /// response). Past it, the least recently used records are evicted before their
    /// TTL (see [`MemoryStore`]'s capacity section). Reservations do not count against it.
    ///
    /// Defaults to 256 MiB.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// How many requests may be in flight (reserved, handler running) at once; past it, new
    /// keyed requests get 503 without running.
    ///
    /// Defaults to 100 000.
    pub fn max_in_flight(mut self, max_in_flight: u64) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            built_on: Some(std::thread::current().id()),
            in_flight: Arc::new(InFlightMap::default()),
            records: Arc::new(Records::new(self.max_bytes)),
            max_in_flight: self.max_in_flight,
            evictions: Arc::new(Evictions::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    #[actix_rt::test]
    async fn memory_store_keeps_the_store_contract() {
        conformance::run_all(|| MemoryStore::builder().build()).await;
    }

    /// The same suite on a store small enough for its capacity case to evict records.
    #[actix_rt::test]
    async fn a_small_memory_store_keeps_the_store_contract() {
        conformance::run_all(|| MemoryStore::builder().max_bytes(16 * 1024).build()).await;
    }

    #[actix_rt::test]
    async fn expired_reservations_do_not_hold_places_in_flight() {
        let store = MemoryStore::builder().max_in_flight(2).build();
        for key in ["a", "b"] {
            let reserved = store.reserve_now(
                key,
                ReservationToken::generate(),
                Fingerprint([1; 32]),
                Duration::from_millis(50),
            );
            assert!(
                matches!(reserved, Ok(Reservation::Acquired)),
                "{reserved:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reserved = store.reserve_now(
            "c",
            ReservationToken::generate(),
            Fingerprint([1; 32]),
            Duration::from_secs(30),
        );
        assert!(
            matches!(reserved, Ok(Reservation::Acquired)),
            "{reserved:?}"
        );
    }

    #[actix_rt::test]
    async fn reservations_past_max_in_flight_are_refused_as_full() {
        let store = MemoryStore::builder().max_in_flight(2).build();
        let lease = Duration::from_secs(30);
        for key in ["a", "b"] {
            let reserved = store.reserve_now(
                key,
                ReservationToken::generate(),
                Fingerprint([1; 32]),
                lease,
            );
            assert!(
                matches!(reserved, Ok(Reservation::Acquired)),
                "{reserved:?}"
            );
        }
        let refused = store.reserve_now(
            "c",
            ReservationToken::generate(),
            Fingerprint([1; 32]),
            lease,
        );
        assert!(matches!(refused, Err(StoreError::Full(_))), "{refused:?}");
    }

    /// Waiters are woken by the end of the reservation, not by their own deadline: the
    /// deadlines here are far longer than the test allows.
    #[actix_rt::test]
    async fn waiters_wake_when_the_reservation_completes_or_is_freed() {
        let store = MemoryStore::builder().build();
        let lease = Duration::from_secs(30);
        for complete in [true, false] {
            let key = format!("k-{complete}");
            let token = ReservationToken::generate();
            let Ok(Reservation::Acquired) =
                store.reserve_now(&key, token, Fingerprint([1; 32]), lease)
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
