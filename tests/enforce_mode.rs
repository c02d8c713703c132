//! Enforce mode protects every unsafe keyed request, whatever its handler reads: nothing, the
//! path, the query, a form, the payload by hand, or a JSON body it may ignore. On a real server,
//! with retries in sequence and at once, each on its own connection.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use actix_web::{http::StatusCode, web, App, HttpResponse};
use futures_util::{future::join_all, StreamExt};
use idempotency_actix::{IdempotencyMiddleware, MemoryStore};
use idempotency_actix_workspace::{received, work::fresh_client, Received, Runs, TestServer};
use tokio::sync::Barrier;

const RETRIES: usize = 10;

/// A request as one of the routes below expects it: path, content type, body.
#[derive(Debug, Clone, Copy)]
struct Shape {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const SHAPES: [Shape; 6] = [
    Shape {
        path: "/orders/7/cancel",
        content_type: "application/json",
        body: "",
    },
    Shape {
        path: "/no-arguments",
        content_type: "application/json",
        body: "",
    },
    Shape {
        path: "/query-only?reason=duplicate",
        content_type: "application/json",
        body: "",
    },
    Shape {
        path: "/form",
        content_type: "application/x-www-form-urlencoded",
        body: "amount=100&currency=EUR",
    },
    Shape {
        path: "/payload-by-hand",
        content_type: "application/octet-stream",
        body: "raw bytes",
    },
    Shape {
        path: "/optional-json",
        content_type: "application/json",
        body: "{\"amount\":100}",
    },
];

/// Runs of each route's handler, by path.
#[derive(Debug, Clone, Default)]
struct Tally(HashMap<&'static str, Runs>);

impl Tally {
    fn new() -> Self {
        Self(
            SHAPES
                .iter()
                .map(|s| (route_of(s), Runs::default()))
                .collect(),
        )
    }

    fn of(&self, route: &str) -> Runs {
        self.0.get(route).cloned().unwrap_or_default()
    }
}

fn route_of(shape: &Shape) -> &'static str {
    shape.path.split('?').next().unwrap_or(shape.path)
}

/// Records a run, lingers so that concurrent retries overlap it, and answers.
async fn ran(runs: Runs, what: String) -> HttpResponse {
    let run = runs.record();
    actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    HttpResponse::Ok().body(format!("run {run}: {what}"))
}

/// The handlers, none of them annotated: in enforce mode each is protected by the default.
fn routes(tally: Tally) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        let runs = tally.of("/orders/7/cancel");
        config.route(
            "/orders/{id}/cancel",
            web::post().to(move |id: web::Path<u64>| ran(runs.clone(), format!("cancel {id}"))),
        );
        let runs = tally.of("/no-arguments");
        config.route(
            "/no-arguments",
            web::post().to(move || ran(runs.clone(), "nothing".to_owned())),
        );
        let runs = tally.of("/query-only");
        config.route(
            "/query-only",
            web::post().to(move |query: web::Query<HashMap<String, String>>| {
                ran(runs.clone(), format!("{:?}", query.get("reason")))
            }),
        );
        let runs = tally.of("/form");
        config.route(
            "/form",
            web::post().to(move |form: web::Form<HashMap<String, String>>| {
                ran(runs.clone(), format!("{:?}", form.get("amount")))
            }),
        );
        let runs = tally.of("/payload-by-hand");
        config.route(
            "/payload-by-hand",
            web::post().to(move |mut payload: web::Payload| {
                let runs = runs.clone();
                async move {
                    let mut body = Vec::new();
                    while let Some(Ok(chunk)) = payload.next().await {
                        body.extend_from_slice(&chunk);
                    }
                    ran(runs, String::from_utf8_lossy(&body).into_owned()).await
                }
            }),
        );
        let runs = tally.of("/optional-json");
        config.route(
            "/optional-json",
            web::post().to(move |body: Option<web::Json<serde_json::Value>>| {
                ran(runs.clone(), format!("{:?}", body.map(|b| b.into_inner())))
            }),
        );
    }
}

