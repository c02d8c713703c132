//! One `tracing` span per keyed request, carrying its outcome, and never the key in clear.

use std::sync::{Arc, Mutex};

use actix_web::{http::StatusCode, test, web, App};
use idempotency_actix::{IdempotencyMiddleware, IdempotencyPolicy, MemoryStore};
use idempotency_actix_workspace::{
    orders::{routes, Orders},
    respond,
};
use serde_json::json;
use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

/// The fields of one span or event, as text.
#[derive(Debug, Default, Clone)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl Fields {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Every closed `idempotency` span with its fields, and every event's fields.
#[derive(Debug, Default, Clone)]
struct Recorded {
    spans: Arc<Mutex<Vec<Fields>>>,
    events: Arc<Mutex<Vec<Fields>>>,
}

impl<S> Layer<S> for Recorded
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        fields
            .0
            .push(("level".to_owned(), attrs.metadata().level().to_string()));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fields);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.name() != "idempotency" {
            return;
        }
        let fields = span.extensions().get::<Fields>().cloned();
        if let Some(fields) = fields {
            self.spans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(fields);
        }
    }
}

fn order(key: &str, item: &str) -> actix_http::Request {
    test::TestRequest::post()
        .uri("/orders")
        .insert_header(("Idempotency-Key", key.to_owned()))
        .set_json(json!({ "item": item }))
        .to_request()
}

#[actix_rt::test]
async fn each_keyed_request_has_a_span_with_its_outcome_and_no_key_in_clear() {
    let recorded = Recorded::default();
    let subscriber = tracing_subscriber::registry().with(recorded.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .configure(routes(web::Data::new(Orders::default()))),
    )
    .await;
    let key = "tracing-secret-key";
    assert_eq!(
        respond(&app, order(key, "book")).await.status,
        StatusCode::CREATED
    );
    assert!(respond(&app, order(key, "book")).await.is_replay());
    assert_eq!(
        respond(&app, order(key, "pen")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let spans = recorded
        .spans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let outcomes: Vec<_> = spans.iter().map(|span| span.get("outcome")).collect();
    assert_eq!(
        outcomes,
        [Some("fresh"), Some("replayed"), Some("mismatch")],
        "{spans:?}"
    );
    let keys: Vec<_> = spans.iter().map(|span| span.get("key")).collect();
    assert!(
        keys.iter()
            .all(|k| k.is_some_and(|k| k.len() == 12) && *k == keys[0]),
        "one short digest follows the key through its requests: {keys:?}"
    );
    assert!(spans.iter().all(|span| span.get("method") == Some("POST")));
    assert!(
        spans.iter().all(|span| span.get("level") == Some("DEBUG")),
        "one span per request belongs at DEBUG, not in an INFO log: {spans:?}"
    );
    let everything = format!(
        "{spans:?}{:?}",
        recorded.events.lock().unwrap_or_else(|e| e.into_inner())
    );
    assert!(
        !everything.contains(key),
        "the key never appears in clear: {everything}"
    );
}

/// The span names the route by its pattern, never by the concrete path, on a route with a policy
/// and on one settled by the enforce-mode default.
#[actix_rt::test]
async fn the_span_names_the_route_pattern_not_the_path() {
    let recorded = Recorded::default();
    let subscriber = tracing_subscriber::registry().with(recorded.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .route(
                "/users/{id}/cancel",
                web::post().to(actix_web::HttpResponse::Ok),
            )
            .service(
                web::resource("/accounts/{id}/close")
                    .wrap(IdempotencyPolicy::required())
                    .route(web::post().to(actix_web::HttpResponse::Ok)),
            ),
    )
    .await;
    for path in ["/users/123/cancel", "/accounts/456/close"] {
        let request = test::TestRequest::post()
            .uri(path)
            .insert_header(("Idempotency-Key", "k"))
            .to_request();
        assert_eq!(respond(&app, request).await.status, StatusCode::OK);
    }
    let spans = recorded
        .spans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let routes: Vec<_> = spans.iter().map(|span| span.get("route")).collect();
    assert_eq!(
        routes,
        [Some("/users/{id}/cancel"), Some("/accounts/{id}/close")],
        "{spans:?}"
    );
}

/// Counts the events at ERROR level.
#[derive(Debug, Default, Clone)]
struct Errors(Arc<Mutex<usize>>);

impl<S: Subscriber> Layer<S> for Errors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::ERROR {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
    }
}

/// Requests cannot flood the log: hundreds of invented methods and paths, with and without a
/// key, on routes with a misconfigured policy or none, leave at most one error line per setup
/// mistake.
#[actix_rt::test]
async fn requests_cannot_flood_the_log_with_setup_errors() {
    let errors = Errors::default();
    let subscriber = tracing_subscriber::registry().with(errors.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let app = test::init_service(
        App::new()
            .wrap(IdempotencyMiddleware::new(MemoryStore::builder().build()))
            .route(
                "/anything/{id}",
                web::route().to(actix_web::HttpResponse::Ok),
            )
            .service(
                // Two policies on one route: a setup mistake, said once.
                web::resource("/twice/{id}")
                    .wrap(IdempotencyPolicy::required())
                    .wrap(IdempotencyPolicy::required())
                    .route(web::route().to(actix_web::HttpResponse::Ok)),
            ),
    )
    .await;
    for n in 0..300 {
        let method = actix_web::http::Method::from_bytes(format!("INVENTED-{n}").as_bytes())
            .unwrap_or_else(|e| panic!("method: {e}"));
        for path in [
            format!("/anything/{n}"),
            format!("/twice/{n}"),
            format!("/nope/{n}"),
        ] {
            let mut request = test::TestRequest::default()
                .method(method.clone())
                .uri(&path);
            if n % 2 == 0 {
                request = request.insert_header(("Idempotency-Key", format!("k{n}")));
            }
            let _ = respond(&app, request.to_request()).await;
        }
    }
    let logged = *errors.0.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(
        logged, 1,
        "one line for the one setup mistake, for 900 requests"
    );
}
