//! What `#[idempotency_manual]` handlers get to decide for themselves.

use std::future::{ready, Ready};

use actix_web::{
    dev::Payload,
    http::{header::HeaderMap, StatusCode},
    FromRequest, HttpMessage, HttpRequest,
};
use bytes::Bytes;

use crate::{replay::stored_headers, storage::StoredResponse, IdempotencyError, IdempotencyKey};

/// The response stored under a key by an earlier request.
#[derive(Debug, Clone)]
pub struct PriorResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl PriorResponse {
    pub(crate) fn from_stored(stored: &StoredResponse) -> Self {
        let mut headers = HeaderMap::new();
        for (name, value) in stored_headers(stored) {
            headers.append(name, value);
        }
        Self {
            status: StatusCode::from_u16(stored.status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            headers,
            body: stored.body.clone(),
        }
    }

    /// The stored status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The stored body bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// Extractor for handlers marked `#[idempotency_manual]`: whether the key was seen before, and
/// the response stored for it. The handler always runs and decides what to do.
///
/// The first storable response under a new key is stored; a handler answering a repeated key
/// never overwrites it. Using the extractor on a handler that is not manual, or without
/// [`IdempotencyMiddleware`](crate::IdempotencyMiddleware), fails with a 500 problem response
/// ([`IdempotencyError::Misconfigured`]), never a panic.
///
/// ```no_run
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::{idempotency_manual, ManualIdempotency};
///
/// #[idempotency_manual]
/// #[post("/transfers")]
/// async fn transfer(idempotency: ManualIdempotency) -> HttpResponse {
///     if idempotency.key_exists() {
///         return HttpResponse::Ok().body("already done");
///     }
///     HttpResponse::Created().body("transferred")
/// }
/// ```
#[derive(Debug, Clone)]
pub struct ManualIdempotency {
    key: IdempotencyKey,
    key_exists: bool,
    payload_matches: bool,
    prior: Option<PriorResponse>,
}

impl ManualIdempotency {
    pub(crate) fn new(
        key: IdempotencyKey,
        key_exists: bool,
        payload_matches: bool,
        prior: Option<PriorResponse>,
    ) -> Self {
        Self {
            key,
            key_exists,
            payload_matches,
            prior,
        }
    }

    /// The client's key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// Whether an earlier request with this key completed (the Python `key_exists`).
    pub fn key_exists(&self) -> bool {
        self.key_exists
    }

    /// Whether this request's payload matches the earlier one's (always `true` for a new key).
    pub fn payload_matches(&self) -> bool {
        self.payload_matches
    }

    /// The response stored for the key, if any (`None` for a new key, or when the earlier
    /// response was too large to store).
    pub fn prior_response(&self) -> Option<&PriorResponse> {
        self.prior.as_ref()
    }
}

impl FromRequest for ManualIdempotency {
    type Error = IdempotencyError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(req.extensions().get::<Self>().cloned().ok_or(IdempotencyError::Misconfigured(
            "ManualIdempotency is only available in #[idempotency_manual] handlers behind IdempotencyMiddleware",
        )))
    }
}
