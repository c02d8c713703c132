//! The demo server of `cargo run --example orders`, as a binary of this package, so that
//! tests can run it as a process (`CARGO_BIN_EXE_orders_demo`, rebuilt with the tests).

use idempotency_actix_workspace::orders::run_from_environment;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    run_from_environment().await
}
