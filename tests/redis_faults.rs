//! Exactly once on Redis under real faults: handlers slower than their lease, unreadable
//! records, a full Redis, Redis restarts, and an instance killed mid-request.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{http::StatusCode, web, App};
use futures_util::future::join_all;
use idempotency_actix::{
    IdempotencyMiddleware, IdempotencyMiddlewareBuilder, RedisStore, StoreOutage,
};
use idempotency_actix_workspace::{
    orders::{routes, Orders},
    post_keyed, redis_url_or_skip, unique_prefix,
    work::{
        check_a_handler_slower_than_its_lease, check_durations_past_the_clock, fresh_client,
        work_server,
    },
    PrivateRedis, Received, RedisCleanup, Runs, TestServer,
};
use tokio::sync::Barrier;

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"))
}

fn server(builder: IdempotencyMiddlewareBuilder, runs: &Runs, delay: Duration) -> TestServer {
    work_server(builder, runs, delay, |_| {})
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("redis: {e}"));
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis: {e}"))
}

fn slug(answer: &Received) -> Option<String> {
    answer
        .problem_type()
        .and_then(|t| t.rsplit('#').next().map(str::to_owned))
}

async fn private_redis(test: &str) -> Option<PrivateRedis> {
    if !PrivateRedis::available() {
        assert!(
            std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() != Ok("1"),
            "{test}: IDEMPOTENCY_REQUIRE_REDIS=1 but redis-server is not installed"
        );
        eprintln!("\n*** SKIPPED {test}: redis-server is not installed ***\n");
        return None;
    }
    let mut redis = PrivateRedis::reserve_port().unwrap_or_else(|e| panic!("port: {e}"));
    redis.start().await.unwrap_or_else(|e| panic!("{e}"));
    Some(redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_slower_than_its_lease_runs_once_on_redis() {
    let test = "a_handler_slower_than_its_lease_runs_once_on_redis";
    let Some(url) = redis_url_or_skip(test).await else {
        return;
    };
    let prefix = unique_prefix("slow-lease");
    let _cleanup = RedisCleanup::new(&url, &prefix);
    check_a_handler_slower_than_its_lease(store(&url, &prefix)).await;
}

/// A record that cannot be read (corrupt, or from another record format) answers 409
/// `record-unreadable`: not 503 for a day, and not a new run, even when failing open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_records_are_answered_409_and_never_run_again() {
    let test = "unreadable_records_are_answered_409_and_never_run_again";
    let Some(url) = redis_url_or_skip(test).await else {
        return;
    };
    let prefix = unique_prefix("unreadable");
    let _cleanup = RedisCleanup::new(&url, &prefix);
    let runs = Runs::default();
    let closed = server(
        IdempotencyMiddleware::builder(store(&url, &prefix)),
        &runs,
        Duration::ZERO,
    );
    let open = server(
        IdempotencyMiddleware::builder(store(&url, &prefix)).store_outage(StoreOutage::FailOpen),
        &runs,
        Duration::ZERO,
    );
    let first = post_keyed(&fresh_client(), &closed.url("/work"), "k", "order").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");

    let mut connection = redis(&url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The record's first byte after the marker is its format version.
    let mut future_version = stored.clone();
    future_version[1] = 99;
    for unreadable in [b"c\xff\xff\xff".to_vec(), future_version] {
        let () = redis::cmd("SET")
            .arg(&keys[0])
            .arg(unreadable)
            .arg("KEEPTTL")
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for server in [&closed, &open] {
            let answer = post_keyed(&fresh_client(), &server.url("/work"), "k", "order").await;
            assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
            assert_eq!(slug(&answer).as_deref(), Some("record-unreadable"));
        }
    }
    assert_eq!(
        runs.count(),
        1,
        "an unreadable record never runs the handler again"
    );
}

/// A Redis at `maxmemory` under `noeviction` refuses new reservations: 503, never an
/// unprotected run, even when the middleware fails open for outages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_redis_refuses_with_503_even_when_failing_open() {
    let test = "a_full_redis_refuses_with_503_even_when_failing_open";
    let Some(private) = private_redis(test).await else {
        return;
    };
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(store(&private.url(), "full:"))
        .store_outage(StoreOutage::FailOpen);
    let server = server(builder, &runs, Duration::ZERO);
    let first = post_keyed(&fresh_client(), &server.url("/work"), "before", "order").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");

    // Any memory in use is now over the bound: Redis refuses every write with OOM.
    let mut connection = redis(&private.url()).await;
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let refused = post_keyed(&fresh_client(), &server.url("/work"), "after", "order").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    assert_eq!(slug(&refused).as_deref(), Some("store-unavailable"));
    let replay = post_keyed(&fresh_client(), &server.url("/work"), "before", "order").await;
    assert!(replay.is_replay(), "a full Redis still replays: {replay:?}");
    assert_eq!(runs.count(), 1, "the refused request must not run");
}

/// Redis restarts without persistence while 20 slow requests run: their reservations are made
/// again by renewal and their records stored after the restart, so no retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_no_request_in_flight() {
    let test = "a_redis_restart_loses_no_request_in_flight";
    let Some(mut private) = private_redis(test).await else {
        return;
    };
    let runs = Runs::default();
    let builder = IdempotencyMiddleware::builder(store(&private.url(), "restart:"))
        .reservation_lease(Duration::from_secs(3));
    let server = server(builder, &runs, Duration::from_millis(2500));

    const REQUESTS: usize = 20;
    let start = Arc::new(Barrier::new(REQUESTS + 1));
    let requests: Vec<_> = (0..REQUESTS)
        .map(|n| {
            let url = server.url("/work");
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                post_keyed(&fresh_client(), &url, &format!("k{n}"), "order").await
            })
        })
        .collect();
    start.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs.count(), REQUESTS, "every request is running");
    private.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    private.start().await.unwrap_or_else(|e| panic!("{e}"));
    // By now every reservation was renewed once since the restart, which made it again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let duplicates = (0..REQUESTS).map(|n| {
        let url = server.url("/work");
        async move { post_keyed(&fresh_client(), &url, &format!("k{n}"), "order").await }
    });
    for duplicate in join_all(duplicates).await {
        assert!(
            duplicate.status == StatusCode::CONFLICT || duplicate.is_replay(),
            "a duplicate during the run must not run: {duplicate:?}"
        );
    }

    for answer in join_all(requests).await {
        let answer = answer.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in 0..REQUESTS {
        let retry = post_keyed(
            &fresh_client(),
            &server.url("/work"),
            &format!("k{n}"),
            "order",
        )
        .await;
        assert!(retry.is_replay(), "k{n}: {retry:?}");
    }
    assert_eq!(runs.count(), REQUESTS, "no request ran twice");
}

