//! The PostgreSQL store: durable records, and records committed in the handler's own
//! transaction.

mod expiry;
mod held;
mod schema;
mod transaction;

use std::{future::Future, sync::Arc, time::Duration};

use sqlx::{postgres::PgPoolOptions, PgConnection, PgPool, Row};

use self::schema::{is_plain_table_name, Statements, DEFAULT_TABLE};
pub use self::{
    expiry::ExpiryJob,
    transaction::{IdempotentTransaction, MaybeIdempotentTransaction},
};
use super::{
    codec::{decode_record, encode_record},
    CompletedRecord, Completion, IdempotencyStore, KeyState, Renewal, Reservation,
    ReservationToken, LONGEST_LIFETIME,
};
use crate::{Fingerprint, StoreError};

/// How often a reservation is tried again when the key changed hands between two statements.
const CLAIM_ATTEMPTS: usize = 8;

/// A store on PostgreSQL: one row per key in one table, shared by every instance that uses the
/// same database.
///
/// Reservations are committed rows with a lease, so a duplicate request costs one short query
/// and never holds a connection while it waits. Completed records stay until their TTL; an
/// [`ExpiryJob`] (or a statement of your own, see [`ExpiryJob`]) deletes expired rows.
///
/// With [`IdempotentTransaction`], a handler does its own writes in the transaction that also
/// writes its key's record: its effects are committed if and only if the record is.
///
/// # Schema
///
/// [`ensure_schema`](Self::ensure_schema) creates the table if it is missing (handy for a quick
/// start); teams that manage migrations run [`PostgresStore::SCHEMA`] (the files
/// `migrations/0001_idempotency_keys.sql` and `0002_idempotency_keys_hold.sql` in this crate)
/// with their own tool.
///
/// ```no_run
/// use idempotency_actix::{IdempotencyMiddleware, PostgresStore};
///
/// # async fn run() -> Result<(), idempotency_actix::StoreError> {
/// let store = PostgresStore::builder("postgres://postgres@127.0.0.1:5432/test")
///     .max_connections(20)
///     .build()?;
/// store.ensure_schema().await?;
/// actix_web::rt::spawn(store.expiry_job().run());
/// let middleware = IdempotencyMiddleware::new(store);
/// # let _ = middleware;
/// # Ok(()) }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The pool handlers' transactions come from ([`IdempotentTransaction`]).
    pool: PgPool,
    /// The store's own connections, for its short statements (reserve, renew, complete,
    /// release): handlers holding every connection of `pool` never starve them, so leases stay
    /// renewed and duplicates are told the key is in flight.
    statements: PgPool,
    table: String,
    sql: Statements,
    /// Keys of routes whose handler takes a transaction are reserved in it.
    reserve_in_transactions: bool,
    hold: held::HoldFunction,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table)
            .field("connections", &self.inner.pool.size())
            .field("statement_connections", &self.inner.statements.size())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The schema of the default table (`idempotency_keys`) and of the function that holds its
    /// keys in transactions (`idempotency_keys_hold`), as one migration.
    pub const SCHEMA: &'static str = schema::DEFAULT_SCHEMA;

    /// A builder for a store on the database at `url` (`postgres://user@host:port/db`).
    pub fn builder(url: &str) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source: Source::Url(url.to_owned()),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: 10,
            statement_connections: 4,
            acquire_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(5),
            reserve_in_transactions: true,
        }
    }

    /// A builder for a store on a pool the application already has, so that handlers'
    /// transactions come from it; the pool's own settings apply to them. The store's own short
    /// statements get a few connections of their own, made with the pool's connect options.
    pub fn builder_from_pool(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source: Source::Pool(pool),
            ..Self::builder("")
        }
    }

    /// The connection pool handlers' transactions ([`IdempotentTransaction`]) come from.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Creates the store's table and index if they do not exist, and the function that holds
    /// keys in transactions if it is missing or another version.
    ///
    /// A schema already in place is left alone, so that a role that may use the table without
    /// owning it (one that cannot create anything) starts as well; where something is missing,
    /// such a role gets an error naming [`schema`](Self::schema), to run as the owner. Instances
    /// starting together take turns (a transaction-scoped advisory lock on the table's name), so
    /// that none of them fails on the catalog rows another one is writing.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        if self.schema_in_place().await? {
            return Ok(());
        }
        let mut transaction = self.inner.statements.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(held::schema_lock_id(&self.inner.table))
            .execute(&mut *transaction)
            .await
            .map_err(backend)?;
        sqlx::raw_sql(&self.inner.sql.schema)
            .execute(&mut *transaction)
            .await
            .map_err(|error| self.schema_error(error))?;
        transaction.commit().await.map_err(backend)
    }

    /// Whether the table, its index and this version of its hold function exist.
    async fn schema_in_place(&self) -> Result<bool, StoreError> {
        let table = &self.inner.table;
        let Some(hold_body) = schema::hold_function_body(&self.inner.sql.schema) else {
            return Ok(false);
        };
        sqlx::query_scalar(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL \
             AND EXISTS (SELECT 1 FROM pg_proc WHERE oid = to_regprocedure($3) AND prosrc = $4)",
        )
        .bind(table)
        .bind(schema::index_name(table))
        .bind(format!("{table}_hold(text,bigint)"))
        .bind(hold_body)
        .fetch_one(&self.inner.statements)
        .await
        .map_err(backend)
    }

    /// A failure to create the schema; one for want of privileges says what to run instead.
    fn schema_error(&self, error: sqlx::Error) -> StoreError {
        let denied = error
            .as_database_error()
            .and_then(|database| database.code())
            .is_some_and(|code| code == "42501");
        if !denied {
            return backend(error);
        }
        StoreError::Backend(Box::new(SchemaNotCreatable {
            table: self.inner.table.clone(),
            source: error,
        }))
    }

    /// The schema of this store's table (and of the function that holds its keys), as
    /// migrations: [`SCHEMA`](Self::SCHEMA) written for the table the store was built with.
    pub fn schema(&self) -> &str {
        &self.inner.sql.schema
    }

    /// A job that deletes expired rows, with the default period and batch size.
    pub fn expiry_job(&self) -> ExpiryJob {
        ExpiryJob::new(self.clone())
    }

    async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, StoreError> {
        let statements = &self.inner.statements;
        statements.acquire().await.map_err(|error| {
            // No connection came free in time, with connections open: the database answers, it
            // is only busy. A store that cannot take one more request never runs it
            // unprotected. (With none open, it could not be reached: an outage.)
            if matches!(error, sqlx::Error::PoolTimedOut) && statements.size() > 0 {
                return StoreError::Full(error.to_string());
            }
            backend(error)
        })
    }

    async fn reserve_key(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Reservation, StoreError> {
        let mut connection = self.connection().await?;
        let sql = &self.inner.sql;
        for _ in 0..CLAIM_ATTEMPTS {
            if self
                .claim(&mut connection, &sql.claim, key, token, fingerprint, lease)
                .await?
            {
                return Ok(Reservation::Acquired);
            }
            let row = sqlx::query(&sql.holder)
                .bind(key)
                .bind(held::lock_id(&self.inner.table, key))
                .fetch_one(&mut *connection)
                .await
                .map_err(backend)?;
            // The same reservation asked for again (its first answer was lost): it is ours.
            let owner: Option<i64> = row.try_get(5).map_err(backend)?;
            if owner == Some(token_value(token)) {
                return Ok(Reservation::Acquired);
            }
            // Nothing: gone between the two statements (completed and expired, or freed).
            if let Some(holder) = held::holder_in(&row, fingerprint, lease)? {
                return Ok(holder);
            }
        }
        Err(StoreError::Corrupt(format!(
            "the key changed hands {CLAIM_ATTEMPTS} times while it was being reserved"
        )))
    }

    /// Claims `key` if it is free or expired and no transaction holds its advisory lock; says
    /// whether it did.
    async fn claim(
        &self,
        connection: &mut PgConnection,
        statement: &str,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let claimed = sqlx::query(statement)
            .bind(key)
            .bind(token_value(token))
            .bind(fingerprint.0.as_slice())
            .bind(millis(lease))
            .bind(held::lock_id(&self.inner.table, key))
            .fetch_optional(connection)
            .await
            .map_err(backend)?;
        Ok(claimed.is_some())
    }

    async fn renew_key(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let mut connection = self.connection().await?;
        let sql = &self.inner.sql;
        let extended = sqlx::query(&sql.extend)
            .bind(key)
            .bind(token_value(token))
            .bind(millis(lease))
            .fetch_optional(&mut *connection)
            .await
            .map_err(backend)?;
        if let Some(row) = extended {
            let live: bool = row.try_get(0).map_err(backend)?;
            return Ok(if live {
                Renewal::Renewed
            } else {
                Renewal::Restored
            });
        }
        if self
            .claim(
                &mut connection,
                &sql.restore,
                key,
                token,
                fingerprint,
                lease,
            )
            .await?
        {
            return Ok(Renewal::Restored);
        }
        Ok(Renewal::Lost)
    }

    async fn release_key(&self, key: &str, token: ReservationToken) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        sqlx::query(&self.inner.sql.release)
            .bind(key)
            .bind(token_value(token))
            .execute(&mut *connection)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn inspect_key(&self, key: &str) -> Result<Option<KeyState>, StoreError> {
        // A key held by a handler's transaction has no row: its lock says it is in flight,
        // with a lease of zero (it is held until the transaction ends) and a fingerprint
        // nobody outside that transaction knows (zeroes).
        let holder = self
            .holder(key, Fingerprint([0; 32]), Duration::ZERO)
            .await?;
        Ok(holder.and_then(KeyState::from_reservation))
    }

    async fn purge_key(&self, key: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection().await?;
        let deleted = sqlx::query(&self.inner.sql.purge)
            .bind(key)
            .fetch_optional(&mut *connection)
            .await
            .map_err(backend)?;
        match deleted {
            Some(row) => row.try_get::<bool, _>(0).map_err(backend),
            None => Ok(false),
        }
    }
}

