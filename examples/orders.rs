//! The demo server: an order API in enforce mode, on the in-memory store, or on Redis when
//! `IDEMPOTENCY_REDIS_URL` is set (then several copies on several ports behave as one server),
//! or on a Redis Cluster when `IDEMPOTENCY_REDIS_CLUSTER_URLS=redis://h:p,redis://h:p,..` is.
//!
//! ```text
//! cargo run --release --example orders            # listens on $BIND, default 127.0.0.1:8080
//! curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' \
//!      -H 'Content-Type: application/json' -d '{"item":"book"}'
//! ```

use actix_web::{middleware::Logger, web, App, HttpServer};
use idempotency_actix::{IdempotencyMiddleware, MemoryStore, RedisStore};
use idempotency_actix_workspace::orders::{routes, Orders};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    // One store and one order counter for every worker: built here, outside the factory.
    let redis_cluster = std::env::var("IDEMPOTENCY_REDIS_CLUSTER_URLS");
    let (idempotency, orders) = match (redis_cluster, std::env::var("IDEMPOTENCY_REDIS_URL")) {
        (Ok(urls), _) => on_redis_cluster(&urls).await?,
        (_, Ok(url)) => {
            let store = RedisStore::builder(&url)
                .key_prefix("orders-demo:idempotency:")
                .build()
                .map_err(std::io::Error::other)?;
            let orders = Orders::shared(&url, "orders-demo:next-order-id")
                .await
                .map_err(std::io::Error::other)?;
            println!("idempotency store: Redis at {url}");
            (IdempotencyMiddleware::new(store), orders)
        }
        _ => {
            println!("idempotency store: in memory");
            (
                IdempotencyMiddleware::new(MemoryStore::default()),
                Orders::default(),
            )
        }
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

/// The store and the order counter on the Redis Cluster whose nodes are listed in `urls`.
async fn on_redis_cluster(urls: &str) -> std::io::Result<(IdempotencyMiddleware, Orders)> {
    let urls: Vec<&str> = urls
        .split(',')
        .filter(|url| !url.trim().is_empty())
        .collect();
    let store = RedisStore::cluster_builder(&urls)
        .key_prefix("orders-demo:idempotency:")
        .build()
        .map_err(std::io::Error::other)?;
    let orders = Orders::shared_in_cluster(&urls, "orders-demo:next-order-id")
        .await
        .map_err(std::io::Error::other)?;
    println!("idempotency store: Redis Cluster at {}", urls.join(","));
    Ok((IdempotencyMiddleware::new(store), orders))
}
