//! Operator tools: what a client's key holds, and freeing it, computed the way the middleware
//! computes its storage key.

use std::sync::Arc;

use actix_web::http::Method;
use bytes::Bytes;

use crate::{
    config::Config, encoder::KeyParts, storage::KeyState, IdempotencyKey, IdempotencyMiddleware,
    StoreError,
};

/// The request a support question is about: a client's key, on a route, for a caller.
///
/// The middleware stores a request under its configured [`KeyEncoder`](crate::KeyEncoder)'s
/// encoding of these parts; a target names the same parts so that
/// [`IdempotencyAdmin`] finds the same storage key.
///
/// - **method** and **path**: the request's method, and its path as the router matched it
///   (`/orders`, without the query string).
/// - **key**: the client's `Idempotency-Key` value.
/// - **scope**: what the configured [`CallerScope`](crate::CallerScope) returned for the
///   caller. The default, [`AuthorizationScope`](crate::AuthorizationScope), returns the
///   lower-case hex SHA-256 of the caller's whole `Authorization` header value, which
///   [`AuthorizationScope::scope_of`](crate::AuthorizationScope::scope_of) computes; callers
///   without the header, and [`GlobalScope`](crate::GlobalScope), have no scope (`None`, the
///   default here).
/// - **store**: the name of the store the route's policy names (`#[idempotent(store = "..")]`),
///   or `None` (the default) for the middleware's main store.
/// - **body** and **authorization**: only for encoders that put them in the key.
///   [`PythonKeyEncoder`](crate::PythonKeyEncoder) hashes the request body and the raw
///   `Authorization` value: its keys can only be targeted with the exact body bytes and header
///   value the client sent. The default encoder ignores both.
///
/// ```
/// use actix_web::http::Method;
/// use idempotency_actix::{AuthorizationScope, IdempotencyKey, KeyTarget};
///
/// let key = IdempotencyKey::try_from("order-1").expect("a valid key");
/// let target = KeyTarget::new(Method::POST, "/orders", key)
///     .scope(Some(AuthorizationScope::scope_of(b"Bearer alice-token")));
/// # let _ = target;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct KeyTarget {
    method: Method,
    path: String,
    key: IdempotencyKey,
    scope: Option<String>,
    store: Option<String>,
    body: Bytes,
    authorization: Option<Bytes>,
}

impl KeyTarget {
    /// The request `method path` sent with `key`, unscoped, on the main store.
    pub fn new(method: Method, path: impl Into<String>, key: IdempotencyKey) -> Self {
        Self {
            method,
            path: path.into(),
            key,
            scope: None,
            store: None,
            body: Bytes::new(),
            authorization: None,
        }
    }

    /// The caller's scope, as the configured [`CallerScope`](crate::CallerScope) produces it.
    ///
    /// Defaults to `None` (callers without an identity share the unscoped space).
    pub fn scope(mut self, scope: Option<String>) -> Self {
        self.scope = scope;
        self
    }

    /// The named store the route uses.
    ///
    /// Defaults to `None`, the middleware's main store.
    pub fn store(mut self, store: Option<String>) -> Self {
        self.store = store;
        self
    }

    /// The request body, for encoders that put it in the key
    /// ([`PythonKeyEncoder`](crate::PythonKeyEncoder)).
    ///
    /// Defaults to empty.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The raw `Authorization` header value, for encoders that put it in the key
    /// ([`PythonKeyEncoder`](crate::PythonKeyEncoder)).
    ///
    /// Defaults to `None`.
    pub fn authorization(mut self, authorization: Option<Bytes>) -> Self {
        self.authorization = authorization;
        self
    }
}

