//! The Redis store: one shared state for any number of instances.

mod changes;
mod connection;
/// Shared with the workspace's integration tests, which include the file and use all of it.
#[cfg(test)]
#[allow(unreachable_pub, dead_code)]
pub(crate) mod private_cluster;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{Script, Value};
use tokio::sync::OnceCell;

use self::{
    changes::Changes,
    connection::{Certificates, Connection, Target, Timeouts},
};
use super::{
    CompletedRecord, Completion, IdempotencyStore, KeyState, Renewal, Reservation,
    ReservationToken, LONGEST_LIFETIME,
};
use crate::{Fingerprint, StoreError};

/// The longest a duplicate waits to be woken before it looks again: a bound on what a lost
/// wake-up (a failover, a resharding) costs it.
const NOTIFIED_WAIT: Duration = Duration::from_secs(1);
/// How soon a duplicate looks again after its subscription failed.
const FALLBACK_POLL: Duration = Duration::from_millis(50);

// The values of a key: `i<token>|<fingerprint>` while in flight, `c<record>` once completed,
// `f<token>|` once freed (purged or released) until the lease's end, so that its old owner
// cannot make it again. A freed key is free for everyone else.

/// Claims a free key (or one whose lease ran out: Redis expired it), in one step; the same
/// reservation asked for again (its first answer was lost) is acquired again.
/// Returns `{0}` acquired, `{1, value, pttl}` in flight, `{2, value}` completed.
const RESERVE: &str = r"
local current = redis.call('GET', KEYS[1])
local kind = current and string.sub(current, 1, 1)
if not current or kind == 'f' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {0}
end
if kind == 'i' then
  local owner = string.sub(ARGV[1], 1, string.find(ARGV[1], '|', 1, true))
  if string.sub(current, 1, string.len(owner)) == owner then
    return {0}
  end
  return {1, current, redis.call('PTTL', KEYS[1])}
end
return {2, current}
";

/// Extends the reservation whose value starts with ARGV[1] (the owner's token) to ARGV[3] ms,
/// or makes it again (value ARGV[2]) if the key is empty, unless the owner's reservation was
/// freed. Returns 1 renewed, 2 restored, 0 lost.
const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == 'f' .. string.sub(ARGV[1], 2) then
  return 0
end
if not current or string.sub(current, 1, 1) == 'f' then
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
/// or stores the record in an empty key, unless the owner's reservation was freed. Returns 1
/// stored, 2 stored without reservation, 0 lost. Repeating a completion whose answer was lost
/// finds its own record and reports it stored. A stored record wakes the key's waiting
/// duplicates: `SPUBLISH` on the key's own name (one slot), under `pcall` so that a Redis
/// without sharded pub/sub (before 7.0) still stores it.
const COMPLETE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.pcall('SPUBLISH', KEYS[1], '')
  return 1
end
if current == ARGV[2] then
  return 1
end
if current == 'f' .. string.sub(ARGV[1], 2) then
  return 0
end
if not current or string.sub(current, 1, 1) == 'f' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.pcall('SPUBLISH', KEYS[1], '')
  return 2
end
return 0
";

/// Frees the reservation whose value starts with ARGV[1] (the owner's token), and wakes the
/// key's waiting duplicates as [`COMPLETE`] does.
const RELEASE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    redis.call('SET', KEYS[1], 'f' .. string.sub(ARGV[1], 2), 'PX', left)
  else
    redis.call('DEL', KEYS[1])
  end
  redis.pcall('SPUBLISH', KEYS[1], '')
  return 1
end
return 0
";

/// Reads a key for an operator. Returns `{0}` free, `{1, value, pttl}` held.
const INSPECT: &str = r"
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, 1) == 'f' then
  return {0}
end
return {1, current, redis.call('PTTL', KEYS[1])}
";

/// Frees a reservation as [`RELEASE`] does, or deletes a record. Returns 1 if something was
/// there.
const PURGE: &str = r"
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, 1) == 'f' then
  return 0
end
local left = redis.call('PTTL', KEYS[1])
if string.sub(current, 1, 1) == 'i' and left > 0 then
  local owner = string.sub(current, 2, string.find(current, '|', 1, true))
  redis.call('SET', KEYS[1], 'f' .. owner, 'PX', left)
else
  redis.call('DEL', KEYS[1])
end
redis.pcall('SPUBLISH', KEYS[1], '')
return 1
";

