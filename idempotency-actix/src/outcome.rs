//! How a running handler's request stands with its key, for the handler to read.

use actix_web::{dev::Payload, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{ready, Ready};

use crate::IdempotencyError;

/// Why a handler is running, as far as idempotency goes: read it with this extractor on a
/// route with a policy (`#[idempotent]`, `#[idempotent(optional)]`, `#[idempotency_manual]`,
/// [`IdempotencyPolicy`](crate::IdempotencyPolicy)). Elsewhere, extraction fails with 500
/// [`misconfigured`](crate::problems#misconfigured).
///
/// A payment handler may, for instance, refuse to charge when it runs
/// [`Unprotected`](Self::Unprotected).
///
/// ```
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::{idempotent, IdempotencyOutcome};
///
/// #[idempotent]
/// #[post("/payments")]
/// async fn pay(outcome: IdempotencyOutcome) -> HttpResponse {
///     if outcome == IdempotencyOutcome::Unprotected {
///         return HttpResponse::ServiceUnavailable().finish();
///     }
///     HttpResponse::Created().finish()
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyOutcome {
    /// The request's key is reserved for this run; the response will be stored and replayed
    /// to its retries.
    Fresh,
    /// Manual mode, and the key was used before: the handler decides from
    /// [`ManualIdempotency`](crate::ManualIdempotency).
    Existing,
    /// The store was unavailable and the middleware fails open: this run is not protected,
    /// and its response will not be stored.
    Unprotected,
    /// An optional-key route called without a key.
    Unkeyed,
}

impl IdempotencyOutcome {
    /// The outcome of a request that proceeds to its handler.
    pub(crate) fn of(reserved: bool, manual_key_exists: Option<bool>, has_key: bool) -> Self {
        match (reserved, manual_key_exists, has_key) {
            (true, _, _) => Self::Fresh,
            (false, Some(true), _) => Self::Existing,
            (false, _, true) => Self::Unprotected,
            (false, _, false) => Self::Unkeyed,
        }
    }
}

impl FromRequest for IdempotencyOutcome {
    type Error = IdempotencyError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Self>()
                .copied()
                .ok_or(IdempotencyError::Misconfigured(
                    "IdempotencyOutcome needs a route with an idempotency policy (#[idempotent])",
                )),
        )
    }
}
