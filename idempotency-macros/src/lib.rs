//! Handler attributes for [idempotency-actix](https://docs.rs/idempotency-actix).
//!
//! Use them through `idempotency_actix`, which re-exports them; this crate is an
//! implementation detail. Each attribute goes **above** an actix-web route attribute
//! (`#[post(..)]`, `#[put(..)]`, `#[patch(..)]`, `#[delete(..)]`, `#[route(..)]`, ...) and adds
//! the route's policy to it as its first `wrap = ".."` argument, which actix-web makes the
//! innermost: the key is settled after every other middleware of the route, whatever order its
//! own `wrap`s are in, and before the handler runs. A last `wrap`, outermost, tells enforce mode
//! while routing runs that the route settles its key itself.
//!
//! Safe methods (GET, HEAD, OPTIONS, TRACE) never carry idempotency keys: the middleware passes
//! them through. `#[idempotent]` and `#[idempotency_manual]` on a route whose methods are all
//! safe (`#[get(..)]`, `#[head(..)]`, `#[options(..)]`, `#[trace(..)]`, or `#[route(..)]`
//! listing only those) would do nothing, so they are a compile error there.
//! `#[idempotency_exempt]` is allowed: it says what such a route already is.

use proc_macro::TokenStream;

mod args;
mod expand;

use expand::Marker;

/// Makes a handler idempotent: a key is required, the handler runs once per key and its
/// response is replayed to retries.
///
/// # Syntax
/// ```text
/// #[idempotent]
/// #[idempotent(optional)]
/// #[idempotent(store = "name")]
/// #[idempotent(optional, store = "name")]
/// ```
/// `optional`: a request without a key runs the handler and nothing is stored.
/// `store`: use the store registered under that name on the middleware.
///
/// # Safe methods
/// On a route whose methods are all safe (`#[get(..)]`, `#[head(..)]`, `#[options(..)]`,
/// `#[trace(..)]`, `#[route(.., method = "GET")]`) it is a compile error pointing at the route
/// attribute: the middleware passes safe methods through, so the attribute would do nothing.
///
/// ```compile_fail
/// use actix_web::{get, HttpResponse};
/// use idempotency_actix::idempotent;
///
/// #[idempotent] // error: `#[idempotent]` has no effect on GET routes
/// #[get("/orders")]
/// async fn list_orders() -> HttpResponse {
///     HttpResponse::Ok().finish()
/// }
/// ```
///
/// # Examples
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::idempotent;
///
/// #[idempotent]
/// #[post("/orders")]
/// async fn create_order() -> HttpResponse {
///     HttpResponse::Created().finish()
/// }
/// ```
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Marker::Idempotent, args.into(), item.into()).into()
}

/// Exempts a handler: it runs every time, key or not, and nothing is stored. In enforce mode
/// this is how a route opts out of the key requirement.
///
/// # Syntax
/// ```text
/// #[idempotency_exempt]
/// ```
///
/// # Safe methods
/// It is allowed on GET, HEAD, OPTIONS and TRACE routes, where it changes nothing: those
/// methods are always passed through, which is what it states. (The other attributes are a
/// compile error there, because they would promise a protection that never happens.)
///
/// # Examples
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::idempotency_exempt;
///
/// #[idempotency_exempt]
/// #[post("/ping")]
/// async fn ping() -> HttpResponse {
///     HttpResponse::Ok().finish()
/// }
/// ```
#[proc_macro_attribute]
pub fn idempotency_exempt(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Marker::Exempt, args.into(), item.into()).into()
}

/// Leaves the decision to the handler: a key is required, the handler always runs and reads
/// whether the key was seen before (and the stored response) through the
/// `ManualIdempotency` extractor. The first storable response under a new key is stored.
///
/// # Syntax
/// ```text
/// #[idempotency_manual]
/// #[idempotency_manual(store = "name")]
/// ```
///
/// # Safe methods
/// Like `#[idempotent]`, it is a compile error on a route whose methods are all safe (GET,
/// HEAD, OPTIONS, TRACE): the middleware passes those through, so the handler would never see
/// a key.
///
/// # Examples
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::{idempotency_manual, ManualIdempotency};
///
/// #[idempotency_manual]
/// #[post("/refunds")]
/// async fn refund(idempotency: ManualIdempotency) -> HttpResponse {
///     if idempotency.key_exists() {
///         HttpResponse::Ok().body("refund already issued")
///     } else {
///         HttpResponse::Created().body("refund issued")
///     }
/// }
/// ```
#[proc_macro_attribute]
pub fn idempotency_manual(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::expand(Marker::Manual, args.into(), item.into()).into()
}
