//! Storage backends and the trait they implement.

mod interface;
mod memory;
mod record;
#[cfg(feature = "redis")]
mod redis;

pub(crate) use interface::DynStore;
pub use interface::IdempotencyStore;
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub use record::{
    CompletedRecord, Completion, Reservation, ReservationToken, StoredResponse,
    RECORD_FORMAT_VERSION,
};

#[cfg(test)]
pub(crate) mod conformance;
