//! The demo server's routes, exactly as `cargo run --example orders` serves them.

use actix_web::{http::StatusCode, test, web, App};
use idempotency_actix::{IdempotencyMiddleware, MemoryStore, RedisStore};
use idempotency_actix_workspace::{
    orders::{routes, Orders},
    post_keyed, redis_url_or_skip, respond, unique_prefix, PrivateRedisCluster, Received,
    RedisCleanup, TestServer,
};
use serde_json::json;

fn order(path: &str, key: Option<&str>, item: &str) -> actix_http::Request {
    let mut request = test::TestRequest::post()
        .uri(path)
        .set_json(json!({ "item": item }));
    if let Some(key) = key {
        request = request.insert_header(("Idempotency-Key", key.to_owned()));
    }
    request.to_request()
}

#[actix_rt::test]
async fn demo_routes_behave_as_documented() {
    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .configure(routes(web::Data::new(Orders::default()))),
    )
    .await;
    let count = |received: Received| received.json()["count"].as_u64();

    let first = respond(&app, order("/orders", Some("a"), "book")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.json(), json!({ "id": 1, "item": "book" }));
    let replay = respond(&app, order("/orders", Some("a"), "book")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.json(), json!({ "id": 1, "item": "book" }));
    assert_eq!(
        respond(&app, order("/orders", None, "book")).await.status,
        StatusCode::BAD_REQUEST
    );

    let optional = respond(&app, order("/orders/optional", None, "pen")).await;
    assert_eq!(optional.json(), json!({ "id": 2, "item": "pen" }));
    let optional_again = respond(&app, order("/orders/optional", None, "pen")).await;
    assert_eq!(optional_again.json()["id"], 3);

    let manual = respond(&app, order("/orders/manual", Some("m"), "ink")).await;
    assert_eq!(manual.status, StatusCode::CREATED);
    assert_eq!(manual.json(), json!({ "id": 4, "item": "ink" }));
    let manual_again = respond(&app, order("/orders/manual", Some("m"), "ink")).await;
    assert_eq!(manual_again.status, StatusCode::OK);
    assert_eq!(manual_again.json(), json!({ "replayed_id": 4 }));

    let slow = respond(&app, order("/orders/slow", Some("s"), "desk")).await;
    assert_eq!(slow.json(), json!({ "id": 5, "item": "desk" }));

    let failed = respond(&app, order("/orders/fail", Some("f"), "lamp")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        failed.header("content-type"),
        Some("application/problem+json")
    );
    let failed_again = respond(&app, order("/orders/fail", Some("f"), "lamp")).await;
    assert!(!failed_again.is_replay(), "a 500 is not stored");

    for _ in 0..2 {
        let ping = respond(&app, test::TestRequest::post().uri("/ping").to_request()).await;
        assert_eq!(ping.status, StatusCode::OK);
    }
    let note = |key: Option<&str>| {
        let mut request = test::TestRequest::post().uri("/notes").set_payload("hello");
        if let Some(key) = key {
            request = request.insert_header(("Idempotency-Key", key.to_owned()));
        }
        request.to_request()
    };
    assert_eq!(
        respond(&app, note(None)).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        respond(&app, note(Some("n"))).await.status,
        StatusCode::CREATED
    );

    let counted = respond(
        &app,
        test::TestRequest::get().uri("/orders/count").to_request(),
    )
    .await;
    assert_eq!(
        count(counted),
        Some(5),
        "replays, failures and manual repeats create nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demo_servers_on_one_redis_behave_as_one() {
    let Some(url) = redis_url_or_skip("two_demo_servers_on_one_redis_behave_as_one").await else {
        return;
    };
    let prefix = unique_prefix("demo");
    let _cleanup = RedisCleanup::new(&url, &prefix);
    let orders = Orders::shared(&url, &format!("{prefix}next-order-id"))
        .await
        .unwrap_or_else(|e| panic!("orders: {e}"));
    let store = || {
        RedisStore::builder(&url)
            .key_prefix(format!("{prefix}idempotency:"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
    };
    two_demo_servers_behave_as_one(store, orders).await;
}

/// The example in `IDEMPOTENCY_REDIS_CLUSTER_URLS` mode: store and order counter in a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_demo_servers_on_a_redis_cluster_behave_as_one() {
    let Some(cluster) =
        PrivateRedisCluster::start_or_skip("two_demo_servers_on_a_redis_cluster_behave_as_one")
    else {
        return;
    };
    let prefix = unique_prefix("demo-cluster");
    let orders = Orders::shared_in_cluster(&cluster.urls(), &format!("{prefix}next-order-id"))
        .await
        .unwrap_or_else(|e| panic!("orders: {e}"));
    let store = || {
        RedisStore::cluster_builder(cluster.urls())
            .key_prefix(format!("{prefix}idempotency:"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"))
    };
    two_demo_servers_behave_as_one(store, orders).await;
    let keys = cluster.keys_per_node().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        keys.iter().filter(|&&n| n > 0).count() >= 2,
        "the demo's keys must land on several nodes: {keys:?}"
    );
}

/// Two copies of the demo server on one shared store and order counter: a key used on one is
/// replayed byte-identically by the other, and both count the orders they share.
async fn two_demo_servers_behave_as_one(store: impl Fn() -> RedisStore, orders: Orders) {
    let orders = web::Data::new(orders);
    let start = || {
        let middleware = IdempotencyMiddleware::new(store());
        let orders = orders.clone();
        TestServer::start(1, move || {
            App::new()
                .wrap(middleware.clone())
                .configure(routes(orders.clone()))
        })
        .unwrap_or_else(|e| panic!("server: {e}"))
    };
    let (a, b) = (start(), start());
    let client = reqwest::Client::new();
    let book = r#"{"item":"book"}"#;
    let first = post_keyed(&client, &a.url("/orders"), "k1", book).await;
    let on_b = post_keyed(&client, &b.url("/orders"), "k1", book).await;
    assert_eq!(
        (first.status, first.is_replay()),
        (StatusCode::CREATED, false)
    );
    assert_eq!((on_b.status, on_b.is_replay()), (StatusCode::CREATED, true));
    assert_eq!(
        on_b.body, first.body,
        "the replay from the other server is byte-identical"
    );
    let second = post_keyed(&client, &b.url("/orders"), "k2", book).await;
    assert_eq!(second.json()["id"], 2);
    for n in 3..=8 {
        let key = format!("k{n}");
        let server = if n % 2 == 0 { &a } else { &b };
        let created = post_keyed(&client, &server.url("/orders"), &key, book).await;
        assert_eq!(created.json()["id"], n, "{key}");
    }
    for server in [&a, &b] {
        let count = client
            .get(server.url("/orders/count"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            count.json::<serde_json::Value>().await.unwrap_or_default(),
            json!({ "count": 8 }),
            "every copy counts the orders they share"
        );
    }
}
