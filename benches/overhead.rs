//! What the middleware costs per request: the same app with and without it, measured in one
//! run with interleaved rounds, reported as ratios (the machines are noisy; ratios are not).
//!
//! ```text
//! cargo bench --bench overhead
//! ```

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use actix_web::{
    body::MessageBody,
    dev::{Service, ServiceResponse},
    http::StatusCode,
    middleware::Condition,
    test, web, App, HttpResponse,
};
use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore, RedisStore};

const ROUNDS: usize = 15;
const REDIS_ROUNDS: usize = 3;
const REQUESTS_PER_ROUND: u32 = 20_000;

/// The same routes with their policies (`marked`) or without (the `Condition` wrapper, which
/// costs next to nothing, is in both so that only the policy differs).
fn routes(marked: bool) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        let echo =
            |status| move |body: web::Bytes| async move { HttpResponse::build(status).body(body) };
        config
            .route(
                "/read",
                web::get().to(|| async { HttpResponse::Ok().body("read") }),
            )
            .service(
                web::resource("/exempt")
                    .wrap(Condition::new(marked, IdempotencyPolicy::exempt()))
                    .route(web::post().to(echo(StatusCode::OK))),
            )
            .service(
                web::resource("/keyed")
                    .wrap(Condition::new(marked, IdempotencyPolicy::required()))
                    .route(web::post().to(echo(StatusCode::CREATED))),
            )
            .route("/unannotated", web::post().to(echo(StatusCode::CREATED)));
    }
}

type Request = fn(u32) -> actix_http::Request;

fn get(_: u32) -> actix_http::Request {
    test::TestRequest::get().uri("/read").to_request()
}

fn exempt_post(_: u32) -> actix_http::Request {
    test::TestRequest::post()
        .uri("/exempt")
        .set_payload(r#"{"item":"book"}"#)
        .to_request()
}

fn replayed_post(_: u32) -> actix_http::Request {
    keyed("/keyed", "the-same-key".to_owned())
}

fn fresh_post(i: u32) -> actix_http::Request {
    keyed("/keyed", format!("key-{i}-{}", std::process::id()))
}

fn fresh_unannotated_post(i: u32) -> actix_http::Request {
    keyed("/unannotated", format!("key-{i}-{}", std::process::id()))
}

fn keyed(path: &str, key: String) -> actix_http::Request {
    test::TestRequest::post()
        .uri(path)
        .insert_header(("Idempotency-Key", key))
        .set_payload(r#"{"item":"book"}"#)
        .to_request()
}

async fn round<S, B>(app: &S, request: Request, offset: u32) -> Duration
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let requests: Vec<_> = (0..REQUESTS_PER_ROUND)
        .map(|i| request(offset + i))
        .collect();
    let start = Instant::now();
    for request in requests {
        let response = app.call(request).await;
        black_box(response.map(|r| r.status()).ok());
    }
    start.elapsed()
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64 / f64::from(REQUESTS_PER_ROUND)
}

fn main() {
    let system = actix_rt::System::new();
    system.block_on(async {
        let bare = test::init_service(App::new().configure(routes(false))).await;
        // Fresh keys need a store large enough to keep every record of the run.
        let in_memory = IdempotencyMiddleware::new(MemoryStore::builder().build());
        let with = test::init_service(App::new().wrap(in_memory).configure(routes(true))).await;

        println!(
            "{:<38} {:>12} {:>12} {:>7}",
            "request", "without ns", "with ns", "ratio"
        );
        let cases: [(&str, Request); 5] = [
            ("GET (safe method)", get),
            ("POST to an exempt route", exempt_post),
            ("POST replayed (same key)", replayed_post),
            ("POST fresh key, #[idempotent]", fresh_post),
            (
                "POST fresh key, unannotated (enforce)",
                fresh_unannotated_post,
            ),
        ];
        for (name, request) in cases {
            compare(name, &bare, &with, request, ROUNDS).await;
        }

        // The keyed cases on Redis, when one answers: each request then pays its round trips.
        let url = std::env::var("IDEMPOTENCY_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        if !idempotency_actix_workspace::redis_answers(&url).await {
            println!("(no Redis at {url}: the Redis cases are skipped)");
            return;
        }
        let store = RedisStore::builder(&url)
            .key_prefix(idempotency_actix_workspace::unique_prefix("bench"))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"));
        let on_redis = test::init_service(
            App::new()
                .wrap(IdempotencyMiddleware::new(store))
                .configure(routes(true)),
        )
        .await;
        compare(
            "POST replayed, Redis store",
            &bare,
            &on_redis,
            replayed_post,
            REDIS_ROUNDS,
        )
        .await;
        compare(
            "POST fresh key, Redis store",
            &bare,
            &on_redis,
            fresh_post,
            REDIS_ROUNDS,
        )
        .await;
    });
}

/// Runs `rounds` interleaved rounds of `request` against both apps and prints the medians.
async fn compare<S1, S2, B1, B2>(name: &str, bare: &S1, with: &S2, request: Request, rounds: usize)
where
    S1: Service<actix_http::Request, Response = ServiceResponse<B1>, Error = actix_web::Error>,
    S2: Service<actix_http::Request, Response = ServiceResponse<B2>, Error = actix_web::Error>,
    B1: MessageBody,
    B2: MessageBody,
{
    let (mut without, mut with_middleware) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let offset = (r as u32) * REQUESTS_PER_ROUND;
        without.push(round(bare, request, offset).await);
        with_middleware.push(round(with, request, offset).await);
    }
    let (without, with_middleware) = (median(without), median(with_middleware));
    println!(
        "{name:<38} {without:>12.0} {with_middleware:>12.0} {:>7.2}",
        with_middleware / without
    );
}
