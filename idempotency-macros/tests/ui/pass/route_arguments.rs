use actix_web::{
    middleware::{DefaultHeaders, Logger},
    post, route, App, HttpResponse,
};
use idempotency_actix::{idempotency_exempt, idempotent};

#[idempotent]
#[post("/a", name = "pay", wrap = "Logger::default()", wrap = "DefaultHeaders::new()",)]
async fn two_wraps_a_name_and_a_trailing_comma() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn is_json(ctx: &actix_web::guard::GuardContext<'_>) -> bool {
    ctx.header::<actix_web::http::header::ContentType>().is_some()
}

#[idempotent(optional)]
#[route("/b", method = "POST", method = "PUT", guard = "is_json", wrap = "Logger::default()")]
async fn methods_a_guard_and_a_wrap() -> HttpResponse {
    HttpResponse::Ok().finish()
}

#[idempotency_exempt]
#[post("/c", wrap = "Logger::default()")]
async fn exempt_with_a_wrap() -> HttpResponse {
    HttpResponse::Ok().finish()
}

fn main() {
    let _ = App::new()
        .service(two_wraps_a_name_and_a_trailing_comma)
        .service(methods_a_guard_and_a_wrap)
        .service(exempt_with_a_wrap);
}
