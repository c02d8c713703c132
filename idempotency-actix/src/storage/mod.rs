//! Storage backends and the trait they implement.

#[cfg(any(feature = "redis", feature = "postgres"))]
mod codec;
mod in_flight;
mod interface;
mod memory;
mod memory_key;
#[cfg(feature = "postgres")]
mod postgres;
mod record;
mod records;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "postgres")]
pub use self::postgres::{
    ExpiryJob, IdempotentTransaction, MaybeIdempotentTransaction, PostgresStore,
    PostgresStoreBuilder,
};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub use interface::IdempotencyStore;
pub(crate) use interface::{BackgroundSlot, DynStore};
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use record::{
    CompletedRecord, Completion, KeyState, Renewal, Reservation, ReservationToken, StoredResponse,
    RECORD_FORMAT_VERSION,
};

#[cfg(any(test, feature = "test-suite"))]
pub mod conformance;

/// The longest lease or TTL a store represents; longer ones are cut to it rather than
/// overflowing a clock (Redis refuses an expiry past its clock's range).
const LONGEST_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(100 * 365 * 24 * 60 * 60);
