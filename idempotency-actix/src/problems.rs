//! The problem types this crate answers with, each a section of this page: the `type` of every
//! problem+json response is `https://docs.rs/idempotency-actix/latest/idempotency_actix/problems#<slug>`.
//!
//! Each response carries `type`, `title`, `status`, `detail`, and `error` (the Python package's
//! `"Bad Request (400)"` text). See [`IdempotencyError`](crate::IdempotencyError).
//!
//! # missing-key
//! **400.** The route requires an `Idempotency-Key` header and the request has none. Send a
//! unique key (a UUID is a good choice) and reuse it for every retry of the same operation.
//!
//! # invalid-key
//! **400.** The header is empty, longer than 255 characters, contains characters other than
//! visible ASCII, is a malformed structured-field string, or appears more than once.
//!
//! # payload-mismatch
//! **422.** The key was already used for a request with another body (or content type). A
//! retry must repeat the original request exactly; a new operation needs a new key.
//!
//! # in-flight
//! **409**, with `Retry-After`. A request with this key is still being processed. Retry after
//! the indicated delay to get its response.
//!
//! # locked
//! **423**, with `Retry-After`. As `in-flight`, on services configured with the Python
//! package's status.
//!
//! # body-too-large
//! **413.** The request body is larger than the service accepts for idempotent requests.
//!
//! # body-unreadable
//! **400.** The request body could not be read.
//!
//! # response-not-replayable
//! **409.** The operation with this key completed, but its response was too large to store, so
//! it cannot be sent again. The operation was not repeated.
//!
//! # record-unreadable
//! **409.** A request with this key was processed, but the record it left cannot be read by
//! this server: it is corrupt, or it was written by another version of the library (during a
//! rolling upgrade, for instance). The operation is not run again, because it may already have
//! happened; its response cannot be sent again. Check the operation's outcome by other means;
//! the key becomes usable again when its record expires.
//!
//! # reservation-lost
//! **409**, with `Retry-After`. The handler ran in a database transaction of its own, but it
//! took longer than its reservation of the key lasted and another request with the key took
//! over; so its transaction was rolled back and none of its effects happened. Retry with the same
//! key to get the other request's outcome.
//!
//! # store-unavailable
//! **503**, with `Retry-After`. The service cannot currently guarantee that the request runs only
//! once (its store cannot be reached, or cannot take one more request in flight), so it did not
//! run it; or the handler ran in a transaction of its own that could not be committed with its
//! record, so its effects were rolled back. Retry with the same key.
//!
//! # misconfigured
//! **500.** The service's idempotency middleware is missing or registered in the wrong order;
//! its log says which. Nothing was run.
