//! Safe retries for [actix-web](https://docs.rs/actix-web) services through `Idempotency-Key`s.
//!
//! A client that lost a response retries its request with the same
//! [idempotency key](https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/).
//! The server runs the handler once and replays the stored response to every retry, however
//! many arrive and however concurrently:
//!
//! - a retry after success gets the stored status, headers and body, marked
//!   `Idempotent-Replayed: true`;
//! - a duplicate that arrives while the first request still runs waits briefly for its
//!   response, then gets **409** with `Retry-After`;
//! - the same key with another payload gets **422**; a missing or malformed key gets **400**;
//! - keys are scoped to the caller (the `Authorization` header by default);
//! - every error is an `application/problem+json` response with a stable `type`
//!   ([`IdempotencyError`]).
//!
//! # Getting started
//!
//! Register [`IdempotencyMiddleware`] on the app, then mark handlers:
//!
//! ```no_run
//! use actix_web::{post, web, App, HttpResponse, HttpServer};
//! use idempotency_actix::{idempotency_exempt, idempotent, IdempotencyMiddleware, MemoryStore};
//!
//! #[idempotent]
//! #[post("/payments")]
//! async fn pay(body: web::Bytes) -> HttpResponse {
//!     HttpResponse::Created().body(body)
//! }
//!
//! #[idempotency_exempt]
//! #[post("/ping")]
//! async fn ping() -> HttpResponse {
//!     HttpResponse::Ok().finish()
//! }
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     // Build the middleware (and its store) once, outside the factory closure.
//!     let idempotency = IdempotencyMiddleware::new(MemoryStore::default());
//!     HttpServer::new(move || {
//!         App::new()
//!             .wrap(idempotency.clone()) // first: innermost
//!             .service(pay)
//!             .service(ping)
//!     })
//!     .bind("127.0.0.1:8080")?
//!     .run()
//!     .await
//! }
//! ```
//!
//! | attribute | key | handler runs | stored |
//! |---|---|---|---|
//! | `#[idempotent]` | required (400 without) | once per key | yes |
//! | `#[idempotent(optional)]` | used when present | once per key, or every time without one | with a key |
//! | `#[idempotency_exempt]` | ignored | every time | no |
//! | `#[idempotency_manual]` | required | every time; it reads [`ManualIdempotency`] | first response |
//! | none, [`Mode::Enforce`] | required | once per key | yes |
//! | none, [`Mode::OptIn`] | ignored | every time | no |
//!
//! Attributes go **above** the route attribute (`#[post(..)]`, `#[route(..)]`). On a route
//! whose methods are all safe (`#[get(..)]`, `#[head(..)]`), `#[idempotent]` and
//! `#[idempotency_manual]` are compile errors: the middleware passes safe methods through, so
//! they would do nothing. Routes registered by hand take an [`IdempotencyPolicy`] with
//! `.wrap(..)`.
//!
//! # Choosing a backend
//!
//! [`MemoryStore`] (the default) keeps records in the process: right for one
//! instance. With the `redis` feature, `RedisStore` shares one state between any number of
//! instances (one atomic command or Lua script per operation, two round trips for a fresh
//! request, one for a replay), on one Redis server or, with `redis-cluster`, on a Redis
//! Cluster. Any backend implementing [`IdempotencyStore`] can be plugged in; its
//! [`reserve`](IdempotencyStore::reserve) must be atomic.
//!
//! Build the store and the middleware once, outside `HttpServer::new`: its closure runs once
//! per worker, and a per-worker in-memory store would let every worker run the same request
//! once. [`MemoryStore::default()`] guards against that mistake by being one store per process;
//! a store from [`MemoryStore::builder()`] is a new one each time.
//!
//! With the `postgres` feature, `PostgresStore` keeps keys in a table, durable and shared by
//! every instance on the database, and its `IdempotentTransaction` extractor lets a handler
//! write in the transaction that also commits its key's record: its effects exist if and only
//! if the record does.
//!
//! # Observability
//!
//! Every keyed request runs in one `idempotency` [tracing](https://docs.rs/tracing) span with its
//! `outcome` and a 12-digit digest of its key (never the key in clear); the
//! [metrics](https://docs.rs/metrics) facade receives `idempotency_requests_total{outcome}`,
//! `idempotency_store_errors_total{operation}` and
//! `idempotency_store_duration_seconds{operation}`. `log` users keep seeing warnings and errors
//! through tracing's `log` feature.
//!
//! # Operating it
//!
//! [`IdempotencyMiddleware::admin`] gives support tools, [`IdempotencyAdmin`]: look up what a
//! client's key holds (in flight, or the stored status and body) and purge it so that the next
//! retry runs, naming the request with a [`KeyTarget`] (method, path, key, caller scope, named
//! store) that is encoded as the middleware encodes it. Every store implements the underlying
//! [`IdempotencyStore::inspect`] and [`IdempotencyStore::purge`].
//!
//! # Crate features
//!
//! - `redis`: `RedisStore`, on the [redis](https://docs.rs/redis) crate (tokio).
//! - `redis-cluster`: `RedisStore::cluster` and `RedisStore::cluster_builder`, the same store
//!   on a Redis Cluster (the redis crate's async cluster connection); implies `redis`.
//! - `postgres`: `PostgresStore`, `IdempotentTransaction` (and `MaybeIdempotentTransaction`) and `ExpiryJob`, on the
//!   [sqlx](https://docs.rs/sqlx) crate (tokio).
//! - `test-suite`: `storage::conformance`, the checks every store passes, for the tests of
//!   a custom [`IdempotencyStore`].
//!
//! # Customising keys
//!
//! [`IdempotencyMiddlewareBuilder`] sets the header name, the caller [`CallerScope`], the
//! [`KeyEncoder`] (with [`PythonKeyEncoder`] for stores shared with the Django package), the
//! [`Fingerprinter`], the stored statuses, the replay status, lock and lease timings, body
//! limits and the store-outage policy:
//!
//! ```
//! use std::time::Duration;
//! use idempotency_actix::{IdempotencyMiddleware, InFlightStatus, MemoryStore, ReplayStatus};
//! use actix_web::http::StatusCode;
//!
//! let middleware = IdempotencyMiddleware::builder(MemoryStore::default())
//!     .header_name("HTTP_IDEMPOTENCY_KEY") // Django spelling, converted
//!     .replay_status(ReplayStatus::Fixed(StatusCode::CONFLICT))
//!     .store_on_statuses(200..=299)
//!     .lock_timeout(Duration::from_millis(250))
//!     .lock_timeout_status(InFlightStatus::Locked)
//!     .record_ttl(Duration::from_secs(3600))
//!     .build()
//!     .expect("valid configuration");
//! # let _ = middleware;
//! ```
//!
//! # When keys are settled
//!
//! A route with a policy (every attribute) settles its key innermost on the route, after every
//! middleware on it, authentication included, in whatever order the `wrap`s are registered; its
//! answers are ordinary responses that outer middleware (`Logger`, `DefaultHeaders`, CORS) see.
//!
//! In [`Mode::Enforce`], a route without a policy is settled by [`IdempotencyMiddleware`] right
//! after routing, before its handler runs, whatever the handler reads: register the middleware
//! first on the app, and first on every scope whose middleware authenticates. If the caller
//! scope changes after a key was settled, that response is not stored and the route's keyed
//! requests are refused (500 `misconfigured`) from then on: never another caller's response.
//!
//! # Guide
//!
//! The detail lives in the [guide], one page per topic (the repository's `docs/*.md`, with
//! their examples compiled here):
//!
//! - [The guarantee, precisely][guide::guarantee]
//! - [Handler attributes, modes, and when the key is settled][guide::modes_and_attributes]
//! - [Caller scope and request identity][guide::caller_scope]
//! - [Several instances: Redis][guide::redis]
//! - [Redis Cluster][guide::redis_cluster]
//! - [PostgreSQL: records in the handler's own transaction][guide::postgres]
//! - [Deploying][guide::deploying]
//! - [Operating it][guide::operating]
//! - [Settings (Python → Rust)][guide::settings]
//! - [Your own store: the conformance suite][guide::custom_stores]
//! - [Design decisions][guide::design_decisions]
//! - [Benchmarks][guide::benchmarks]

