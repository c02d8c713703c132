//! `#[idempotency_exempt]` states what a safe route already is, so it is allowed there; the
//! other attributes are allowed on routes that list any unsafe method.

use actix_web::{get, head, route, App, HttpResponse};
use idempotency_actix::{idempotency_exempt, idempotent};

#[idempotency_exempt]
#[get("/status")]
async fn status() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotency_exempt]
#[head("/status")]
async fn probe() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotent]
#[route("/orders", method = "GET", method = "POST")]
async fn read_or_create() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {
    let _ = App::new()
        .service(status)
        .service(probe)
        .service(read_or_create);
}
