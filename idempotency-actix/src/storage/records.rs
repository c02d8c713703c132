//! The memory store's completed records: least-recently-used lists in a few shards, bounded by
//! the records' resident size.
//!
//! Every record is written once and may be replayed much later, so the eviction order must be
//! plain recency: a scan-resistant policy (TinyLFU admission, S3-FIFO) would drop a fresh record
//! first, which is exactly the one a retry is about to ask for.

use std::{
    hash::BuildHasher,
    sync::Arc,
    time::{Duration, Instant},
};

use lru::LruCache;
use parking_lot::Mutex;

use super::{in_flight::deadline, memory_key::MemoryKey, CompletedRecord};

type FastHash = foldhash::fast::RandomState;

/// A store keeps one list (exact LRU) below twice this bound; above it, one shard per this
/// much, up to `MOST_SHARDS`.
const SHARD_BUDGET: u64 = 4 * 1024 * 1024;
const MOST_SHARDS: u64 = 16;

#[derive(Debug)]
struct Kept {
    record: Arc<CompletedRecord>,
    expires_at: Instant,
    weight: u64,
}

#[derive(Debug)]
struct Shard {
    list: LruCache<MemoryKey, Kept, FastHash>,
    weight: u64,
}

/// Completed records by key.
pub(super) struct Records {
    shards: Box<[Mutex<Shard>]>,
    budget: u64,
    hasher: FastHash,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("shards", &self.shards.len())
            .field("budget_per_shard", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Records {
    /// Records of at most `max_bytes` in all.
    pub(super) fn new(max_bytes: u64) -> Self {
        let shards = (max_bytes / SHARD_BUDGET).clamp(1, MOST_SHARDS);
        let hasher = FastHash::default();
        Self {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        list: LruCache::unbounded_with_hasher(hasher.clone()),
                        weight: 0,
                    })
                })
                .collect(),
            budget: max_bytes / shards,
            hasher,
        }
    }

    fn shard(&self, key: &MemoryKey) -> &Mutex<Shard> {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[index]
    }

    /// The live record of `key` at `now`, which becomes the most recently used.
    pub(super) fn get(&self, key: &MemoryKey, now: Instant) -> Option<Arc<CompletedRecord>> {
        let mut shard = self.shard(key).lock();
        match shard.list.get(key) {
            Some(kept) if kept.expires_at > now => Some(Arc::clone(&kept.record)),
            Some(_) => {
                if let Some(expired) = shard.list.pop(key) {
                    shard.weight -= expired.weight;
                }
                None
            }
            None => None,
        }
    }

    /// The live record of `key`, leaving its place in the eviction order as it is.
    pub(super) fn peek(&self, key: &MemoryKey) -> Option<Arc<CompletedRecord>> {
        let now = Instant::now();
        let shard = self.shard(key).lock();
        shard
            .list
            .peek(key)
            .filter(|kept| kept.expires_at > now)
            .map(|kept| Arc::clone(&kept.record))
    }

    /// Removes the record of `key`, and says whether it was live.
    pub(super) fn remove(&self, key: &MemoryKey) -> bool {
        let now = Instant::now();
        let mut shard = self.shard(key).lock();
        match shard.list.pop(key) {
            Some(removed) => {
                shard.weight -= removed.weight;
                removed.expires_at > now
            }
            None => false,
        }
    }

    /// Whether `key` has a live record.
    pub(super) fn contains(&self, key: &MemoryKey) -> bool {
        let now = Instant::now();
        let shard = self.shard(key).lock();
        shard
            .list
            .peek(key)
            .is_some_and(|kept| kept.expires_at > now)
    }

    /// Stores `record` for `ttl` from `now`, evicting the least recently used records past the bound, and
    /// says how many live records it evicted. A record heavier than a whole shard's budget
    /// evicts everything else in its shard: the newest record always stays.
    pub(super) fn insert(
        &self,
        key: &MemoryKey,
        record: Arc<CompletedRecord>,
        ttl: Duration,
        weight: u64,
        now: Instant,
    ) -> u64 {
        let kept = Kept {
            record,
            expires_at: deadline(now, ttl),
            weight,
        };
        let mut shard = self.shard(key).lock();
        if let Some(replaced) = shard.list.put(*key, kept) {
            shard.weight -= replaced.weight;
        }
        shard.weight += weight;
        let mut evicted_live = 0;
        while shard.weight > self.budget && shard.list.len() > 1 {
            let Some((_, evicted)) = shard.list.pop_lru() else {
                break;
            };
            shard.weight -= evicted.weight;
            if evicted.expires_at > now {
                evicted_live += 1;
            }
        }
        evicted_live
    }

    /// How many records are held (expired ones not yet dropped included).
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().list.len())
            .sum()
    }

    /// Their weight, in bytes.
    pub(super) fn weight(&self) -> u64 {
        self.shards.iter().map(|shard| shard.lock().weight).sum()
    }
}