/// What a row with the key's state, fingerprint, record, remaining lease in ms and token from
/// column `first` on says about the key's holder.
fn read_holder(row: &sqlx::postgres::PgRow, first: usize) -> Reservation {
    let read = || -> Result<Reservation, StoreError> {
        let state: String = row.try_get(first).map_err(backend)?;
        let fingerprint: Vec<u8> = row.try_get(first + 1).map_err(backend)?;
        let fingerprint = Fingerprint(
            fingerprint
                .try_into()
                .map_err(|_| StoreError::Corrupt("a fingerprint of the wrong size".to_owned()))?,
        );
        match state.as_str() {
            "in_flight" => {
                let remaining: f64 = row.try_get(first + 3).map_err(backend)?;
                Ok(Reservation::InFlight {
                    fingerprint,
                    remaining_lease: Duration::try_from_secs_f64(remaining / 1000.0)
                        .unwrap_or_default(),
                })
            }
            "completed" => {
                let record: Option<Vec<u8>> = row.try_get(first + 2).map_err(backend)?;
                let record = decode_record(record.as_deref().unwrap_or_default())?;
                Ok(Reservation::Completed(Arc::new(record)))
            }
            other => Err(StoreError::Corrupt(format!("unknown state {other:?}"))),
        }
    };
    read().unwrap_or_else(|error| Reservation::Unreadable {
        reason: error.to_string(),
    })
}

