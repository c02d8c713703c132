//! Keys reserved in the handler's own transaction: a transaction-scoped advisory lock on the
//! key, taken as the transaction begins and held until it ends.
//!
//! A fresh request then costs one commit (the handler's rows with the key's record) instead of
//! two, and a request whose process dies frees its key the moment the database sees its
//! connection close, since nothing about it was committed.
//!
//! The transaction begins at READ COMMITTED (the look after the lock must see what its previous
//! holder committed, whatever the database's default level), then calls the table's `_hold`
//! function (migration 0002): it returns a live record without taking the lock (a replay), or
//! takes the lock without waiting (`pg_try_advisory_xact_lock`) and looks again. A duplicate
//! learns at once that the key is held, ends its transaction, and waits for the record looking
//! on the store's own connections; nobody waits for the key's lock inside PostgreSQL. (The
//! function gives up after a `lock_timeout` of 5 s on the table itself: a migration's lock
//! fails requests, never hangs them.)
//!
//! The key is held as long as the handler's transaction, which ends with its connection: a
//! connection that dies while its handler still runs frees the key under it (see `docs/postgres.md`).
//!
//! The function is one prepared statement, planned once per connection: the same lock and looks
//! sent as a multi-statement query were planned on every request, which cost more database time
//! than the second commit this design saves (see `docs/benchmarks.md`).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use futures_util::future::LocalBoxFuture;
use sha2::{Digest, Sha256};
use sqlx::{postgres::PgRow, PgConnection, PgPool, Postgres, Row, Transaction};

use super::{
    backend, read_holder, schema::Statements, store_in_free_key, transaction::Returned,
    PostgresStore,
};
use crate::{
    joined::HeldReservation,
    storage::{CompletedRecord, Completion, Reservation, ReservationToken},
    Fingerprint, StoreError,
};

/// PostgreSQL's code for a function that does not exist.
const UNDEFINED_FUNCTION: &str = "42883";

/// Whether the table's `_hold` function is known to be missing (migration 0002 not run): keys
/// are then reserved by lease, as by a store with
/// [`reserve_in_transactions(false)`](super::PostgresStoreBuilder::reserve_in_transactions).
#[derive(Debug, Default)]
pub(super) struct HoldFunction {
    missing: AtomicBool,
}

impl PostgresStore {
    /// Reserves `key` in a transaction for the handler, if the store is configured to.
    pub(crate) fn reserve_held_by_transaction<'a>(
        &'a self,
        key: &'a str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Option<LocalBoxFuture<'a, Result<HeldReservation, StoreError>>> {
        if !self.inner.reserve_in_transactions || self.inner.hold.missing.load(Ordering::Relaxed) {
            return None;
        }
        Some(Box::pin(self.reserve_in_transaction(
            key,
            token,
            fingerprint,
            lease,
        )))
    }

    async fn reserve_in_transaction(
        &self,
        key: &str,
        token: ReservationToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<HeldReservation, StoreError> {
        let lock = lock_id(&self.inner.table, key);
        let hold = self.inner.sql.hold.clone();
        // In a task of its own: a request dropped half-way would otherwise drop a connection in
        // the middle of its `BEGIN`, which sqlx would put back in the pool inside a transaction
        // holding the key. The task ends the transaction properly instead.
        let begun = tokio::spawn(begin_holding(
            self.inner.pool.clone(),
            hold,
            key.to_owned(),
            lock,
        ))
        .await
        .map_err(|error| StoreError::Backend(Box::new(error)))?;
        let (transaction, holder) = match begun {
            Ok(begun) => begun,
            Err(error) if is_undefined_function(&error) => {
                if !self.inner.hold.missing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "idempotency: the function {}_hold does not exist (run migration 0002, \
                         or PostgresStore::ensure_schema): until this process restarts, keys \
                         are reserved by lease, and a crashed request's key stays held until \
                         its lease ends",
                        self.inner.table
                    );
                }
                let reservation = self.reserve_key(key, token, fingerprint, lease).await?;
                return Ok((reservation, None));
            }
            Err(error) => return Err(self.pool_error(error)),
        };
        let Some(holder) = holder else {
            let held = Returned::holding_the_key(transaction, self.clone());
            return Ok((Reservation::Acquired, Some(Box::new(held))));
        };
        // Dropped, it rolls back as its connection goes back to the pool, off this request's
        // path.
        drop(transaction);
        // The function returns a row only when something holds the key.
        let holder = holder_in(&holder, fingerprint, lease)?;
        Ok((
            holder.unwrap_or(Reservation::InFlight {
                fingerprint,
                remaining_lease: lease,
            }),
            None,
        ))
    }

    /// What holds `key`, from the store's own connections, without waiting for its lock:
    /// `None` when nothing does. A key held by a transaction shows in flight, with the
    /// fingerprint and lease given here.
    pub(super) async fn holder(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Option<Reservation>, StoreError> {
        let lock = lock_id(&self.inner.table, key);
        let mut connection = self.connection().await?;
        let row = sqlx::query(&self.inner.sql.holder)
            .bind(key)
            .bind(lock)
            .fetch_one(&mut *connection)
            .await
            .map_err(backend)?;
        holder_in(&row, fingerprint, lease)
    }

    /// An error from the handlers' pool, as the store reports it.
    fn pool_error(&self, error: sqlx::Error) -> StoreError {
        if matches!(error, sqlx::Error::PoolTimedOut) && self.inner.pool.size() > 0 {
            return StoreError::Full(error.to_string());
        }
        backend(error)
    }
}

