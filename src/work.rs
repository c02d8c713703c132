//! A keyed handler that takes its time, on a real server: what the fault tests send requests to.

use std::time::Duration;

use actix_web::{post, web, App, HttpResponse};
use idempotency_actix::{idempotent, IdempotencyMiddlewareBuilder};

use crate::{Runs, TestServer};

/// How long `/work` takes.
#[derive(Debug, Clone, Copy)]
pub struct Delay(pub Duration);

/// `POST /work`: counts its run, takes its [`Delay`], answers `run N: M bytes`.
#[allow(unreachable_pub)] // the lint misreads the route macro's expansion; tests use it
#[idempotent]
#[post("/work")]
pub async fn work(
    runs: web::Data<Runs>,
    delay: web::Data<Delay>,
    body: web::Bytes,
) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(delay.0).await;
    HttpResponse::Created().body(format!("run {run}: {} bytes", body.len()))
}

/// A server with two workers behind the middleware from `builder`, serving `/work` (taking
/// `delay`, counting into `runs`) and whatever `more` registers.
pub fn work_server(
    builder: IdempotencyMiddlewareBuilder,
    runs: &Runs,
    delay: Duration,
    more: fn(&mut web::ServiceConfig),
) -> TestServer {
    let middleware = builder.build().unwrap_or_else(|e| panic!("config: {e}"));
    let runs = runs.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .app_data(web::Data::new(runs.clone()))
            .app_data(web::Data::new(Delay(delay)))
            .service(work)
            .configure(more)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// A client that opens a new connection for every request and gives up after ten seconds.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"))
}
