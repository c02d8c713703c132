//! The Redis store: one shared state for any number of instances.

use std::{
    collections::hash_map::RandomState,
    future::Future,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, Script, Value,
};
use tokio::sync::OnceCell;

use super::{CompletedRecord, Completion, IdempotencyStore, Reservation, ReservationToken};
use crate::{Fingerprint, StoreError};

/// Claims a free key (or one whose lease ran out: Redis expired it), in one step.
/// Returns `{0}` acquired, `{1, value, pttl}` in flight, `{2, value}` completed.
const RESERVE: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {0}
end
if string.sub(current, 1, 1) == 'i' then
  return {1, current, redis.call('PTTL', KEYS[1])}
end
return {2, current}
";

/// Replaces the reservation whose value starts with ARGV[1] (the owner's token) by the record.
const COMPLETE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Deletes the reservation whose value starts with ARGV[1] (the owner's token).
const RELEASE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

const IN_FLIGHT: u8 = b'i';
const COMPLETED: u8 = b'c';

/// A store on Redis, shared by every instance that points at the same server and key prefix.
///
/// Each operation is one Lua script on one key, so a fresh request costs two round trips
/// (reserve, complete), a replay one, and the layout works on Redis Cluster. Reservations and
/// records expire on Redis' own clock (`PX`); completing or releasing a key checks the owner's
/// token inside the script, so an owner whose lease ran out cannot overwrite a newer owner.
///
/// The connection is made on first use and remade after a failure, so a server started before
/// Redis is reachable recovers by itself. Run Redis with `maxmemory-policy noeviction`: an
/// evicted reservation would let a duplicate run.
///
/// ```no_run
/// use idempotency_actix::{IdempotencyMiddleware, RedisStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .key_prefix("orders-api:idempotency:")
///     .build()
///     .expect("a valid Redis URL");
/// let middleware = IdempotencyMiddleware::new(store);
/// # let _ = middleware;
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    settings: ConnectionManagerConfig,
    connection: OnceCell<ConnectionManager>,
    prefix: String,
    reserve: Script,
    complete: Script,
    release: Script,
    token_seed: u64,
    next_token: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("server", &self.inner.client.get_connection_info().addr)
            .field("prefix", &self.inner.prefix)
            .field("connected", &self.inner.connection.initialized())
            .finish()
    }
}

impl RedisStore {
    /// A store on the Redis server at `url` with the default settings.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).build()
    }

    /// A builder for a store on the Redis server at `url` (`redis://host:port/db`).
    pub fn builder(url: &str) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.to_owned(),
            prefix: "idempotency:".to_owned(),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let inner = &self.inner;
        let connection = inner
            .connection
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(inner.client.clone(), inner.settings.clone())
            })
            .await
            .map_err(backend)?;
        Ok(connection.clone())
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    fn new_token(&self) -> ReservationToken {
        // Unique across instances: a per-process random seed mixed with a per-process counter.
        let count = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(self.inner.token_seed);
        hasher.write_u64(count);
        ReservationToken(hasher.finish())
    }

    async fn reserve_key(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let token = self.new_token();
        let mut value = owner_prefix(token);
        value.extend_from_slice(&fingerprint.0);
        let mut connection = self.connection().await?;
        let answer: Vec<Value> = self
            .inner
            .reserve
            .key(self.key(key))
            .arg(value)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        match answer.as_slice() {
            [Value::Int(0)] => Ok(Reservation::Acquired(token)),
            [Value::Int(1), Value::BulkString(current), Value::Int(pttl)] => {
                Ok(Reservation::InFlight {
                    fingerprint: in_flight_fingerprint(current)?,
                    remaining_lease: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)),
                })
            }
            [Value::Int(2), Value::BulkString(current)] => {
                Ok(Reservation::Completed(Arc::new(decode_record(current)?)))
            }
            other => Err(StoreError::Corrupt(format!(
                "unexpected answer to a reservation: {other:?}"
            ))),
        }
    }

    async fn complete_key(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let mut value = vec![COMPLETED];
        value.extend(postcard::to_stdvec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        let mut connection = self.connection().await?;
        let stored: i64 = self
            .inner
            .complete
            .key(self.key(key))
            .arg(owner_prefix(token))
            .arg(value)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(if stored == 1 {
            Completion::Stored
        } else {
            Completion::LostReservation
        })
    }

    async fn release_key(&self, key: &str, token: ReservationToken) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let _released: i64 = self
            .inner
            .release
            .key(self.key(key))
            .arg(owner_prefix(token))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

impl IdempotencyStore for RedisStore {
    fn reserve(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        self.reserve_key(key, fingerprint, lease)
    }

    fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> {
        self.complete_key(key, token, record, ttl)
    }

    fn release(
        &self,
        key: &str,
        token: ReservationToken,
    ) -> impl Future<Output = Result<(), StoreError>> {
        self.release_key(key, token)
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
}

impl RedisStoreBuilder {
    /// The prefix of every key the store writes, so that several services (or tests) can
    /// share one Redis.
    ///
    /// Defaults to `idempotency:`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long connecting may take before the request gets the store-outage answer.
    ///
    /// Defaults to 1 second.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one command may take before the request gets the store-outage answer.
    ///
    /// Defaults to 1 second.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Checks the URL and builds the store. No connection is made until the first request.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let client = Client::open(self.url.as_str()).map_err(backend)?;
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(self.connection_timeout)
            .set_response_timeout(self.response_timeout)
            .set_number_of_retries(1)
            .set_max_delay(100);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                settings,
                connection: OnceCell::new(),
                prefix: self.prefix,
                reserve: Script::new(RESERVE),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                token_seed: RandomState::new().build_hasher().finish(),
                next_token: AtomicU64::new(0),
            }),
        })
    }
}