const IN_FLIGHT: u8 = b'i';
const COMPLETED: u8 = b'c';

/// A store on Redis, shared by every instance that points at the same server (or cluster) and
/// key prefix.
///
/// A reservation is one plain `SET .. NX PX .. GET` (Redis 7.0 or later): it takes a free key,
/// or returns the key's record, which is a replay in one command. Anything else it finds (a
/// reservation in flight, a freed one) and every other operation is one Lua script on one key
/// (the operator's [`inspect`](IdempotencyStore::inspect) and
/// [`purge`](IdempotencyStore::purge) too), so a fresh request costs two round trips (reserve,
/// complete) and a replay one. (A Redis before 7.0 refuses `NX` with `GET`; the store then
/// reserves by script only.) Reservations and records expire on Redis' own clock
/// (`PX`); completing or releasing a key checks the owner's token inside the script, so an
/// owner whose lease ran out cannot overwrite a newer owner.
///
/// The connection is made on first use and remade after a failure, so a server started before
/// Redis is reachable recovers by itself.
///
/// # Redis Cluster
///
/// With the `redis-cluster` feature, `RedisStore::cluster` and `RedisStore::cluster_builder`
/// make the same store on a Redis Cluster: each script runs on the node that owns its key's
/// hash slot (every operation touches that one key), following `MOVED` and `ASK` redirections
/// as slots move.
///
/// # Waiting duplicates are woken
///
/// A duplicate of a running request waits for its record. Completing or releasing a key
/// publishes on the key's own name as a sharded channel (`SPUBLISH`, Redis 7.0 or later), which
/// on a cluster stays in the shard that owns the key; one subscriber connection per store
/// (RESP3) listens to the keys this process's duplicates wait on and wakes them at once. A
/// waiting duplicate looks again at least every second (and when the owner's lease runs out),
/// which bounds what a lost message costs. Where the subscription fails (Redis before 7.0, a
/// proxy without pub/sub) duplicates poll, every 5 ms backing off to 50 ms.
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
/// On its first connection the store reads these settings (`CONFIG GET`, where allowed; on a
/// cluster, from every primary) and logs a warning for each that does not hold.
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
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    timeouts: Timeouts,
    connection: OnceCell<Connection>,
    /// Whether the server's settings were checked (once, after the first connection).
    settings_checked: std::sync::atomic::AtomicBool,
    changes: Changes,
    prefix: String,
    reserve: Script,
    complete: Script,
    release: Script,
    renew: Script,
    inspect: Script,
    purge: Script,
    /// Whether reservations start with a plain `SET .. NX .. GET` (Redis 7.0 or later): off
    /// once the server refused it.
    plain_reserve: AtomicBool,
    /// Whether a refusal of it for another reason was logged (once: requests cause them).
    plain_refusal_logged: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = &self.inner;
        let mut f = f.debug_struct("RedisStore");
        match &inner.target {
            Target::Node(node) => f.field("server", &node.addr),
            #[cfg(feature = "redis-cluster")]
            Target::Cluster(nodes, _) => {
                let addresses: Vec<_> = nodes.iter().map(|node| &node.addr).collect();
                f.field("cluster", &addresses)
            }
            Target::Given(_) => f.field("connection", &"given by the application"),
        };
        f.field("prefix", &inner.prefix)
            .field("connected", &inner.connection.initialized())
            .field("subscribed", &inner.changes.connected())
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
        RedisStoreBuilder::new(Servers::Node(url.to_owned()))
    }

    /// A store on the Redis Cluster that the nodes at `urls` (`redis://host:port`, one or more
    /// of the cluster's nodes) belong to, with the default settings.
    ///
    /// ```no_run
    /// use idempotency_actix::RedisStore;
    ///
    /// let store = RedisStore::cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
    ///     .expect("valid Redis URLs");
    /// # let _ = store;
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster<I, S>(urls: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::cluster_builder(urls).build()
    }

    /// A builder for a store on the Redis Cluster that the nodes at `urls` belong to. The
    /// cluster's other nodes are found from these; a URL's database number is ignored (a
    /// cluster has one).
    ///
    /// ```no_run
    /// use idempotency_actix::{IdempotencyMiddleware, RedisStore};
    ///
    /// let urls = std::env::var("REDIS_CLUSTER_URLS").unwrap_or_default();
    /// let store = RedisStore::cluster_builder(urls.split(','))
    ///     .key_prefix("orders-api:idempotency:")
    ///     .build()
    ///     .expect("valid Redis URLs");
    /// let middleware = IdempotencyMiddleware::new(store);
    /// # let _ = middleware;
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster_builder<I, S>(urls: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        RedisStoreBuilder::new(Servers::Cluster(
            urls.into_iter()
                .map(|url| url.as_ref().trim().to_owned())
                .collect(),
        ))
    }

    /// A builder for a store on a connection the application already has (one pool per
    /// backend): its commands go through `connection`, and the connection's own settings
    /// (its TLS, its timeouts) apply to them; the builder's TLS settings and connection
    /// timeout do not, and its response timeout bounds only `health`. Give the connection a
    /// response timeout
    /// (`ConnectionManagerConfig::set_response_timeout`), or a request waits as long as Redis
    /// does. With no URL of its own, the store cannot subscribe to wake waiting duplicates:
    /// they poll (every 5 ms, backing off to 50 ms), which costs them a little latency and
    /// Redis a few reads.
    ///
    /// ```no_run
    /// use idempotency_actix::RedisStore;
    /// use redis::aio::ConnectionManager;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let connection = ConnectionManager::new(client).await?;
    /// let store = RedisStore::builder_from_connection(connection.clone()).build()?;
    /// # let _ = store;
    /// # Ok(()) }
    /// ```
    pub fn builder_from_connection(connection: redis::aio::ConnectionManager) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Servers::Given(Connection::Node(connection)))
    }

    /// A builder for a store on a Redis Cluster connection the application already has; as
    /// [`builder_from_connection`](Self::builder_from_connection).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster_builder_from_connection(
        connection: redis::cluster_async::ClusterConnection,
    ) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Servers::Given(Connection::Cluster(connection)))
    }

    /// The store's connection, made on first use. A request waits for it no longer than the
    /// connection and response timeouts together, whoever is making it: requests during an
    /// outage answer in that time, the first as the tenth, instead of queueing behind attempt
    /// after attempt. (Making the connection is bounded by the same timeouts, so a wait cut
    /// short only ends an attempt that was failing.) The server's settings are checked apart,
    /// once connected, so that a slow check never delays a request.
    async fn connection(&self) -> Result<Connection, StoreError> {
        let inner = &self.inner;
        let made = inner
            .connection
            .get_or_try_init(|| inner.target.connect(inner.timeouts));
        let within = inner.timeouts.connection + inner.timeouts.response;
        let connection = match tokio::time::timeout(within, made).await {
            Ok(made) => made.cloned().map_err(backend)?,
            Err(_elapsed) => {
                return Err(StoreError::Backend(
                    format!("no connection to Redis within {within:?}").into(),
                ))
            }
        };
        if !inner
            .settings_checked
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let checked = connection.clone();
            tokio::spawn(async move { warn_about_unsafe_settings(&checked).await });
        }
        Ok(connection)
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
        let storage_key = self.key(key);
        let value = reservation_value(token, fingerprint);
        let unreadable = |error: StoreError| Reservation::Unreadable {
            reason: error.to_string(),
        };
        if self.inner.plain_reserve.load(Ordering::Relaxed) {
            // One plain command for the two common cases, a free key and a record (a replay);
            // anything else (in flight, freed, the same reservation again) is the script's.
            let answer: Result<Option<Vec<u8>>, _> = redis::cmd("SET")
                .arg(&storage_key)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .arg("GET")
                .query_async(&mut connection)
                .await;
            match answer {
                Ok(None) => return Ok(Reservation::Acquired),
                Ok(Some(current)) if current.first() == Some(&COMPLETED) => {
                    return Ok(match decode_record(&current) {
                        Ok(record) => Reservation::Completed(Arc::new(record)),
                        Err(error) => unreadable(error),
                    });
                }
                Ok(Some(_)) => {}
                // A full Redis refuses every `SET`, even one that would not write; the script
                // still reads a record (a replay), and is refused only when it writes.
                Err(error) if matches!(fault_of(&error), BackendFault::Full) => {}
                // Before Redis 7.0, `SET` takes `NX` or `GET`, not both: a syntax error, for
                // good. Any other refusal concerns this call only; the script answers it.
                Err(error) if error.kind() == redis::ErrorKind::ResponseError => {
                    if refuses_set_nx_get(&error) {
                        if self.inner.plain_reserve.swap(false, Ordering::Relaxed) {
                            tracing::info!(
                                "idempotency: this Redis refuses SET .. NX .. GET ({error}); \
                                 keys are reserved by script only"
                            );
                        }
                    } else if !self
                        .inner
                        .plain_refusal_logged
                        .swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "idempotency: Redis refused a reservation by SET .. NX .. GET \
                             ({error}); the script made it (logged once)"
                        );
                    }
                }
                Err(error) => return Err(backend(error)),
            }
        }
        let answer: Vec<Value> = self
            .inner
            .reserve
            .key(storage_key)
            .arg(value)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
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
        value.extend(super::codec::encode_record(&record)?);
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
        // A store that never connected holds no reservation: nothing to free, and no attempt
        // to connect that new requests would wait behind.
        if !self.inner.connection.initialized() {
            return Ok(());
        }
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

    async fn inspect_key(&self, key: &str) -> Result<Option<KeyState>, StoreError> {
        let mut connection = self.connection().await?;
        let answer: Vec<Value> = self
            .inner
            .inspect
            .key(self.key(key))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        let unreadable = |error: StoreError| KeyState::Unreadable {
            reason: error.to_string(),
        };
        match answer.as_slice() {
            [Value::Int(0)] => Ok(None),
            [Value::Int(1), Value::BulkString(current), Value::Int(pttl)] => {
                Ok(Some(match current.first() {
                    Some(&IN_FLIGHT) => match in_flight_fingerprint(current) {
                        Ok(fingerprint) => KeyState::InFlight {
                            fingerprint,
                            remaining_lease: Duration::from_millis(
                                u64::try_from(*pttl).unwrap_or(0),
                            ),
                        },
                        Err(error) => unreadable(error),
                    },
                    _ => match decode_record(current) {
                        Ok(record) => KeyState::Completed(Arc::new(record)),
                        Err(error) => unreadable(error),
                    },
                }))
            }
            other => Err(StoreError::Corrupt(format!(
                "unexpected answer to an inspection: {other:?}"
            ))),
        }
    }

    async fn purge_key(&self, key: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection().await?;
        let deleted: i64 = self
            .inner
            .purge
            .key(self.key(key))
            .invoke_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(deleted > 0)
    }
}

