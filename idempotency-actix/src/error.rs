//! Client-facing errors, rendered as RFC 9457 problem details.

use std::time::Duration;

use actix_web::{
    http::{
        header::{self, HeaderValue},
        StatusCode,
    },
    HttpResponse, ResponseError,
};
use serde::Serialize;

use crate::InvalidKey;

/// The base of every problem `type` URI this crate produces: the [`problems`](crate::problems)
/// page of this crate's documentation.
///
/// Each variant of [`IdempotencyError`] appends a stable slug to it; clients may match on the
/// full URI.
pub const PROBLEM_TYPE_BASE: &str =
    "https://docs.rs/idempotency-actix/latest/idempotency_actix/problems#";

/// Why a request did not reach its handler, or why its outcome could not be recorded.
///
/// Every variant renders as an `application/problem+json` response (RFC 9457) carrying a stable
/// `type` URI, a `title`, the `status`, a `detail` and, for parity with the Python package, an
/// `error` member such as `"Bad Request (400)"`. Internal causes (store errors) are logged, never
/// sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The route requires an idempotency key and the request carried none (400).
    #[error("this request requires an `{header}` header")]
    MissingKey {
        /// The configured header name.
        header: String,
    },
    /// The idempotency key header is malformed, empty, too long, repeated, or not visible ASCII (400).
    #[error("invalid `{header}` header: {reason}")]
    InvalidKey {
        /// The configured header name.
        header: String,
        /// What is wrong with it.
        reason: InvalidKey,
    },
    /// The key was already used for a request with a different payload (422).
    #[error("this idempotency key was already used with a different request payload")]
    PayloadMismatch,
    /// A request with the same key is still being processed (409, or 423 when configured).
    #[error("a request with this idempotency key is still being processed")]
    InFlight {
        /// The status sent: 409 Conflict by default, 423 Locked where configured.
        status: StatusCode,
        /// How long the client should wait before retrying.
        retry_after: Duration,
    },
    /// The request body is larger than the configured limit for keyed requests (413).
    #[error("the request body exceeds the {limit} byte limit for idempotent requests")]
    BodyTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The request body could not be read (400).
    #[error("the request body could not be read")]
    BodyUnreadable,
    /// The operation completed, but its response was too large to be stored, so it cannot be
    /// replayed (409).
    #[error(
        "the request with this idempotency key completed, but its response was not kept for replay"
    )]
    ResponseNotReplayable,
    /// The key's record cannot be read by this version (corrupt, or written in another record
    /// format): the operation may have run, so it is not run again, and it cannot be replayed
    /// (409).
    #[error(
        "the request with this idempotency key was processed, but its record cannot be read by this server"
    )]
    RecordUnreadable,
    /// The handler ran in its own transaction, but its reservation had lapsed and another
    /// request had taken the key before it could commit: its transaction was rolled back, so
    /// none of its effects happened (409).
    #[error(
        "another request with this idempotency key took over while this one ran; this one's effects were rolled back"
    )]
    ReservationLost,
    /// The idempotency store could not be reached and the middleware fails closed (503).
    #[error("the idempotency store is unavailable; retry later")]
    StoreUnavailable,
    /// The middleware is missing or registered in the wrong order (500). The log says which.
    #[error("idempotency middleware misconfigured: {0}")]
    Misconfigured(&'static str),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    error: String,
}

impl IdempotencyError {
    /// The stable slug appended to [`PROBLEM_TYPE_BASE`] to form this error's `type`.
    pub fn slug(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "missing-key",
            Self::InvalidKey { .. } => "invalid-key",
            Self::PayloadMismatch => "payload-mismatch",
            Self::InFlight { status, .. } if *status == StatusCode::LOCKED => "locked",
            Self::InFlight { .. } => "in-flight",
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::BodyUnreadable => "body-unreadable",
            Self::ResponseNotReplayable => "response-not-replayable",
            Self::RecordUnreadable => "record-unreadable",
            Self::ReservationLost => "reservation-lost",
            Self::StoreUnavailable => "store-unavailable",
            Self::Misconfigured(_) => "misconfigured",
        }
    }

    /// The full problem `type` URI of this error under [`PROBLEM_TYPE_BASE`]: the base
    /// followed by the slug. A middleware built with
    /// [`problem_type_base`](crate::IdempotencyMiddlewareBuilder::problem_type_base) answers
    /// with its own base instead.
    pub fn problem_type(&self) -> String {
        format!("{PROBLEM_TYPE_BASE}{}", self.slug())
    }

    /// The problem response with `base` in front of its `type` slug: how a middleware (or an
    /// extractor on one of its routes) answers with the base it was configured with.
    pub(crate) fn to_response(&self, base: &str) -> HttpResponse {
        let status = self.status_code();
        let problem = Problem {
            kind: format!("{base}{}", self.slug()),
            title: self.title(),
            status: status.as_u16(),
            detail: self.to_string(),
            error: format!(
                "{} ({})",
                status.canonical_reason().unwrap_or("Error"),
                status.as_u16()
            ),
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        let retry_after_seconds = match self {
            Self::InFlight { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            Self::StoreUnavailable | Self::ReservationLost => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after_seconds {
            response.insert_header((header::RETRY_AFTER, seconds));
        }
        // Serialising a struct of strings and integers cannot fail; fall back to an empty
        // object rather than panic all the same.
        response.body(serde_json::to_vec(&problem).unwrap_or_else(|_| b"{}".to_vec()))
    }

    fn title(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "Idempotency key missing",
            Self::InvalidKey { .. } => "Idempotency key invalid",
            Self::PayloadMismatch => "Idempotency key reused with another payload",
            Self::InFlight { .. } => "Request with this idempotency key in progress",
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::BodyUnreadable => "Request body unreadable",
            Self::ResponseNotReplayable => "Stored response not replayable",
            Self::RecordUnreadable => "Stored record unreadable",
            Self::ReservationLost => "Request with this idempotency key taken over",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::Misconfigured(_) => "Idempotency middleware misconfigured",
        }
    }
}

impl ResponseError for IdempotencyError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MissingKey { .. } | Self::InvalidKey { .. } | Self::BodyUnreadable => {
                StatusCode::BAD_REQUEST
            }
            Self::PayloadMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight { status, .. } => *status,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ResponseNotReplayable | Self::RecordUnreadable | Self::ReservationLost => {
                StatusCode::CONFLICT
            }
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.to_response(PROBLEM_TYPE_BASE)
    }
}

