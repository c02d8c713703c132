use actix_web::{post, HttpResponse};
use idempotency_actix::idempotency_exempt;

#[idempotency_exempt(optional)]
#[post("/ping")]
async fn ping() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
