//! Storage backends and the trait they implement.

mod interface;
mod memory;
mod record;

pub use interface::IdempotencyStore;
pub(crate) use interface::DynStore;
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use record::{
    Completion, CompletedRecord, Reservation, ReservationToken, StoredResponse,
    RECORD_FORMAT_VERSION,
};

#[cfg(test)]
pub(crate) mod conformance;
