//! Start-up refusals, explained in the error the server returns.
//!
//! actix-web's `App` cannot carry a reason out of its factory (its init error is `()`), and
//! actix-server answers any refused worker with a bare `Can not start server service N`. So the
//! middleware keeps the reason of the refusal it made, and [`explain_startup_error`] puts it
//! into the server's error.

use parking_lot::Mutex;

/// The reason of the last refusal, for [`explain_startup_error`]: one slot, since actix-server
/// gives the refused worker's error nowhere else.
static LAST_REFUSAL: Mutex<Option<String>> = Mutex::new(None);

/// Logs why a worker may not start, and keeps the reason for [`explain_startup_error`].
pub(crate) fn refuse_start(why: String) {
    tracing::error!("idempotency: {why}");
    *LAST_REFUSAL.lock() = Some(why);
}

/// The server's start-up `error` with the reason the idempotency middleware refused to start a
/// worker, if it did; any other error comes back as it was.
///
/// ```no_run
/// use actix_web::{App, HttpServer};
/// use idempotency_actix::{explain_startup_error, IdempotencyMiddleware, MemoryStore};
///
/// #[actix_web::main]
/// async fn main() -> std::io::Result<()> {
///     let idempotency = IdempotencyMiddleware::new(MemoryStore::default());
///     HttpServer::new(move || App::new().wrap(idempotency.clone()))
///         .bind("127.0.0.1:8080")?
///         .run()
///         .await
///         .map_err(explain_startup_error)
/// }
/// ```
pub fn explain_startup_error(error: std::io::Error) -> std::io::Error {
    match LAST_REFUSAL.lock().take() {
        Some(why) => std::io::Error::new(error.kind(), format!("{error}: {why}")),
        None => error,
    }
}
