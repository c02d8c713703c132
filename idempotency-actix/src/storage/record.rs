//! The versioned records a store keeps.

use std::time::Duration;

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

/// Proof of a reservation, handed back to [`complete`](super::IdempotencyStore::complete) and
/// [`release`](super::IdempotencyStore::release) so that only the current owner can finish a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReservationToken(pub u64);

/// What [`reserve`](super::IdempotencyStore::reserve) found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Reservation {
    /// The key was free (or its previous owner's lease ran out): the caller now owns it.
    Acquired(ReservationToken),
    /// Another request owns the key and has not finished.
    InFlight {
        /// The fingerprint of the request that owns the key.
        fingerprint: Fingerprint,
        /// How long the owner's lease still runs.
        remaining_lease: Duration,
    },
    /// The key is done; here is its record.
    Completed(std::sync::Arc<CompletedRecord>),
}

/// What [`complete`](super::IdempotencyStore::complete) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The record was stored.
    Stored,
    /// The caller's lease had run out and the key was taken over or freed: nothing was written.
    LostReservation,
}
