use actix_web::{post, HttpResponse};
use idempotency_actix::{idempotency_manual, idempotent};

#[idempotency_manual]
#[idempotent(optional)]
#[post("/orders")]
async fn create_order() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
