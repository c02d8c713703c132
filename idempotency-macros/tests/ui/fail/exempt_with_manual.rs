use actix_web::{post, HttpResponse};
use idempotency_actix::{idempotency_exempt, idempotency_manual};

#[idempotency_exempt]
#[idempotency_manual]
#[post("/orders")]
async fn create_order() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
