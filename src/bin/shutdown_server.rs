//! A server for shutdown tests: started as its own process and stopped with SIGTERM while a
//! transactional request runs, with a shutdown that does not wait for it.
//!
//! Reads `DATABASE_URL` and `LEASE_MS`; listens on a free port on 127.0.0.1 and prints
//! `listening on ADDRESS`. `POST /slow` (`#[idempotent]`) inserts a row into `effects` in its
//! `IdempotentTransaction`, then takes five seconds; the server's shutdown timeout is one.

use std::{io::Write, time::Duration};

use actix_web::{post, App, HttpResponse, HttpServer};
use idempotency_actix::{idempotent, IdempotencyMiddleware, IdempotentTransaction, PostgresStore};

#[idempotent]
#[post("/slow")]
async fn slow(mut transaction: IdempotentTransaction) -> HttpResponse {
    let inserted = sqlx::query("INSERT INTO effects DEFAULT VALUES")
        .execute(&mut *transaction)
        .await;
    actix_web::rt::time::sleep(Duration::from_secs(5)).await;
    match inserted {
        Ok(_) => HttpResponse::Created().finish(),
        Err(error) => HttpResponse::ServiceUnavailable().body(error.to_string()),
    }
}

fn setting(name: &str) -> std::io::Result<String> {
    std::env::var(name).map_err(|_| std::io::Error::other(format!("{name} is not set")))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let url = setting("DATABASE_URL")?;
    let lease = setting("LEASE_MS")?
        .parse()
        .map(Duration::from_millis)
        .map_err(std::io::Error::other)?;
    let store = PostgresStore::builder(&url)
        .build()
        .map_err(std::io::Error::other)?;
    store.ensure_schema().await.map_err(std::io::Error::other)?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS effects (id bigserial PRIMARY KEY)")
        .execute(store.pool())
        .await
        .map_err(std::io::Error::other)?;
    let idempotency = IdempotencyMiddleware::builder(store)
        .reservation_lease(lease)
        .build()
        .map_err(std::io::Error::other)?;
    let server = HttpServer::new(move || App::new().wrap(idempotency.clone()).service(slow))
        .workers(1)
        .shutdown_timeout(1)
        .bind("127.0.0.1:0")?;
    for address in server.addrs() {
        println!("listening on {address}");
    }
    std::io::stdout().flush()?;
    server.run().await
}