/// Completes the reservation `token` holds on `key` with `record`, on `connection` (the pool's,
/// or the handler's transaction).
async fn complete_on(
    connection: &mut PgConnection,
    sql: &Statements,
    key: &str,
    token: ReservationToken,
    record: &CompletedRecord,
    ttl: Duration,
) -> Result<Completion, StoreError> {
    let encoded = encode_record(record)?;
    let ours = sqlx::query(&sql.complete_ours)
        .bind(key)
        .bind(token_value(token))
        .bind(encoded.as_slice())
        .bind(millis(ttl))
        .fetch_optional(&mut *connection)
        .await
        .map_err(backend)?;
    if let Some(row) = ours {
        let live: bool = row.try_get(0).map_err(backend)?;
        return Ok(if live {
            Completion::Stored
        } else {
            Completion::StoredWithoutReservation
        });
    }
    if store_in_free_key(connection, sql, key, token, record, &encoded, ttl).await? {
        return Ok(Completion::StoredWithoutReservation);
    }
    // A repeated completion (its first answer was lost) finds its own record.
    let same = sqlx::query(&sql.holds_record)
        .bind(key)
        .bind(encoded.as_slice())
        .fetch_optional(&mut *connection)
        .await
        .map_err(backend)?;
    let same = match same {
        Some(row) => row.try_get::<Option<bool>, _>(0).map_err(backend)?,
        None => None,
    };
    Ok(if same == Some(true) {
        Completion::Stored
    } else {
        Completion::LostReservation
    })
}

