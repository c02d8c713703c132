//! The PostgreSQL server the tests use; shared with the workspace's test-support crate
//! (included there by `#[path]`), so that both skip or fail the same way.

use sqlx::{Connection, PgConnection};

/// The server at `IDEMPOTENCY_TEST_DATABASE_URL` (default
/// `postgres://postgres@127.0.0.1:5432/test`), or `None` with a loud message when none answers
/// and `IDEMPOTENCY_REQUIRE_POSTGRES` is not `1` (then it panics).
pub async fn postgres_url_or_skip(test: &str) -> Option<String> {
    let url = std::env::var("IDEMPOTENCY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    match PgConnection::connect(&url).await {
        Ok(connection) => {
            let _ = connection.close().await;
            Some(url)
        }
        Err(error) if std::env::var("IDEMPOTENCY_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("IDEMPOTENCY_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {url}: {error}")
        }
        Err(error) => {
            eprintln!(
                "\n*** SKIPPED {test}: no PostgreSQL at {url} ({error}); set \
                 IDEMPOTENCY_TEST_DATABASE_URL to run the PostgreSQL tests ***\n"
            );
            None
        }
    }
}
