//! A server for memory tests: a handler that echoes its request body, with no policy (enforce
//! mode protects it), on a `MemoryStore` bounded by `MAX_BYTES`, with two workers.
//!
//! Listens on a free port on 127.0.0.1 and prints `listening on ADDRESS`.

use std::io::Write;

use actix_web::{web, App, HttpResponse, HttpServer};
use idempotency_actix::{IdempotencyMiddleware, MemoryStore};

async fn echo(body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok().body(body)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let max_bytes = std::env::var("MAX_BYTES")
        .map_err(|_| std::io::Error::other("MAX_BYTES is not set"))?
        .parse()
        .map_err(std::io::Error::other)?;
    let idempotency =
        IdempotencyMiddleware::new(MemoryStore::builder().max_bytes(max_bytes).build());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .route("/echo", web::post().to(echo))
    })
    .workers(2)
    .bind("127.0.0.1:0")?;
    for address in server.addrs() {
        println!("listening on {address}");
    }
    std::io::stdout().flush()?;
    server.run().await
}
