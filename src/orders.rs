//! The demo order API behind `examples/orders.rs`, kept here so that tests can run the very
//! same routes.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use actix_web::{
    get, http::header::ContentType, middleware::Logger, post, web, App, HttpResponse, HttpServer,
};
use idempotency_actix::{
    explain_startup_error, idempotency_exempt, idempotency_manual, idempotent,
    IdempotencyMiddleware, IdempotencyStore, IdempotentTransaction, ManualIdempotency,
    MaybeIdempotentTransaction, MemoryStore, PostgresStore, RedisStore,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::admin::{admin_routes, AdminAccess};

/// Where orders are kept: counted in this process, counted in Redis or a Redis Cluster (shared
/// by every copy), or stored in a Postgres table, each inside its request's idempotency
/// transaction.
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
    /// Orders as rows of a Postgres table, shared by every copy.
    Database {
        /// The pool (the idempotency store's own, so that both share its connections).
        pool: PgPool,
        /// The table.
        table: String,
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
            Self::Database { table, .. } => f
                .debug_struct("Database")
                .field("table", table)
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

    /// Orders kept in `table` (created if missing) of the database behind `pool`.
    pub async fn database(pool: PgPool, table: &str) -> sqlx::Result<Self> {
        sqlx::raw_sql(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
               id bigserial PRIMARY KEY, item jsonb NOT NULL, \
               created_at timestamptz NOT NULL DEFAULT now())"
        ))
        .execute(&pool)
        .await?;
        Ok(Self::Database {
            pool,
            table: table.to_owned(),
        })
    }

    /// A new order's id: a row inserted in the handler's idempotency transaction when it has
    /// one (it commits with the key's record, or not at all), or a counter's next value.
    async fn next_id(
        &self,
        item: &serde_json::Value,
        transaction: Option<&mut IdempotentTransaction>,
    ) -> Option<u64> {
        match self {
            Self::Database { pool, table } => {
                let insert = format!("INSERT INTO {table} (item) VALUES ($1) RETURNING id");
                let query = sqlx::query_scalar::<_, i64>(&insert).bind(item);
                let id = match transaction {
                    Some(transaction) => query.fetch_one(&mut **transaction).await,
                    None => query.fetch_one(pool).await,
                };
                id.ok().and_then(|id| u64::try_from(id).ok())
            }
            Self::Local(count) => Some(count.fetch_add(1, Ordering::SeqCst) + 1),
            Self::Shared { redis, counter } => increment(&mut redis.clone(), counter).await,
            Self::Cluster { redis, counter } => increment(&mut redis.clone(), counter).await,
        }
    }

    async fn count(&self) -> Option<u64> {
        match self {
            Self::Database { pool, table } => {
                sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                    .fetch_one(pool)
                    .await
                    .ok()
                    .and_then(|count| u64::try_from(count).ok())
            }
            Self::Local(count) => Some(count.load(Ordering::SeqCst)),
            Self::Shared { redis, counter } => read(&mut redis.clone(), counter).await,
            Self::Cluster { redis, counter } => read(&mut redis.clone(), counter).await,
        }
    }

    async fn create(
        &self,
        item: &serde_json::Value,
        transaction: Option<IdempotentTransaction>,
    ) -> HttpResponse {
        self.create_then_wait(item, transaction, Duration::ZERO)
            .await
    }

    /// Creates the order, waits (the order exists but, in a transaction, is not committed),
    /// then answers.
    async fn create_then_wait(
        &self,
        item: &serde_json::Value,
        mut transaction: Option<IdempotentTransaction>,
        wait: Duration,
    ) -> HttpResponse {
        let id = self.next_id(item, transaction.as_mut()).await;
        if !wait.is_zero() {
            actix_web::rt::time::sleep(wait).await;
        }
        match id {
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

// On Postgres, a keyed order is created in the request's idempotency transaction; on the
// other stores (and without a key) there is none, and the order is created on its own.

#[idempotent]
#[post("/orders")]
async fn create_order(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
    transaction: MaybeIdempotentTransaction,
) -> HttpResponse {
    orders.create(&order.item, transaction.into_option()).await
}

#[idempotent(optional)]
#[post("/orders/optional")]
async fn create_order_optional_key(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
    transaction: MaybeIdempotentTransaction,
) -> HttpResponse {
    orders.create(&order.item, transaction.into_option()).await
}

#[idempotency_manual]
#[post("/orders/manual")]
async fn create_order_manually(
    orders: web::Data<Orders>,
    idempotency: ManualIdempotency,
    order: web::Json<NewOrder>,
    transaction: MaybeIdempotentTransaction,
) -> HttpResponse {
    let prior_id = idempotency
        .prior_response()
        .and_then(|prior| serde_json::from_slice::<serde_json::Value>(prior.body()).ok())
        .and_then(|body| body.get("id").cloned());
    match (idempotency.key_exists(), prior_id) {
        (true, Some(id)) => HttpResponse::Ok().json(json!({ "replayed_id": id })),
        (true, None) => HttpResponse::Conflict().json(json!({ "error": "no replayable order" })),
        (false, _) => orders.create(&order.item, transaction.into_option()).await,
    }
}

/// Creates the order first, then takes 300 ms to answer: a crash in between leaves an order
/// that, on Postgres, was never committed.
#[idempotent]
#[post("/orders/slow")]
async fn create_order_slowly(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
    transaction: MaybeIdempotentTransaction,
) -> HttpResponse {
    orders
        .create_then_wait(
            &order.item,
            transaction.into_option(),
            Duration::from_millis(300),
        )
        .await
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

/// The demo server, configured from the environment, on `bind`: the in-memory store; on
/// PostgreSQL when `IDEMPOTENCY_DATABASE_URL` is set (orders are rows created in each
/// request's idempotency transaction); on a Redis Cluster when
/// `IDEMPOTENCY_REDIS_CLUSTER_URLS=redis://h:p,redis://h:p,..` is set; on Redis when
/// `IDEMPOTENCY_REDIS_URL` is set.
/// `IDEMPOTENCY_LEASE_MS` sets the reservation lease. `IDEMPOTENCY_ADMIN_TOKEN` turns on the
/// admin routes ([`crate::admin`]) for callers sending it as a bearer token. Prints `listening on http://ADDRESS`,
/// then serves until stopped.
pub async fn serve_from_environment(bind: &str) -> std::io::Result<()> {
    // One store and one order counter for every worker: built here, outside the factory.
    let database = std::env::var("IDEMPOTENCY_DATABASE_URL").ok();
    let redis_cluster = std::env::var("IDEMPOTENCY_REDIS_CLUSTER_URLS").ok();
    let redis = std::env::var("IDEMPOTENCY_REDIS_URL").ok();
    let (idempotency, orders) = if let Some(url) = database {
        let starting = Starting(format!("PostgreSQL at {}", without_password(&url)));
        // A first connection of its own: the store's pool connects lazily, and its timeout
        // would hide why it could not.
        <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .map_err(|e| starting.failed(e))?;
        let store = PostgresStore::builder(&url)
            .build()
            .map_err(|e| starting.failed(e))?;
        store
            .ensure_schema()
            .await
            .map_err(|e| starting.failed(e))?;
        actix_web::rt::spawn(store.expiry_job().run());
        let orders = Orders::database(store.pool().clone(), "demo_orders")
            .await
            .map_err(|e| starting.failed(e))?;
        println!("idempotency store: PostgreSQL");
        (middleware(store)?, orders)
    } else if let Some(urls) = redis_cluster {
        let urls: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        let shown: Vec<String> = urls.iter().map(|url| without_password(url)).collect();
        let starting = Starting(format!("the Redis Cluster at {}", shown.join(",")));
        let store = RedisStore::cluster_builder(&urls)
            .key_prefix("orders-demo:idempotency:")
            .build()
            .map_err(|e| starting.failed(e))?;
        let orders = Orders::shared_in_cluster(&urls, "orders-demo:next-order-id")
            .await
            .map_err(|e| starting.failed(e))?;
        println!("idempotency store: Redis Cluster at {}", urls.join(","));
        (middleware(store)?, orders)
    } else if let Some(url) = redis {
        let starting = Starting(format!("Redis at {}", without_password(&url)));
        let store = RedisStore::builder(&url)
            .key_prefix("orders-demo:idempotency:")
            .build()
            .map_err(|e| starting.failed(e))?;
        let orders = Orders::shared(&url, "orders-demo:next-order-id")
            .await
            .map_err(|e| starting.failed(e))?;
        println!("idempotency store: Redis at {}", without_password(&url));
        (middleware(store)?, orders)
    } else {
        println!("idempotency store: in memory");
        (middleware(MemoryStore::default())?, Orders::default())
    };
    let orders = web::Data::new(orders);
    let metrics = prometheus().map_err(std::io::Error::other)?;
    actix_web::rt::spawn({
        let metrics = metrics.clone();
        async move {
            loop {
                actix_web::rt::time::sleep(Duration::from_secs(5)).await;
                metrics.run_upkeep();
            }
        }
    });
    let admin = AdminAccess::new(
        idempotency.admin(),
        std::env::var("IDEMPOTENCY_ADMIN_TOKEN").ok(),
    );
    let health = health_route(idempotency.clone());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .wrap(access_log())
            .configure(routes(orders.clone()))
            .configure(health.clone())
            .configure(metrics_route(metrics.clone()))
            .configure(admin_routes(admin.clone()))
    })
    .bind(bind)
    .map_err(|e| Starting(format!("cannot listen on {bind}")).failed(e))?;
    for address in server.addrs() {
        println!("listening on http://{address}");
    }
    std::io::stdout().flush()?;
    server.run().await.map_err(explain_startup_error)
}

/// What a start-up step works with, to put in front of its error: the failure's one line.
struct Starting(String);

impl Starting {
    fn failed(&self, error: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::other(format!("{}: {error}", self.0))
    }
}

/// `url` without the password its user part may hold, to be printed.
fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}

