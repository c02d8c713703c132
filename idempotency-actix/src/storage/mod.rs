//! Storage backends and the trait they implement.

mod interface;
mod memory;
mod record;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub(crate) use interface::DynStore;
pub use interface::IdempotencyStore;
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use record::{
    CompletedRecord, Completion, Renewal, Reservation, ReservationToken, StoredResponse,
    RECORD_FORMAT_VERSION,
};

#[cfg(test)]
pub(crate) mod conformance;
