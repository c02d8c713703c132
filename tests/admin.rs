//! Operator tools: the demo's token-guarded admin routes over `IdempotencyAdmin` find a
//! completed order and a request in flight, and purging a key lets its retry run again, on
//! every store; and `IdempotencyAdmin` targets keys as the middleware encodes them.

use std::time::Duration;

use actix_web::{http::StatusCode, post, test, web, App, HttpResponse};
use bytes::Bytes;
use idempotency_actix::{
    idempotent, storage::KeyState, AuthorizationScope, IdempotencyKey, IdempotencyMiddleware,
    KeyTarget, MemoryStore, PythonKeyEncoder, RedisStore, StoreError,
};
use idempotency_actix_workspace::{
    admin::{admin_routes, AdminAccess},
    orders::{routes, Orders},
    postgres::{postgres_url_or_skip, FreshDatabase},
    redis_url_or_skip, respond, unique_prefix, Received, RedisCleanup,
};
use serde_json::json;

const TOKEN: &str = "s3cret-admin-token";

fn order(path: &str, key: &str, item: &str) -> actix_http::Request {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", key.to_owned()))
        .set_json(json!({ "item": item }))
        .to_request()
}

fn admin(method: &str, query: &str, token: Option<&str>) -> actix_http::Request {
    let request = match method {
        "DELETE" => test::TestRequest::delete(),
        _ => test::TestRequest::get(),
    };
    let mut request = request.uri(&format!("/admin/idempotency-keys?{query}"));
    if let Some(token) = token {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    request.to_request()
}

/// The demo routes and the admin routes behind `middleware`, run through the whole support
/// story: find a completed order, see a slow one in flight, refuse callers without the token,
/// purge a completed key and see its retry create a new order.
async fn support_story(middleware: IdempotencyMiddleware, orders: Orders) {
    let access = AdminAccess::new(middleware.admin(), Some(TOKEN.to_owned()));
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            .configure(routes(web::Data::new(orders)))
            .configure(admin_routes(access)),
    )
    .await;
    let count = |received: Received| received.json()["count"].as_u64();
    let orders_count = || test::TestRequest::get().uri("/orders/count").to_request();
    let before = count(respond(&app, orders_count()).await).unwrap_or_default();

    // A completed order is found with its status and body.
    let created = respond(&app, order("/orders", "a", "book")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let found = respond(
        &app,
        admin("GET", "key=a&path=/orders&method=POST", Some(TOKEN)),
    )
    .await;
    assert_eq!(found.status, StatusCode::OK, "{:?}", found.body);
    assert_eq!(
        found.json(),
        json!({ "state": "completed", "status": 201, "body": created.json() })
    );
    // The method defaults to POST; another path or method is another key.
    let defaulted = respond(&app, admin("GET", "key=a&path=/orders", Some(TOKEN))).await;
    assert_eq!(defaulted.status, StatusCode::OK);
    let elsewhere = respond(&app, admin("GET", "key=a&path=/orders/slow", Some(TOKEN))).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
    assert_eq!(
        elsewhere.header("content-type"),
        Some("application/problem+json")
    );

    // Without the token: 401 (with a challenge); with another token: 403. Nothing is purged.
    let anonymous = respond(&app, admin("GET", "key=a&path=/orders", None)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    assert_eq!(anonymous.problem_type().as_deref(), Some("about:blank"));
    let wrong = respond(&app, admin("GET", "key=a&path=/orders", Some("guess"))).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(wrong.problem_type().as_deref(), Some("about:blank"));
    for token in [None, Some("guess"), Some("s3cret-admin-tokeN")] {
        let refused = respond(&app, admin("DELETE", "key=a&path=/orders", token)).await;
        assert!(
            matches!(
                refused.status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ),
            "{token:?}: {:?}",
            refused.status
        );
    }
    let replay = respond(&app, order("/orders", "a", "book")).await;
    assert!(replay.is_replay(), "a refused purge leaves the record");

    // A request still running shows in flight.
    let slow = respond(&app, order("/orders/slow", "s", "desk"));
    let look = async {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        respond(&app, admin("GET", "key=s&path=/orders/slow", Some(TOKEN))).await
    };
    let (slow, during) = tokio::join!(slow, look);
    assert_eq!(slow.status, StatusCode::CREATED);
    assert_eq!(during.status, StatusCode::OK);
    assert_eq!(during.json()["state"], "in_flight", "{}", during.json());
    // A lease on the stores that lease; zero on PostgreSQL, where the key is held by the
    // handler's transaction for as long as it runs.
    assert!(
        during.json()["remaining_lease_ms"].as_u64().is_some(),
        "{}",
        during.json()
    );
    let after = respond(&app, admin("GET", "key=s&path=/orders/slow", Some(TOKEN))).await;
    assert_eq!(after.json()["state"], "completed");

    // Purging the completed key makes the next retry run again: one more order.
    let with_record = count(respond(&app, orders_count()).await);
    assert_eq!(with_record, Some(before + 2));
    let purged = respond(&app, admin("DELETE", "key=a&path=/orders", Some(TOKEN))).await;
    assert_eq!(purged.status, StatusCode::NO_CONTENT);
    let gone = respond(&app, admin("GET", "key=a&path=/orders", Some(TOKEN))).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let again = respond(&app, order("/orders", "a", "book")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.is_replay(), "the retry of a purged key runs");
    assert_ne!(again.json()["id"], created.json()["id"]);
    assert_eq!(count(respond(&app, orders_count()).await), Some(before + 3));

    // Nothing there: 404 for both.
    let unknown = respond(&app, admin("DELETE", "key=never&path=/orders", Some(TOKEN))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let unknown = respond(&app, admin("GET", "key=never&path=/orders", Some(TOKEN))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // A caller's keys live in its scope: the default scope is the SHA-256 of its
    // Authorization value.
    let alice = test::TestRequest::post()
        .uri("/orders")
        .insert_header(("Idempotency-Key", "a"))
        .insert_header(("Authorization", "Bearer alice"))
        .set_json(json!({ "item": "pen" }))
        .to_request();
    assert_eq!(respond(&app, alice).await.status, StatusCode::CREATED);
    let scope = AuthorizationScope::scope_of(b"Bearer alice");
    let scoped = respond(
        &app,
        admin(
            "GET",
            &format!("key=a&path=/orders&scope={scope}"),
            Some(TOKEN),
        ),
    )
    .await;
    assert_eq!(scoped.json()["body"]["item"], "pen", "{}", scoped.json());

    // A malformed query is a 400, not a lookup.
    let invalid = respond(&app, admin("GET", "key=&path=/orders", Some(TOKEN))).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
}

#[actix_rt::test]
async fn admin_routes_find_and_purge_keys_on_the_memory_store() {
    support_story(
        IdempotencyMiddleware::new(MemoryStore::builder().build()),
        Orders::default(),
    )
    .await;
}

#[actix_rt::test]
async fn admin_routes_find_and_purge_keys_on_redis() {
    let test = "admin_routes_find_and_purge_keys_on_redis";
    let Some(url) = redis_url_or_skip(test).await else {
        return;
    };
    let prefix = unique_prefix(test);
    let _cleanup = RedisCleanup::new(&url, &prefix);
    let orders = Orders::shared(&url, &format!("{prefix}next-order-id"))
        .await
        .unwrap_or_else(|e| panic!("orders: {e}"));
    let store = RedisStore::builder(&url)
        .key_prefix(format!("{prefix}idempotency:"))
        .build()
        .unwrap_or_else(|e| panic!("store: {e}"));
    support_story(IdempotencyMiddleware::new(store), orders).await;
}

#[actix_rt::test]
async fn admin_routes_find_and_purge_keys_on_postgres() {
    let test = "admin_routes_find_and_purge_keys_on_postgres";
    let Some(url) = postgres_url_or_skip(test).await else {
        return;
    };
    let database = FreshDatabase::create(&url, test).await;
    let store = database.store().await;
    let orders = Orders::database(store.pool().clone(), "demo_orders")
        .await
        .unwrap_or_else(|e| panic!("orders table: {e}"));
    support_story(IdempotencyMiddleware::new(store), orders).await;
}

/// Without a configured token the admin routes are off: 404 whatever the caller sends.
#[actix_rt::test]
async fn admin_routes_without_a_token_are_off() {
    let middleware = IdempotencyMiddleware::new(MemoryStore::builder().build());
    for token in [None, Some(String::new())] {
        let access = AdminAccess::new(middleware.admin(), token);
        let app = test::init_service(
            App::new()
                .wrap(middleware.clone())
                .configure(routes(web::Data::new(Orders::default())))
                .configure(admin_routes(access)),
        )
        .await;
        assert_eq!(
            respond(&app, order("/orders", "a", "book")).await.status,
            StatusCode::CREATED
        );
        for (method, caller) in [("GET", None), ("GET", Some("")), ("DELETE", Some(TOKEN))] {
            let answer = respond(&app, admin(method, "key=a&path=/orders", caller)).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {caller:?}");
        }
        let replay = respond(&app, order("/orders", "a", "book")).await;
        assert!(replay.is_replay(), "nothing was purged");
    }
}

#[idempotent(store = "payments")]
#[post("/pay")]
async fn pay(body: Bytes) -> HttpResponse {
    HttpResponse::Created().body(body)
}

/// `IdempotencyAdmin` targets named stores, and keys of encoders that hash the body and the
/// `Authorization` value when it is given both.
#[actix_rt::test]
async fn admin_targets_named_stores_and_body_hashing_encoders() {
    let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .named_store("payments", MemoryStore::builder().build())
        .key_encoder(PythonKeyEncoder)
        .build()
        .unwrap_or_else(|e| panic!("middleware: {e}"));
    let admin = middleware.admin();
    let app = test::init_service(App::new().wrap(middleware).service(pay)).await;
    let paid = test::TestRequest::post()
        .uri("/pay")
        .insert_header(("Idempotency-Key", "p-1"))
        .insert_header(("Authorization", "Bearer bob"))
        .set_payload("42 EUR")
        .to_request();
    assert_eq!(respond(&app, paid).await.status, StatusCode::CREATED);

    let key = IdempotencyKey::try_from("p-1").unwrap_or_else(|e| panic!("key: {e}"));
    let bare = KeyTarget::new(actix_web::http::Method::POST, "/pay", key)
        .store(Some("payments".to_owned()));
    let exact = bare
        .clone()
        .body(Bytes::from_static(b"42 EUR"))
        .authorization(Some(Bytes::from_static(b"Bearer bob")));

    let without_body = admin.lookup(&bare).await;
    assert!(
        matches!(without_body, Ok(None)),
        "a body-hashing encoder's key needs the body: {without_body:?}"
    );
    let on_main_store = admin.lookup(&exact.clone().store(None)).await;
    assert!(matches!(on_main_store, Ok(None)), "{on_main_store:?}");
    match admin.lookup(&exact).await {
        Ok(Some(KeyState::Completed(record))) => {
            let response = record.response.as_ref();
            assert_eq!(response.map(|r| r.status), Some(201));
            assert_eq!(
                response.map(|r| r.body.clone()),
                Some(Bytes::from("42 EUR"))
            );
        }
        other => panic!("expected the payment's record, got {other:?}"),
    }
    let unknown = admin
        .lookup(&exact.clone().store(Some("refunds".to_owned())))
        .await;
    assert!(
        matches!(unknown, Err(StoreError::UnknownStore(ref name)) if name == "refunds"),
        "{unknown:?}"
    );

    assert!(matches!(admin.purge(&exact).await, Ok(true)));
    assert!(matches!(admin.purge(&exact).await, Ok(false)));
    assert!(matches!(admin.lookup(&exact).await, Ok(None)));
}

/// A slow handler whose key an operator purges while it runs: the purge sticks. Its renewals
/// do not make the reservation again, a retry runs at once, and the purged run's response is
/// never the key's record (the retry's is).
#[actix_rt::test]
async fn a_purge_of_a_running_request_sticks_against_its_renewals() {
    let runs = idempotency_actix_workspace::Runs::default();
    let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .reservation_lease(std::time::Duration::from_millis(600))
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let admin = middleware.admin();
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .route(
                "/slow",
                web::post().to(
                    |runs: web::Data<idempotency_actix_workspace::Runs>| async move {
                        let run = runs.record();
                        actix_web::rt::time::sleep(std::time::Duration::from_millis(1500)).await;
                        actix_web::HttpResponse::Created().body(format!("run {run}"))
                    },
                ),
            ),
    )
    .await;
    let keyed = || {
        test::TestRequest::post()
            .uri("/slow")
            .insert_header(("Idempotency-Key", "stuck"))
            .to_request()
    };
    let key = IdempotencyKey::try_from("stuck").unwrap_or_else(|e| panic!("key: {e}"));
    let target = KeyTarget::new(actix_web::http::Method::POST, "/slow", key);
    let purged_run = respond(&app, keyed());
    let operator = async {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(matches!(admin.purge(&target).await, Ok(true)));
        // Past two renewals of the purged run.
        actix_web::rt::time::sleep(std::time::Duration::from_millis(500)).await;
        respond(&app, keyed()).await
    };
    let (purged_run, retry) = futures_util::future::join(purged_run, operator).await;
    assert_eq!(purged_run.body, "run 1", "{purged_run:?}");
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry runs: {retry:?}"
    );
    assert_eq!(retry.body, "run 2");
    let replay = respond(&app, keyed()).await;
    assert!(replay.is_replay(), "{replay:?}");
    assert_eq!(
        replay.body, "run 2",
        "the purged run's response is never the record"
    );
    assert_eq!(runs.count(), 2);
}
