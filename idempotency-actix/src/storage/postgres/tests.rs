use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
};

use futures_util::FutureExt;
use sqlx::Connection;

use super::{test_database::postgres_url_or_skip, *};
use crate::{joined::HeldReservation, storage::conformance};

/// A schema of its own for one test, dropped (with its tables) by `drop_schema`.
async fn fresh_schema(url: &str) -> String {
    let schema = format!("test_{}", RandomState::new().build_hasher().finish());
    let mut connection = PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("create schema: {e}"));
    schema
}

async fn drop_schema(url: &str, schema: &str) {
    if let Ok(mut connection) = PgConnection::connect(url).await {
        let _ = sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut connection)
            .await;
    }
}

async fn store_on(url: &str, table: &str) -> PostgresStore {
    store_on_with(url, table, |builder| builder).await
}

/// A store on `table`, configured by `configure`, with its schema.
async fn store_on_with(
    url: &str,
    table: &str,
    configure: impl FnOnce(PostgresStoreBuilder) -> PostgresStoreBuilder,
) -> PostgresStore {
    let store = configure(PostgresStore::builder(url).table(table))
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    store
        .ensure_schema()
        .await
        .unwrap_or_else(|e| panic!("schema: {e}"));
    store
}

#[actix_rt::test]
async fn postgres_store_keeps_the_store_contract() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    // One table per case, made beforehand: the suite's factory is not async.
    let mut stores = Vec::new();
    for n in 0..20 {
        stores.push(store_on(&url, &format!("{schema}.keys_{n}")).await);
    }
    let next = AtomicU64::new(0);
    conformance::run_all(|| {
        let n = next.fetch_add(1, Ordering::Relaxed) as usize;
        stores
            .get(n)
            .cloned()
            .unwrap_or_else(|| panic!("more than {} cases: make more tables", stores.len()))
    })
    .await;
    drop_schema(&url, &schema).await;
}

#[actix_rt::test]
async fn expiry_job_deletes_expired_rows_in_batches_and_keeps_live_ones() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let store = store_on(&url, &format!("{schema}.keys")).await;
    let short = Duration::from_millis(50);
    for n in 0..25 {
        let key = format!("expiring-{n}");
        let token = ReservationToken::generate();
        let reserved = store
            .reserve(&key, token, Fingerprint([1; 32]), short)
            .await;
        assert!(
            matches!(reserved, Ok(Reservation::Acquired)),
            "{reserved:?}"
        );
        if n % 2 == 0 {
            let record = CompletedRecord::new(Fingerprint([1; 32]), None);
            let completed = store.complete(&key, token, record, short).await;
            assert!(matches!(completed, Ok(Completion::Stored)), "{completed:?}");
        }
    }
    let live = ReservationToken::generate();
    let reserved = store
        .reserve("live", live, Fingerprint([2; 32]), Duration::from_secs(60))
        .await;
    assert!(
        matches!(reserved, Ok(Reservation::Acquired)),
        "{reserved:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    let job = store.expiry_job().batch_size(10);
    assert_eq!(job.run_once().await.ok(), Some(25));
    assert_eq!(job.run_once().await.ok(), Some(0));
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.keys"))
        .fetch_one(store.pool())
        .await
        .unwrap_or_else(|e| panic!("count: {e}"));
    assert_eq!(left, 1, "only the live reservation stays");
    assert!(matches!(
        store
            .reserve(
                "live",
                ReservationToken::generate(),
                Fingerprint([2; 32]),
                short
            )
            .await,
        Ok(Reservation::InFlight { .. })
    ));
    drop_schema(&url, &schema).await;
}

#[actix_rt::test]
async fn a_bad_table_name_is_refused_before_any_sql_is_written() {
    let built = PostgresStore::builder("postgres://nobody@127.0.0.1:1/none")
        .table("keys; DROP TABLE orders")
        .build();
    assert!(matches!(built, Err(StoreError::Corrupt(_))), "{built:?}");
}

#[actix_rt::test]
async fn an_unreachable_database_is_a_backend_error_not_a_panic() {
    let store = PostgresStore::builder("postgres://nobody@127.0.0.1:1/none")
        .acquire_timeout(Duration::from_millis(200))
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let reserved = store
        .reserve(
            "k",
            ReservationToken::generate(),
            Fingerprint([1; 32]),
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(reserved, Err(StoreError::Backend(_))),
        "{reserved:?}"
    );
}

