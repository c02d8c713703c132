//! Start-up refusals, explained in the error the server returns.
//!
//! actix-web's `App` cannot carry a reason out of its factory (its init error is `()`), and
//! actix-server answers any refused worker with a bare `Can not start server service N`. So the
//! middleware keeps the reason of the refusal it made, and [`explain_startup_error`] puts it
//! into the server's error.

use std::{cell::RefCell, sync::Arc};

use parking_lot::Mutex;

use crate::config::Config;

/// The reason of the last refusal, for [`explain_startup_error`]: one slot, since actix-server
/// gives the refused worker's error nowhere else.
static LAST_REFUSAL: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    /// Store names asked for by the route policies built on this thread since an
    /// `IdempotencyMiddleware` was last built here. actix-web builds an app's routes before the
    /// middleware wrapped around them, on the worker's thread, so the middleware finds here the
    /// names its own routes ask for.
    static STORES_ASKED_FOR: RefCell<Vec<Arc<str>>> = const { RefCell::new(Vec::new()) };
}

/// Notes that a route policy being built uses the store `name`.
pub(crate) fn route_asks_for_store(name: Arc<str>) {
    STORES_ASKED_FOR.with(|asked| asked.borrow_mut().push(name));
}

/// Checks the store names the routes inside a middleware being built asked for against its
/// configuration.
pub(crate) fn check_stores_asked_for(config: &Config) -> Result<(), String> {
    let asked = STORES_ASKED_FOR.with(|asked| std::mem::take(&mut *asked.borrow_mut()));
    match asked.iter().find(|name| config.store(Some(name)).is_none()) {
        None => Ok(()),
        Some(name) => Err(format!(
            "a route uses the store `{name}`, but its IdempotencyMiddleware registers no store \
             under that name (see IdempotencyMiddlewareBuilder::named_store)"
        )),
    }
}

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
