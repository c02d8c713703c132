//! The demo server: an order API in enforce mode, on the in-memory store; on PostgreSQL when
//! `IDEMPOTENCY_DATABASE_URL` is set (orders are rows created in each request's idempotency
//! transaction); or on Redis when `IDEMPOTENCY_REDIS_URL` is set. On either of those, several
//! copies on several ports behave as one server. `IDEMPOTENCY_LEASE_MS` sets the reservation
//! lease (how soon a crashed request's key is free again).
//!
//! ```text
//! cargo run --release --example orders            # listens on $BIND, default 127.0.0.1:8080
//! curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book"}'
//! ```

use std::time::Duration;

use actix_web::{middleware::Logger, web, App, HttpServer};
use idempotency_actix::{
    IdempotencyMiddleware, IdempotencyStore, MemoryStore, PostgresStore, RedisStore,
};
use idempotency_actix_workspace::orders::{routes, Orders};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    // One store and one order counter for every worker: built here, outside the factory.
    let database = std::env::var("IDEMPOTENCY_DATABASE_URL").ok();
    let redis = std::env::var("IDEMPOTENCY_REDIS_URL").ok();
    let (idempotency, orders) = if let Some(url) = database {
        let store = PostgresStore::builder(&url)
            .build()
            .map_err(std::io::Error::other)?;
        store
            .ensure_schema()
            .await
            .map_err(std::io::Error::other)?;
        actix_web::rt::spawn(store.expiry_job().run());
        let orders = Orders::database(store.pool().clone(), "demo_orders")
            .await
            .map_err(std::io::Error::other)?;
        println!("idempotency store: PostgreSQL");
        (middleware(store)?, orders)
    } else if let Some(url) = redis {
        let store = RedisStore::builder(&url)
            .key_prefix("orders-demo:idempotency:")
            .build()
            .map_err(std::io::Error::other)?;
        let orders = Orders::shared(&url, "orders-demo:next-order-id")
            .await
            .map_err(std::io::Error::other)?;
        println!("idempotency store: Redis at {url}");
        (middleware(store)?, orders)
    } else {
        println!("idempotency store: in memory");
        (middleware(MemoryStore::default())?, Orders::default())
    };
    let orders = web::Data::new(orders);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .wrap(Logger::default())
            .configure(routes(orders.clone()))
    })
    .bind(&bind)?;
    for address in server.addrs() {
        println!("listening on http://{address}");
    }
    server.run().await
}

/// The middleware on `store`, with the lease from `IDEMPOTENCY_LEASE_MS` if set.
fn middleware(store: impl IdempotencyStore) -> std::io::Result<IdempotencyMiddleware> {
    let mut builder = IdempotencyMiddleware::builder(store);
    if let Ok(lease) = std::env::var("IDEMPOTENCY_LEASE_MS") {
        let lease = lease.parse().map_err(|_| {
            std::io::Error::other(format!("IDEMPOTENCY_LEASE_MS={lease} is not milliseconds"))
        })?;
        builder = builder.reservation_lease(Duration::from_millis(lease));
    }
    builder.build().map_err(std::io::Error::other)
}
