//! Deleting expired rows in bounded batches.

use std::time::Duration;

use super::{backend, PostgresStore};
use crate::StoreError;

/// Deletes the rows of a [`PostgresStore`] whose lease or TTL ran out, in batches, forever.
///
/// Expired rows are already ignored by every operation; the job only keeps the table from
/// growing. Each batch is one short statement that skips rows other transactions hold, so
/// several instances can run the job at once. Teams that prefer their own scheduler (pg_cron,
/// a Kubernetes CronJob) run this instead, as often as they like:
///
/// ```sql
/// DELETE FROM idempotency_keys WHERE key IN (
///   SELECT key FROM idempotency_keys WHERE expires_at <= clock_timestamp()
///   ORDER BY expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED);
/// ```
///
/// ```no_run
/// # async fn run(store: idempotency_actix::PostgresStore) {
/// use std::time::Duration;
///
/// let job = store
///     .expiry_job()
///     .period(Duration::from_secs(30))
///     .batch_size(5_000);
/// actix_web::rt::spawn(job.run());
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[derive(Debug, Clone)]
#[must_use]
pub struct ExpiryJob {
    store: PostgresStore,
    period: Duration,
    batch_size: u32,
}

impl ExpiryJob {
    pub(super) fn new(store: PostgresStore) -> Self {
        Self {
            store,
            period: Duration::from_secs(60),
            batch_size: 1_000,
        }
    }

    /// How long the job sleeps once no expired row is left.
    ///
    /// Defaults to 60 seconds.
    pub fn period(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// How many rows one statement deletes at most, so that no statement holds locks on a
    /// large part of the table.
    ///
    /// Defaults to 1000.
    pub fn batch_size(mut self, rows: u32) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Deletes expired rows until none is left (batch after batch) and says how many.
    pub async fn run_once(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = sqlx::query(&self.store.inner.sql.expire)
                .bind(i64::from(self.batch_size))
                .execute(&self.store.inner.statements)
                .await
                .map_err(backend)?
                .rows_affected();
            deleted += batch;
            if batch < u64::from(self.batch_size) {
                return Ok(deleted);
            }
        }
    }

    /// Runs [`run_once`](Self::run_once) every period, for ever; a failure is logged and tried
    /// again a period later. Spawn it on the runtime.
    pub async fn run(self) {
        loop {
            match self.run_once().await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!("idempotency: deleted {deleted} expired keys"),
                Err(error) => tracing::warn!("idempotency: could not delete expired keys: {error}"),
            }
            tokio::time::sleep(self.period).await;
        }
    }
}