/// Stores `record` (encoded as `encoded`) for `ttl` in `key` if nothing live holds it, unless
/// it is the freed reservation of `token`; says whether it did.
async fn store_in_free_key(
    connection: &mut PgConnection,
    sql: &Statements,
    key: &str,
    token: ReservationToken,
    record: &CompletedRecord,
    encoded: &[u8],
    ttl: Duration,
) -> Result<bool, StoreError> {
    let stored = sqlx::query(&sql.complete_empty)
        .bind(key)
        .bind(encoded)
        .bind(record.fingerprint.0.as_slice())
        .bind(millis(ttl))
        .bind(token_value(token))
        .fetch_optional(connection)
        .await
        .map_err(backend)?;
    Ok(stored.is_some())
}

impl IdempotencyStore for PostgresStore {
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

    async fn complete(
        &self,
        key: &str,
        token: ReservationToken,
        record: CompletedRecord,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let mut connection = self.connection().await?;
        complete_on(&mut connection, &self.inner.sql, key, token, &record, ttl).await
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
        sqlx::query("SELECT 1")
            .execute(&mut *connection)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

enum Source {
    Url(String),
    Pool(PgPool),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The URL may carry a password.
            Self::Url(_) => f.write_str("Url(..)"),
            Self::Pool(_) => f.write_str("Pool(..)"),
        }
    }
}

/// Configures a [`PostgresStore`].
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug)]
#[must_use]
pub struct PostgresStoreBuilder {
    source: Source,
    table: String,
    max_connections: u32,
    statement_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    reserve_in_transactions: bool,
}

impl PostgresStoreBuilder {
    /// Whether the keys of routes whose handler takes an [`IdempotentTransaction`] are
    /// reserved in that transaction, under a transaction-scoped advisory lock (see
    /// [`IdempotencyPolicy::in_transaction`](crate::IdempotencyPolicy::in_transaction)):
    /// one commit per request, and a crashed request's key is free at once. When off, such
    /// keys are reserved like every other, by a row with a lease committed before the handler
    /// runs, and a crashed request's key is free once the lease ends.
    ///
    /// Turn it off for handlers that raise their transaction's isolation level themselves
    /// (`SET TRANSACTION ISOLATION LEVEL ..` must come first, and the reserving transaction
    /// starts at READ COMMITTED), and for the first deploy of this version next to instances
    /// of 0.1, which reserve by lease and do not see the lock.
    ///
    /// Defaults to on.
    pub fn reserve_in_transactions(mut self, on: bool) -> Self {
        self.reserve_in_transactions = on;
        self
    }

