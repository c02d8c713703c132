//! The request's idempotency key, for the handler: to forward it to a payment provider or to
//! put it in a log line of the handler's own.

use std::rc::Rc;

use actix_web::{dev::Payload, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{ready, Ready};

use crate::{context::RouteSlot, key::parse_key_header, IdempotencyError, IdempotencyKey};

/// Reads the key the middleware read, under the configured header name and with the same
/// validation: a handler that takes an [`IdempotencyKey`] gets exactly the key its request is
/// settled under. On a request without one (an optional-key route called without it), the
/// extraction fails with 400 [`missing-key`](crate::problems#missing-key); take
/// `Option<IdempotencyKey>` there. Without [`IdempotencyMiddleware`](crate::IdempotencyMiddleware)
/// on the app it fails with 500 [`misconfigured`](crate::problems#misconfigured).
///
/// ```
/// use actix_web::{post, HttpResponse};
/// use idempotency_actix::{idempotent, IdempotencyKey};
///
/// #[idempotent]
/// #[post("/payments")]
/// async fn pay(key: IdempotencyKey) -> HttpResponse {
///     // e.g. the provider's own idempotency header: the same key for every retry.
///     HttpResponse::Created().body(format!("charged under {key}"))
/// }
/// ```
impl FromRequest for IdempotencyKey {
    type Error = IdempotencyError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let header = req
            .extensions()
            .get::<Rc<RouteSlot>>()
            .map(|slot| slot.config.header.clone());
        let Some(header) = header else {
            return ready(Err(IdempotencyError::Misconfigured(
                "IdempotencyMiddleware is not registered on the app (App::wrap)",
            )));
        };
        ready(match parse_key_header(req.headers(), &header) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err(IdempotencyError::MissingKey {
                header: header.as_str().to_owned(),
            }),
            Err(reason) => Err(IdempotencyError::InvalidKey {
                header: header.as_str().to_owned(),
                reason,
            }),
        })
    }
}
