//! The load benchmark's server (`benches/load/run.sh`): one trivial handler served three ways,
//! each on its own port and its own worker: without the middleware, behind it on the memory
//! store, and behind it on Redis (when `BENCH_REDIS_URL` answers).
//!
//! Prints one line per server, `NAME http://ADDRESS`, then serves until killed.

use std::io::Write;

use actix_web::{
    body::MessageBody,
    dev::{Server, ServiceFactory, ServiceRequest, ServiceResponse},
    web, App, HttpResponse, HttpServer,
};
use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore, RedisStore};

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
        );
}

/// The same routes without the middleware (the exempt policy needs the middleware, so it goes).
fn bare_routes(config: &mut web::ServiceConfig) {
    config
        .route("/orders", web::post().to(create_order))
        .route("/exempt", web::post().to(create_order));
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
    println!("ready");
    std::io::stdout().flush()?;
    futures_util::future::try_join_all(servers).await?;
    Ok(())
}