#![forbid(unsafe_code)]
// `doc_cfg` (not `doc_auto_cfg`, which newer nightlies removed): each feature-gated item says
// which feature it needs on docs.rs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod admin;
mod body;
mod config;
mod context;
mod encoder;
mod error;
mod fingerprint;
mod flow;
pub mod guide;
mod joined;
mod key;
mod key_extractor;
mod manual;
mod middleware;
mod observe;
mod outcome;
mod policy;
pub mod problems;
mod replay;
mod scope;
mod scope_check;
mod startup;
pub mod storage;
mod unclaimed;
mod upkeep;

pub use admin::{IdempotencyAdmin, KeyTarget};
pub use config::{IdempotencyMiddlewareBuilder, InFlightStatus, Mode, ReplayStatus, StoreOutage};
pub use encoder::{DefaultKeyEncoder, KeyEncoder, KeyParts, PythonKeyEncoder};
pub use error::{ConfigError, IdempotencyError, StoreError, PROBLEM_TYPE_BASE};
pub use fingerprint::{
    BodyFingerprint, Fingerprint, Fingerprinter, JsonFingerprint, NoFingerprint,
};
pub use idempotency_macros::{idempotency_exempt, idempotency_manual, idempotent};
pub use key::{IdempotencyKey, InvalidKey, MAX_KEY_LENGTH};
pub use manual::{ManualIdempotency, PriorResponse};
pub use middleware::IdempotencyMiddleware;
pub use outcome::IdempotencyOutcome;
pub use policy::{IdempotencyPolicy, PolicyKind};
pub use replay::REPLAYED_HEADER;
pub use scope::{AuthorizationScope, CallerScope, ExtensionScope, GlobalScope, HeaderScope};
pub use startup::explain_startup_error;
#[cfg(feature = "postgres")]
pub use storage::{
    ExpiryJob, IdempotentTransaction, MaybeIdempotentTransaction, PostgresStore,
    PostgresStoreBuilder,
};
pub use storage::{IdempotencyStore, MemoryStore};
#[cfg(feature = "redis")]
pub use storage::{RedisStore, RedisStoreBuilder};

/// The services the middleware and the route policies wrap around a handler: they appear in
/// `Transform` implementations (as actix-web's own middleware services live in
/// `actix_web::dev`), and no application needs to name them.
pub mod dev {
    pub use crate::flow::Detached;
    pub use crate::middleware::InnerIdempotencyMiddleware;
    pub use crate::policy::IdempotencyPolicyService;
}

/// Paths used by the code the handler attributes generate. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::policy::IdempotencyPolicy;
}

/// Compiles the README's Rust examples, so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
