//! The demo server of `cargo run --example orders`, as a binary of this package, so that
//! tests can run it as a process (`CARGO_BIN_EXE_orders_demo`, rebuilt with the tests).

use idempotency_actix_workspace::orders::serve_from_environment;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    serve_from_environment(&bind).await
}
