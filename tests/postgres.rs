//! PostgresStore end to end: the handler's writes commit with its record, over real
//! connections, across two servers, and across a SIGKILL.

use std::time::{Duration, Instant};

use actix_web::{http::StatusCode, post, web, App, HttpResponse};
use futures_util::future::join_all;
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotentTransaction, MaybeIdempotentTransaction,
    MemoryStore, PostgresStore,
};
use idempotency_actix_workspace::{
    order_count,
    orders::{routes, Orders},
    post_keyed,
    postgres::{postgres_url_or_skip, DemoProcess, FreshDatabase},
    work::fresh_client,
    Received, Runs, TestServer,
};
use serde_json::json;

const ORDER: &str = r#"{"item":"book"}"#;
const DEMO: &str = env!("CARGO_BIN_EXE_orders_demo");

async fn demo_server(store: PostgresStore) -> TestServer {
    let orders = Orders::database(store.pool().clone(), "demo_orders")
        .await
        .unwrap_or_else(|e| panic!("orders table: {e}"));
    let orders = web::Data::new(orders);
    let idempotency = IdempotencyMiddleware::new(store);
    TestServer::start(2, move || {
        App::new()
            .wrap(idempotency.clone())
            .configure(routes(orders.clone()))
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// Twenty concurrent requests with one key, spread over two servers on one database, create
/// one order; every later retry, on either server, replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_on_two_servers_create_one_order() {
    let test = "duplicates_on_two_servers_create_one_order";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database.store().await;
    let servers = [
        demo_server(store.clone()).await,
        demo_server(store.clone()).await,
    ];

    let answers: Vec<Received> = join_all((0..20).map(|n| {
        let url = servers[n % 2].url("/orders/slow");
        async move { post_keyed(&fresh_client(), &url, "one-order", ORDER).await }
    }))
    .await;
    let created: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED && !a.is_replay())
        .collect();
    assert_eq!(created.len(), 1, "one request runs: {answers:?}");
    for answer in &answers {
        assert!(
            answer.status == StatusCode::CREATED || answer.status == StatusCode::CONFLICT,
            "{answer:?}"
        );
    }
    for server in &servers {
        let replay = post_keyed(
            &fresh_client(),
            &server.url("/orders/slow"),
            "one-order",
            ORDER,
        )
        .await;
        assert!(replay.is_replay(), "{replay:?}");
        assert_eq!(replay.body, created[0].body);
        assert_eq!(order_count(&server.url("/orders/count")).await, 1);
    }
    assert_eq!(database.number("SELECT count(*) FROM demo_orders").await, 1);
}

#[derive(Clone)]
struct Effects {
    runs: Runs,
    fail_first: bool,
    wait: Duration,
}

impl Effects {
    fn new(fail_first: bool, wait: Duration) -> Self {
        Self {
            runs: Runs::default(),
            fail_first,
            wait,
        }
    }
}

/// Writes one row in the request's transaction, waits, then answers: 500 on the first run
/// when told to, 201 otherwise.
#[idempotent]
#[post("/effects")]
async fn write_effect(effects: web::Data<Effects>, mut tx: IdempotentTransaction) -> HttpResponse {
    let run = effects.runs.record();
    let inserted = sqlx::query("INSERT INTO effects (run) VALUES ($1)")
        .bind(i64::try_from(run).unwrap_or_default())
        .execute(&mut *tx)
        .await;
    if let Err(error) = inserted {
        return HttpResponse::InternalServerError().body(error.to_string());
    }
    actix_web::rt::time::sleep(effects.wait).await;
    if effects.fail_first && run == 1 {
        return HttpResponse::InternalServerError().body("the first run fails");
    }
    HttpResponse::Created().json(json!({ "run": run }))
}

async fn effects_server(database: &FreshDatabase, effects: Effects) -> (TestServer, PostgresStore) {
    effects_server_on(database.store().await, effects).await
}

/// The effects server on a store reserving by lease only, as before keys were held by
/// transactions (and as `reserve_in_transactions(false)` still does).
async fn lease_effects_server(
    database: &FreshDatabase,
    effects: Effects,
) -> (TestServer, PostgresStore) {
    let store = database
        .store_with(|builder| builder.reserve_in_transactions(false))
        .await;
    effects_server_on(store, effects).await
}

async fn effects_server_on(store: PostgresStore, effects: Effects) -> (TestServer, PostgresStore) {
    sqlx::raw_sql("CREATE TABLE effects (run bigint NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("effects table: {e}"));
    let idempotency = IdempotencyMiddleware::new(store.clone());
    let effects = web::Data::new(effects);
    let server = TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(effects.clone())
            .service(write_effect)
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    (server, store)
}

/// A handler that fails after writing leaves nothing behind, and its key free: the retry runs
/// and commits once; the next retry is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_rolls_back_its_writes_and_frees_its_key() {
    let test = "a_failed_handler_rolls_back_its_writes";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let effects = Effects::new(true, Duration::ZERO);
    let (server, _store) = effects_server(&database, effects.clone()).await;
    let rows = || database.number("SELECT count(*) FROM effects");

    let failed = post_keyed(&fresh_client(), &server.url("/effects"), "k", "{}").await;
    assert_eq!(
        failed.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{failed:?}"
    );
    assert_eq!(rows().await, 0, "the failed run's row was rolled back");

    let retried = post_keyed(&fresh_client(), &server.url("/effects"), "k", "{}").await;
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    assert_eq!(retried.json(), json!({ "run": 2 }));
    assert_eq!(rows().await, 1);

    let replay = post_keyed(&fresh_client(), &server.url("/effects"), "k", "{}").await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.json(), json!({ "run": 2 }));
    assert_eq!(effects.runs.count(), 2);
    assert_eq!(rows().await, 1);
}

