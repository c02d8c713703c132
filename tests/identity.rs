//! What makes two requests one operation: the query string, the path as routing matched it,
//! and nothing for requests routing does not match.

use std::sync::atomic::Ordering;

use actix_web::{get, http::StatusCode, post, test, web, App, HttpResponse};
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, JsonFingerprint, MemoryStore,
};
use idempotency_actix_workspace::{faulty::FaultyStore, respond, Received, Runs};

#[idempotent]
#[post("/echo")]
async fn echo(runs: web::Data<Runs>, query: web::Query<Vec<(String, String)>>) -> HttpResponse {
    HttpResponse::Created().body(format!("run {} for {:?}", runs.record(), query.0))
}

#[idempotent]
#[post("/orders")]
async fn orders(runs: web::Data<Runs>, _body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(format!("order {}", runs.record()))
}

/// No policy: enforce mode applies its default.
#[post("/notes")]
async fn notes(runs: web::Data<Runs>, _body: web::Bytes) -> HttpResponse {
    HttpResponse::Created().body(format!("note {}", runs.record()))
}

#[get("/report")]
async fn report() -> HttpResponse {
    HttpResponse::Ok().body("report")
}

async fn exchange(
    builder: IdempotencyMiddlewareBuilder,
    runs: &Runs,
    requests: Vec<test::TestRequest>,
) -> Vec<Received> {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    let app = test::init_service(
        App::new()
            .wrap(middleware)
            .app_data(web::Data::new(runs.clone()))
            .service(echo)
            .service(orders)
            .service(notes)
            .service(report),
    )
    .await;
    let mut received = Vec::new();
    for request in requests {
        received.push(respond(&app, request.to_request()).await);
    }
    received
}

fn post(uri: &str, key: Option<&str>) -> test::TestRequest {
    let request = test::TestRequest::post()
        .uri(uri)
        .insert_header(("content-type", "application/json"))
        .set_payload("{}");
    match key {
        Some(key) => request.insert_header(("Idempotency-Key", key.to_owned())),
        None => request,
    }
}

fn post_json(body: impl Into<bytes::Bytes>) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/orders")
        .insert_header(("content-type", "application/json"))
        .insert_header(("Idempotency-Key", "pay-1"))
        .set_payload(body)
}

fn slug(answer: &Received) -> Option<String> {
    answer
        .problem_type()
        .and_then(|t| t.rsplit('#').next().map(str::to_owned))
}

