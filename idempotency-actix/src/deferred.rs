//! The enforce-mode default for routes without a policy, deferred until the handler reads its
//! body: by then every middleware on the route (authentication included, deferring or not) has
//! run, and no route policy claimed the request.

use std::{
    collections::HashSet,
    future::{poll_fn, Future},
    pin::{pin, Pin},
    rc::Rc,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use actix_web::{
    body::{EitherBody, MessageBody},
    dev::{Payload, ServiceResponse},
    error::{InternalError, PayloadError},
    Error, ResponseError,
};
use bytes::Bytes;
use futures_util::{future::LocalBoxFuture, Stream};
use parking_lot::Mutex;

use crate::{
    context::{Decision, DefaultOutcome, RouteSlot},
    flow::{self, KeyedPolicy, Start},
    IdempotencyError,
};

/// The payload a request carries through routing in enforce mode. Reading it starts the
/// default; until then nothing is reserved, refused or replayed.
pub(crate) fn deferred_default(slot: Rc<RouteSlot>) -> Payload {
    let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
        Box::pin(DeferredDefault {
            slot,
            state: State::Unread,
        });
    Payload::from(stream)
}

struct DeferredDefault {
    slot: Rc<RouteSlot>,
    state: State,
}

enum State {
    Unread,
    Settling(LocalBoxFuture<'static, Start>),
    Body(Payload),
    /// The default answers instead of the handler: one error makes the handler's extractor
    /// fail, so the handler never runs.
    Refusing,
    Answered,
}

impl Stream for DeferredDefault {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Unread => this.state = start(&this.slot),
                State::Settling(settling) => {
                    let Poll::Ready(start) = settling.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    this.state = match start {
                        Start::Respond(answer) => {
                            *this.slot.outcome.borrow_mut() = DefaultOutcome::Answer(answer);
                            State::Refusing
                        }
                        Start::Proceed {
                            payload, pending, ..
                        } => {
                            *this.slot.outcome.borrow_mut() = match pending {
                                Some(pending) => DefaultOutcome::Running(pending),
                                None => DefaultOutcome::Unprotected,
                            };
                            State::Body(payload)
                        }
                    };
                }
                State::Body(payload) => return Pin::new(payload).poll_next(cx),
                State::Refusing => {
                    this.state = State::Answered;
                    return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::other(
                        AnsweredByTheMiddleware,
                    )))));
                }
                State::Answered => return Poll::Ready(None),
            }
        }
    }
}

/// What the handler's body extractor fails with when the default answers instead (a type of
/// its own: a message would be copied into a new string on every replay).
#[derive(Debug, Clone, Copy)]
struct AnsweredByTheMiddleware;

impl std::fmt::Display for AnsweredByTheMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answered by IdempotencyMiddleware")
    }
}

impl std::error::Error for AnsweredByTheMiddleware {}

/// The first read: the default starts, unless a route policy (or an inner registration)
/// already took the request, in which case the real payload is read as it is (through whatever
/// the inner registration and the middleware between wrapped around this stand-in).
fn start(slot: &RouteSlot) -> State {
    if slot.decision.get() != Decision::Pending {
        let held = slot.held_payload.borrow_mut().take();
        return State::Body(held.unwrap_or(Payload::None));
    }
    slot.decision.set(Decision::DefaultStarted);
    let config = std::sync::Arc::clone(&slot.config);
    if config.scope_seen_too_early.load(Ordering::Relaxed) {
        *slot.outcome.borrow_mut() = DefaultOutcome::Answer(scope_too_early().error_response());
        return State::Refusing;
    }
    let Some(facts) = slot.facts.borrow_mut().take() else {
        return State::Body(Payload::None);
    };
    *slot.default_scope.borrow_mut() = facts.scope.clone();
    let payload = slot
        .held_payload
        .borrow_mut()
        .take()
        .unwrap_or(Payload::None);
    State::Settling(Box::pin(flow::start(
        config,
        KeyedPolicy::Required,
        None,
        facts,
        payload,
    )))
}

fn scope_too_early() -> IdempotencyError {
    IdempotencyError::Misconfigured(
        "the caller scope is only known after this middleware ran: register \
         IdempotencyMiddleware inside the authentication, or mark the route #[idempotent]",
    )
}

