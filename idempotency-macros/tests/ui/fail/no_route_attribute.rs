use actix_web::HttpResponse;
use idempotency_actix::idempotency_exempt;

#[idempotency_exempt]
async fn registered_by_hand() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {}
