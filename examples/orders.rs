//! The demo server: an order API in enforce mode, on the in-memory store; on PostgreSQL when
//! `IDEMPOTENCY_DATABASE_URL` is set (orders are rows created in each request's idempotency
//! transaction); on a Redis Cluster when `IDEMPOTENCY_REDIS_CLUSTER_URLS=redis://h:p,..` is set;
//! or on Redis when `IDEMPOTENCY_REDIS_URL` is set. On any of those, several copies on several
//! ports behave as one server. `IDEMPOTENCY_LEASE_MS` sets the reservation
//! lease (how soon a crashed request's key is free again). `IDEMPOTENCY_ADMIN_TOKEN` turns on
//! the admin routes (`GET`/`DELETE /admin/idempotency-keys?key=K&path=/orders`, bearer token;
//! see the README's "Operating it" section).
//!
//! The routes and the set-up are in `src/orders.rs`, shared with the tests, which also run this
//! very server as a process (`src/bin/orders_demo.rs`).
//!
//! ```text
//! cargo run --release --example orders            # listens on $BIND, default 127.0.0.1:8080
//! curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book"}'
//! ```

use idempotency_actix_workspace::orders::serve_from_environment;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    serve_from_environment(&bind).await
}
