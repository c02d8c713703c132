//! Keys reserved in the handler's own transaction: a transaction-scoped advisory lock on the
//! key, taken as the transaction begins and held until it ends.
//!
//! A fresh request then costs one commit (the handler's rows with the key's record) instead of
//! two, and one round trip to begin instead of two; a request whose process dies frees its key
//! the moment the database sees its connection close, since nothing about it was committed.
//!
//! The transaction begins with one simple query:
//!
//! 1. `SET TRANSACTION ISOLATION LEVEL READ COMMITTED`, so that every statement after the lock
//!    reads what was committed before the lock was taken, whatever the database's default;
//! 2. the try-lock, failing the query when another transaction holds the key;
//! 3. a look at the key's row, failing the query when the key holds a live record or a
//!    reservation of the lease design;
//! 4. `BEGIN`, which makes the implicit transaction of the first three statements the
//!    handler's transaction, lock included.
//!
//! A failure rolls the implicit transaction back whole and leaves the connection as it was, so
//! it goes back to the pool clean (an explicit `BEGIN` first would leave it inside a failed
//! transaction). Only then does the store look at what holds the key, on its own connections,
//! without any lock kept: a duplicate never holds a connection while it waits for the key. (It
//! waits for a connection to begin with, like any handler's transaction: when handlers hold
//! them all, it gets 503 after the pool's acquire timeout.)
//!
//! The query fails on purpose by casting a text to an integer: plain SQL has no `RAISE`, and a
//! function of the store's own would need a migration. The text names this crate, which is how
//! such a failure is told from a real one.

use std::{sync::Arc, time::Duration};

use futures_util::future::LocalBoxFuture;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{backend, millis, read_holder_at, token_value, transaction::Returned, PostgresStore};
use crate::{
    joined::HeldReservation,
    storage::{CompletedRecord, Completion, Reservation, ReservationToken},
    Fingerprint, StoreError,
};

/// How often the key is tried again when it changed hands between the attempt and the look.
const ATTEMPTS: usize = 8;

/// What the failing casts of the begin statement say, to tell them from real failures.
const MARKER: &str = "idempotency-actix: ";

impl PostgresStore {
    /// Reserves `key` in a transaction for the handler, if the store is configured to.
    pub(crate) fn reserve_held_by_transaction<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Option<LocalBoxFuture<'a, Result<HeldReservation, StoreError>>> {
        if !self.inner.reserve_in_transactions {
            return None;
        }
        Some(Box::pin(self.reserve_in_transaction(
            key,
            fingerprint,
            lease,
        )))
    }

    async fn reserve_in_transaction(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<HeldReservation, StoreError> {
        let lock = lock_id(&self.inner.table, key);
        let begin: Arc<str> = Arc::from(begin_statement(&self.inner.table, key, lock));
        for _ in 0..ATTEMPTS {
            // In a task of its own: a request dropped half-way would otherwise drop a connection
            // in the middle of its `BEGIN`, which sqlx would put back in the pool inside a
            // transaction holding the key. The task ends the transaction properly instead.
            let begun = tokio::spawn(begin_holding(self.inner.pool.clone(), begin.clone()))
                .await
                .map_err(|error| StoreError::Backend(Box::new(error)))?;
            match begun {
                Ok(transaction) => {
                    let held = Returned::holding_the_key(transaction, self.clone());
                    return Ok((Reservation::Acquired, Some(Box::new(held))));
                }
                Err(error) if is_held_elsewhere(&error) => {}
                Err(error) => return Err(self.pool_error(error)),
            }
            if let Some(held) = self.holder(key, lock, fingerprint, lease).await? {
                return Ok((held, None));
            }
            // Free now: its holder ended between the two statements.
        }
        Err(StoreError::Corrupt(format!(
            "the key changed hands {ATTEMPTS} times while it was being reserved"
        )))
    }

    /// What holds `key`, from the store's own connections; `None` when nothing does.
    pub(super) async fn holder(
        &self,
        key: &str,
        lock: i64,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Option<Reservation>, StoreError> {
        let mut connection = self.connection().await?;
        let row = sqlx::query(&self.inner.sql.holder)
            .bind(key)
            .bind(lock)
            .fetch_one(&mut *connection)
            .await
            .map_err(backend)?;
        let free: bool = row.try_get(0).map_err(backend)?;
        let state: Option<String> = row.try_get(1).map_err(backend)?;
        Ok(match (state, free) {
            (Some(_), _) => Some(read_holder_at(&row, 1)),
            // Held by a transaction, which says nothing of its payload: a duplicate waits for
            // the record, then compares (422 if it differs) rather than guess now.
            (None, false) => Some(Reservation::InFlight {
                fingerprint,
                remaining_lease: lease,
            }),
            (None, true) => None,
        })
    }

    /// An error from the handlers' pool, as the store reports it.
    fn pool_error(&self, error: sqlx::Error) -> StoreError {
        if matches!(error, sqlx::Error::PoolTimedOut) && self.inner.pool.size() > 0 {
            return StoreError::Full(error.to_string());
        }
        backend(error)
    }
}

/// Begins a transaction holding the key, waiting for a connection like any handler's
/// transaction.
async fn begin_holding(
    pool: PgPool,
    begin: Arc<str>,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(String::from(&*begin)).await
}

/// Whether the begin statement failed because the key is held or taken.
fn is_held_elsewhere(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|database| {
        database.code().as_deref() == Some("22P02") && database.message().contains(MARKER)
    })
}

