//! The demo server: an order API in enforce mode on the in-memory store.
//!
//! ```text
//! cargo run --release --example orders            # listens on $BIND, default 127.0.0.1:8080
//! curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' -d '{"item":"book"}'
//! ```

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use actix_web::{
    get, http::header::ContentType, middleware::Logger, post, web, App, HttpResponse, HttpServer,
};
use idempotency_actix::{
    idempotency_exempt, idempotency_manual, idempotent, IdempotencyMiddleware, ManualIdempotency,
    MemoryStore,
};
use serde::Deserialize;
use serde_json::json;

/// Orders created so far; the ids count up from 1.
#[derive(Debug, Default)]
struct Orders {
    created: AtomicU64,
}

impl Orders {
    fn create(&self, item: &serde_json::Value) -> HttpResponse {
        let id = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        HttpResponse::Created().json(json!({ "id": id, "item": item }))
    }
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    item: serde_json::Value,
}

#[idempotent]
#[post("/orders")]
async fn create_order(orders: web::Data<Orders>, order: web::Json<NewOrder>) -> HttpResponse {
    orders.create(&order.item)
}

#[idempotent(optional)]
#[post("/orders/optional")]
async fn create_order_optional_key(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
) -> HttpResponse {
    orders.create(&order.item)
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
        (false, _) => orders.create(&order.item),
    }
}

#[idempotent]
#[post("/orders/slow")]
async fn create_order_slowly(
    orders: web::Data<Orders>,
    order: web::Json<NewOrder>,
) -> HttpResponse {
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    orders.create(&order.item)
}

#[idempotent]
#[post("/orders/fail")]
async fn fail_to_create_order() -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type("application/problem+json")
        .json(json!({
            "type": "about:blank",
            "title": "Order service unavailable",
            "status": 500,
        }))
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
    HttpResponse::Ok().json(json!({ "count": orders.created.load(Ordering::SeqCst) }))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    // One store and one order counter for every worker.
    let idempotency = IdempotencyMiddleware::new(MemoryStore::default());
    let orders = web::Data::new(Orders::default());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(idempotency.clone())
            .wrap(Logger::default())
            .app_data(orders.clone())
            .service(create_order)
            .service(create_order_optional_key)
            .service(create_order_manually)
            .service(create_order_slowly)
            .service(fail_to_create_order)
            .service(ping)
            .service(create_note)
            .service(count_orders)
    })
    .bind(&bind)?;
    for address in server.addrs() {
        println!("listening on http://{address}");
    }
    server.run().await
}