impl RedisStore {
    /// Waits until the reservation on `key` ends (its completion or release wakes this
    /// duplicate), for at most `within`; polls while the subscription does not work.
    async fn wait_for_end(&self, key: &str, within: Duration) {
        let changes = &self.inner.changes;
        if !changes.available() {
            tokio::time::sleep(within).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + within;
        let key = self.key(key);
        let woken = changes.wait(&self.inner.target, self.inner.timeouts, &key, || {
            self.reservation_ended(&key)
        });
        if let Ok(Err(error)) = tokio::time::timeout_at(deadline, woken).await {
            changes.unavailable(&error);
            let poll = tokio::time::Instant::now() + FALLBACK_POLL;
            tokio::time::sleep_until(deadline.min(poll)).await;
        }
    }

    /// Whether the reservation on `key` (prefixed) ended: its value no longer starts with the
    /// in-flight marker.
    async fn reservation_ended(&self, key: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection().await?;
        let first: Vec<u8> = redis::cmd("GETRANGE")
            .arg(key)
            .arg(0)
            .arg(0)
            .query_async(&mut connection)
            .await
            .map_err(backend)?;
        Ok(first.first() != Some(&IN_FLIGHT))
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

    fn inspect(&self, key: &str) -> impl Future<Output = Result<Option<KeyState>, StoreError>> {
        self.inspect_key(key)
    }

    fn purge(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> {
        self.purge_key(key)
    }

    async fn health(&self) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        // Bounded here too: a connection the application gave may have no response timeout.
        let within = self.inner.timeouts.response;
        let answered = tokio::time::timeout(
            within,
            redis::cmd("PING").query_async::<()>(&mut connection),
        )
        .await;
        match answered {
            Ok(answer) => answer.map_err(backend),
            Err(_elapsed) => Err(StoreError::Backend(
                format!("Redis did not answer PING within {within:?}").into(),
            )),
        }
    }

    fn wait_for_change(&self, key: &str, within: Duration) -> impl Future<Output = ()> {
        self.wait_for_end(key, within)
    }

    fn longest_notified_wait(&self) -> Option<Duration> {
        self.inner.changes.available().then_some(NOTIFIED_WAIT)
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStoreBuilder {
    servers: Servers,
    prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
    certificates: Certificates,
}

/// The URLs, or the connection, a builder was given.
#[derive(Clone)]
enum Servers {
    Node(String),
    #[cfg(feature = "redis-cluster")]
    Cluster(Vec<String>),
    Given(Connection),
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A URL may carry a password.
            Self::Node(_) => f.write_str("Node(..)"),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(urls) => write!(f, "Cluster({} nodes)", urls.len()),
            Self::Given(_) => f.write_str("Given(..)"),
        }
    }
}

impl RedisStoreBuilder {
    fn new(servers: Servers) -> Self {
        Self {
            servers,
            prefix: "idempotency:".to_owned(),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            certificates: Certificates::default(),
        }
    }

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

    /// How long one command may take before the request gets the store-outage answer (on a
    /// cluster, redirections and retries included).
    ///
    /// Defaults to 1 second.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Verifies a `rediss://` server against these CA certificates (PEM) instead of the
    /// platform's roots (which honour `SSL_CERT_FILE`): for a private CA. A server whose
    /// certificate they do not sign is refused; nothing falls back to plain text.
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.certificates
            .given
            .get_or_insert_with(no_certificates)
            .root_cert = Some(pem.into());
        self
    }

    /// Presents this client certificate and its private key (both PEM) to a `rediss://`
    /// server that requires them (mutual TLS, `tls-auth-clients yes`).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.certificates
            .given
            .get_or_insert_with(no_certificates)
            .client_tls = Some(redis::ClientTlsConfig {
            client_cert: certificate_pem.into(),
            client_key: key_pem.into(),
        });
        self
    }