/// The example's order counter has its own Redis connection: after a Redis restart it answers
/// again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_recovers_from_a_redis_restart_within_seconds() {
    let test = "the_example_recovers_from_a_redis_restart_within_seconds";
    let Some(mut private) = private_redis(test).await else {
        return;
    };
    let url = private.url();
    let orders = Orders::shared(&url, "orders-demo:next-order-id")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let middleware = IdempotencyMiddleware::new(store(&url, "orders-demo:idempotency:"));
    let orders = web::Data::new(orders);
    let server = TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .configure(routes(orders.clone()))
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    let order = r#"{"item":"book"}"#;
    let first = post_keyed(&fresh_client(), &server.url("/orders"), "before", order).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");

    private.stop();
    // Requests while Redis is down make the connection try to reconnect, and back off.
    let patient = fresh_client();
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(1500) {
        let _ = patient.get(server.url("/orders/count")).send().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    private.start().await.unwrap_or_else(|e| panic!("{e}"));
    let restarted = Instant::now();
    let recovered = loop {
        let count = patient.get(server.url("/orders/count")).send().await;
        if count.is_ok_and(|answer| answer.status().is_success()) {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "the order counter did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        recovered < Duration::from_secs(5),
        "recovered after {recovered:?}"
    );
    // The idempotency store remakes its own connection on first use after the restart, so
    // the client may get a 503 (with Retry-After) before its order goes through.
    loop {
        let after = post_keyed(&fresh_client(), &server.url("/orders"), "after", order).await;
        if after.status == StatusCode::CREATED {
            break;
        }
        assert_eq!(after.status, StatusCode::SERVICE_UNAVAILABLE, "{after:?}");
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "orders still fail {:?} after the restart: {after:?}",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An instance of `crash_server` on `redis_url`, killed on drop.
struct Instance {
    child: Child,
    address: String,
}

impl Instance {
    fn start(redis_url: &str, prefix: &str, lease: Duration) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_server"))
            .env("REDIS_URL", redis_url)
            .env("KEY_PREFIX", prefix)
            .env("LEASE_MS", lease.as_millis().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("crash_server: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("crash_server said {line:?}"))
            .to_owned();
        Self { child, address }
    }

    fn url(&self) -> String {
        format!("http://{}/slow", self.address)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance killed with SIGKILL mid-request leaves its reservation behind: another instance
/// refuses the retry while the lease runs, then runs it once the lease is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_frees_its_key_after_one_lease() {
    let test = "a_killed_instance_frees_its_key_after_one_lease";
    let Some(url) = redis_url_or_skip(test).await else {
        return;
    };
    let prefix = unique_prefix("crash");
    let _cleanup = RedisCleanup::new(&url, &prefix);
    let lease = Duration::from_millis(1500);
    let mut doomed = Instance::start(&url, &prefix, lease);
    let survivor = Instance::start(&url, &prefix, lease);

    let lost = tokio::spawn({
        let url = doomed.url();
        async move { post_keyed(&fresh_client(), &url, "k", "order").await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    doomed.kill();
    let killed = Instant::now();
    let _ = lost.await;

    let during = post_keyed(&fresh_client(), &survivor.url(), "k", "order").await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "the lease still runs: {during:?}"
    );
    let retried = loop {
        let retry = post_keyed(&fresh_client(), &survivor.url(), "k", "order").await;
        if retry.status == StatusCode::CREATED {
            break retry;
        }
        assert!(
            killed.elapsed() < lease * 4,
            "the key was never freed: {retry:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!retried.is_replay(), "{retried:?}");
    assert_eq!(
        retried.body, "run 2",
        "the dead instance's run, then this one"
    );
    let replay = post_keyed(&fresh_client(), &survivor.url(), "k", "order").await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, "run 2");
}

/// Durations past what Redis' clock can hold are cut, not refused: every request completes
/// and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durations_past_the_clock_work_on_redis() {
    let test = "durations_past_the_clock_work_on_redis";
    let Some(url) = redis_url_or_skip(test).await else {
        return;
    };
    let prefix = unique_prefix("durations");
    let _cleanup = RedisCleanup::new(&url, &prefix);
    check_durations_past_the_clock(store(&url, &prefix)).await;
}

/// A "Redis" that accepts connections and never answers, as one behind a dead route does.
fn silent_server() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(64).flatten() {
            held.push(stream);
        }
    });
    (address, accepting)
}

/// An instance started while Redis does not answer: each keyed request gets its 503 within the
/// store's timeouts, the tenth as soon as the first (a failed reservation on a store that never
/// connected has nothing to free, so no background release queues up behind the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_instance_answers_every_request_within_its_timeouts_during_an_outage() {
    let (address, _accepting) = silent_server();
    let store = store(&format!("redis://{address}"), "cold:");
    let runs = Runs::default();
    let server = server(IdempotencyMiddleware::builder(store), &runs, Duration::ZERO);
    let mut took = Vec::new();
    for n in 0..10 {
        let started = Instant::now();
        let answer = post_keyed(
            &fresh_client(),
            &server.url("/work"),
            &format!("cold-{n}"),
            "{}",
        )
        .await;
        took.push(started.elapsed());
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    }
    // Connecting and one command, 300 ms each, and some room for a loaded machine.
    let slowest = took.iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_millis(1500), "{took:?}");
    assert_eq!(runs.count(), 0);
}