/// Begins a transaction (waiting for a connection like any handler's transaction) and holds
/// `key` in it: the transaction, and `None` when it holds the key, or what holds it otherwise.
async fn begin_holding(
    pool: PgPool,
    hold: String,
    key: String,
    lock: i64,
) -> Result<(Transaction<'static, Postgres>, Option<PgRow>), sqlx::Error> {
    let mut transaction = pool
        .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await?;
    let holder = sqlx::query(&hold)
        .bind(key)
        .bind(lock)
        .fetch_optional(&mut *transaction)
        .await?;
    Ok((transaction, holder))
}

/// What holds the key, from a row of the `holder` statement or the `_hold` function: whether
/// its lock was free, then the key's live row (NULLs without one). `None` when nothing holds
/// it. A key held by a transaction shows in flight with `fingerprint` and `lease`: a
/// transaction says nothing of its payload, so a duplicate waits for the record and compares
/// then (422 if it differs), rather than guess now.
pub(super) fn holder_in(
    row: &PgRow,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Result<Option<Reservation>, StoreError> {
    let free: bool = row.try_get(0).map_err(backend)?;
    let state: Option<String> = row.try_get(1).map_err(backend)?;
    Ok(match (state, free) {
        (Some(_), _) => Some(read_holder(row, 1)),
        (None, false) => Some(Reservation::InFlight {
            fingerprint,
            remaining_lease: lease,
        }),
        (None, true) => None,
    })
}

fn is_undefined_function(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|database| database.code().as_deref() == Some(UNDEFINED_FUNCTION))
}

/// The advisory lock of `key` in `table`: 64 bits of a digest, so that two keys share a lock
/// only by a collision, which makes one wait for the other, never run twice.
pub(super) fn lock_id(table: &str, key: &str) -> i64 {
    digest_id(&[table, key])
}

/// The advisory lock under which instances create `table`'s schema one after the other.
pub(super) fn schema_lock_id(table: &str) -> i64 {
    digest_id(&["schema", table])
}

/// 64 bits of a digest of `parts` (each followed by a NUL, so that no two lists share one).
fn digest_id(parts: &[&str]) -> i64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0]);
    }
    let mut first = [0; 8];
    first.copy_from_slice(&hasher.finalize()[..8]);
    i64::from_be_bytes(first)
}

/// Writes the record of a key held by the transaction on `connection` (its caller commits);
/// [`Completion::LostReservation`] when a live row is in the way, and the caller rolls back.
pub(super) async fn record_held(
    connection: &mut PgConnection,
    sql: &Statements,
    key: &str,
    token: ReservationToken,
    record: &CompletedRecord,
    ttl: Duration,
) -> Result<Completion, StoreError> {
    let encoded = crate::storage::codec::encode_record(record)?;
    let stored = store_in_free_key(connection, sql, key, token, record, &encoded, ttl).await?;
    // No row: a live one was in the way, put there by a writer that ignores the lock (an
    // instance of an older version, or a lease owner whose renewal or completion came after its
    // lease lapsed).
    Ok(if stored {
        Completion::Stored
    } else {
        Completion::LostReservation
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids_differ_by_table_and_key() {
        assert_ne!(lock_id("a", "k"), lock_id("b", "k"));
        assert_ne!(lock_id("a", "k"), lock_id("a", "l"));
        assert_eq!(lock_id("a", "k"), lock_id("a", "k"));
    }
}