    /// Checks the URLs and builds the store. No connection is made until the first request.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let target = match &self.servers {
            Servers::Node(url) => Target::node(url, &self.certificates),
            #[cfg(feature = "redis-cluster")]
            Servers::Cluster(urls) => Target::cluster(urls, &self.certificates),
            Servers::Given(connection) => Ok(Target::Given(connection.clone())),
        }
        .map_err(backend)?;
        let connection = match &target {
            Target::Given(connection) => OnceCell::new_with(Some(connection.clone())),
            _ => OnceCell::new(),
        };
        let changes = match &target {
            Target::Given(_) => Changes::polling(),
            _ => Changes::new(),
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                target,
                timeouts: Timeouts {
                    connection: self.connection_timeout,
                    response: self.response_timeout,
                },
                connection,
                settings_checked: std::sync::atomic::AtomicBool::new(false),
                changes,
                prefix: self.prefix,
                reserve: Script::new(RESERVE),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
                inspect: Script::new(INSPECT),
                purge: Script::new(PURGE),
                plain_reserve: AtomicBool::new(true),
                plain_refusal_logged: AtomicBool::new(false),
            }),
        })
    }
}

/// Whether `error` is how a Redis before 7.0 refuses `SET` with both `NX` and `GET`.
fn refuses_set_nx_get(error: &redis::RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.to_ascii_lowercase().contains("syntax error"))
}