fn backend(error: redis::RedisError) -> StoreError {
    StoreError::Backend(Box::new(error))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What a reservation's value starts with: the in-flight marker and the owner's token.
fn owner_prefix(token: ReservationToken) -> Vec<u8> {
    format!("{}{}|", char::from(IN_FLIGHT), token.0).into_bytes()
}

fn in_flight_fingerprint(value: &[u8]) -> Result<Fingerprint, StoreError> {
    let corrupt = || StoreError::Corrupt("a reservation without a fingerprint".to_owned());
    let separator = value.iter().position(|b| *b == b'|').ok_or_else(corrupt)?;
    let bytes: [u8; 32] = value[separator + 1..].try_into().map_err(|_| corrupt())?;
    Ok(Fingerprint(bytes))
}

fn decode_record(value: &[u8]) -> Result<CompletedRecord, StoreError> {
    let Some((&COMPLETED, encoded)) = value.split_first() else {
        return Err(StoreError::Corrupt("not a completed record".to_owned()));
    };
    let record: CompletedRecord =
        postcard::from_bytes(encoded).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if record.version != super::RECORD_FORMAT_VERSION {
        return Err(StoreError::Corrupt(format!(
            "record format version {} is not {}",
            record.version,
            super::RECORD_FORMAT_VERSION
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;

    /// The Redis the tests use, or `None` (with a loud message) when none is reachable and
    /// `IDEMPOTENCY_REQUIRE_REDIS` is not `1`.
    pub(crate) async fn test_redis_url() -> Option<String> {
        let url = std::env::var("IDEMPOTENCY_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let reachable = match Client::open(url.as_str()) {
            Ok(client) => match client.get_multiplexed_async_connection().await {
                Ok(mut connection) => redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if reachable {
            return Some(url);
        }
        if std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!("IDEMPOTENCY_REQUIRE_REDIS=1 but no Redis answers at {url}");
        }
        eprintln!("\n*** SKIPPED: no Redis at {url}; set IDEMPOTENCY_TEST_REDIS_URL to run the Redis tests ***\n");
        None
    }

    #[actix_rt::test]
    async fn redis_store_keeps_the_store_contract() {
        let Some(url) = test_redis_url().await else {
            return;
        };
        let run = RandomState::new().build_hasher().finish();
        let counter = AtomicU64::new(0);
        conformance::run_all(|| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            RedisStore::builder(&url)
                .key_prefix(format!("test:conformance:{run}:{n}:"))
                .build()
                .unwrap_or_else(|e| panic!("store: {e}"))
        })
        .await;
    }

    #[test]
    fn records_survive_the_wire_format() {
        let record = CompletedRecord::new(
            Fingerprint([3; 32]),
            Some(super::super::StoredResponse::new(
                201,
                vec![(
                    "content-type".to_owned(),
                    bytes::Bytes::from_static(b"text/plain"),
                )],
                bytes::Bytes::from_static(b"hello"),
            )),
        );
        let mut value = vec![COMPLETED];
        value.extend(postcard::to_stdvec(&record).unwrap_or_default());
        assert_eq!(decode_record(&value).ok(), Some(record));
        assert!(decode_record(b"c\xff\xff").is_err());
        assert!(decode_record(b"i1|").is_err());
    }
}
