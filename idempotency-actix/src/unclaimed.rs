//! The enforce-mode default, for requests that routing handed to a route without a policy: the
//! key is settled right after routing, before the handler can run, whatever the handler reads.

use std::{
    cell::RefCell,
    fmt,
    future::{poll_fn, Future},
    pin::pin,
    rc::Rc,
    sync::Arc,
    task::Poll,
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::ServiceResponse,
    http::{header::HeaderMap, StatusCode},
    Error, HttpResponse, ResponseError,
};

use crate::{
    context::{RequestFacts, RouteSlot},
    flow::{self, KeyedPolicy, SettlePoint, Start},
};

/// Settles the key of a request no route claimed while routing ran, then awaits the routed
/// request under its reservation.
///
/// The request belongs to the route by now, so a refusal or a replay travels as the error of
/// the routed request: the client gets it whole, but middleware registered outside this one
/// (`Logger`, `DefaultHeaders`, CORS) see an error, not a response. Routes with a policy answer
/// with ordinary responses.
pub(crate) async fn settle<F, B>(
    slot: Rc<RouteSlot>,
    facts: RequestFacts,
    route: Option<String>,
    routed: F,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
    B: MessageBody + 'static,
{
    if !slot.settle_by_default() {
        return routed.await.map(ServiceResponse::map_into_left_body);
    }
    let config = Arc::clone(&slot.config);
    let point = SettlePoint {
        policy: KeyedPolicy::Required,
        store: None,
        latches: Arc::clone(&config.default_latches),
        route,
        in_transaction: false,
    };
    match flow::start(config, point, facts, slot.take_held()).await {
        Start::Respond(answer) => Err(Answered(RefCell::new(Some(answer))).into()),
        Start::Proceed {
            payload, pending, ..
        } => {
            slot.hold(payload);
            *slot.default_run() = pending;
            let result = renewing(&slot, routed).await;
            // Taken by a route reached later (a middleware between deferred routing), which
            // settled the key itself; or none was made (a store outage under fail-open).
            let Some(pending) = slot.default_run().take() else {
                return result.map(ServiceResponse::map_into_left_body);
            };
            pending.settle(result).await
        }
    }
}

/// Awaits the routed request, renewing meanwhile the reservation it runs under: the handler
/// may outlast a lease.
async fn renewing<F: Future>(slot: &RouteSlot, routed: F) -> F::Output {
    let mut routed = pin!(routed);
    poll_fn(|cx| {
        if let Poll::Ready(output) = routed.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        if let Some(pending) = &mut *slot.default_run() {
            pending.poll_renewal(cx);
        }
        Poll::Pending
    })
    .await
}

/// The default's refusal or replay, travelling as the error of the routed request (the only way
/// out once the request belongs to the route); the client gets the response it holds.
pub(crate) struct Answered(RefCell<Option<HttpResponse>>);

impl Answered {
    /// The headers of the answer, for the middleware's own timing headers.
    pub(crate) fn edit_headers(&self, edit: impl FnOnce(&mut HeaderMap)) {
        if let Some(answer) = &mut *self.0.borrow_mut() {
            edit(answer.headers_mut());
        }
    }
}

impl ResponseError for Answered {
    fn status_code(&self) -> StatusCode {
        self.0
            .borrow()
            .as_ref()
            .map_or(StatusCode::INTERNAL_SERVER_ERROR, HttpResponse::status)
    }

    fn error_response(&self) -> HttpResponse {
        self.0
            .borrow_mut()
            .take()
            .unwrap_or_else(|| HttpResponse::InternalServerError().finish())
    }
}

impl fmt::Debug for Answered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Answered({})", self.status_code())
    }
}

impl fmt::Display for Answered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "answered by IdempotencyMiddleware ({})",
            self.status_code()
        )
    }
}