/// Awaits the routed request, renewing meanwhile the reservation the default makes when the
/// handler reads its body: the handler runs under it, and may outlast a lease.
pub(crate) async fn renewing<F: Future>(slot: &RouteSlot, routed: F) -> F::Output {
    let mut routed = pin!(routed);
    poll_fn(|cx| {
        if let Poll::Ready(output) = routed.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        if let DefaultOutcome::Running(pending) = &mut *slot.outcome.borrow_mut() {
            pending.poll_renewal(cx);
        }
        Poll::Pending
    })
    .await
}

/// Applies the default's decision to the routed request's result: its answer in place of the
/// handler's response (as an ordinary response that every outer middleware sees), or the
/// handler's response settled under its reservation.
pub(crate) async fn apply<B>(
    slot: &RouteSlot,
    result: Result<ServiceResponse<B>, Error>,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    B: MessageBody + 'static,
{
    if slot.decision.get() != Decision::DefaultStarted {
        if slot.decision.get() == Decision::Pending {
            report_unread_body(&result);
        }
        return result.map(ServiceResponse::map_into_left_body);
    }
    let scoped_too_early = match &result {
        Ok(response) => {
            let scope_now = slot.config.scope.scope(response.request());
            scope_now != *slot.default_scope.borrow()
        }
        Err(_) => false,
    };
    if scoped_too_early {
        tracing::error!(
            "idempotency: the caller scope of a request changed after IdempotencyMiddleware \
             computed it (an authentication middleware runs between it and the route); keyed \
             requests to routes without a policy are refused from now on. Register \
             IdempotencyMiddleware inside the authentication (on the same scope, registered \
             first), or mark the handlers #[idempotent]"
        );
        slot.config
            .scope_seen_too_early
            .store(true, Ordering::Relaxed);
    }
    let outcome = std::mem::take(&mut *slot.outcome.borrow_mut());
    match outcome {
        DefaultOutcome::Answer(answer) => {
            report_swallowed_refusal(&result);
            // An answer computed before the scope was known could be another caller's replay,
            // whether this request or a concurrent one found that out.
            let answer = if slot.config.scope_seen_too_early.load(Ordering::Relaxed) {
                scope_too_early().error_response()
            } else {
                answer
            };
            match result {
                Ok(response) => Ok(response.into_response(answer).map_into_right_body()),
                Err(_) => Err(InternalError::from_response("idempotency", answer).into()),
            }
        }
        DefaultOutcome::Running(mut pending) => {
            if scoped_too_early {
                // It ran, under a key space that may be shared with other callers: its
                // response must never be replayed to anyone.
                pending.forbid_replay();
            }
            // Boxed: settling's state is large, and the task that runs this is moved whole
            // before it starts; boxed, only a pointer is.
            Box::pin(pending.settle(result)).await
        }
        DefaultOutcome::Unprotected | DefaultOutcome::None => {
            result.map(ServiceResponse::map_into_left_body)
        }
    }
}

/// Logs a handler that answered successfully although the default refused its request: an
/// extractor swallowed the body error (`Option<web::Json<T>>`) or the handler reads its body
/// itself (`web::Payload`), so it ran. Its response is replaced all the same.
fn report_swallowed_refusal<B>(result: &Result<ServiceResponse<B>, Error>) {
    let Ok(response) = result else { return };
    if response.status().is_success() {
        tracing::error!(
            "idempotency: {} {} ran although the idempotency middleware refused the request: \
             its handler ignores body errors (Option/Result extractors) or reads the body \
             itself. Mark it #[idempotent] so that its key is settled before it runs",
            response.request().method(),
            response.request().path()
        );
    }
}

/// Routes whose handler answered without reading the body: the default never saw them.
static UNREAD_ROUTES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Logs, once per route, a handler that answered successfully without reading its body: the
/// enforce-mode default had no moment to settle its key before it ran.
fn report_unread_body<B>(result: &Result<ServiceResponse<B>, Error>) {
    let Ok(response) = result else { return };
    if !response.status().is_success() {
        return;
    }
    let request = response.request();
    let Some(pattern) = request.match_pattern() else {
        return;
    };
    let route = format!("{} {pattern}", request.method());
    let first_time = UNREAD_ROUTES
        .lock()
        .get_or_insert_with(HashSet::new)
        .insert(route.clone());
    if first_time {
        tracing::error!(
            "idempotency: {route} ran without idempotency protection: its handler reads no \
             request body, so the enforce-mode default cannot settle its key before it runs. \
             Mark it #[idempotent] (or #[idempotency_exempt])"
        );
    }
}

impl std::fmt::Debug for DeferredDefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredDefault").finish_non_exhaustive()
    }
}