/// A handler whose key was taken over while it ran (its reservation lapsed and another
/// request claimed the key) commits nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_whose_key_was_taken_over_commits_nothing() {
    let test = "a_handler_whose_key_was_taken_over";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let effects = Effects::new(false, Duration::from_millis(400));
    let (server, store) = lease_effects_server(&database, effects).await;

    let running = tokio::spawn({
        let url = server.url("/effects");
        async move { post_keyed(&fresh_client(), &url, "k", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // What another instance does after the lease lapsed: the key now has another owner.
    let taken = sqlx::query("UPDATE idempotency_keys SET token = 42 WHERE state = 'in_flight'")
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("take over: {e}"))
        .rows_affected();
    assert_eq!(taken, 1, "the handler's reservation is a committed row");

    let answer = running.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
    assert_eq!(
        answer.problem_type().as_deref(),
        Some(
            "https://docs.rs/idempotency-actix/latest/idempotency_actix/problems#reservation-lost"
        )
    );
    assert_eq!(database.number("SELECT count(*) FROM effects").await, 0);
}

/// Where the key is not settled before the handler runs, or the store is not Postgres, the
/// extractor refuses instead of handing out a transaction nobody commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_outside_a_settled_postgres_key_is_refused() {
    let effects = web::Data::new(Effects::new(false, Duration::ZERO));
    let idempotency = IdempotencyMiddleware::new(MemoryStore::builder().build());
    let server = TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(effects.clone())
            .service(write_effect)
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    let answer = post_keyed(&fresh_client(), &server.url("/effects"), "k", "{}").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        answer
            .problem_type()
            .is_some_and(|kind| kind.ends_with("#misconfigured")),
        "{answer:?}"
    );
}