/// Support tools for one middleware's stores: answers "did this request run, and what did it
/// answer?" and frees a stuck key. Cheap to clone; get one from
/// [`IdempotencyMiddleware::admin`].
///
/// Storage keys are computed with the middleware's own [`KeyEncoder`](crate::KeyEncoder), so a
/// [`KeyTarget`] names a request the way a client sent it.
///
/// These are operator tools: expose them only behind your own authorization (the
/// `orders` example guards its admin route with a bearer token).
///
/// ```
/// use actix_web::http::Method;
/// use idempotency_actix::{IdempotencyKey, IdempotencyMiddleware, KeyTarget, MemoryStore};
///
/// # actix_web::rt::System::new().block_on(async {
/// let middleware = IdempotencyMiddleware::new(MemoryStore::builder().build());
/// let admin = middleware.admin();
/// let key = IdempotencyKey::try_from("order-1").expect("a valid key");
/// let target = KeyTarget::new(Method::POST, "/orders", key);
/// assert!(admin.lookup(&target).await?.is_none(), "nothing ran under this key");
/// assert!(!admin.purge(&target).await?, "nothing to free");
/// # Ok::<(), idempotency_actix::StoreError>(())
/// # }).expect("the example runs");
/// ```
#[derive(Clone)]
pub struct IdempotencyAdmin {
    config: Arc<Config>,
}

impl std::fmt::Debug for IdempotencyAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyAdmin").finish_non_exhaustive()
    }
}

impl IdempotencyMiddleware {
    /// Whether every store of this middleware answers (see
    /// [`IdempotencyStore::health`](crate::IdempotencyStore::health)), for a readiness probe:
    /// the first store that does not, with why.
    ///
    /// ```
    /// use actix_web::{web, HttpResponse};
    /// use idempotency_actix::{IdempotencyMiddleware, MemoryStore};
    ///
    /// async fn ready(idempotency: web::Data<IdempotencyMiddleware>) -> HttpResponse {
    ///     match idempotency.health().await {
    ///         Ok(()) => HttpResponse::Ok().finish(),
    ///         Err(why) => HttpResponse::ServiceUnavailable().body(why.to_string()),
    ///     }
    /// }
    /// # actix_web::rt::System::new().block_on(async {
    /// let idempotency = IdempotencyMiddleware::new(MemoryStore::default());
    /// assert!(idempotency.health().await.is_ok());
    /// # let _ = ready;
    /// # });
    /// ```
    pub async fn health(&self) -> Result<(), crate::StoreError> {
        let config = self.shared_config();
        for store in config.stores() {
            store.health().await?;
        }
        Ok(())
    }

    /// Support tools on this middleware's stores, with its key encoder: see
    /// [`IdempotencyAdmin`].
    pub fn admin(&self) -> IdempotencyAdmin {
        IdempotencyAdmin {
            config: self.shared_config(),
        }
    }
}

impl IdempotencyAdmin {
    /// The key the store keeps `target` under, as the middleware computes it.
    pub fn storage_key(&self, target: &KeyTarget) -> String {
        self.config.encoder.encode(
            &KeyParts::new(&target.key, &target.method, &target.path, &target.body)
                .scope(target.scope.as_deref())
                .authorization(target.authorization.as_deref()),
        )
    }

    /// What `target`'s key holds: `None` when no request holds or completed it (never sent,
    /// expired, released after a failure, or purged), else the request in flight or its
    /// stored response. Changes nothing.
    ///
    /// Fails with [`StoreError::UnknownStore`] when the target names a store the middleware
    /// does not have, and with the store's error when it cannot be reached.
    pub async fn lookup(&self, target: &KeyTarget) -> Result<Option<KeyState>, StoreError> {
        let key = self.storage_key(target);
        self.store(target)?.inspect(&key).await
    }

    /// Deletes whatever `target`'s key holds (a reservation or a record) and says whether
    /// something was there: the next request with the key runs its handler.
    ///
    /// Purging the reservation of a request whose handler **still runs** lets a retry run
    /// alongside it; do it for a key stuck behind a handler that will not finish (a hung
    /// dependency, a lease configured far too long). Purging a completed key makes the next
    /// retry run the operation again.
    ///
    /// Fails as [`lookup`](Self::lookup) does.
    pub async fn purge(&self, target: &KeyTarget) -> Result<bool, StoreError> {
        let key = self.storage_key(target);
        self.store(target)?.purge(&key).await
    }

    fn store(&self, target: &KeyTarget) -> Result<&dyn crate::storage::DynStore, StoreError> {
        self.config
            .store(target.store.as_deref())
            .map(|store| &**store)
            .ok_or_else(|| StoreError::UnknownStore(target.store.clone().unwrap_or_default()))
    }
}