/// A connection holding `table` locked, as a migration does, until it rolls back.
async fn lock_table(url: &str, table: &str) -> PgConnection {
    let mut migration = PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    sqlx::raw_sql(&format!(
        "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut migration)
    .await
    .unwrap_or_else(|e| panic!("lock: {e}"));
    migration
}

/// A table locked by someone else (a migration) makes the store's statements give up after
/// the statement timeout: the request gets its outage answer, it does not hang.
#[actix_rt::test]
async fn a_locked_table_is_an_error_after_the_statement_timeout() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let table = format!("{schema}.keys");
    let store = store_on_with(&url, &table, |builder| {
        builder.statement_timeout(Duration::from_millis(300))
    })
    .await;
    let mut migration = lock_table(&url, &table).await;
    let started = std::time::Instant::now();
    let reserved = store
        .reserve(
            "k",
            ReservationToken::generate(),
            Fingerprint([7; 32]),
            Duration::from_secs(30),
        )
        .await;
    let took = started.elapsed();
    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut migration).await;
    drop_schema(&url, &schema).await;
    assert!(
        matches!(reserved, Err(StoreError::Backend(_))),
        "{reserved:?}"
    );
    assert!(took < Duration::from_secs(2), "it waited {took:?}");
}

/// Reserves `key` in a transaction of the store's, as a transactional route does.
async fn hold(store: &PostgresStore, key: &str, fingerprint: Fingerprint) -> HeldReservation {
    let reserving = store
        .reserve_held_by_transaction(
            key,
            ReservationToken::generate(),
            fingerprint,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("the store reserves in transactions"));
    reserving
        .await
        .unwrap_or_else(|e| panic!("reserve in a transaction: {e}"))
}

/// Reserves `key` as a route without a transaction does: a lease row.
async fn reserve_by_lease(
    store: &PostgresStore,
    key: &str,
    fingerprint: Fingerprint,
) -> Result<Reservation, StoreError> {
    let token = ReservationToken::generate();
    store
        .reserve(key, token, fingerprint, Duration::from_secs(30))
        .await
}

/// A key held by a transaction is seen held by every other way of reserving it (another
/// transaction, a lease claim, the admin's look), and free the moment the transaction ends
/// without its record; once it committed its record, every way finds that record.
#[actix_rt::test]
async fn a_key_held_by_a_transaction_is_held_for_every_way_of_reserving_it() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let store = store_on(&url, &format!("{schema}.keys")).await;
    let mine = Fingerprint([3; 32]);

    let (acquired, transaction) = hold(&store, "k", mine).await;
    assert!(matches!(acquired, Reservation::Acquired), "{acquired:?}");
    let transaction = transaction.unwrap_or_else(|| panic!("the key is held by a transaction"));
    let (other, none) = hold(&store, "k", Fingerprint([4; 32])).await;
    assert!(matches!(other, Reservation::InFlight { .. }), "{other:?}");
    assert!(none.is_none());
    let leased = reserve_by_lease(&store, "k", mine).await;
    assert!(
        matches!(leased, Ok(Reservation::InFlight { .. })),
        "a lease claim went past the transaction's lock: {leased:?}"
    );
    assert!(matches!(
        store.inspect("k").await,
        Ok(Some(KeyState::InFlight { .. }))
    ));

    // Ended without its record (the handler failed, or its process died): free at once.
    transaction.roll_back().await;
    let (again, transaction) = hold(&store, "k", mine).await;
    assert!(matches!(again, Reservation::Acquired), "{again:?}");
    let transaction = transaction.unwrap_or_else(|| panic!("held again"));
    let record = CompletedRecord::new(mine, None);
    let committed = transaction
        .commit_with_record(
            "k".to_owned(),
            ReservationToken::generate(),
            record,
            Duration::from_secs(60),
        )
        .await;
    assert!(matches!(committed, Ok(Completion::Stored)), "{committed:?}");

    let (replay, none) = hold(&store, "k", mine).await;
    assert!(matches!(replay, Reservation::Completed(_)), "{replay:?}");
    assert!(none.is_none());
    let leased = reserve_by_lease(&store, "k", mine).await;
    assert!(
        matches!(leased, Ok(Reservation::Completed(_))),
        "{leased:?}"
    );
    drop_schema(&url, &schema).await;
}

/// A database whose schema predates the function that holds keys (migration 0002 not run)
/// still serves every request: keys are reserved by lease, as before.
#[actix_rt::test]
async fn without_the_hold_function_keys_are_reserved_by_lease() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let table = format!("{schema}.keys");
    let store = store_on(&url, &table).await;
    sqlx::raw_sql(&format!("DROP FUNCTION {table}_hold"))
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("drop the function: {e}"));

    let (acquired, transaction) = hold(&store, "k", Fingerprint([5; 32])).await;
    assert!(matches!(acquired, Reservation::Acquired), "{acquired:?}");
    assert!(transaction.is_none(), "reserved by lease, not held");
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE state = 'in_flight'"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("count: {e}"));
    assert_eq!(rows, 1, "the lease row");
    assert!(
        store
            .reserve_held_by_transaction(
                "k2",
                ReservationToken::generate(),
                Fingerprint([5; 32]),
                Duration::from_secs(1)
            )
            .is_none(),
        "once missing, the function is not asked for again"
    );
    drop_schema(&url, &schema).await;
}

