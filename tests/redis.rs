//! The Redis store: several instances behave as one, Redis faults, and round trips.

use std::{sync::Arc, time::Duration};

use actix_web::{http::StatusCode, post, test, web, App, HttpResponse};
use futures_util::future::join_all;
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, InFlightStatus, RedisStore,
    StoreOutage,
};
use idempotency_actix_workspace::{
    post_keyed, redis_url_or_skip, respond, unique_prefix, PrivateRedis, Runs, TestServer,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Barrier,
};

#[idempotent]
#[post("/orders")]
async fn create_order(runs: web::Data<Runs>, body: web::Bytes) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    HttpResponse::Created()
        .insert_header(("x-order", run.to_string()))
        .body(format!("order {run}: {}", String::from_utf8_lossy(&body)))
}

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix)
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"))
}

fn instance(url: &str, prefix: &str, runs: &Runs) -> TestServer {
    let builder =
        IdempotencyMiddleware::builder(store(url, prefix)).lock_timeout(Duration::from_secs(5));
    instance_with(builder, runs)
}

fn instance_with(builder: IdempotencyMiddlewareBuilder, runs: &Runs) -> TestServer {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    let runs = runs.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .app_data(web::Data::new(runs.clone()))
            .service(create_order)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_run_a_handler_once() {
    let Some(url) = redis_url_or_skip("two_instances_on_one_redis_run_a_handler_once").await else {
        return;
    };
    let prefix = unique_prefix("two-instances");
    let runs = Runs::default();
    let (first, second) = (
        instance(&url, &prefix, &runs),
        instance(&url, &prefix, &runs),
    );
    assert_ne!(first.address(), second.address());

    const REQUESTS: usize = 40;
    let start = Arc::new(Barrier::new(REQUESTS));
    let urls = [first.url("/orders"), second.url("/orders")];
    let tasks = (0..REQUESTS).map(|i| {
        let url = urls[i % 2].clone();
        let start = Arc::clone(&start);
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            start.wait().await;
            (i % 2, post_keyed(&client, &url, "shared-key", "book").await)
        })
    });
    let answers: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect();

    assert_eq!(runs.count(), 1, "one run across both instances");
    let firsts: Vec<_> = answers
        .iter()
        .filter(|(_, a)| a.status == StatusCode::CREATED && !a.is_replay())
        .collect();
    assert_eq!(firsts.len(), 1, "{answers:?}");
    assert!(
        answers.iter().all(|(_, a)| a.is_replay()
            || a.status == StatusCode::CONFLICT
            || a.status == StatusCode::CREATED),
        "{answers:?}"
    );
    let replays: Vec<_> = answers.iter().filter(|(_, a)| a.is_replay()).collect();
    assert!(
        replays.iter().any(|(from, _)| *from == 0) && replays.iter().any(|(from, _)| *from == 1)
    );
    for (_, replay) in &replays {
        assert_eq!(
            replay.body, firsts[0].1.body,
            "replays are byte-identical to the first answer"
        );
        assert_eq!(replay.header("x-order"), firsts[0].1.header("x-order"));
        assert_eq!(replay.status, StatusCode::CREATED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_spans_instances_with_its_timeout_status() {
    let Some(url) = redis_url_or_skip("the_lock_spans_instances_with_its_timeout_status").await
    else {
        return;
    };
    let prefix = unique_prefix("lock-across");
    let runs = Runs::default();
    let locked = |url: &str| {
        IdempotencyMiddleware::builder(store(url, &prefix))
            .lock_timeout(Duration::from_millis(50))
            .lock_timeout_status(InFlightStatus::Locked)
    };
    let (first, second) = (
        instance_with(locked(&url), &runs),
        instance_with(locked(&url), &runs),
    );
    let client = reqwest::Client::new();
    let running = tokio::spawn({
        let (client, url) = (client.clone(), first.url("/orders"));
        async move { post_keyed(&client, &url, "k", "book").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let duplicate = post_keyed(&client, &second.url("/orders"), "k", "book").await;
    assert_eq!(duplicate.status, StatusCode::LOCKED, "{duplicate:?}");
    assert!(duplicate
        .problem_type()
        .is_some_and(|t| t.ends_with("#locked")));
    let original = running.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (original.status, original.is_replay()),
        (StatusCode::CREATED, false)
    );
    let later = post_keyed(&client, &second.url("/orders"), "k", "book").await;
    assert!(later.is_replay());
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn redis_outages_answer_503_and_recover_without_a_restart() {
    if !PrivateRedis::available() {
        if std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!("IDEMPOTENCY_REQUIRE_REDIS=1 but redis-server is not installed");
        }
        eprintln!("\n*** SKIPPED redis_outages_answer_503_and_recover_without_a_restart: no redis-server ***\n");
        return;
    }
    let mut redis = PrivateRedis::reserve_port().unwrap_or_else(|e| panic!("{e}"));
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::new(store(&redis.url(), "outage:"));
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .service(create_order),
    )
    .await;
    let send = |key: &'static str| {
        test::TestRequest::post()
            .uri("/orders")
            .insert_header(("Idempotency-Key", key))
            .to_request()
    };

    // Unreachable from the start.
    let refused = respond(&app, send("a")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused
        .problem_type()
        .is_some_and(|t| t.ends_with("#store-unavailable")));
    assert_eq!(runs.count(), 0, "fail closed: the handler must not run");

    // Redis comes up: the same app recovers.
    redis.start().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(respond(&app, send("a")).await.status, StatusCode::CREATED);
    assert!(respond(&app, send("a")).await.is_replay());

    // Redis goes away mid-run.
    redis.stop();
    let during = respond(&app, send("b")).await;
    assert_eq!(during.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.count(), 1);

    // And comes back (empty: it keeps nothing on disk).
    redis.start().await.unwrap_or_else(|e| panic!("{e}"));
    let mut recovered = respond(&app, send("b")).await;
    for _ in 0..20 {
        if recovered.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        recovered = respond(&app, send("b")).await;
    }
    assert_eq!(recovered.status, StatusCode::CREATED);
    assert_eq!(runs.count(), 2);
}

#[actix_rt::test]
async fn fail_open_runs_the_handler_while_redis_is_down() {
    let redis = PrivateRedis::reserve_port().unwrap_or_else(|e| panic!("{e}"));
    let runs = Runs::default();
    let middleware = IdempotencyMiddleware::builder(store(&redis.url(), "open:"))
        .store_outage(StoreOutage::FailOpen)
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .service(create_order),
    )
    .await;
    let request = || {
        test::TestRequest::post()
            .uri("/orders")
            .insert_header(("Idempotency-Key", "k"))
            .to_request()
    };
    assert_eq!(respond(&app, request()).await.status, StatusCode::CREATED);
    assert_eq!(respond(&app, request()).await.status, StatusCode::CREATED);
    assert_eq!(
        runs.count(),
        2,
        "fail open: unprotected, every request runs"
    );
}

/// Counts the commands clients send to Redis that name `prefix`, leaving out the ones Lua
/// scripts run inside the server.
struct Monitor {
    lines: BufReader<TcpStream>,
}

impl Monitor {
    async fn start(url: &str) -> Self {
        let address = url.trim_start_matches("redis://").trim_end_matches('/');
        let mut stream = TcpStream::connect(address)
            .await
            .unwrap_or_else(|e| panic!("monitor: {e}"));
        stream
            .write_all(b"MONITOR\r\n")
            .await
            .unwrap_or_else(|e| panic!("monitor: {e}"));
        let mut lines = BufReader::new(stream);
        let mut ok = String::new();
        lines
            .read_line(&mut ok)
            .await
            .unwrap_or_else(|e| panic!("monitor: {e}"));
        assert!(ok.starts_with("+OK"), "{ok}");
        Self { lines }
    }

    async fn client_commands_naming(&mut self, prefix: &str) -> usize {
        let mut count = 0;
        loop {
            let mut line = String::new();
            match tokio::time::timeout(Duration::from_millis(300), self.lines.read_line(&mut line))
                .await
            {
                Ok(Ok(n)) if n > 0 => {
                    if line.contains(prefix) && !line.contains(" lua]") {
                        count += 1;
                    }
                }
                _ => return count,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_request_costs_two_round_trips_and_a_replay_one() {
    let Some(url) =
        redis_url_or_skip("a_fresh_request_costs_two_round_trips_and_a_replay_one").await
    else {
        return;
    };
    let prefix = unique_prefix("round-trips");
    let runs = Runs::default();
    let server = instance(&url, &prefix, &runs);
    let client = reqwest::Client::new();
    // Warm up: connect and load the scripts.
    post_keyed(&client, &server.url("/orders"), "warm-up", "book").await;
    post_keyed(&client, &server.url("/orders"), "warm-up", "book").await;

    let mut monitor = Monitor::start(&url).await;
    let fresh = post_keyed(&client, &server.url("/orders"), "measured", "book").await;
    assert_eq!(
        (fresh.status, fresh.is_replay()),
        (StatusCode::CREATED, false)
    );
    assert_eq!(
        monitor.client_commands_naming(&prefix).await,
        2,
        "reserve + complete"
    );

    let replay = post_keyed(&client, &server.url("/orders"), "measured", "book").await;
    assert!(replay.is_replay());
    assert_eq!(monitor.client_commands_naming(&prefix).await, 1, "one read");
}
