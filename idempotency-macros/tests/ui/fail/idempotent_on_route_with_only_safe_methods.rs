use actix_web::{route, HttpResponse};
use idempotency_actix::idempotent;

#[idempotent]
#[route("/orders", method = "GET", method = "HEAD")]
async fn read_orders() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
