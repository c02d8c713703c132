use actix_web::{head, HttpResponse};
use idempotency_actix::idempotent;

#[idempotent(optional)]
#[head("/orders")]
async fn probe_orders() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
