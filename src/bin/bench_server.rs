//! The load benchmark's server (`benches/load/run.sh`): one trivial handler served three ways,
//! each on its own port and its own worker: without the middleware, behind it on the memory
//! store, and behind it on Redis (when `BENCH_REDIS_URL` answers). When `BENCH_DATABASE_URL`
//! answers, a handler inserting one row in a transaction is served three more ways: in a
//! transaction of its own without the middleware (`pg_bare`), and in an
//! `IdempotentTransaction` with the key held by the transaction (`postgres`) or reserved by a
//! lease beforehand (`postgres_lease`), each with pools of the same size.
//!
//! Prints one line per server, `NAME http://ADDRESS`, then serves until killed.

use std::io::Write;

use actix_web::{
    body::MessageBody,
    dev::{Server, ServiceFactory, ServiceRequest, ServiceResponse},
    web, App, HttpResponse, HttpServer,
};
use idempotency_actix::{
    idempotent, IdempotencyMiddleware, IdempotencyPolicy, IdempotentTransaction, MemoryStore,
    PostgresStore, RedisStore,
};
use sqlx::{postgres::PgPoolOptions, PgPool};

/// Connections for the handlers' transactions, with and without the middleware.
const PG_CONNECTIONS: u32 = 10;
const INSERT: &str = "INSERT INTO bench_orders (item) VALUES ('book')";

/// A 60-byte JSON body, as an order API would answer.
const ORDER: &str = r#"{"id":4242,"item":"book","status":"created","total":"19.90"}"#;

async fn create_order(_order: web::Bytes) -> HttpResponse {
    HttpResponse::Created()
        .content_type("application/json")
        .body(ORDER)
}

/// `POST /orders` (no policy: enforce mode's default applies) and `POST /exempt`.
fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/orders", web::post().to(create_order))
        .service(
            web::resource("/exempt")
                .wrap(IdempotencyPolicy::exempt())
                .route(web::post().to(create_order)),
        )
        // As `#[idempotent]` marks a route: the key is settled by the route's policy.
        .service(
            web::resource("/marked")
                .wrap(IdempotencyPolicy::required())
                .route(web::post().to(create_order)),
        );
}

/// One row, in the transaction that also holds the key's record.
#[idempotent]
#[actix_web::post("/orders")]
async fn insert_in_transaction(mut tx: IdempotentTransaction) -> HttpResponse {
    match sqlx::query(INSERT).execute(&mut *tx).await {
        Ok(_) => created(),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}

/// One row, in a transaction of its own.
async fn insert_bare(pool: web::Data<PgPool>) -> HttpResponse {
    let inserted = async {
        let mut tx = pool.begin().await?;
        sqlx::query(INSERT).execute(&mut *tx).await?;
        tx.commit().await
    };
    match inserted.await {
        Ok(()) => created(),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}

fn created() -> HttpResponse {
    HttpResponse::Created()
        .content_type("application/json")
        .body(ORDER)
}

/// The PostgreSQL servers, on emptied tables.
async fn postgres_servers(url: &str, servers: &mut Vec<Server>) -> std::io::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(PG_CONNECTIONS)
        .connect(url)
        .await
        .map_err(std::io::Error::other)?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, item text NOT NULL); \
         TRUNCATE bench_orders",
    )
    .execute(&pool)
    .await
    .map_err(std::io::Error::other)?;
    let bare = web::Data::new(pool);
    servers.push(serve("pg_bare", move || {
        App::new()
            .app_data(bare.clone())
            .route("/orders", web::post().to(insert_bare))
    })?);
    for (name, held) in [("postgres", true), ("postgres_lease", false)] {
        let store = PostgresStore::builder(url)
            .table(format!("bench_keys_{name}"))
            .max_connections(PG_CONNECTIONS)
            .reserve_in_transactions(held)
            .build()
            .map_err(std::io::Error::other)?;
        store.ensure_schema().await.map_err(std::io::Error::other)?;
        sqlx::raw_sql(&format!("TRUNCATE bench_keys_{name}"))
            .execute(store.pool())
            .await
            .map_err(std::io::Error::other)?;
        let idempotency = IdempotencyMiddleware::new(store);
        servers.push(serve(name, move || {
            App::new()
                .wrap(idempotency.clone())
                .service(insert_in_transaction)
        })?);
    }
    Ok(())
}

/// The same routes without the middleware (the exempt policy needs the middleware, so it goes).
fn bare_routes(config: &mut web::ServiceConfig) {
    config
        .route("/orders", web::post().to(create_order))
        .route("/exempt", web::post().to(create_order))
        .route("/marked", web::post().to(create_order));
}

fn serve<F, T, B>(name: &str, factory: F) -> std::io::Result<Server>
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let server = HttpServer::new(factory)
        .workers(1)
        .backlog(1024)
        .bind("127.0.0.1:0")?;
    for address in server.addrs() {
        println!("{name} http://{address}");
    }
    Ok(server.run())
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut servers = vec![serve("bare", || App::new().configure(bare_routes))?];
    let memory = IdempotencyMiddleware::new(MemoryStore::builder().build());
    servers.push(serve("memory", move || {
        App::new().wrap(memory.clone()).configure(routes)
    })?);
    if let Ok(url) = std::env::var("BENCH_REDIS_URL") {
        if idempotency_actix_workspace::redis_answers(&url).await {
            let store = RedisStore::builder(&url)
                .key_prefix(idempotency_actix_workspace::unique_prefix("load"))
                .build()
                .map_err(std::io::Error::other)?;
            // Each round starts a new server under a new prefix: short-lived records keep the
            // rounds from piling up in the shared Redis.
            let redis = IdempotencyMiddleware::builder(store)
                .record_ttl(std::time::Duration::from_secs(600))
                .build()
                .map_err(std::io::Error::other)?;
            servers.push(serve("redis", move || {
                App::new().wrap(redis.clone()).configure(routes)
            })?);
        }
    }
    if let Ok(url) = std::env::var("BENCH_DATABASE_URL") {
        if let Err(error) = postgres_servers(&url, &mut servers).await {
            eprintln!("no PostgreSQL servers ({error})");
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    futures_util::future::try_join_all(servers).await?;
    Ok(())
}
