//! Bounded buffering of request and response bodies.

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use actix_web::{
    body::{BodySize, MessageBody},
    dev::Payload,
};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::oneshot;

/// Why a request body could not be buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestBodyError {
    TooLarge,
    Unreadable,
}

/// Reads a request body of at most `limit` bytes, into a buffer of its own.
///
/// Always copied, even when it arrives in one chunk: a chunk is a slice of the connection's
/// read buffer, and a handler that echoes its body into its response would otherwise have the
/// stored record hold that whole buffer, many times what the store weighs it at.
pub(crate) async fn read_request_body(
    mut payload: Payload,
    limit: usize,
) -> Result<Bytes, RequestBodyError> {
    let mut buffer = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| RequestBodyError::Unreadable)?;
        if buffer.len() + chunk.len() > limit {
            return Err(RequestBodyError::TooLarge);
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// What a streamed response body left for the record once it was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// The whole body, within the limit.
    Whole(Bytes),
    /// The body went past the limit: it was sent whole, but not kept.
    TooLarge,
    /// The body failed mid-way.
    Failed,
    /// The body was dropped before its end (the client went away).
    Abandoned,
}

/// A response body that flows to the client chunk by chunk as it is produced, keeping a copy
/// of up to `limit` bytes, and reports what it kept when it ends (or is dropped).
pub(crate) struct RecordingBody<B> {
    body: Pin<Box<B>>,
    copy: Option<BytesMut>,
    limit: usize,
    done: Option<oneshot::Sender<Recorded>>,
}

impl<B> RecordingBody<B> {
    pub(crate) fn new(body: B, limit: usize) -> (Self, oneshot::Receiver<Recorded>) {
        let (done, recorded) = oneshot::channel();
        let body = Self {
            body: Box::pin(body),
            copy: Some(BytesMut::new()),
            limit,
            done: Some(done),
        };
        (body, recorded)
    }

    fn report(&mut self, recorded: Recorded) {
        if let Some(done) = self.done.take() {
            // Nobody waits any more only when the record was given up: nothing to tell.
            let _ = done.send(recorded);
        }
    }
}

impl<B: MessageBody> MessageBody for RecordingBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = ready!(this.body.as_mut().poll_next(cx));
        match &next {
            Some(Ok(chunk)) => {
                let fits = this
                    .copy
                    .as_ref()
                    .is_some_and(|copy| copy.len() + chunk.len() <= this.limit);
                match this.copy.as_mut() {
                    Some(copy) if fits => copy.extend_from_slice(chunk),
                    _ => this.copy = None,
                }
            }
            Some(Err(_)) => this.report(Recorded::Failed),
            None => {
                let recorded = match this.copy.take() {
                    // Exactly its length: the buffer grew by doubling.
                    Some(copy) => Recorded::Whole(Bytes::copy_from_slice(&copy)),
                    None => Recorded::TooLarge,
                };
                this.report(recorded);
            }
        }
        Poll::Ready(next)
    }
}

impl<B> Drop for RecordingBody<B> {
    fn drop(&mut self) {
        self.report(Recorded::Abandoned);
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::{to_bytes, BodyStream};
    use futures_util::stream;

    use super::*;

    fn chunks(
        parts: &'static [&'static str],
    ) -> BodyStream<impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>> {
        BodyStream::new(stream::iter(
            parts.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))),
        ))
    }

    #[actix_rt::test]
    async fn a_body_within_the_limit_is_sent_and_kept_whole() {
        let (body, recorded) = RecordingBody::new(chunks(&["ab", "cd"]), 4);
        assert_eq!(to_bytes(body).await.ok(), Some(Bytes::from_static(b"abcd")));
        assert_eq!(
            recorded.await.ok(),
            Some(Recorded::Whole(Bytes::from_static(b"abcd")))
        );
    }

    #[actix_rt::test]
    async fn a_body_over_the_limit_is_sent_whole_and_not_kept() {
        let (body, recorded) = RecordingBody::new(chunks(&["ab", "cd", "ef"]), 3);
        assert_eq!(
            to_bytes(body).await.ok(),
            Some(Bytes::from_static(b"abcdef"))
        );
        assert_eq!(recorded.await.ok(), Some(Recorded::TooLarge));
    }

    #[actix_rt::test]
    async fn a_body_dropped_before_its_end_is_abandoned() {
        let (body, recorded) = RecordingBody::new(chunks(&["ab", "cd"]), 4);
        drop(body);
        assert_eq!(recorded.await.ok(), Some(Recorded::Abandoned));
    }

    #[actix_rt::test]
    async fn a_body_in_several_chunks_is_read_whole_and_bounded() {
        let chunks = || {
            let parts = ["ab", "cd", "ef"].map(|part| Ok(Bytes::from_static(part.as_bytes())));
            let stream: Pin<Box<dyn futures_util::Stream<Item = _>>> =
                Box::pin(stream::iter(parts));
            Payload::from(stream)
        };
        assert_eq!(
            read_request_body(chunks(), 6).await.ok(),
            Some(Bytes::from_static(b"abcdef"))
        );
        assert_eq!(
            read_request_body(chunks(), 5).await,
            Err(RequestBodyError::TooLarge)
        );
    }

    #[actix_rt::test]
    async fn request_body_over_limit_is_refused() {
        let payload = Payload::from(Bytes::from_static(b"0123456789"));
        assert_eq!(
            read_request_body(payload, 4).await,
            Err(RequestBodyError::TooLarge)
        );
        let payload = Payload::from(Bytes::from_static(b"0123"));
        assert_eq!(
            read_request_body(payload, 4).await.ok(),
            Some(Bytes::from_static(b"0123"))
        );
    }
}
