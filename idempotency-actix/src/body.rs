//! Bounded buffering of request and response bodies.

use actix_web::{
    body::{BodySize, BodyStream, BoxBody, MessageBody},
    dev::Payload,
};
use bytes::{Bytes, BytesMut};
use futures_util::{future::poll_fn, stream, StreamExt};

/// Why a request body could not be buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestBodyError {
    TooLarge,
    Unreadable,
}

/// Reads a request body of at most `limit` bytes.
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

/// A response body after an attempt to buffer it for storage.
pub(crate) enum CapturedBody {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// Over the limit: the body to send on, rebuilt from what was read and what remains.
    TooLarge(BoxBody),
    /// The body failed while it was being read.
    Failed(Box<dyn std::error::Error>),
}

/// Buffers a response body of at most `limit` bytes without ever losing what it read: past the
/// limit the bytes read so far are chained in front of the rest of the stream.
pub(crate) async fn capture_response_body<B>(body: B, limit: usize) -> CapturedBody
where
    B: MessageBody + 'static,
{
    match body.size() {
        BodySize::None => return CapturedBody::Complete(Bytes::new()),
        BodySize::Sized(size) if usize::try_from(size).map_or(true, |size| size > limit) => {
            return CapturedBody::TooLarge(BoxBody::new(body));
        }
        _ => {}
    }
    let mut body = Box::pin(body);
    let mut buffer = BytesMut::new();
    loop {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            None => return CapturedBody::Complete(buffer.freeze()),
            Some(Err(error)) => return CapturedBody::Failed(error.into()),
            Some(Ok(chunk)) if buffer.len() + chunk.len() > limit => {
                buffer.extend_from_slice(&chunk);
                let read =
                    stream::once(
                        async move { Ok::<_, Box<dyn std::error::Error>>(buffer.freeze()) },
                    );
                let rest = stream::poll_fn(move |cx| {
                    body.as_mut()
                        .poll_next(cx)
                        .map(|item| item.map(|chunk| chunk.map_err(Into::into)))
                });
                return CapturedBody::TooLarge(BoxBody::new(BodyStream::new(read.chain(rest))));
            }
            Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::to_bytes;

    use super::*;

    fn chunks(
        parts: &'static [&'static str],
    ) -> BodyStream<impl futures_util::Stream<Item = Result<Bytes, std::io::Error>>> {
        BodyStream::new(stream::iter(
            parts.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))),
        ))
    }

    #[actix_rt::test]
    async fn streaming_body_within_limit_is_captured_whole() {
        match capture_response_body(chunks(&["ab", "cd"]), 4).await {
            CapturedBody::Complete(bytes) => assert_eq!(bytes, "abcd"),
            _ => panic!("expected the whole body"),
        }
    }

    #[actix_rt::test]
    async fn streaming_body_over_limit_is_passed_on_intact() {
        match capture_response_body(chunks(&["ab", "cd", "ef"]), 3).await {
            CapturedBody::TooLarge(body) => {
                assert_eq!(
                    to_bytes(body).await.ok(),
                    Some(Bytes::from_static(b"abcdef"))
                );
            }
            _ => panic!("expected an over-limit body"),
        }
    }

    #[actix_rt::test]
    async fn sized_body_over_limit_is_not_read() {
        match capture_response_body(Bytes::from_static(b"0123456789"), 4).await {
            CapturedBody::TooLarge(body) => assert_eq!(body.size(), BodySize::Sized(10)),
            _ => panic!("expected an over-limit body"),
        }
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