/// `health` answers for a database that answers, and says why for one that does not.
#[actix_rt::test]
async fn health_says_whether_the_database_answers() {
    let unreachable = PostgresStore::builder("postgres://nobody@127.0.0.1:1/none")
        .acquire_timeout(Duration::from_millis(200))
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    assert!(unreachable.health().await.is_err());
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let store = PostgresStore::builder(&url)
        .build()
        .unwrap_or_else(|e| panic!("build: {e}"));
    let healthy = store.health().await;
    assert!(healthy.is_ok(), "{healthy:?}");
}

/// A table locked by someone else (a migration) makes a reservation in a transaction fail
/// after the function's lock timeout: the request gets its outage answer, it does not hang.
#[actix_rt::test]
async fn a_locked_table_fails_a_reservation_in_a_transaction_instead_of_hanging() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let table = format!("{schema}.keys");
    let store = store_on(&url, &table).await;
    let mut migration = lock_table(&url, &table).await;
    let started = std::time::Instant::now();
    let reserving = store
        .reserve_held_by_transaction(
            "k",
            ReservationToken::generate(),
            Fingerprint([7; 32]),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("the store reserves in transactions"));
    let reserved = reserving.await;
    let took = started.elapsed();
    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut migration).await;
    drop_schema(&url, &schema).await;
    assert!(reserved.is_err(), "{:?}", reserved.map(|(r, _)| r));
    assert!(took < Duration::from_secs(8), "it waited {took:?}");
}

/// Instances starting together each make sure the schema exists: none of them fails.
#[actix_rt::test]
async fn instances_starting_together_all_make_sure_of_the_schema() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let table = format!("{schema}.keys");
    let stores: Vec<PostgresStore> = (0..8)
        .map(|_| {
            PostgresStore::builder(&url)
                .table(&table)
                .build()
                .unwrap_or_else(|e| panic!("store: {e}"))
        })
        .collect();
    let made =
        futures_util::future::join_all(stores.iter().map(PostgresStore::ensure_schema)).await;
    drop_schema(&url, &schema).await;
    for outcome in made {
        assert!(outcome.is_ok(), "{outcome:?}");
    }
}

/// A role that may use the table without owning it (the least privilege a service runs with)
/// starts with `ensure_schema` once the owner has made the schema: nothing is created again.
/// Where the schema is missing, such a role gets an error that says what to run.
#[actix_rt::test]
async fn a_role_that_does_not_own_the_schema_starts_once_it_is_in_place() {
    let Some(url) = postgres_url_or_skip(module_path!()).await else {
        return;
    };
    let schema = fresh_schema(&url).await;
    let table = format!("{schema}.keys");
    let _owner = store_on(&url, &table).await;
    let role = format!("{schema}_app");
    let mut admin = PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"
    ))
    .execute(&mut admin)
    .await
    .unwrap_or_else(|e| panic!("role: {e}"));
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap_or_else(|e| panic!("url: {e}"))
        .username(&role);
    let pool = PgPool::connect_lazy_with(options);
    let app_store = |table: &str| {
        PostgresStore::builder_from_pool(pool.clone())
            .table(table)
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
    };

    // Whatever happens, the role (which outlives databases) and the schema are dropped.
    let outcome = std::panic::AssertUnwindSafe(async {
        let store = app_store(&table);
        let started = store.ensure_schema().await;
        let (acquired, transaction) = hold(&store, "k", Fingerprint([6; 32])).await;
        let held = transaction.is_some();
        drop(transaction);
        let missing = app_store(&format!("{schema}.other")).ensure_schema().await;
        (started, acquired, held, missing)
    })
    .catch_unwind()
    .await;
    pool.close().await;
    drop_schema(&url, &schema).await;
    let dropped = sqlx::raw_sql(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await;
    let (started, acquired, held, missing) =
        outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert!(dropped.is_ok(), "{dropped:?}");

    assert!(started.is_ok(), "{started:?}");
    assert!(matches!(acquired, Reservation::Acquired), "{acquired:?}");
    assert!(held, "held by the role's transaction");
    let missing = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        missing.contains("PostgresStore::schema()"),
        "the error says what to run: {missing}"
    );
}