/// The demo as a real process on Postgres, killed with SIGKILL after its handler inserted the
/// order but before it committed: after a restart the retry runs once, and one order exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_handler_leaves_no_order_and_the_retry_creates_one() {
    let test = "a_crash_mid_handler";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    // A lease far longer than the test may wait: the key is held by the dead process's
    // transaction, not by a lease, and is free as soon as the database sees it gone.
    let lease = Duration::from_secs(60);
    let environment = [
        ("IDEMPOTENCY_DATABASE_URL", database.url()),
        ("IDEMPOTENCY_LEASE_MS", lease.as_millis().to_string()),
    ];
    let environment: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let mut doomed = DemoProcess::start(DEMO, &environment);

    let lost = tokio::spawn({
        let url = doomed.url("/orders/slow");
        async move {
            let _ = fresh_client()
                .post(url)
                .header("Idempotency-Key", "crash")
                .header("content-type", "application/json")
                .body(ORDER)
                .send()
                .await;
        }
    });
    // The handler inserts first, then waits 300 ms: wait until the insert has happened (a
    // sequence moves outside transactions), then kill.
    let inserted = Instant::now();
    while database
        .number("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM demo_orders_id_seq")
        .await
        == 0
    {
        assert!(
            inserted.elapsed() < Duration::from_secs(5),
            "the handler never inserted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.kill();
    let _ = lost.await;
    assert_eq!(
        database.number("SELECT count(*) FROM demo_orders").await,
        0,
        "the uncommitted order died with the process"
    );

    let restarted = DemoProcess::start(DEMO, &environment);
    let killed = Instant::now();
    let retried = loop {
        let retry = post_keyed(
            &fresh_client(),
            &restarted.url("/orders/slow"),
            "crash",
            ORDER,
        )
        .await;
        if retry.status != StatusCode::CONFLICT {
            break retry;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "the key stayed held after its process died: {retry:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    assert!(!retried.is_replay());
    let replay = post_keyed(
        &fresh_client(),
        &restarted.url("/orders/slow"),
        "crash",
        ORDER,
    )
    .await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, retried.body);
    assert_eq!(database.number("SELECT count(*) FROM demo_orders").await, 1);
    assert_eq!(order_count(&restarted.url("/orders/count")).await, 1);
}

/// Killed right after answering: the retry after the restart is a replay, and no second order
/// is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_completed_request_replays_after_the_restart() {
    let test = "a_crash_after_a_completed_request";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let database_url = database.url();
    let environment = [("IDEMPOTENCY_DATABASE_URL", database_url.as_str())];
    let mut first = DemoProcess::start(DEMO, &environment);
    let created = post_keyed(&fresh_client(), &first.url("/orders"), "done", ORDER).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    first.kill();

    let restarted = DemoProcess::start(DEMO, &environment);
    let replay = post_keyed(&fresh_client(), &restarted.url("/orders"), "done", ORDER).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, created.body);
    assert_eq!(order_count(&restarted.url("/orders/count")).await, 1);
}

/// Holds a transaction (and so a pooled connection) for `Hold`'s time.
#[derive(Debug, Clone, Copy)]
struct Hold(Duration);

#[idempotent]
#[post("/hold")]
async fn hold_a_connection(hold: web::Data<Hold>, mut tx: IdempotentTransaction) -> HttpResponse {
    let _ = sqlx::query("SELECT 1").execute(&mut *tx).await;
    actix_web::rt::time::sleep(hold.0).await;
    HttpResponse::Created().finish()
}

/// Slow, without a transaction: it holds no connection while it runs.
#[idempotent]
#[post("/slow-plain")]
async fn slow_plain(runs: web::Data<Runs>, hold: web::Data<Hold>) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(hold.0).await;
    HttpResponse::Created().body(format!("run {run}"))
}

