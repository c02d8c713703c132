//! The demo order API behind `examples/orders.rs`, kept here so that tests can run the very
//! same routes.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use actix_web::{get, http::header::ContentType, post, web, HttpResponse};
use idempotency_actix::{idempotency_exempt, idempotency_manual, idempotent, ManualIdempotency};
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};
use serde::Deserialize;
use serde_json::json;

/// Where order ids come from: this process, or a Redis (or Redis Cluster) counter shared by
/// every copy.
pub enum Orders {
    /// Ids counted in this process.
    Local(AtomicU64),
    /// Ids counted in Redis, so that several copies of the server count as one.
    Shared {
        /// The connection.
        redis: ConnectionManager,
        /// The counter's key.
        counter: String,
    },
    /// Ids counted in a Redis Cluster, on the node that owns the counter's key.
    Cluster {
        /// The cluster connection.
        redis: ClusterConnection,
        /// The counter's key.
        counter: String,
    },
}

impl std::fmt::Debug for Orders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(count) => f.debug_tuple("Local").field(count).finish(),
            Self::Shared { counter, .. } => f
                .debug_struct("Shared")
                .field("counter", counter)
                .finish_non_exhaustive(),
            Self::Cluster { counter, .. } => f
                .debug_struct("Cluster")
                .field("counter", counter)
                .finish_non_exhaustive(),
        }
    }
}

impl Default for Orders {
    fn default() -> Self {
        Self::Local(AtomicU64::new(0))
    }
}

impl Orders {
    /// Ids shared through the Redis at `url`, counted under `counter`.
    ///
    /// Every command gives up after a second and the connection is remade at once, so a
    /// Redis restart stalls the handlers for about a second, not for the two minutes of the
    /// connection manager's default backoff.
    pub async fn shared(url: &str, counter: &str) -> redis::RedisResult<Self> {
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1))
            .set_number_of_retries(1)
            .set_max_delay(100);
        let redis = ConnectionManager::new_with_config(redis::Client::open(url)?, settings).await?;
        Ok(Self::Shared {
            redis,
            counter: counter.to_owned(),
        })
    }

    /// Ids shared through the Redis Cluster that the nodes at `urls` belong to, counted under
    /// `counter`, with the same timeouts as [`Orders::shared`].
    pub async fn shared_in_cluster<S: AsRef<str>>(
        urls: &[S],
        counter: &str,
    ) -> redis::RedisResult<Self> {
        let redis = ClusterClientBuilder::new(urls.iter().map(AsRef::as_ref))
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .retries(3)
            .min_retry_wait(5)
            .max_retry_wait(100)
            .build()?
            .get_async_connection()
            .await?;
        Ok(Self::Cluster {
            redis,
            counter: counter.to_owned(),
        })
    }

    async fn next_id(&self) -> Option<u64> {
        match self {
            Self::Local(count) => Some(count.fetch_add(1, Ordering::SeqCst) + 1),
            Self::Shared { redis, counter } => increment(&mut redis.clone(), counter).await,
            Self::Cluster { redis, counter } => increment(&mut redis.clone(), counter).await,
        }
    }

    async fn count(&self) -> Option<u64> {
        match self {
            Self::Local(count) => Some(count.load(Ordering::SeqCst)),
            Self::Shared { redis, counter } => read(&mut redis.clone(), counter).await,
            Self::Cluster { redis, counter } => read(&mut redis.clone(), counter).await,
        }
    }

    async fn create(&self, item: &serde_json::Value) -> HttpResponse {
        match self.next_id().await {
            Some(id) => HttpResponse::Created().json(json!({ "id": id, "item": item })),
            None => {
                HttpResponse::ServiceUnavailable().json(json!({ "error": "order ids unavailable" }))
            }
        }
    }
}

async fn increment(redis: &mut impl ConnectionLike, counter: &str) -> Option<u64> {
    redis::cmd("INCR")
        .arg(counter)
        .query_async(redis)
        .await
        .ok()
}

async fn read(redis: &mut impl ConnectionLike, counter: &str) -> Option<u64> {
    redis::cmd("GET")
        .arg(counter)
        .query_async::<Option<u64>>(redis)
        .await
        .ok()
        .map(Option::unwrap_or_default)
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    item: serde_json::Value,
}

#[idempotent]
#[post("/orders")]
async fn create_order(orders: web::Data<Orders>, order: web::Json<NewOrder>) -> HttpResponse {
    orders.create(&order.item).await
}

#[idempotent(optional)]
#[post("/orders/optional")]
async fn create_order_optional_key(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
) -> HttpResponse {
    orders.create(&order.item).await
}

#[idempotency_manual]
#[post("/orders/manual")]
async fn create_order_manually(
    orders: web::Data<Orders>,
    idempotency: ManualIdempotency,
    order: web::Json<NewOrder>,
) -> HttpResponse {
    let prior_id = idempotency
        .prior_response()
        .and_then(|prior| serde_json::from_slice::<serde_json::Value>(prior.body()).ok())
        .and_then(|body| body.get("id").cloned());
    match (idempotency.key_exists(), prior_id) {
        (true, Some(id)) => HttpResponse::Ok().json(json!({ "replayed_id": id })),
        (true, None) => HttpResponse::Conflict().json(json!({ "error": "no replayable order" })),
        (false, _) => orders.create(&order.item).await,
    }
}

#[idempotent]
#[post("/orders/slow")]
async fn create_order_slowly(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
) -> HttpResponse {
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    orders.create(&order.item).await
}

#[idempotent]
#[post("/orders/fail")]
async fn fail_to_create_order() -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type("application/problem+json")
        .body(
            json!({
                "type": "about:blank",
                "title": "Order service unavailable",
                "status": 500,
            })
            .to_string(),
        )
}

#[idempotency_exempt]
#[post("/ping")]
async fn ping() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "pong": true }))
}

/// No attribute: enforce mode makes the key required.
#[post("/notes")]
async fn create_note(note: web::Bytes) -> HttpResponse {
    HttpResponse::Created()
        .insert_header(ContentType::json())
        .json(json!({ "bytes": note.len() }))
}

#[get("/orders/count")]
async fn count_orders(orders: web::Data<Orders>) -> HttpResponse {
    match orders.count().await {
        Some(count) => HttpResponse::Ok().json(json!({ "count": count })),
        None => HttpResponse::ServiceUnavailable().json(json!({ "error": "count unavailable" })),
    }
}

/// Registers the demo's routes and its order counter.
pub fn routes(orders: web::Data<Orders>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(orders)
            .service(create_order)
            .service(create_order_optional_key)
            .service(create_order_manually)
            .service(create_order_slowly)
            .service(fail_to_create_order)
            .service(ping)
            .service(create_note)
            .service(count_orders);
    }
}
