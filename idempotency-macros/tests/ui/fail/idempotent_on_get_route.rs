use actix_web::{get, HttpResponse};
use idempotency_actix::idempotent;

#[idempotent]
#[get("/orders")]
async fn list_orders() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
