use actix_web::{post, put, route, web, App, HttpResponse};
use idempotency_actix::{idempotency_exempt, idempotency_manual, idempotent, ManualIdempotency};

#[idempotent]
#[post("/a")]
async fn required() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotent(optional)]
#[put("/b")]
async fn optional() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotent(optional, store = "payments")]
#[route("/c", method = "POST", method = "PATCH")]
async fn optional_in_a_named_store() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotency_exempt]
#[actix_web::post("/d",)]
async fn exempt_with_a_path_attribute_and_trailing_comma() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotency_manual(store = "payments")]
#[post("/e", wrap = "actix_web::middleware::Logger::default()")]
async fn manual_with_another_wrap(idempotency: ManualIdempotency) -> HttpResponse {
    HttpResponse::Ok().body(idempotency.key_exists().to_string())
}

fn main() {
    let _ = App::new()
        .service(required)
        .service(optional)
        .service(optional_in_a_named_store)
        .service(exempt_with_a_path_attribute_and_trailing_comma)
        .service(manual_with_another_wrap)
        .route("/f", web::post().to(HttpResponse::Ok));
}
