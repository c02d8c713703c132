//! The versioned records a store keeps.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Fingerprint;

/// The format version written into every [`CompletedRecord`]; bumped on any incompatible change
/// so that a store shared by two library versions never misreads a record.
pub const RECORD_FORMAT_VERSION: u8 = 1;

/// A response as stored for replay: status, replayable headers and body bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and raw values, in order, without hop-by-hop headers,
    /// `Content-Length` and `Date`.
    pub headers: Vec<(String, Bytes)>,
    /// The body bytes.
    pub body: Bytes,
}

impl StoredResponse {
    /// A stored response from its parts.
    pub fn new(status: u16, headers: Vec<(String, Bytes)>, body: Bytes) -> Self {
        Self {
            status,
            headers,
            body,
        }
    }

    /// Approximate size in bytes, for stores that bound their memory.
    pub fn size_hint(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }
}

/// The final state of a key: the request's fingerprint and its response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CompletedRecord {
    /// [`RECORD_FORMAT_VERSION`] at the time of writing.
    pub version: u8,
    /// The fingerprint of the request that produced the response.
    pub fingerprint: Fingerprint,
    /// The response, or `None` when it was too large to store: the operation is done but
    /// cannot be replayed.
    pub response: Option<StoredResponse>,
}

impl CompletedRecord {
    /// A record in the current format.
    pub fn new(fingerprint: Fingerprint, response: Option<StoredResponse>) -> Self {
        Self {
            version: RECORD_FORMAT_VERSION,
            fingerprint,
            response,
        }
    }
}

/// Proof of a reservation, handed back to [`complete`](super::IdempotencyStore::complete),
/// [`renew`](super::IdempotencyStore::renew) and [`release`](super::IdempotencyStore::release) so
/// that only the current owner can finish a key.
///
/// The caller makes the token before it asks for the reservation, so that a reservation whose
/// answer was lost (a timeout after the command was sent, a dropped future) can still be freed
/// with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReservationToken(pub u64);

impl ReservationToken {
    /// A token no other reservation in this or any other process is expected to carry: a
    /// per-process random seed mixed with a per-process counter.
    pub fn generate() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| RandomState::new().build_hasher().finish());
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(seed);
        hasher.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
        Self(hasher.finish())
    }
}

/// What [`reserve`](super::IdempotencyStore::reserve) found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Reservation {
    /// The key was free (or its previous owner's lease ran out): the caller's token now owns it.
    Acquired,
    /// Another request owns the key and has not finished.
    InFlight {
        /// The fingerprint of the request that owns the key.
        fingerprint: Fingerprint,
        /// How long the owner's lease still runs.
        remaining_lease: Duration,
    },
    /// The key is done; here is its record.
    Completed(std::sync::Arc<CompletedRecord>),
    /// The key holds a value this version cannot read: corrupt, or written in another
    /// [`RECORD_FORMAT_VERSION`]. The operation it stands for may have run, so it must not run
    /// again, and its response cannot be replayed.
    Unreadable {
        /// Why it could not be read, for the log.
        reason: String,
    },
}

/// What [`complete`](super::IdempotencyStore::complete) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The caller's reservation was replaced by the record.
    Stored,
    /// The caller's reservation had gone (its lease ran out, or the store lost it) but no other
    /// request had taken the key, so the record was stored all the same.
    StoredWithoutReservation,
    /// Another request took the key (or completed it) after the caller's reservation had gone:
    /// nothing was written.
    LostReservation,
}

/// What [`renew`](super::IdempotencyStore::renew) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Renewal {
    /// The caller's reservation runs for another lease.
    Renewed,
    /// The caller's reservation had gone (the store lost it, or the lease ran out between two
    /// renewals) and nobody had taken the key: it was made again for another lease.
    Restored,
    /// Another request owns or completed the key, or the caller's reservation was freed (an
    /// operator purged it; a renewal that arrived after its release): the caller's handler is
    /// no longer protected and its record will not be stored.
    Lost,
}

/// What a key holds, as [`inspect`](super::IdempotencyStore::inspect) reports it to an
/// operator: the answer to "did this request run, and what did it answer?".
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KeyState {
    /// A request holds the key and its handler has not finished (or its process died and the
    /// lease has not yet run out).
    InFlight {
        /// The fingerprint of the request that holds the key.
        fingerprint: Fingerprint,
        /// How long its lease still runs; zero for a key held by a handler's transaction
        /// (`PostgresStore`), which holds it until the transaction ends, and whose fingerprint
        /// is then unknown (zeroes).
        remaining_lease: Duration,
    },
    /// The request ran; here is its record (status and body in
    /// [`response`](CompletedRecord::response), `None` when it was too large to store).
    Completed(std::sync::Arc<CompletedRecord>),
    /// The key holds a value this version cannot read (see [`Reservation::Unreadable`]): the
    /// request may have run. Purging it lets a retry run.
    Unreadable {
        /// Why it could not be read.
        reason: String,
    },
}

impl KeyState {
    /// The state a [`Reservation`] answer describes, or `None` for
    /// [`Reservation::Acquired`] (the key was free).
    pub fn from_reservation(reservation: Reservation) -> Option<Self> {
        match reservation {
            Reservation::Acquired => None,
            Reservation::InFlight {
                fingerprint,
                remaining_lease,
            } => Some(Self::InFlight {
                fingerprint,
                remaining_lease,
            }),
            Reservation::Completed(record) => Some(Self::Completed(record)),
            Reservation::Unreadable { reason } => Some(Self::Unreadable { reason }),
        }
    }
}
