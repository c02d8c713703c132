use actix_web::{post, HttpResponse};
use idempotency_actix::idempotent;

#[post("/orders")]
#[idempotent]
async fn create_order() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
