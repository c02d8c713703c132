use actix_web::{post, HttpResponse};
use idempotency_actix::idempotent;

#[idempotent(optinal)]
#[post("/orders")]
async fn create_order() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
