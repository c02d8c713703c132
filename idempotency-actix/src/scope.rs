//! Caller scopes: whose key space a request's key lives in.

use std::{fmt, marker::PhantomData};

use actix_web::{
    http::header::{HeaderName, AUTHORIZATION},
    HttpMessage, HttpRequest,
};
use sha2::{Digest, Sha256};

/// Decides whose key space a request's key lives in, so that two callers using the same key
/// never share (or see) each other's stored responses.
///
/// Implemented for closures `Fn(&HttpRequest) -> Option<String>`. The default is
/// [`AuthorizationScope`]; [`ExtensionScope`] reads the identity an authentication middleware
/// put in the request extensions, [`HeaderScope`] an API-key header.
///
/// **Callers without an identity** (the scope returns `None`) share one unscoped key space:
/// two anonymous callers sending the same key and payload get one run and one response. Put
/// authentication in front of routes where that matters, or return a value for every caller.
///
/// The scope is computed where the key is settled: by a route's policy (`#[idempotent]` and
/// friends) after every middleware on the route ran, so it sees what authentication inserted.
/// For routes without a policy in enforce mode it is computed where the middleware sits, right
/// after routing; if it turns out to change by the time the handler answers (authentication
/// runs further in), the response is not stored and that route's keyed requests are refused
/// (500, `misconfigured`) rather than scoped wrongly.
///
/// ```
/// use actix_web::{HttpMessage, HttpRequest};
/// use idempotency_actix::{CallerScope, IdempotencyMiddleware, MemoryStore};
///
/// #[derive(Clone)]
/// struct UserId(u64);
///
/// let middleware = IdempotencyMiddleware::builder(MemoryStore::default())
///     .caller_scope(|req: &HttpRequest| req.extensions().get::<UserId>().map(|u| u.0.to_string()))
///     .build()
///     .unwrap();
/// # let _ = middleware;
/// ```
pub trait CallerScope: Send + Sync + 'static {
    /// The caller's scope for this request, or `None` for the shared space.
    fn scope(&self, req: &HttpRequest) -> Option<String>;
}

impl<F> CallerScope for F
where
    F: Fn(&HttpRequest) -> Option<String> + Send + Sync + 'static,
{
    fn scope(&self, req: &HttpRequest) -> Option<String> {
        self(req)
    }
}

/// The default scope: the SHA-256 of the `Authorization` header value, so credentials are
/// never stored; requests without the header share the unscoped space.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizationScope;

impl AuthorizationScope {
    /// The scope of a caller whose `Authorization` header value is `authorization` (the whole
    /// value, `Bearer ..` included): its lower-case hex SHA-256. For operators who look a key
    /// up with [`IdempotencyAdmin`](crate::IdempotencyAdmin).
    ///
    /// ```
    /// use idempotency_actix::AuthorizationScope;
    ///
    /// let scope = AuthorizationScope::scope_of(b"Bearer alice");
    /// assert_eq!(scope.len(), 64);
    /// ```
    pub fn scope_of(authorization: &[u8]) -> String {
        format!("{:x}", Sha256::digest(authorization))
    }
}

impl CallerScope for AuthorizationScope {
    fn scope(&self, req: &HttpRequest) -> Option<String> {
        let value = req.headers().get(AUTHORIZATION)?;
        Some(Self::scope_of(value.as_bytes()))
    }
}

/// The SHA-256 of a header's value, for callers identified by a header such as `X-Api-Key`;
/// requests without it share the unscoped space.
///
/// ```
/// use idempotency_actix::{HeaderScope, IdempotencyMiddleware, MemoryStore};
///
/// let middleware = IdempotencyMiddleware::builder(MemoryStore::default())
///     .caller_scope(HeaderScope::new("x-api-key").expect("a valid header name"))
///     .build();
/// assert!(middleware.is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct HeaderScope {
    name: HeaderName,
}

impl HeaderScope {
    /// The scope of the header `name`, or `None` if it is not a valid header name.
    pub fn new(name: &str) -> Option<Self> {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        Some(Self { name })
    }
}

impl CallerScope for HeaderScope {
    fn scope(&self, req: &HttpRequest) -> Option<String> {
        let value = req.headers().get(&self.name)?;
        Some(format!("{:x}", Sha256::digest(value.as_bytes())))
    }
}

/// The identity an authentication middleware inserted in the request extensions as a `T`,
/// turned into a scope by `identify`; requests without a `T` share the unscoped space.
///
/// ```
/// use idempotency_actix::{ExtensionScope, IdempotencyMiddleware, MemoryStore};
///
/// #[derive(Clone)]
/// struct User { id: u64 }
///
/// let middleware = IdempotencyMiddleware::builder(MemoryStore::default())
///     .caller_scope(ExtensionScope::new(|user: &User| user.id.to_string()))
///     .build();
/// assert!(middleware.is_ok());
/// ```
pub struct ExtensionScope<T, F> {
    identify: F,
    identity: PhantomData<fn(&T)>,
}

impl<T, F> ExtensionScope<T, F>
where
    T: 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    /// The scope `identify` makes of the request's `T` extension.
    pub fn new(identify: F) -> Self {
        Self {
            identify,
            identity: PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for ExtensionScope<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtensionScope")
            .field("extension", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, F> CallerScope for ExtensionScope<T, F>
where
    T: 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    fn scope(&self, req: &HttpRequest) -> Option<String> {
        req.extensions().get::<T>().map(&self.identify)
    }
}

/// No scoping: every caller shares one key space. Only for services whose callers all trust
/// each other (for example a single internal client).
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalScope;

impl CallerScope for GlobalScope {
    fn scope(&self, _req: &HttpRequest) -> Option<String> {
        None
    }
}