/// The demo server as its binaries run it: on `BIND` (default `127.0.0.1:8080`), configured
/// from the environment ([`serve_from_environment`]). A failure to start is one line on
/// stderr, `orders demo: ..`, and a failing exit status.
pub async fn run_from_environment() -> std::process::ExitCode {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    match serve_from_environment(&bind).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orders demo: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `GET /healthz`, for readiness probes: 200 when the idempotency store answers, 503 with the
/// reason (as `application/problem+json`) when it does not. A `GET` carries no key, so the
/// middleware lets it through.
pub fn health_route(
    idempotency: IdempotencyMiddleware,
) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |config| {
        config.app_data(web::Data::new(idempotency.clone())).route(
            "/healthz",
            web::get().to(|idempotency: web::Data<IdempotencyMiddleware>| async move {
                match idempotency.health().await {
                    Ok(()) => HttpResponse::Ok().json(json!({ "status": "ok" })),
                    Err(why) => HttpResponse::ServiceUnavailable()
                        .content_type("application/problem+json")
                        .body(
                            json!({
                                "type": "about:blank",
                                "title": "Idempotency store unavailable",
                                "status": 503,
                                "detail": why.to_string(),
                            })
                            .to_string(),
                        ),
                }
            }),
        );
    }
}

/// The demo's access log: the path without the query string, since the admin routes take a
/// key and a caller scope there, which a log must not keep.
pub fn access_log() -> Logger {
    Logger::new(r#"%a "%{method}xi %U" %s %b "%{User-Agent}i" %T"#)
        .custom_request_replace("method", |req| req.method().to_string())
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

/// The process's Prometheus recorder for the `metrics` facade, installed on first use; every
/// later call returns the same handle.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Store calls take from a fraction of a millisecond (memory) to a few (Redis,
            // Postgres): buckets that tell those apart.
            let buckets = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("idempotency_store_duration_seconds".to_owned()),
                    &buckets,
                )
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|error| format!("metrics recorder: {error}"))
        })
        .clone()
}

/// `GET /metrics`: the process's metrics, the library's among them, in Prometheus' text format.
pub fn metrics_route(metrics: PrometheusHandle) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config.app_data(web::Data::new(metrics)).route(
            "/metrics",
            web::get().to(|metrics: web::Data<PrometheusHandle>| async move {
                HttpResponse::Ok()
                    .content_type("text/plain; version=0.0.4")
                    .body(metrics.render())
            }),
        );
    }
}
