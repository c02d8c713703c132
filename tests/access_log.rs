//! The demo's access log keeps no query string: the admin routes take a key and a caller scope
//! there. (Its own test binary: it installs the process's `log` logger.)

use std::sync::{Arc, Mutex};

use actix_web::{test, web, App, HttpResponse};
use idempotency_actix_workspace::orders::access_log;

/// Keeps every log line.
#[derive(Debug, Default, Clone)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl log::Log for Lines {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record.args().to_string());
    }

    fn flush(&self) {}
}

#[actix_rt::test]
async fn the_access_log_names_the_path_and_never_the_query() {
    let lines = Lines::default();
    log::set_boxed_logger(Box::new(lines.clone())).unwrap_or_else(|e| panic!("logger: {e}"));
    log::set_max_level(log::LevelFilter::Info);
    let app = test::init_service(
        App::new()
            .wrap(access_log())
            .route("/admin/idempotency-keys", web::get().to(HttpResponse::Ok)),
    )
    .await;
    let request = test::TestRequest::get()
        .uri("/admin/idempotency-keys?key=secret-key-42&scope=alice-scope")
        .to_request();
    let _ = test::call_service(&app, request).await;
    let logged = lines.0.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
    assert!(logged.contains("GET /admin/idempotency-keys"), "{logged}");
    assert!(!logged.contains("secret-key-42"), "{logged}");
    assert!(!logged.contains("alice-scope"), "{logged}");
}