fn backend(error: redis::RedisError) -> StoreError {
    match fault_of(&error) {
        BackendFault::Full => StoreError::Full(error.to_string()),
        BackendFault::Other => StoreError::Backend(Box::new(error)),
    }
}

/// What kind of failure a Redis error is.
enum BackendFault {
    /// A Redis at `maxmemory` under `noeviction` refuses writes with OOM: the store is full,
    /// which must never turn into an unprotected run the way an outage may under fail-open.
    Full,
    Other,
}

fn fault_of(error: &redis::RedisError) -> BackendFault {
    // Redis 7 reports it with the OOM code; older versions wrap it in a script error.
    if error.code() == Some("OOM") || error.to_string().contains("OOM command not allowed") {
        return BackendFault::Full;
    }
    BackendFault::Other
}

#[cfg(feature = "redis-tls")]
fn no_certificates() -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: None,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.min(LONGEST_LIFETIME).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Logs a warning for each Redis setting that breaks the store's guarantees, on every primary
/// of a cluster. Managed Redis services often refuse `CONFIG`; then nothing can be checked and
/// nothing is logged.
async fn warn_about_unsafe_settings(connection: &Connection) {
    for (server, policy) in setting(connection, "maxmemory-policy").await {
        if policy != "noeviction" {
            tracing::warn!(
                "idempotency: {server} runs with maxmemory-policy {policy}; under memory \
                 pressure it may evict a reservation or record and let a request run twice. \
                 Set maxmemory-policy noeviction"
            );
        }
    }
    let snapshots = setting(connection, "save").await;
    for (server, append_only) in setting(connection, "appendonly").await {
        let saves = snapshots
            .iter()
            .find(|(other, _)| *other == server)
            .map(|(_, save)| save.as_str());
        if append_only == "no" && saves == Some("") {
            tracing::warn!(
                "idempotency: {server} keeps nothing on disk (appendonly no, no save points); \
                 a Redis restart forgets every completed record, and retries of those requests \
                 run again. Set appendonly yes for records that survive a restart"
            );
        }
    }
}