/// Why a store operation failed. Logged by the middleware, never sent to clients.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or answered with an error.
    #[error("idempotency store backend error: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The backend answered something this version does not understand.
    #[error("idempotency store answered unexpectedly: {0}")]
    Corrupt(String),
    /// The store cannot take one more reservation (a bound on requests in flight). Answered
    /// with 503 whatever the [`StoreOutage`](crate::StoreOutage) policy: a request the store
    /// cannot protect never runs unprotected.
    #[error("idempotency store is full: {0}")]
    Full(String),
    /// An [`IdempotencyAdmin`](crate::IdempotencyAdmin) call named a store the middleware does
    /// not have (see [`KeyTarget::store`](crate::KeyTarget::store)).
    #[error("no idempotency store is registered under the name {0:?}")]
    UnknownStore(String),
}

/// Why a configuration was refused by [`IdempotencyMiddlewareBuilder::build`](crate::IdempotencyMiddlewareBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The key header name is not a valid HTTP header name.
    #[error("`{0}` is not a valid header name")]
    InvalidHeaderName(String),
    /// No status was configured as storable, so nothing would ever be replayed.
    #[error("store_on_statuses is empty: no response would ever be stored")]
    NoStorableStatus,
    /// A configured status code is outside 100..=999.
    #[error("{0} is not a valid HTTP status code")]
    InvalidStatus(u16),
    /// The reservation lease must be shorter than the record TTL.
    #[error("the reservation lease ({lease:?}) must be shorter than the record TTL ({ttl:?})")]
    LeaseNotShorterThanTtl {
        /// The configured lease.
        lease: Duration,
        /// The configured record TTL.
        ttl: Duration,
    },
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// Two named stores share a name.
    #[error("the store name `{0}` is registered twice")]
    DuplicateStoreName(String),
}

#[cfg(test)]
mod tests {
    use actix_web::body::to_bytes;

    use super::*;

    #[actix_rt::test]
    async fn renders_problem_json_with_stable_type() {
        let response = IdempotencyError::PayloadMismatch.error_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let body = to_bytes(response.into_body()).await.unwrap_or_default();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(json["type"], format!("{PROBLEM_TYPE_BASE}payload-mismatch"));
        assert_eq!(json["status"], 422);
        assert_eq!(json["error"], "Unprocessable Entity (422)");
    }

    #[test]
    fn in_flight_carries_retry_after_and_locked_variant_has_its_own_type() {
        let conflict = IdempotencyError::InFlight {
            status: StatusCode::CONFLICT,
            retry_after: Duration::from_millis(200),
        };
        let response = conflict.error_response();
        assert_eq!(
            response
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        let locked = IdempotencyError::InFlight {
            status: StatusCode::LOCKED,
            retry_after: Duration::from_secs(3),
        };
        assert_eq!(locked.slug(), "locked");
        assert_eq!(locked.error_response().status(), StatusCode::LOCKED);
    }

    #[test]
    fn every_problem_type_is_documented_on_the_problems_page() {
        let page = include_str!("problems.rs");
        let conflict = |status| IdempotencyError::InFlight {
            status,
            retry_after: Duration::from_secs(1),
        };
        let all = [
            IdempotencyError::MissingKey {
                header: "k".to_owned(),
            },
            IdempotencyError::InvalidKey {
                header: "k".to_owned(),
                reason: InvalidKey::Empty,
            },
            IdempotencyError::PayloadMismatch,
            conflict(StatusCode::CONFLICT),
            conflict(StatusCode::LOCKED),
            IdempotencyError::BodyTooLarge { limit: 1 },
            IdempotencyError::BodyUnreadable,
            IdempotencyError::ResponseNotReplayable,
            IdempotencyError::RecordUnreadable,
            IdempotencyError::StoreUnavailable,
            IdempotencyError::Misconfigured("m"),
        ];
        for error in all {
            let heading = format!("//! # {}\n", error.slug());
            assert!(
                page.contains(&heading),
                "problems.rs lacks a section for {}",
                error.slug()
            );
        }
    }
}