#[actix_rt::test]
async fn the_query_string_is_part_of_the_request_by_default() {
    let runs = Runs::default();
    let got = exchange(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()),
        &runs,
        vec![
            post("/echo?to=alice", Some("k")),
            post("/echo?to=bob", Some("k")),
            post("/echo?to=alice", Some("k")),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::CREATED, "{:?}", got[0]);
    assert_eq!(
        got[1].status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        got[1]
    );
    assert_eq!(slug(&got[1]).as_deref(), Some("payload-mismatch"));
    assert!(got[2].is_replay(), "{:?}", got[2]);
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn the_query_string_can_be_left_out_of_the_request() {
    let runs = Runs::default();
    let builder =
        IdempotencyMiddleware::builder(MemoryStore::builder().build()).query_in_fingerprint(false);
    let got = exchange(
        builder,
        &runs,
        vec![
            post("/echo?to=alice", Some("k")),
            post("/echo?to=bob", Some("k")),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::CREATED);
    assert!(got[1].is_replay(), "{:?}", got[1]);
    assert_eq!(runs.count(), 1);
}

/// Every spelling that routing sends to one handler is one operation, for routes with a policy
/// and for the enforce-mode default.
#[actix_rt::test]
async fn percent_encoded_spellings_of_one_path_are_one_operation() {
    for (plain, spellings) in [
        ("/orders", ["/%6Frders", "/ord%65rs", "/%6f%72%64%65%72%73"]),
        ("/notes", ["/%6Eotes", "/not%65s", "/%6e%6f%74%65%73"]),
    ] {
        let runs = Runs::default();
        let mut requests = vec![post(plain, Some("k"))];
        requests.extend(spellings.iter().map(|path| post(path, Some("k"))));
        let got = exchange(
            IdempotencyMiddleware::builder(MemoryStore::builder().build()),
            &runs,
            requests,
        )
        .await;
        assert_eq!(got[0].status, StatusCode::CREATED, "{plain}: {:?}", got[0]);
        for replay in &got[1..] {
            assert!(replay.is_replay(), "{plain}: {replay:?}");
            assert_eq!(replay.body, got[0].body);
        }
        assert_eq!(runs.count(), 1, "{plain}");
    }
}

/// Enforce mode settles every unsafe request before its handler could run, and routing does not
/// say beforehand whether it finds a route: a keyless request to an unknown path or method gets
/// 400 like any other; a keyed one gets routing's own answer, and its key stays free.
#[actix_rt::test]
async fn unmatched_paths_and_methods_answer_as_routing_does_and_keep_nothing() {
    let keyed = || {
        vec![
            post("/nope", Some("k1")),
            test::TestRequest::put()
                .uri("/report")
                .insert_header(("Idempotency-Key", "k2")),
        ]
    };
    let without = {
        let app = test::init_service(App::new().service(report)).await;
        let mut statuses = Vec::new();
        for request in keyed() {
            statuses.push(respond(&app, request.to_request()).await.status);
        }
        statuses
    };
    assert_eq!(without, [StatusCode::NOT_FOUND, StatusCode::NOT_FOUND]);

    let (store, asked) = FaultyStore::new();
    let runs = Runs::default();
    let twice: Vec<_> = keyed().into_iter().chain(keyed()).collect();
    let with = exchange(IdempotencyMiddleware::builder(store), &runs, twice).await;
    let with: Vec<_> = with.iter().map(|answer| answer.status).collect();
    assert_eq!(
        with[..2],
        without,
        "routing's answers, not the middleware's"
    );
    assert_eq!(
        with[2..],
        without,
        "the keys stayed free: no replay, no 409"
    );
    assert_eq!(asked.reservations.load(Ordering::SeqCst), 4);

    let keyless = exchange(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()),
        &runs,
        vec![post("/nope", None), test::TestRequest::put().uri("/report")],
    )
    .await;
    for answer in keyless {
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
        assert!(answer
            .problem_type()
            .is_some_and(|t| t.ends_with("#missing-key")));
    }
    assert_eq!(runs.count(), 0);
}

#[actix_rt::test]
async fn a_json_retry_with_reordered_keys_and_whitespace_is_replayed_with_json_fingerprints() {
    let runs = Runs::default();
    let got = exchange(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()).fingerprint(JsonFingerprint),
        &runs,
        vec![
            post_json(r#"{"amount":100,"currency":"EUR"}"#),
            post_json("{ \"currency\" : \"EUR\",\n  \"amount\" : 100 }"),
            post_json(r#"{"amount":101,"currency":"EUR"}"#),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::CREATED, "{:?}", got[0]);
    assert!(got[1].is_replay(), "{:?}", got[1]);
    assert_eq!(got[1].status, StatusCode::CREATED);
    assert_eq!(got[1].body, got[0].body);
    assert_eq!(
        got[2].status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "another amount is another request: {:?}",
        got[2]
    );
    assert_eq!(slug(&got[2]).as_deref(), Some("payload-mismatch"));
    assert_eq!(runs.count(), 1);
}

#[actix_rt::test]
async fn a_json_retry_with_other_spacing_is_a_reused_key_by_default() {
    let runs = Runs::default();
    let got = exchange(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()),
        &runs,
        vec![
            post_json(r#"{"amount":100}"#),
            post_json(r#"{ "amount" : 100 }"#),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::CREATED, "{:?}", got[0]);
    assert_eq!(
        got[1].status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        got[1]
    );
    assert_eq!(runs.count(), 1);
}

/// Nesting beyond serde_json's recursion limit is compared as bytes, without a stack overflow.
#[actix_rt::test]
async fn deeply_nested_json_is_still_replayed_with_json_fingerprints() {
    let depth = 5_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let runs = Runs::default();
    let got = exchange(
        IdempotencyMiddleware::builder(MemoryStore::builder().build()).fingerprint(JsonFingerprint),
        &runs,
        vec![
            post_json(nested.clone()),
            post_json(nested),
            post_json(format!("{} {}", "[".repeat(depth), "]".repeat(depth))),
        ],
    )
    .await;
    assert_eq!(got[0].status, StatusCode::CREATED, "{:?}", got[0]);
    assert!(got[1].is_replay(), "{:?}", got[1]);
    assert_eq!(
        got[2].status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "too deep to parse, so compared byte for byte: {:?}",
        got[2]
    );
    assert_eq!(runs.count(), 1);
}
