use actix_web::HttpResponse;
use idempotency_actix::{idempotency_manual, ManualIdempotency};

#[idempotency_manual]
#[actix_web::get("/refunds")]
async fn list_refunds(idempotency: ManualIdempotency) -> HttpResponse {
    HttpResponse::Ok().body(idempotency.key_exists().to_string())
}

fn main() {}