/// A setting's value on the server, or on each primary of a cluster, named for the log.
async fn setting(connection: &Connection, name: &str) -> Vec<(String, String)> {
    let mut command = redis::cmd("CONFIG");
    command.arg("GET").arg(name);
    let value = |pair: Vec<String>| pair.into_iter().nth(1);
    match connection.clone() {
        Connection::Node(mut node) => command
            .query_async::<Vec<String>>(&mut node)
            .await
            .ok()
            .and_then(value)
            .map(|value| vec![("Redis".to_owned(), value)])
            .unwrap_or_default(),
        #[cfg(feature = "redis-cluster")]
        Connection::Cluster(mut cluster) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let primaries = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            let Ok(Value::Map(answers)) = cluster.route_command(&command, primaries).await else {
                return Vec::new();
            };
            answers
                .into_iter()
                .filter_map(|(node, answer)| {
                    let node: String = redis::from_redis_value(&node).ok()?;
                    let pair: Vec<String> = redis::from_redis_value(&answer).ok()?;
                    Some((format!("Redis Cluster node {node}"), value(pair)?))
                })
                .collect()
        }
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
    super::codec::decode_record(encoded)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::hash_map::RandomState,
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };

    use std::time::Instant;

    #[cfg(feature = "redis-cluster")]
    use super::private_cluster::PrivateRedisCluster;
    use super::*;
    use crate::storage::conformance;

    /// The Redis the tests use, or `None` (with a loud message) when none is reachable and
    /// `IDEMPOTENCY_REQUIRE_REDIS` is not `1`.
    pub(crate) async fn test_redis_url() -> Option<String> {
        let url = std::env::var("IDEMPOTENCY_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let reachable = match redis::Client::open(url.as_str()) {
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

    /// Runs the store conformance suite on stores from `builder`, each under its own prefix;
    /// returns what those prefixes start with.
    async fn keeps_the_store_contract(builder: impl Fn() -> RedisStoreBuilder) -> String {
        let run = format!(
            "test:conformance:{}:",
            RandomState::new().build_hasher().finish()
        );
        let counter = AtomicU64::new(0);
        conformance::run_all(|| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            builder()
                .key_prefix(format!("{run}{n}:"))
                .build()
                .unwrap_or_else(|e| panic!("store: {e}"))
        })
        .await;
        run
    }

    /// Deletes what a test left under `prefix` on the shared Redis at `url`.
    async fn delete_prefixed(url: &str, prefix: &str) {
        let deleted = async {
            let client = redis::Client::open(url)?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut connection)
                .await?;
            for batch in keys.chunks(500) {
                redis::cmd("DEL")
                    .arg(batch)
                    .query_async::<()>(&mut connection)
                    .await?;
            }
            redis::RedisResult::Ok(())
        };
        if let Err(error) = deleted.await {
            eprintln!("could not delete the test keys under {prefix}: {error}");
        }
    }

    #[actix_rt::test]
    async fn redis_store_keeps_the_store_contract() {
        let Some(url) = test_redis_url().await else {
            return;
        };
        let prefix = keeps_the_store_contract(|| RedisStore::builder(&url)).await;
        delete_prefixed(&url, &prefix).await;
    }

    /// A store on the application's own connection keeps the same contract, and its waiting
    /// duplicates, with no subscriber, find the record by polling.
    #[actix_rt::test]
    async fn a_store_on_the_applications_connection_keeps_the_store_contract() {
        let Some(url) = test_redis_url().await else {
            return;
        };
        let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let connection = redis::aio::ConnectionManager::new(client)
            .await
            .unwrap_or_else(|e| panic!("connection: {e}"));
        let prefix =
            keeps_the_store_contract(|| RedisStore::builder_from_connection(connection.clone()))
                .await;

        let store = RedisStore::builder_from_connection(connection.clone())
            .key_prefix(format!("{prefix}wait:"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"));
        assert_eq!(IdempotencyStore::longest_notified_wait(&store), None);
        let token = ReservationToken::generate();
        let fingerprint = Fingerprint([9; 32]);
        let reserved = store
            .reserve("k", token, fingerprint, Duration::from_secs(30))
            .await;
        assert!(
            matches!(reserved, Ok(Reservation::Acquired)),
            "{reserved:?}"
        );
        let record = CompletedRecord::new(fingerprint, None);
        let completed = store
            .complete("k", token, record, Duration::from_secs(60))
            .await;
        assert!(matches!(completed, Ok(Completion::Stored)), "{completed:?}");
        let replay = store
            .reserve(
                "k",
                ReservationToken::generate(),
                fingerprint,
                Duration::from_secs(30),
            )
            .await;
        assert!(
            matches!(replay, Ok(Reservation::Completed(_))),
            "{replay:?}"
        );
        assert!(store.health().await.is_ok());
        delete_prefixed(&url, &prefix).await;
    }

    #[cfg(feature = "redis-cluster")]
    #[actix_rt::test]
    async fn redis_cluster_store_keeps_the_store_contract() {
        let Some(cluster) =
            PrivateRedisCluster::start_or_skip("redis_cluster_store_keeps_the_store_contract")
        else {
            return;
        };
        keeps_the_store_contract(|| RedisStore::cluster_builder(cluster.urls())).await;
        let keys = cluster
            .keys_per_node()
            .unwrap_or_else(|e| panic!("DBSIZE: {e}"));
        assert!(
            keys.iter().filter(|&&n| n > 0).count() >= 2,
            "the suite's keys must land on several nodes: {keys:?}"
        );
    }

    #[cfg(feature = "redis-cluster")]
    #[actix_rt::test]
    async fn a_store_on_the_applications_cluster_connection_keeps_the_store_contract() {
        let Some(cluster) = PrivateRedisCluster::start_or_skip(
            "a_store_on_the_applications_cluster_connection_keeps_the_store_contract",
        ) else {
            return;
        };
        let connection = redis::cluster::ClusterClient::new(cluster.urls())
            .unwrap_or_else(|e| panic!("client: {e}"))
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connection: {e}"));
        keeps_the_store_contract(|| {
            RedisStore::cluster_builder_from_connection(connection.clone())
        })
        .await;
    }

    /// Waits whose deadline falls at any moment, while the subscription is being made
    /// included, leave no subscription behind: subscriptions are bounded by the keys waited on.
    #[actix_rt::test]
    async fn waits_cut_short_leave_no_subscription_behind() {
        let Some(url) = test_redis_url().await else {
            return;
        };
        let prefix = format!(
            "test:cut-short:{}:",
            RandomState::new().build_hasher().finish()
        );
        let store = RedisStore::builder(&url)
            .key_prefix(prefix.clone())
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"));
        let lease = Duration::from_secs(30);
        let owner = ReservationToken::generate();
        for n in 0..400u64 {
            let key = format!("k{n}");
            let reserved = store
                .reserve(&key, owner, Fingerprint([7; 32]), lease)
                .await;
            assert!(
                matches!(reserved, Ok(Reservation::Acquired)),
                "{reserved:?}"
            );
            // Deadlines from 0 to ~2 ms: some fall before, some while, some after SSUBSCRIBE.
            let cut = Duration::from_micros(n * 5);
            let _ = tokio::time::timeout(cut, store.wait_for_change(&key, Duration::from_secs(5)))
                .await;
        }
        let channels = || async {
            let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("{e}"));
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            redis::cmd("PUBSUB")
                .arg("SHARDCHANNELS")
                .arg(format!("{prefix}*"))
                .query_async::<Vec<String>>(&mut connection)
                .await
                .unwrap_or_else(|e| panic!("PUBSUB: {e}"))
        };
        // The check sees a subscription that is there: a wait still under way.
        let live = actix_rt::spawn({
            let store = store.clone();
            async move { store.wait_for_change("k0", Duration::from_secs(5)).await }
        });
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        let seen = channels().await;
        assert!(
            seen.contains(&format!("{prefix}k0")),
            "the live wait's subscription: {seen:?}"
        );
        live.abort();
        let mut left = channels().await;
        for _ in 0..20 {
            if left.is_empty() {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
            left = channels().await;
        }
        delete_prefixed(&url, &prefix).await;
        assert!(
            left.is_empty(),
            "{} subscriptions left behind: {left:?}",
            left.len()
        );
    }

    /// A duplicate waiting on a key is woken by the owner's completion or release, and finds
    /// an end that came before it subscribed; the key's subscription ends with its waiters.
    async fn wakes_waiting_duplicates(store: RedisStore) {
        assert_eq!(store.longest_notified_wait(), Some(NOTIFIED_WAIT));
        let fingerprint = Fingerprint([7; 32]);
        let lease = Duration::from_secs(30);
        let record = || CompletedRecord::new(fingerprint, None);
        let acquire = |key: &'static str| {
            let store = store.clone();
            async move {
                let token = ReservationToken::generate();
                let answer = store.reserve(key, token, fingerprint, lease).await;
                assert!(matches!(answer, Ok(Reservation::Acquired)), "{answer:?}");
                token
            }
        };
        let waiting = |key: &'static str| {
            let store = store.clone();
            actix_rt::spawn(async move {
                store.wait_for_change(key, Duration::from_secs(10)).await;
                Instant::now()
            })
        };

        for ending in ["complete", "release"] {
            let owner = acquire(ending).await;
            let waiters: Vec<_> = (0..3).map(|_| waiting(ending)).collect();
            actix_rt::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                store.inner.changes.channels(),
                1,
                "one subscription per key"
            );
            let ended_at = Instant::now();
            if ending == "complete" {
                let stored = store.complete(ending, owner, record(), lease * 2).await;
                assert!(matches!(stored, Ok(Completion::Stored)), "{stored:?}");
            } else {
                assert!(store.release(ending, owner).await.is_ok());
            }
            for waiter in waiters {
                let woken_at = waiter.await.unwrap_or_else(|e| panic!("{e}"));
                let after = woken_at.saturating_duration_since(ended_at);
                assert!(
                    woken_at >= ended_at && after < Duration::from_secs(1),
                    "{ending}: woken {after:?} after the end, expected at once"
                );
            }
        }

        let owner = acquire("ended-first").await;
        assert!(store.release("ended-first", owner).await.is_ok());
        let started = Instant::now();
        store
            .wait_for_change("ended-first", Duration::from_secs(10))
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a reservation that ended before the wait is seen at once"
        );

        for _ in 0..100 {
            if store.inner.changes.channels() == 0 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            store.inner.changes.channels(),
            0,
            "idle keys are unsubscribed"
        );
    }

    #[actix_rt::test]
    async fn redis_store_wakes_waiting_duplicates() {
        let Some(url) = test_redis_url().await else {
            return;
        };
        let prefix = format!("test:wake:{}:", RandomState::new().build_hasher().finish());
        let store = RedisStore::builder(&url).key_prefix(prefix.clone()).build();
        wakes_waiting_duplicates(store.unwrap_or_else(|e| panic!("store: {e}"))).await;
        delete_prefixed(&url, &prefix).await;
    }

    #[cfg(feature = "redis-cluster")]
    #[actix_rt::test]
    async fn redis_cluster_store_wakes_waiting_duplicates() {
        let Some(cluster) =
            PrivateRedisCluster::start_or_skip("redis_cluster_store_wakes_waiting_duplicates")
        else {
            return;
        };
        let store = RedisStore::cluster(cluster.urls());
        wakes_waiting_duplicates(store.unwrap_or_else(|e| panic!("store: {e}"))).await;
    }

    #[actix_rt::test]
    async fn waiting_duplicates_poll_when_they_cannot_be_woken() {
        let nobody = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap_or_else(|e| panic!("{e}"));
        let store =
            RedisStore::new(&format!("redis://{nobody}")).unwrap_or_else(|e| panic!("store: {e}"));
        assert_eq!(store.longest_notified_wait(), Some(NOTIFIED_WAIT));
        let started = Instant::now();
        store.wait_for_change("k", Duration::from_secs(10)).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a failed subscription falls back to a short poll, took {:?}",
            started.elapsed()
        );
        assert_eq!(
            store.longest_notified_wait(),
            None,
            "then duplicates poll for a while"
        );
        let started = Instant::now();
        store.wait_for_change("k", Duration::from_millis(20)).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "polling does not try to subscribe again at once, took {:?}",
            started.elapsed()
        );
        assert_eq!(
            store.longest_notified_wait(),
            None,
            "then duplicates poll for a while"
        );
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
