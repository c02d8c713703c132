//! Streamed responses reach the client as they are produced, over a real server; the copy
//! kept for replay is stored when the stream ends.

use std::time::{Duration, Instant};

use actix_web::{http::StatusCode, post, web, App, HttpResponse};
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use idempotency_actix::{idempotent, IdempotencyMiddleware, MemoryStore};
use idempotency_actix_workspace::{post_keyed, Runs, TestServer};

/// `count` chunks (`None`: without end), `every` apart.
fn ticking(
    run: usize,
    count: Option<usize>,
    every: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
    stream::iter(0..)
        .take_while(move |i| std::future::ready(count.is_none_or(|count| *i < count)))
        .then(move |i| async move {
            if i > 0 {
                actix_web::rt::time::sleep(every).await;
            }
            Ok(Bytes::from(format!("data: run {run} tick {i}\n\n")))
        })
}

#[idempotent]
#[post("/events")]
async fn events(runs: web::Data<Runs>) -> HttpResponse {
    let run = runs.record();
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(ticking(run, Some(3), Duration::from_millis(400)))
}

#[idempotent]
#[post("/export")]
async fn export(runs: web::Data<Runs>) -> HttpResponse {
    let run = runs.record();
    HttpResponse::Ok()
        .content_type("text/plain")
        .streaming(ticking(run, Some(3), Duration::from_millis(300)))
}

#[idempotent]
#[post("/endless")]
async fn endless(runs: web::Data<Runs>) -> HttpResponse {
    let run = runs.record();
    HttpResponse::Ok()
        .content_type("text/plain")
        .streaming(ticking(run, None, Duration::from_millis(50)))
}

/// Its effect is done when it answers; its body then fails after one chunk.
#[idempotent]
#[post("/failing")]
async fn failing(runs: web::Data<Runs>) -> HttpResponse {
    let run = runs.record();
    let chunks = stream::iter([
        Ok(Bytes::from(format!("run {run} part 1\n"))),
        Err(actix_web::error::ErrorInternalServerError(
            "the export broke",
        )),
    ]);
    HttpResponse::Created().streaming(chunks)
}

fn server(runs: &Runs) -> TestServer {
    let middleware = IdempotencyMiddleware::new(MemoryStore::builder().build());
    let runs = runs.clone();
    TestServer::start(2, move || {
        App::new()
            .wrap(middleware.clone())
            .app_data(web::Data::new(runs.clone()))
            .service(events)
            .service(export)
            .service(endless)
            .service(failing)
    })
    .unwrap_or_else(|e| panic!("server: {e}"))
}

/// Sends a keyed request and reads its body as it comes: the time to the first chunk, and the
/// whole body.
async fn read_as_it_comes(url: &str, key: &str) -> (Duration, Bytes) {
    let started = Instant::now();
    let mut response = reqwest::Client::new()
        .post(url)
        .header("Idempotency-Key", key)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(response.status().as_u16(), 200);
    let mut first = None;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap_or_else(|e| panic!("{e}")) {
        first.get_or_insert_with(|| started.elapsed());
        body.extend_from_slice(&chunk);
    }
    (first.unwrap_or_default(), Bytes::from(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_flows_at_once_and_is_not_replayed() {
    let runs = Runs::default();
    let server = server(&runs);
    let (first_byte, body) = read_as_it_comes(&server.url("/events"), "sse").await;
    assert!(
        first_byte < Duration::from_millis(300),
        "the first event took {first_byte:?}"
    );
    assert_eq!(String::from_utf8_lossy(&body).matches("tick").count(), 3);

    let retry = post_keyed(&reqwest::Client::new(), &server.url("/events"), "sse", "").await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert!(retry
        .problem_type()
        .is_some_and(|t| t.ends_with("#response-not-replayable")));
    assert_eq!(runs.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_flows_at_once_and_is_replayed_whole() {
    let runs = Runs::default();
    let server = server(&runs);
    let (first_byte, body) = read_as_it_comes(&server.url("/export"), "export").await;
    assert!(
        first_byte < Duration::from_millis(250),
        "the first chunk took {first_byte:?}"
    );
    assert_eq!(String::from_utf8_lossy(&body).matches("tick").count(), 3);

    let retry = post_keyed(
        &reqwest::Client::new(),
        &server.url("/export"),
        "export",
        "",
    )
    .await;
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, body);
    assert_eq!(runs.count(), 1);
}

/// A stream without end answers at once; when its client goes away, the key is done but has
/// nothing to replay, so a retry is refused rather than run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_answers_and_its_key_is_settled_when_the_client_leaves() {
    let runs = Runs::default();
    let server = server(&runs);
    {
        let mut response = reqwest::Client::new()
            .post(server.url("/endless"))
            .header("Idempotency-Key", "endless")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let first = tokio::time::timeout(Duration::from_secs(2), response.chunk()).await;
        assert!(
            matches!(first, Ok(Ok(Some(_)))),
            "an endless stream must answer: {first:?}"
        );
    }
    let mut retry = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = post_keyed(
            &reqwest::Client::new(),
            &server.url("/endless"),
            "endless",
            "",
        )
        .await;
        if answer.status != StatusCode::CONFLICT
            || answer
                .problem_type()
                .is_some_and(|t| t.ends_with("#response-not-replayable"))
        {
            retry = Some(answer);
            break;
        }
    }
    let retry = retry.unwrap_or_else(|| panic!("the key stayed in flight"));
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert!(retry
        .problem_type()
        .is_some_and(|t| t.ends_with("#response-not-replayable")));
    assert_eq!(runs.count(), 1);
}

/// The handler ran (its effect is done) before its body failed half-way: the key stays done,
/// not replayable, and retries never run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_stream_fails_half_way_keeps_its_key_done() {
    let runs = Runs::default();
    let server = server(&runs);
    let url = server.url("/failing");
    let first = reqwest::Client::new()
        .post(&url)
        .header("Idempotency-Key", "broken-export")
        .header("content-type", "application/json")
        .send()
        .await;
    if let Ok(response) = first {
        // The body breaks off: the client sees an error or a truncated body.
        let _ = response.bytes().await;
    }
    // A retry that ran the handler again would break off like the first: no answer at all.
    let retry = || async {
        let sent = reqwest::Client::new()
            .post(&url)
            .header("Idempotency-Key", "broken-export")
            .header("content-type", "application/json")
            .send()
            .await
            .ok()?;
        let status = sent.status().as_u16();
        let body = sent.text().await.ok()?;
        Some((status, body))
    };
    let mut retries = Vec::new();
    for _ in 0..2 {
        let mut answer = retry().await;
        // The record is written once the failed stream is dropped: allow it a moment.
        for _ in 0..20 {
            if answer.as_ref().is_some_and(|(status, _)| *status != 409)
                || answer
                    .as_ref()
                    .is_some_and(|(_, body)| body.contains("response-not-replayable"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer = retry().await;
        }
        retries.push(answer);
    }
    for answer in &retries {
        assert!(
            answer.as_ref().is_some_and(
                |(status, body)| *status == 409 && body.contains("#response-not-replayable")
            ),
            "{answer:?}"
        );
    }
    assert_eq!(
        runs.count(),
        1,
        "the handler ran again after its stream failed"
    );
}