    /// The table the store keeps its rows in: a plain name, optionally schema-qualified
    /// (`api.idempotency_keys`).
    ///
    /// Defaults to `idempotency_keys`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections handlers' transactions take: each handler running in an
    /// [`IdempotentTransaction`] holds one for its whole run. Ignored for a pool the
    /// application passed.
    ///
    /// Defaults to 10.
    pub fn max_connections(mut self, connections: u32) -> Self {
        self.max_connections = connections;
        self
    }

    /// The most connections the store keeps for its own short statements (reserve, renew,
    /// complete, release: one statement each), apart from the handlers' transactions, so that
    /// these never wait behind handlers that hold every other connection.
    ///
    /// Defaults to 4.
    pub fn statement_connections(mut self, connections: u32) -> Self {
        self.statement_connections = connections.max(1);
        self
    }

    /// How long a store operation, or a handler's transaction, waits for a free connection.
    /// A request that waited that long while the store's connections were all busy gets 503
    /// whatever the [`StoreOutage`](crate::StoreOutage) policy: the store answers, it is only
    /// busy, and a busy store never runs a request unprotected. (One that could open no
    /// connection at all gets the outage answer.) For a pool the application passed, its own
    /// timeout applies to the handlers' transactions.
    ///
    /// Defaults to 1 second.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long one of the store's own statements may run (PostgreSQL's `statement_timeout`
    /// on its connections) before the request gets the store-outage answer: a table locked by
    /// a migration, a stuck database, never a request that hangs.
    ///
    /// Defaults to 5 seconds.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Checks the settings and builds the store. No connection is made until the first use.
    ///
    /// Must run inside a Tokio runtime (the pool starts its upkeep task there).
    pub fn build(self) -> Result<PostgresStore, StoreError> {
        if !is_plain_table_name(&self.table) {
            return Err(StoreError::Corrupt(format!(
                "{:?} is not a plain table name (letters, digits, _; optionally schema.table)",
                self.table
            )));
        }
        let pool = match self.source {
            Source::Pool(pool) => pool,
            Source::Url(url) => PgPoolOptions::new()
                .max_connections(self.max_connections)
                .acquire_timeout(self.acquire_timeout)
                .connect_lazy(&url)
                .map_err(backend)?,
        };
        let timeout_ms = self.statement_timeout.as_millis().max(1).to_string();
        let statements = PgPoolOptions::new()
            .max_connections(self.statement_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(
                pool.connect_options()
                    .as_ref()
                    .clone()
                    .options([("statement_timeout", timeout_ms.as_str())]),
            );
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                statements,
                sql: Statements::for_table(&self.table),
                table: self.table,
                reserve_in_transactions: self.reserve_in_transactions,
                hold: held::HoldFunction::default(),
            }),
        })
    }
}

/// The schema is missing or another version, and the store's role may not make it.
#[derive(Debug)]
struct SchemaNotCreatable {
    table: String,
    source: sqlx::Error,
}

impl std::fmt::Display for SchemaNotCreatable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the schema of the idempotency table {} is missing or another version, and this \
             role may not create it ({}): run PostgresStore::schema() (for the default table, \
             PostgresStore::SCHEMA) as the schema's owner",
            self.table, self.source
        )
    }
}

impl std::error::Error for SchemaNotCreatable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn backend(error: sqlx::Error) -> StoreError {
    // Class 53 is "insufficient resources" (disk full, out of memory, too many connections):
    // a store that cannot take one more request never runs it unprotected.
    let resources = error
        .as_database_error()
        .and_then(|database| database.code())
        .is_some_and(|code| code.starts_with("53"));
    if resources {
        return StoreError::Full(error.to_string());
    }
    StoreError::Backend(Box::new(error))
}

/// The token as Postgres stores it (a `bigint`, same bits).
fn token_value(token: ReservationToken) -> i64 {
    i64::from_ne_bytes(token.0.to_ne_bytes())
}

fn millis(duration: Duration) -> f64 {
    duration.min(LONGEST_LIFETIME).as_secs_f64() * 1000.0
}

#[cfg(test)]
#[allow(unreachable_pub)]
mod test_database;
#[cfg(test)]
mod tests;
