//! A server for crash tests: started as its own process, killed with SIGKILL mid-request.
//!
//! Reads `REDIS_URL`, `KEY_PREFIX` and `LEASE_MS`; listens on a free port on 127.0.0.1 and
//! prints `listening on ADDRESS`. `POST /slow` (`#[idempotent]`) counts its runs in Redis under
//! `{KEY_PREFIX}runs`, then takes two seconds.

use std::{io::Write, time::Duration};

use actix_web::{post, web, App, HttpResponse, HttpServer};
use idempotency_actix::{idempotent, IdempotencyMiddleware, RedisStore};
use redis::aio::ConnectionManager;

struct Runs {
    redis: ConnectionManager,
    counter: String,
}

#[idempotent]
#[post("/slow")]
async fn slow(runs: web::Data<Runs>) -> HttpResponse {
    let run: redis::RedisResult<u64> = redis::cmd("INCR")
        .arg(&runs.counter)
        .query_async(&mut runs.redis.clone())
        .await;
    actix_web::rt::time::sleep(Duration::from_secs(2)).await;
    match run {
        Ok(run) => HttpResponse::Created().body(format!("run {run}")),
        Err(error) => HttpResponse::ServiceUnavailable().body(error.to_string()),
    }
}

fn setting(name: &str) -> std::io::Result<String> {
    std::env::var(name).map_err(|_| std::io::Error::other(format!("{name} is not set")))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let url = setting("REDIS_URL")?;
    let prefix = setting("KEY_PREFIX")?;
    let lease = setting("LEASE_MS")?
        .parse()
        .map(Duration::from_millis)
        .map_err(std::io::Error::other)?;
    let store = RedisStore::builder(&url)
        .key_prefix(&prefix)
        .build()
        .map_err(std::io::Error::other)?;
    let idempotency = IdempotencyMiddleware::builder(store)
        .reservation_lease(lease)
        .build()
        .map_err(std::io::Error::other)?;
    let client = redis::Client::open(url.as_str()).map_err(std::io::Error::other)?;
    let redis = ConnectionManager::new(client)
        .await
        .map_err(std::io::Error::other)?;
    let runs = web::Data::new(Runs {
        redis,
        counter: format!("{prefix}runs"),
    });
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .app_data(runs.clone())
            .service(slow)
    })
    .workers(1)
    .bind("127.0.0.1:0")?;
    for address in server.addrs() {
        println!("listening on {address}");
    }
    std::io::stdout().flush()?;
    server.run().await
}
