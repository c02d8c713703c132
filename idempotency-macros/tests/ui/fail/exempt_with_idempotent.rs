use actix_web::{post, HttpResponse};
use idempotency_actix::{idempotency_exempt, idempotent};

#[idempotent]
#[idempotency_exempt]
#[post("/orders")]
async fn create_order() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
