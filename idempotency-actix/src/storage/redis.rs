//! The Redis store: one shared state for any number of instances.

use std::{future::Future, sync::Arc, time::Duration};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client, Script, Value,
};
use tokio::sync::OnceCell;

use super::{
    CompletedRecord, Completion, IdempotencyStore, Renewal, Reservation, ReservationToken,
    LONGEST_LIFETIME,
};
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

/// Extends the reservation whose value starts with ARGV[1] (the owner's token) to ARGV[3] ms,
/// or makes it again (value ARGV[2]) if the key is empty. Returns 1 renewed, 2 restored, 0 lost.
const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
if string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
";

/// Replaces the reservation whose value starts with ARGV[1] (the owner's token) by the record,
/// or stores the record in an empty key. Returns 1 stored, 2 stored without reservation, 0 lost.
/// Repeating a completion whose answer was lost finds its own record and reports it stored.
const COMPLETE: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[2] then
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
if string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
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
/// Redis is reachable recovers by itself.
///
/// # What Redis must be configured for
///
/// - `maxmemory-policy noeviction`: an evicted reservation would let a duplicate run, and an
///   evicted record would let a retry run again. With `noeviction` a full Redis refuses new
///   reservations, and those requests get 503 whatever the
///   [`StoreOutage`](crate::StoreOutage) policy.
/// - Persistence (`appendonly yes`, with `appendfsync always` for no loss, or `everysec` for
///   up to a second of loss) if completed records must survive a Redis restart. Without it a
///   restart forgets every record: retries of requests completed before it run again.
///   Reservations of requests still running are made again by their next renewal.
///
/// On its first connection the store reads these settings (`CONFIG GET`, where allowed) and
/// logs a warning for each that does not hold.
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
    renew: Script,
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
            .get_or_try_init(|| async {
                let mut connection = ConnectionManager::new_with_config(
                    inner.client.clone(),
                    inner.settings.clone(),
                )
                .await?;
                warn_about_unsafe_settings(&mut connection).await;
                Ok(connection)
            })
            .await
            .map_err(backend)?;
        Ok(connection.clone())
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    async fn reserve_key(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let mut connection = self.connection().await?;
        let answer: Vec<Value> = self
            .inner
            .reserve
            .key(self.key(key))
            .arg(reservation_value(token, fingerprint))
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        let unreadable = |error: StoreError| Reservation::Unreadable {
            reason: error.to_string(),
        };
        match answer.as_slice() {
            [Value::Int(0)] => Ok(Reservation::Acquired),
            [Value::Int(1), Value::BulkString(current), Value::Int(pttl)] => {
                Ok(match in_flight_fingerprint(current) {
                    Ok(fingerprint) => Reservation::InFlight {
                        fingerprint,
                        remaining_lease: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)),
                    },
                    Err(error) => unreadable(error),
                })
            }
            [Value::Int(2), Value::BulkString(current)] => Ok(match decode_record(current) {
                Ok(record) => Reservation::Completed(Arc::new(record)),
                Err(error) => unreadable(error),
            }),
            other => Err(StoreError::Corrupt(format!(
                "unexpected answer to a reservation: {other:?}"
            ))),
        }
    }

    async fn renew_key(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let mut connection = self.connection().await?;
        let renewed: i64 = self
            .inner
            .renew
            .key(self.key(key))
            .arg(owner_prefix(token))
            .arg(reservation_value(token, fingerprint))
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(match renewed {
            1 => Renewal::Renewed,
            2 => Renewal::Restored,
            _ => Renewal::Lost,
        })
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
        Ok(match stored {
            1 => Completion::Stored,
            2 => Completion::StoredWithoutReservation,
            _ => Completion::LostReservation,
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
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> {
        self.reserve_key(key, token, fingerprint, lease)
    }

    fn renew(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, StoreError>> {
        self.renew_key(key, token, fingerprint, lease)
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
                renew: Script::new(RENEW),
            }),
        })
    }
}

fn backend(error: redis::RedisError) -> StoreError {
    // A Redis at `maxmemory` under `noeviction` refuses writes with OOM: the store is full,
    // which must never turn into an unprotected run the way an outage may under fail-open.
    // Redis 7 reports it with the OOM code; older versions wrap it in a script error.
    if error.code() == Some("OOM") || error.to_string().contains("OOM command not allowed") {
        return StoreError::Full(error.to_string());
    }
    StoreError::Backend(Box::new(error))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.min(LONGEST_LIFETIME).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Logs a warning for each Redis setting that breaks the store's guarantees. Managed Redis
/// services often refuse `CONFIG`; then nothing can be checked and nothing is logged.
async fn warn_about_unsafe_settings(connection: &mut ConnectionManager) {
    let setting = |name: &'static str| {
        let mut connection = connection.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async::<Vec<String>>(&mut connection)
                .await
                .ok()
                .and_then(|pair| pair.into_iter().nth(1))
        }
    };
    if let Some(policy) = setting("maxmemory-policy").await {
        if policy != "noeviction" {
            log::warn!(
                "idempotency: Redis runs with maxmemory-policy {policy}; under memory pressure \
                 it may evict a reservation or record and let a request run twice. \
                 Set maxmemory-policy noeviction"
            );
        }
    }
    let append_only = setting("appendonly").await;
    let snapshots = setting("save").await;
    if append_only.as_deref() == Some("no") && snapshots.as_deref() == Some("") {
        log::warn!(
            "idempotency: Redis keeps nothing on disk (appendonly no, no save points); a Redis \
             restart forgets every completed record, and retries of those requests run again. \
             Set appendonly yes for records that survive a restart"
        );
    }
}

/// A reservation's value: the in-flight marker, the owner's token, and the fingerprint.
fn reservation_value(token: ReservationToken, fingerprint: Fingerprint) -> Vec<u8> {
    let mut value = owner_prefix(token);
    value.extend_from_slice(&fingerprint.0);
    value
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
    use std::{
        collections::hash_map::RandomState,
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };

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
