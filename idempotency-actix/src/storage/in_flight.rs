//! The memory store's requests in flight: a map sharded under plain locks.
//!
//! Reservations live for the length of one request and are never evicted, so they need neither
//! a cache's admission policy nor its write log and timer wheel: a hash map per shard, expired
//! entries treated as absent and swept as the shard grows.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use super::{memory_key::MemoryKey, ReservationToken};
use crate::Fingerprint;

const SHARDS: usize = 64;

/// A key whose handler is running.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    pub(super) token: ReservationToken,
    pub(super) fingerprint: Fingerprint,
    pub(super) expires_at: Instant,
    /// Wakes the duplicates waiting for this reservation to end.
    pub(super) ended: Arc<Notify>,
    /// Purged or released: the key is free, and the entry stays until the lease's end only so
    /// that its old owner cannot make it again (a renewal or completion arriving late).
    pub(super) freed: bool,
}

impl InFlight {
    pub(super) fn is_live(&self, now: Instant) -> bool {
        !self.freed && self.expires_at > now
    }

    /// Whether this is `token`'s reservation, freed (purged or released) while its lease runs.
    pub(super) fn freed_for(&self, token: ReservationToken, now: Instant) -> bool {
        self.freed && self.token == token && self.expires_at > now
    }
}

type FastHash = foldhash::fast::RandomState;

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<MemoryKey, InFlight, FastHash>,
    /// The size at which expired entries are swept next.
    sweep_at: usize,
}

/// One shard, locked: what an operation on one key sees, atomically.
pub(super) struct Locked<'a> {
    shard: MutexGuard<'a, Shard>,
    count: &'a AtomicU64,
}

impl Locked<'_> {
    /// The key's reservation, live or expired.
    pub(super) fn get(&self, key: &MemoryKey) -> Option<&InFlight> {
        self.shard.entries.get(key)
    }

    /// Puts a reservation on the key, in place of an expired one if any.
    pub(super) fn put(&mut self, key: &MemoryKey, entry: InFlight, now: Instant) {
        match self.shard.entries.get_mut(key) {
            Some(existing) => {
                // Whoever waited on the expired reservation looks again now.
                existing.ended.notify_waiters();
                *existing = entry;
            }
            None => {
                self.shard.entries.insert(*key, entry);
                self.count.fetch_add(1, Ordering::Relaxed);
                self.sweep_if_grown(now);
            }
        }
    }

    /// Extends the key's reservation to `expires_at`.
    pub(super) fn extend(&mut self, key: &MemoryKey, expires_at: Instant) {
        if let Some(existing) = self.shard.entries.get_mut(key) {
            existing.expires_at = expires_at;
        }
    }

    /// Frees the key's reservation, keeping it as freed until its lease's end, and wakes
    /// whoever waits for it to end.
    pub(super) fn free(&mut self, key: &MemoryKey) {
        if let Some(entry) = self.shard.entries.get_mut(key) {
            entry.freed = true;
            entry.ended.notify_waiters();
        }
    }

    /// Removes the key's reservation and wakes whoever waits for it to end.
    pub(super) fn remove(&mut self, key: &MemoryKey) {
        if let Some(removed) = self.shard.entries.remove(key) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            removed.ended.notify_waiters();
        }
    }

    /// Drops expired reservations (their owners died or stopped renewing) once the shard has
    /// doubled since the last sweep, so the cost stays constant per insertion.
    fn sweep_if_grown(&mut self, now: Instant) {
        if self.shard.entries.len() < self.shard.sweep_at {
            return;
        }
        sweep(&mut self.shard, self.count, now, Freed::Keep);
    }
}

/// What a sweep does with freed reservations whose lease still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freed {
    /// Keeps them: their old owners must not make them again.
    Keep,
    /// Drops them too: the store is full, and a request that could run comes first.
    Drop,
}

/// Drops the shard's expired reservations, waking whoever waited on them.
fn sweep(shard: &mut Shard, count: &AtomicU64, now: Instant, freed: Freed) {
    let before = shard.entries.len();
    shard.entries.retain(|_, entry| {
        let kept = entry.is_live(now) || (freed == Freed::Keep && entry.expires_at > now);
        if !kept {
            entry.ended.notify_waiters();
        }
        kept
    });
    let swept = before - shard.entries.len();
    count.fetch_sub(swept as u64, Ordering::Relaxed);
    shard.sweep_at = (shard.entries.len() * 2).max(64);
}

/// Requests in flight by key.
#[derive(Debug)]
pub(super) struct InFlightMap {
    shards: Box<[Mutex<Shard>]>,
    hasher: FastHash,
    count: AtomicU64,
}

impl Default for InFlightMap {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: FastHash::default(),
            count: AtomicU64::new(0),
        }
    }
}

impl InFlightMap {
    /// Locks the shard of `key`: every operation on a key happens under this lock.
    pub(super) fn lock(&self, key: &MemoryKey) -> Locked<'_> {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        Locked {
            shard: self.shards[index].lock(),
            count: &self.count,
        }
    }

    /// How many reservations are held (expired ones not yet swept included).
    pub(super) fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Drops every shard's expired and freed reservations, one shard at a time (never while
    /// holding another shard's lock): the store is full.
    pub(super) fn sweep_expired(&self, now: Instant) {
        for shard in self.shards.iter() {
            sweep(&mut shard.lock(), &self.count, now, Freed::Drop);
        }
    }
}

/// `now + lifetime`, cut to what the clock can hold.
pub(super) fn deadline(now: Instant, lifetime: Duration) -> Instant {
    let mut lifetime = lifetime.min(super::LONGEST_LIFETIME);
    loop {
        if let Some(deadline) = now.checked_add(lifetime) {
            return deadline;
        }
        lifetime /= 2;
    }
}
