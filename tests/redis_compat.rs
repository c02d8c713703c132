//! The Redis store against servers older than 7.0, which refuse `SET .. NX .. GET` (its fast
//! reservation): keys are then reserved by script, with the same guarantee. Redis here is 7.0,
//! so a proxy in front of it answers that command as Redis 6 does.

use std::{sync::atomic::Ordering, time::Duration};

use futures_util::future::join_all;
use idempotency_actix::{IdempotencyMiddleware, RedisStore};
use idempotency_actix_workspace::{
    post_keyed, redis_url_or_skip,
    resp_proxy::{RespProxy, SetNxGet},
    unique_prefix,
    work::{fresh_client, work_server},
    RedisCleanup, Runs, TestServer,
};

/// The proxy's URL, on the test Redis's database.
async fn proxy(url: &str, behaviour: SetNxGet) -> (RespProxy, String) {
    let info = redis::Client::open(url)
        .unwrap_or_else(|e| panic!("redis url: {e}"))
        .get_connection_info()
        .clone();
    let redis::ConnectionAddr::Tcp(host, port) = &info.addr else {
        panic!("the test Redis must be on plain TCP for the proxy: {url}");
    };
    let proxy = RespProxy::start(&format!("{host}:{port}"), behaviour)
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let credentials = match (&info.redis.username, &info.redis.password) {
        (Some(user), Some(password)) => format!("{user}:{password}@"),
        (None, Some(password)) => format!(":{password}@"),
        (Some(user), None) => format!("{user}@"),
        (None, None) => String::new(),
    };
    let address = proxy.url().replace("redis://", "");
    let proxied = format!("redis://{credentials}{address}/{}", info.redis.db);
    (proxy, proxied)
}

/// A server on a store that reaches the test Redis through a proxy doing `behaviour`; `None`
/// (the test skips) without a Redis.
struct Proxied {
    /// Bound first in the tests' patterns, so dropped last: after the server and its store.
    _cleanup: RedisCleanup,
    proxy: RespProxy,
    server: TestServer,
    runs: Runs,
}

async fn proxied(test: &str, behaviour: SetNxGet) -> Option<Proxied> {
    let url = redis_url_or_skip(test).await?;
    let prefix = unique_prefix(test);
    let cleanup = RedisCleanup::new(&url, &prefix);
    let (proxy, proxied) = proxy(&url, behaviour).await;
    let store = RedisStore::builder(&proxied)
        .key_prefix(&prefix)
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    let runs = Runs::default();
    // Duplicates wait for the first one's answer long enough to get it: without sharded
    // pub/sub they poll for it.
    let server = work_server(
        IdempotencyMiddleware::builder(store).lock_timeout(Duration::from_secs(2)),
        &runs,
        Duration::from_millis(100),
        |_| {},
    );
    Some(Proxied {
        _cleanup: cleanup,
        proxy,
        server,
        runs,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_refusing_set_nx_get_reserves_by_script_with_the_same_guarantee() {
    let Some(Proxied {
        _cleanup,
        proxy,
        server,
        runs,
    }) = proxied("redis6", SetNxGet::RefusedLikeRedis6).await
    else {
        return;
    };
    let client = fresh_client();

    let first = post_keyed(&client, &server.url("/work"), "k1", "order").await;
    assert_eq!(first.status, 201, "{first:?}");
    let replay = post_keyed(&client, &server.url("/work"), "k1", "order").await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    let mismatch = post_keyed(&client, &server.url("/work"), "k1", "another").await;
    assert_eq!(mismatch.status, 422, "{mismatch:?}");

    // Concurrent duplicates of a new key, each on its own connection: one run.
    let duplicates = join_all((0..8).map(|_| {
        let url = server.url("/work");
        async move { post_keyed(&fresh_client(), &url, "k2", "order").await }
    }))
    .await;
    assert!(
        duplicates.iter().all(|answer| answer.status == 201),
        "one ran, the others got its replay: {duplicates:?}"
    );
    assert_eq!(
        duplicates
            .iter()
            .filter(|answer| !answer.is_replay())
            .count(),
        1,
        "{duplicates:?}"
    );
    assert_eq!(runs.count(), 2, "one run per key: {duplicates:?}");

    // The first refusal turned the plain reservation off for good; scripts did the work.
    assert_eq!(proxy.seen().set_nx_get.load(Ordering::SeqCst), 1);
    assert!(proxy.seen().scripts.load(Ordering::SeqCst) >= 4);
}

/// An error on the plain reservation that says nothing of its syntax (the server refused this
/// one command for another reason) sends that request to the script, and leaves the plain
/// reservation on for the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_error_on_the_plain_reservation_leaves_it_on() {
    let Some(Proxied {
        _cleanup,
        proxy,
        server,
        runs,
    }) = proxied("plain-error", SetNxGet::FirstFailsOtherwise).await
    else {
        return;
    };
    let client = fresh_client();

    for key in ["a", "b", "c"] {
        let answer = post_keyed(&client, &server.url("/work"), key, "order").await;
        assert_eq!(answer.status, 201, "{key}: {answer:?}");
    }
    assert_eq!(runs.count(), 3);
    assert_eq!(
        proxy.seen().set_nx_get.load(Ordering::SeqCst),
        3,
        "every reservation starts with the plain command"
    );
}