async fn saturated_server(
    database: &FreshDatabase,
    middleware: idempotency_actix::IdempotencyMiddlewareBuilder,
    runs: &Runs,
    hold: Duration,
) -> TestServer {
    let idempotency = middleware.build().unwrap_or_else(|e| panic!("config: {e}"));
    let (runs, hold) = (web::Data::new(runs.clone()), web::Data::new(Hold(hold)));
    let _ = database;
    TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(runs.clone())
            .app_data(hold.clone())
            .service(hold_a_connection)
            .service(slow_plain)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// A store with two connections, both held by handlers' transactions: the duplicate of a
/// running request finds the store reachable but saturated. It is full, not down: the duplicate
/// never runs, even when the middleware fails open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_never_runs_a_duplicate_even_failing_open() {
    let test = "a_saturated_pool_never_runs_a_duplicate";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database
        .store_with(|builder| {
            builder
                .max_connections(2)
                .acquire_timeout(Duration::from_millis(300))
        })
        .await;
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::builder(store)
        .store_outage(idempotency_actix::StoreOutage::FailOpen)
        .lock_timeout(Duration::from_millis(200));
    let server = saturated_server(&database, middleware, &runs, Duration::from_millis(1500)).await;

    let first = tokio::spawn({
        let url = server.url("/slow-plain");
        async move { post_keyed(&fresh_client(), &url, "plain", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let holders: Vec<_> = ["h1", "h2"]
        .into_iter()
        .map(|key| {
            let url = server.url("/hold");
            tokio::spawn(async move { post_keyed(&fresh_client(), &url, key, "{}").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let duplicate = post_keyed(&fresh_client(), &server.url("/slow-plain"), "plain", "{}").await;
    assert!(
        [StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(&duplicate.status)
            || duplicate.is_replay(),
        "{duplicate:?}"
    );
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    for holder in holders {
        let _ = holder.await;
    }
    assert_eq!(runs.count(), 1, "the duplicate ran the handler again");
}

/// One connection, held by the handler's transaction for longer than a lease: the store's own
/// renewals still get through, so a duplicate meanwhile finds the key in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_a_lease_alive_while_handlers_hold_every_pooled_connection() {
    let test = "renewals_keep_a_lease_alive";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database
        .store_with(|builder| {
            builder
                .max_connections(1)
                .acquire_timeout(Duration::from_millis(300))
                // The lease design: a key held by its transaction has no lease to renew.
                .reserve_in_transactions(false)
        })
        .await;
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::builder(store)
        .reservation_lease(Duration::from_millis(600))
        .lock_timeout(Duration::from_millis(100));
    let server = saturated_server(&database, middleware, &runs, Duration::from_millis(2000)).await;

    let first = tokio::spawn({
        let url = server.url("/hold");
        async move { post_keyed(&fresh_client(), &url, "long", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let duplicate = post_keyed(&fresh_client(), &server.url("/hold"), "long", "{}").await;
    assert_eq!(
        duplicate.status,
        StatusCode::CONFLICT,
        "the lease lapsed while the handler held the only connection: {duplicate:?}"
    );
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
}

/// `shutdown_server` on `database`, its standard error kept to read after it exits.
fn shutdown_server(database: &FreshDatabase, lease_ms: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shutdown_server"))
        .env("DATABASE_URL", database.url())
        .env("LEASE_MS", lease_ms)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("shutdown_server: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("shutdown_server has no stdout"));
    let address = std::io::BufReader::new(stdout)
        .lines()
        .find_map(|line| line.ok()?.strip_prefix("listening on ").map(str::to_owned))
        .unwrap_or_else(|| panic!("shutdown_server stopped before it listened"));
    (child, format!("http://{address}/slow"))
}

/// SIGTERM while a transactional handler runs, and a shutdown that does not wait for it: the
/// server stops without a panic, nothing the handler wrote is committed, and the key is left as
/// a crash leaves it (free at once: its transaction held it), so a retry on a new instance runs
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_by_shutdown_leaves_its_key_as_a_crash_would_without_a_panic() {
    use std::io::Read;
    let test = "a_request_cut_off_by_shutdown";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let (mut first, first_url) = shutdown_server(&database, "1500");
    let cut_off = tokio::spawn(async move {
        fresh_client()
            .post(&first_url)
            .header("Idempotency-Key", "cut-off")
            .body("{}")
            .send()
            .await
            .map(|response| response.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(terminated.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = first.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = first.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        (status, stderr)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, stderr) = exited;
    assert!(
        !stderr.contains("panicked"),
        "the shutdown panicked: {stderr}"
    );
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "{status:?}: {stderr}"
    );
    let cut_off = cut_off.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(cut_off.as_ref().map_or(true, |s| *s >= 500), "{cut_off:?}");
    assert_eq!(database.number("SELECT count(*) FROM effects").await, 0);

    // A new instance: the key was held by the transaction that ended with the process, so
    // the retry runs at once, and once.
    let (_second, second_url) = shutdown_server(&database, "60000");
    let retried = tokio::time::timeout(
        Duration::from_secs(15),
        post_keyed(&fresh_client(), &second_url, "cut-off", "{}"),
    )
    .await
    .unwrap_or_else(|_| panic!("the retry did not answer"));
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    assert_eq!(database.number("SELECT count(*) FROM effects").await, 1);
}

/// Records a decline in its transaction and answers 402, as a payment API does.
#[idempotent]
#[post("/decline")]
async fn decline(effects: web::Data<Effects>, mut tx: IdempotentTransaction) -> HttpResponse {
    let run = effects.runs.record();
    let recorded = sqlx::query("INSERT INTO effects (run) VALUES ($1)")
        .bind(i64::try_from(run).unwrap_or_default())
        .execute(&mut *tx)
        .await;
    match recorded {
        Ok(_) => HttpResponse::PaymentRequired().json(json!({ "run": run, "status": "declined" })),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}

/// Records a refusal in its transaction and answers 422.
#[idempotent]
#[post("/refuse")]
async fn refuse(effects: web::Data<Effects>, mut tx: IdempotentTransaction) -> HttpResponse {
    let run = effects.runs.record();
    let recorded = sqlx::query("INSERT INTO effects (run) VALUES ($1)")
        .bind(i64::try_from(run).unwrap_or_default())
        .execute(&mut *tx)
        .await;
    match recorded {
        Ok(_) => HttpResponse::UnprocessableEntity().json(json!({ "run": run })),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}

/// A 4xx a transactional handler chose to answer commits with its record: the decline it wrote
/// exists, and the retry gets it replayed instead of running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_or_refusal_a_transactional_handler_recorded_is_kept_and_replayed() {
    let test = "a_decline_or_refusal_is_kept";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database.store().await;
    sqlx::raw_sql("CREATE TABLE effects (run bigint NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("effects table: {e}"));
    let effects = Effects::new(false, Duration::ZERO);
    let idempotency = IdempotencyMiddleware::new(store);
    let data = web::Data::new(effects.clone());
    let server = TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(data.clone())
            .service(decline)
            .service(refuse)
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    for (path, status) in [
        ("/decline", StatusCode::PAYMENT_REQUIRED),
        ("/refuse", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let first = post_keyed(&fresh_client(), &server.url(path), path, "{}").await;
        let retry = post_keyed(&fresh_client(), &server.url(path), path, "{}").await;
        assert_eq!(first.status, status, "{first:?}");
        assert!(!first.is_replay());
        assert!(retry.is_replay(), "{path}: {retry:?}");
        assert_eq!(retry.status, status);
        assert_eq!(retry.body, first.body);
        let run = first.json()["run"].as_i64().unwrap_or_default();
        let rows = database
            .number(&format!("SELECT count(*) FROM effects WHERE run = {run}"))
            .await;
        assert_eq!(rows, 1, "{path}: the recorded row exists");
    }
    assert_eq!(effects.runs.count(), 2);
}

/// A server whose store has one connection, with the routes that take the transaction every
/// way (`/maybe`, `/option-fallback`) and one that holds a connection (`/hold`), for 1.5 s;
/// keys reserved in transactions or (`held` false) by lease.
async fn one_connection_server(database: &FreshDatabase, held: bool, runs: &Runs) -> TestServer {
    let store = database
        .store_with(|builder| {
            builder
                .max_connections(1)
                .acquire_timeout(Duration::from_millis(300))
                .reserve_in_transactions(held)
        })
        .await;
    let idempotency = IdempotencyMiddleware::new(store);
    let (data, hold) = (
        web::Data::new(runs.clone()),
        web::Data::new(Hold(Duration::from_millis(1500))),
    );
    TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(data.clone())
            .app_data(hold.clone())
            .service(hold_a_connection)
            .service(option_fallback)
            .service(maybe)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// Sends a request to `/hold` of a [`one_connection_server`] and waits until it holds the
/// connection; its answer, once it lets go.
async fn hold_the_only_connection(server: &TestServer) -> tokio::task::JoinHandle<Received> {
    let holder = tokio::spawn({
        let url = server.url("/hold");
        async move { post_keyed(&fresh_client(), &url, "holder", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder
}

/// Takes the fallback the wrong way: `Option` turns a failed begin into `None`.
#[idempotent]
#[post("/option-fallback")]
async fn option_fallback(
    runs: web::Data<Runs>,
    transaction: Option<IdempotentTransaction>,
) -> HttpResponse {
    let run = runs.record();
    HttpResponse::Created().body(format!("run {run}, joined: {}", transaction.is_some()))
}

/// Takes the fallback the right way.
#[idempotent]
#[post("/maybe")]
async fn maybe(runs: web::Data<Runs>, transaction: MaybeIdempotentTransaction) -> HttpResponse {
    let run = runs.record();
    let joined = transaction.into_option().is_some();
    HttpResponse::Created().body(format!("run {run}, joined: {joined}"))
}

/// The database cannot begin a handler's transaction (every connection is held): the handler
/// never silently runs outside it. `MaybeIdempotentTransaction` fails (503, key free, the
/// retry runs once in a transaction); `Option<IdempotentTransaction>` lets the handler run, and
/// its client gets 503 and a key kept done, never a response that looks recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_database_cannot_begin_is_never_a_silent_fallback() {
    let test = "a_transaction_the_database_cannot_begin";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let runs = Runs::default();
    // Reserving in the transaction, nothing runs before it begins: see
    // `a_key_held_by_its_transaction_never_runs_without_it`.
    let server = one_connection_server(&database, false, &runs).await;

    let holder = hold_the_only_connection(&server).await;
    let maybe_refused = post_keyed(&fresh_client(), &server.url("/maybe"), "m", "{}").await;
    let option_ran = post_keyed(&fresh_client(), &server.url("/option-fallback"), "o", "{}").await;
    assert_eq!(
        maybe_refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{maybe_refused:?}"
    );
    assert_eq!(
        option_ran.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{option_ran:?}"
    );
    assert_eq!(runs.count(), 1, "only the Option handler ran");
    let _ = holder.await;

    let maybe_retried = post_keyed(&fresh_client(), &server.url("/maybe"), "m", "{}").await;
    assert_eq!(
        maybe_retried.status,
        StatusCode::CREATED,
        "{maybe_retried:?}"
    );
    assert_eq!(maybe_retried.body, "run 2, joined: true");
    let option_retried =
        post_keyed(&fresh_client(), &server.url("/option-fallback"), "o", "{}").await;
    assert_eq!(
        option_retried.status,
        StatusCode::CONFLICT,
        "{option_retried:?}"
    );
    assert!(option_retried
        .problem_type()
        .is_some_and(|t| t.ends_with("#response-not-replayable")));
    assert_eq!(runs.count(), 2, "the Option handler never ran again");
}

/// Takes its transaction and a JSON body.
#[idempotent]
#[post("/json-write")]
async fn json_write(
    runs: web::Data<Runs>,
    mut tx: IdempotentTransaction,
    body: web::Json<serde_json::Value>,
) -> HttpResponse {
    let run = runs.record();
    let _ = sqlx::query("SELECT 1").execute(&mut *tx).await;
    HttpResponse::Created().json(json!({ "run": run, "body": body.into_inner() }))
}

/// A body the handler's other extractor refuses: the handler never ran, so its transaction
/// decided nothing. The 400 is neither a 500 nor kept for the key's retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_refusal_beside_the_transaction_is_not_kept() {
    let test = "an_extractor_refusal_beside_the_transaction";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database.store().await;
    let runs = Runs::default();
    let idempotency = IdempotencyMiddleware::new(store);
    let data = web::Data::new(runs.clone());
    let server = TestServer::start(1, move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(data.clone())
            .service(json_write)
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    for _ in 0..2 {
        let refused = post_keyed(
            &fresh_client(),
            &server.url("/json-write"),
            "j",
            "{not json",
        )
        .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
        assert!(!refused.is_replay(), "{refused:?}");
    }
    let ran = post_keyed(&fresh_client(), &server.url("/json-write"), "j2", "{}").await;
    assert_eq!(ran.status, StatusCode::CREATED, "{ran:?}");
    assert_eq!(runs.count(), 1);
}

/// A route whose handler takes its transaction has its key held by that transaction: nothing
/// is committed for the key while the handler runs, concurrent duplicates never run it, and
/// the one commit holds both the handler's row and the record that replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_its_transaction_commits_once_with_its_record() {
    let test = "a_key_held_by_its_transaction_commits_once";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let effects = Effects::new(false, Duration::from_millis(500));
    let runs = effects.runs.clone();
    let (server, _store) = effects_server(&database, effects).await;

    let first = tokio::spawn({
        let url = server.url("/effects");
        async move { post_keyed(&fresh_client(), &url, "held", "{}").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        database
            .number("SELECT count(*) FROM idempotency_keys")
            .await,
        0,
        "the running handler's key is held by its transaction, not by a committed row"
    );
    let duplicates = join_all((0..8).map(|_| {
        let url = server.url("/effects");
        async move { post_keyed(&fresh_client(), &url, "held", "{}").await }
    }))
    .await;
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    for duplicate in &duplicates {
        assert!(
            duplicate.status == StatusCode::CONFLICT
                || (duplicate.is_replay() && duplicate.body == first.body),
            "{duplicate:?}"
        );
    }
    let replay = post_keyed(&fresh_client(), &server.url("/effects"), "held", "{}").await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    let other_payload = post_keyed(
        &fresh_client(),
        &server.url("/effects"),
        "held",
        r#"{"x":1}"#,
    )
    .await;
    assert_eq!(other_payload.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.count(), 1, "a duplicate ran the handler");
    assert_eq!(database.number("SELECT count(*) FROM effects").await, 1);
}

/// With every connection held, a route whose key would be reserved in its transaction cannot
/// reserve it: it answers 503 before its handler runs, whatever way the handler takes the
/// transaction, and the retries run once each, in their transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_its_transaction_never_runs_without_it() {
    let test = "a_key_held_by_its_transaction_never_runs_without_it";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let runs = Runs::default();
    let server = one_connection_server(&database, true, &runs).await;

    let holder = hold_the_only_connection(&server).await;
    for (path, key) in [("/maybe", "m"), ("/option-fallback", "o")] {
        let refused = post_keyed(&fresh_client(), &server.url(path), key, "{}").await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{refused:?}"
        );
    }
    assert_eq!(runs.count(), 0, "a handler ran without its transaction");
    let _ = holder.await;

    let maybe_retried = post_keyed(&fresh_client(), &server.url("/maybe"), "m", "{}").await;
    assert_eq!(
        maybe_retried.body, "run 1, joined: true",
        "{maybe_retried:?}"
    );
    let option_retried =
        post_keyed(&fresh_client(), &server.url("/option-fallback"), "o", "{}").await;
    assert_eq!(
        option_retried.body, "run 2, joined: true",
        "{option_retried:?}"
    );
    let replayed = post_keyed(&fresh_client(), &server.url("/maybe"), "m", "{}").await;
    assert!(replayed.is_replay(), "{replayed:?}");
    assert_eq!(runs.count(), 2);
}

/// SIGTERM while a keyed request runs, with the shutdown's default patience: the request
/// finishes, its client gets the answer and its record is stored, so a retry on the next
/// instance is a replay and one order exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_the_running_request_and_stores_its_record() {
    let test = "a_graceful_shutdown_finishes";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let environment = [("IDEMPOTENCY_DATABASE_URL", database.url())];
    let environment: Vec<(&str, &str)> = environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let mut stopping = DemoProcess::start(DEMO, &environment);
    let running = tokio::spawn({
        let url = stopping.url("/orders/slow");
        async move { post_keyed(&fresh_client(), &url, "graceful", ORDER).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stopping.terminate();
    let answered = running.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answered.status, StatusCode::CREATED, "{answered:?}");
    assert!(stopping.wait(), "the demo did not exit cleanly on SIGTERM");

    let next = DemoProcess::start(DEMO, &environment);
    let retried = post_keyed(
        &fresh_client(),
        &next.url("/orders/slow"),
        "graceful",
        ORDER,
    )
    .await;
    assert!(retried.is_replay(), "{retried:?}");
    assert_eq!(retried.body, answered.body);
    assert_eq!(database.number("SELECT count(*) FROM demo_orders").await, 1);
}