async fn send(url: &str, shape: &Shape, key: Option<&str>) -> Received {
    let mut request = fresh_client()
        .post(url)
        .header("content-type", shape.content_type)
        .body(shape.body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    received(response).await
}

fn server_with(middleware: IdempotencyMiddleware, tally: &Tally) -> TestServer {
    let tally = tally.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .configure(routes(tally.clone()))
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

#[actix_rt::test]
async fn sequential_retries_run_every_handler_shape_once() {
    let tally = Tally::new();
    let server = server_with(
        IdempotencyMiddleware::new(MemoryStore::builder().build()),
        &tally,
    );
    for shape in &SHAPES {
        let url = server.url(shape.path);
        let mut answers = Vec::new();
        for _ in 0..RETRIES {
            answers.push(send(&url, shape, Some("retry-in-sequence")).await);
        }
        assert_eq!(
            answers[0].status,
            StatusCode::OK,
            "{shape:?}: {:?}",
            answers[0]
        );
        for retry in &answers[1..] {
            assert!(retry.is_replay(), "{shape:?}: {retry:?}");
            assert_eq!(retry.body, answers[0].body, "{shape:?}");
        }
        assert_eq!(tally.of(route_of(shape)).count(), 1, "{shape:?}");

        let keyless = send(&url, shape, None).await;
        assert_eq!(
            keyless.status,
            StatusCode::BAD_REQUEST,
            "{shape:?}: {keyless:?}"
        );
        assert!(
            keyless
                .problem_type()
                .is_some_and(|t| t.ends_with("#missing-key")),
            "{shape:?}: {keyless:?}"
        );
        assert_eq!(tally.of(route_of(shape)).count(), 1, "{shape:?}");
    }
}

/// Sends `RETRIES` requests with one key at once, each on its own connection.
fn at_once(url: String, shape: Shape, key: &'static str) -> impl Future<Output = Vec<Received>> {
    let start = Arc::new(Barrier::new(RETRIES));
    let tasks: Vec<_> = (0..RETRIES)
        .map(|_| {
            let (url, start) = (url.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                send(&url, &shape, Some(key)).await
            })
        })
        .collect();
    async move {
        join_all(tasks)
            .await
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|e| panic!("request task: {e}")))
            .collect()
    }
}

#[actix_rt::test]
async fn concurrent_retries_run_every_handler_shape_once() {
    let tally = Tally::new();
    let middleware = IdempotencyMiddleware::builder(MemoryStore::builder().build())
        .lock_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|e| panic!("config: {e}"));
    let server = server_with(middleware, &tally);
    for shape in SHAPES {
        let answers = at_once(server.url(shape.path), shape, "retry-at-once").await;
        let fresh: Vec<_> = answers.iter().filter(|a| !a.is_replay()).collect();
        assert_eq!(fresh.len(), 1, "{shape:?}: {answers:?}");
        for answer in &answers {
            assert_eq!(answer.status, StatusCode::OK, "{shape:?}: {answer:?}");
            assert_eq!(answer.body, fresh[0].body, "{shape:?}");
        }
        assert_eq!(tally.of(route_of(&shape)).count(), 1, "{shape:?}");
    }
}

/// The per-worker mistake: the middleware built inside `HttpServer::new`, once per worker, on
/// the process's default store, with a handler that reads no body.
#[actix_rt::test]
async fn a_middleware_built_per_worker_on_the_default_store_still_runs_a_retried_request_once() {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let server = TestServer::start(2, move || {
        let runs = handler_runs.clone();
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::default()))
            .route(
                "/capture/{id}",
                web::post()
                    .to(move |id: web::Path<u64>| ran(runs.clone(), format!("capture {id}"))),
            )
    })
    .unwrap_or_else(|e| panic!("server: {e}"));
    let shape = Shape {
        path: "/capture/42",
        content_type: "application/json",
        body: "",
    };
    let key = "per-worker-probe-capture-42";
    let url = server.url(shape.path);
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(send(&url, &shape, Some(key)).await);
    }
    assert_eq!(answers[0].status, StatusCode::OK, "{:?}", answers[0]);
    for retry in &answers[1..] {
        assert!(retry.is_replay(), "{retry:?}");
    }
    assert_eq!(runs.count(), 1);
}