/// The advisory lock of `key` in `table`: 64 bits of a digest, so that two keys share a lock
/// only by a collision, which makes one wait for the other, never run twice.
pub(super) fn lock_id(table: &str, key: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(table)
        .chain_update([0])
        .chain_update(key)
        .finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// `text` as an SQL string constant that cannot be anything else, and that the planner can
/// match against the primary key's index: as it is when it holds only characters that no
/// quoting rule touches (the default key encoder's hex digits), otherwise every character
/// written as a Unicode escape.
fn quoted(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '/');
    if text.chars().all(plain) {
        return format!("'{text}'");
    }
    let mut escaped = String::from("U&'");
    for c in text.chars() {
        escaped.push_str(&format!("\\+{:06X}", u32::from(c)));
    }
    escaped.push('\'');
    escaped
}

/// The statement that begins the handler's transaction holding `key` (see the module's
/// documentation). The key travels as a constant it cannot escape from ([`quoted`]).
fn begin_statement(table: &str, key: &str, lock: i64) -> String {
    format!(
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; \
         SELECT CASE WHEN pg_try_advisory_xact_lock({lock}) THEN NULL \
           ELSE ('{MARKER}held by ' || pg_backend_pid())::int END; \
         SELECT ('{MARKER}' || state)::int FROM {table} \
           WHERE key = {key} AND expires_at > clock_timestamp(); \
         BEGIN",
        key = quoted(key),
    )
}

/// Writes the record of a key held by `transaction`, and commits.
pub(super) async fn commit_holding(
    mut transaction: Transaction<'static, Postgres>,
    store: &PostgresStore,
    key: &str,
    token: ReservationToken,
    record: &CompletedRecord,
    ttl: Duration,
) -> Result<Completion, StoreError> {
    let encoded = crate::storage::codec::encode_record(record)?;
    let stored = sqlx::query(&store.inner.sql.complete_empty)
        .bind(key)
        .bind(encoded.as_slice())
        .bind(record.fingerprint.0.as_slice())
        .bind(millis(ttl))
        .bind(token_value(token))
        .fetch_optional(&mut *transaction)
        .await
        .map_err(backend)?;
    if stored.is_none() {
        // A live row appeared under the lock: only a writer that ignores it (an instance of an
        // older version, on the lease design) can have put it there.
        transaction.rollback().await.map_err(backend)?;
        return Ok(Completion::LostReservation);
    }
    transaction.commit().await.map_err(backend)?;
    Ok(Completion::Stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_travel_as_constants_nothing_can_escape() {
        assert_eq!(quoted("0a1f"), "'0a1f'");
        let statement = begin_statement("t", "k'); DROP TABLE t; --", 7);
        assert!(!statement.contains("DROP"), "{statement}");
        assert!(
            statement.contains("U&'\\+00006B\\+000027\\+000029"),
            "{statement}"
        );
    }

    #[test]
    fn lock_ids_differ_by_table_and_key() {
        assert_ne!(lock_id("a", "k"), lock_id("b", "k"));
        assert_ne!(lock_id("a", "k"), lock_id("a", "l"));
        assert_eq!(lock_id("a", "k"), lock_id("a", "k"));
    }
}
