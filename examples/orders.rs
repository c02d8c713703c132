//! The demo server: an order API in enforce mode, on the in-memory store; on PostgreSQL when
//! `IDEMPOTENCY_DATABASE_URL` is set (orders are rows created in each request's idempotency
//! transaction); on a Redis Cluster when `IDEMPOTENCY_REDIS_CLUSTER_URLS=redis://h:p,..` is set;
//! or on Redis when `IDEMPOTENCY_REDIS_URL` is set. On any of those, several copies on several
//! ports behave as one server. `IDEMPOTENCY_LEASE_MS` sets the reservation
//! lease (how soon a crashed request's key is free again). `GET /healthz` says whether the store
//! answers (200, or 503 with why). `IDEMPOTENCY_ADMIN_TOKEN` turns on
//! the admin routes (`GET`/`DELETE /admin/idempotency-keys?key=K&path=/orders`, bearer token;
//! see `docs/operating.md`).
//!
//! The routes and the set-up are in `src/orders.rs`, shared with the tests, which also run this
//! very server as a process (`src/bin/orders_demo.rs`).
//!
//! ```text
//! cargo run --release --example orders            # listens on $BIND, default 127.0.0.1:8080
//! curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book"}'
//! ```

use idempotency_actix_workspace::orders::run_from_environment;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    run_from_environment().await
}
