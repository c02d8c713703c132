//! The demo server as a process, as operators meet it: how it fails to start, and its
//! readiness probe.

use std::{process::Command, time::Duration};

use idempotency_actix_workspace::{postgres::DemoProcess, PrivateRedis};
use reqwest::StatusCode;

const DEMO: &str = env!("CARGO_BIN_EXE_orders_demo");

/// A start-up failure is one line naming what failed, never a `Debug` dump, and never the
/// password of a URL; the process exits with a failure.
#[test]
fn a_demo_that_cannot_start_says_why_in_one_line() {
    let cases = [
        (
            "IDEMPOTENCY_DATABASE_URL",
            "postgres://nobody:secret@127.0.0.1:1/none",
            "orders demo: PostgreSQL at postgres://…@127.0.0.1:1/none: ",
        ),
        (
            "IDEMPOTENCY_REDIS_URL",
            "redis://:secret@127.0.0.1:1",
            "orders demo: Redis at redis://…@127.0.0.1:1: ",
        ),
        (
            "IDEMPOTENCY_LEASE_MS",
            "soon",
            "orders demo: IDEMPOTENCY_LEASE_MS=soon is not milliseconds",
        ),
        (
            "BIND",
            "127.0.0.1:99999",
            "orders demo: cannot listen on 127.0.0.1:99999: ",
        ),
    ];
    for (name, value, expected) in cases {
        let output = Command::new(DEMO)
            .env("BIND", "127.0.0.1:0")
            .env(name, value)
            .output()
            .unwrap_or_else(|e| panic!("run the demo: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}={value} started");
        assert_eq!(stderr.lines().count(), 1, "{name}={value}: {stderr}");
        assert!(stderr.starts_with(expected), "{name}={value}: {stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
        assert!(!stderr.contains("Custom {"), "{stderr}");
    }
}

async fn health(demo: &DemoProcess) -> (StatusCode, Option<String>, serde_json::Value) {
    let response = reqwest::Client::new()
        .get(demo.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /healthz: {e}"));
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or_default();
    (status, content_type, body)
}

/// `GET /healthz` answers 200 while the store answers, 503 with the reason while it does not,
/// and 200 again once it is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_whether_the_store_answers() {
    let in_memory = DemoProcess::start(DEMO, &[]);
    assert_eq!(health(&in_memory).await.0, StatusCode::OK);

    if !PrivateRedis::available() {
        assert!(
            std::env::var_os("IDEMPOTENCY_REQUIRE_REDIS").is_none(),
            "redis-server is required"
        );
        eprintln!("SKIPPED healthz_says_whether_the_store_answers on Redis: no redis-server");
        return;
    }
    let mut redis = PrivateRedis::reserve_port().unwrap_or_else(|e| panic!("port: {e}"));
    redis.start().await.unwrap_or_else(|e| panic!("redis: {e}"));
    let url = redis.url();
    let on_redis = DemoProcess::start(DEMO, &[("IDEMPOTENCY_REDIS_URL", url.as_str())]);
    let (status, _, body) = health(&on_redis).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");

    redis.stop();
    let (status, content_type, body) = health(&on_redis).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| !detail.is_empty()),
        "{body}"
    );

    redis
        .start()
        .await
        .unwrap_or_else(|e| panic!("redis again: {e}"));
    let back = async {
        loop {
            if health(&on_redis).await.0 == StatusCode::OK {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), back)
        .await
        .unwrap_or_else(|_| panic!("/healthz stayed 503 after Redis came back"));
}
