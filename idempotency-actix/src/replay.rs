//! Turning responses into stored records and stored records back into responses.

use actix_web::{
    http::{
        header::{HeaderMap, HeaderName, HeaderValue, SET_COOKIE},
        StatusCode,
    },
    HttpResponse,
};
use bytes::Bytes;

use crate::{storage::StoredResponse, ReplayStatus};

/// The header that marks a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Headers that describe one transfer, not the response, and so are never stored.
fn is_replayable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "date"
            | REPLAYED_HEADER
    )
}

/// The headers of a response as they are stored. `Set-Cookie` is kept only when asked for: a
/// session cookie replayed to a retry would hand one client's session to whoever retries.
pub(crate) fn replayable_headers(headers: &HeaderMap, set_cookie: bool) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .filter(|(name, _)| is_replayable(name))
        .filter(|(name, _)| set_cookie || *name != SET_COOKIE)
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// The stored headers as header types again; a header that no longer parses is skipped.
pub(crate) fn stored_headers(
    stored: &StoredResponse,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
    stored.headers.iter().filter_map(|(name, value)| {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        let value = HeaderValue::from_maybe_shared(value.clone()).ok()?;
        Some((name, value))
    })
}

/// A fresh response built from an immutable stored snapshot.
pub(crate) fn replay_response(stored: &StoredResponse, status: ReplayStatus) -> HttpResponse {
    let status = match status {
        ReplayStatus::Original => {
            StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        ReplayStatus::Fixed(status) => status,
    };
    let mut response = HttpResponse::build(status);
    for header in stored_headers(stored) {
        response.append_header(header);
    }
    // Constants: `from_static` validates its text, at compile time only in a `const`.
    const REPLAYED: HeaderName = HeaderName::from_static(REPLAYED_HEADER);
    const TRUE: HeaderValue = HeaderValue::from_static("true");
    response.insert_header((REPLAYED, TRUE));
    response.body(stored.body.clone())
}

#[cfg(test)]
mod tests {
    use actix_web::http::header;

    use super::*;

    #[test]
    fn stored_headers_drop_transfer_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.insert(
            header::DATE,
            HeaderValue::from_static("Sun, 22 Nov 2026 00:00:00 GMT"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        let names: Vec<_> = replayable_headers(&headers, true)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names.iter().filter(|n| *n == "set-cookie").count(), 2);
        let without_cookies = replayable_headers(&headers, false);
        assert!(without_cookies.iter().all(|(n, _)| n != "set-cookie"));
        assert!(names.contains(&"content-type".to_owned()));
        assert!(!names
            .iter()
            .any(|n| n == "content-length" || n == "date" || n == "connection"));
    }

    #[test]
    fn replay_carries_marker_and_fixed_status() {
        let stored = StoredResponse::new(201, vec![], Bytes::from_static(b"{}"));
        let original = replay_response(&stored, ReplayStatus::Original);
        assert_eq!(original.status(), StatusCode::CREATED);
        assert_eq!(
            original
                .headers()
                .get(REPLAYED_HEADER)
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let fixed = replay_response(&stored, ReplayStatus::Fixed(StatusCode::CONFLICT));
        assert_eq!(fixed.status(), StatusCode::CONFLICT);
    }
}
