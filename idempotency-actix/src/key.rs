//! The validated idempotency key, header parsing and caller scoping.

use std::fmt;

use actix_web::http::header::{HeaderMap, HeaderName};

/// The longest key accepted, in characters (Stripe's limit, and the Python `MaxLengthKeyEncoder`'s).
pub const MAX_KEY_LENGTH: usize = 255;

/// A client-chosen idempotency key: 1–255 visible ASCII characters.
///
/// Parse a header value with [`TryFrom<&str>`]: both the IETF structured-field string form
/// (`"8e03978e-40d5-43e8-bc93-6894a57f9324"`, quotes included) and a bare token are accepted.
///
/// ```
/// use idempotency_actix::IdempotencyKey;
///
/// let quoted = IdempotencyKey::try_from("\"order-42\"").unwrap();
/// let bare = IdempotencyKey::try_from("order-42").unwrap();
/// assert_eq!(quoted, bare);
/// assert_eq!(bare.as_str(), "order-42");
///
/// assert!(IdempotencyKey::try_from("").is_err());
/// assert!(IdempotencyKey::try_from("caf\u{e9}").is_err());
/// assert!(IdempotencyKey::try_from("a".repeat(256).as_str()).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key is empty.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than 255 characters.
    #[error("the key is longer than 255 characters")]
    TooLong,
    /// The key holds a character that is not visible ASCII (a control character, a space
    /// outside quotes, or a non-ASCII character).
    #[error("the key must be visible ASCII characters only")]
    NotVisibleAscii,
    /// A quoted key is not a valid structured-field string (unterminated, or a bad escape).
    #[error("the key is not a valid structured-field string")]
    MalformedString,
    /// The header field appears more than once.
    #[error("the header field appears more than once")]
    Repeated,
}

impl IdempotencyKey {
    /// The key as the client sent it, without structured-field quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for IdempotencyKey {
    type Error = InvalidKey;

    fn try_from(raw: &str) -> Result<Self, Self::Error> {
        let key = match raw.strip_prefix('"') {
            Some(quoted) => unquote_sf_string(quoted)?,
            None => raw.to_owned(),
        };
        if key.is_empty() {
            return Err(InvalidKey::Empty);
        }
        if key.len() > MAX_KEY_LENGTH {
            return Err(InvalidKey::TooLong);
        }
        // Inside quotes a space is part of the sf-string alphabet; a bare token has none.
        let allowed = |b: u8| b.is_ascii_graphic() || (b == b' ' && raw.starts_with('"'));
        if !key.bytes().all(allowed) {
            return Err(InvalidKey::NotVisibleAscii);
        }
        Ok(Self(key))
    }
}

/// Decodes the body of an RFC 8941 sf-string (after its opening quote).
fn unquote_sf_string(rest: &str) -> Result<String, InvalidKey> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(out)
                } else {
                    Err(InvalidKey::MalformedString)
                };
            }
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => out.push(escaped),
                _ => return Err(InvalidKey::MalformedString),
            },
            c if c.is_ascii() && (c == ' ' || c.is_ascii_graphic()) => out.push(c),
            _ => return Err(InvalidKey::NotVisibleAscii),
        }
    }
    Err(InvalidKey::MalformedString)
}

/// Reads the key header: `Ok(None)` when absent, an error when present but unusable.
pub(crate) fn parse_key_header(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<IdempotencyKey>, InvalidKey> {
    let mut values = headers.get_all(name);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(InvalidKey::Repeated);
    }
    let text = first.to_str().map_err(|_| InvalidKey::NotVisibleAscii)?;
    IdempotencyKey::try_from(text.trim_matches(|c| c == ' ' || c == '\t')).map(Some)
}

/// Turns the configured header name into a [`HeaderName`], accepting the Django `META` spelling
/// (`HTTP_IDEMPOTENCY_KEY`) of the Python package as a migration aid.
pub(crate) fn normalise_header_name(name: &str) -> Option<HeaderName> {
    let name = match name.strip_prefix("HTTP_") {
        Some(meta) => meta.replace('_', "-"),
        None => name.to_owned(),
    };
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::HeaderValue;

    use super::*;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                HeaderName::from_static("idempotency-key"),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    fn parse(values: &[&'static str]) -> Result<Option<IdempotencyKey>, InvalidKey> {
        parse_key_header(
            &headers(values),
            &HeaderName::from_static("idempotency-key"),
        )
    }

    #[test]
    fn accepts_sf_string_and_bare_token_as_the_same_key() {
        assert_eq!(parse(&["\"abc\""]), parse(&["abc"]));
        assert_eq!(
            parse(&["abc"]).ok().flatten().map(|k| k.0),
            Some("abc".to_owned())
        );
    }

    #[test]
    fn sf_string_unescapes_quotes_and_backslashes() {
        let key = IdempotencyKey::try_from(r#""a\"b\\c d""#);
        assert_eq!(key.map(|k| k.0), Ok(r#"a"b\c d"#.to_owned()));
    }

    #[test]
    fn refuses_malformed_keys() {
        assert_eq!(parse(&[""]), Err(InvalidKey::Empty));
        assert_eq!(parse(&["\"\""]), Err(InvalidKey::Empty));
        assert_eq!(parse(&["\"abc"]), Err(InvalidKey::MalformedString));
        assert_eq!(parse(&["\"a\"b\""]), Err(InvalidKey::MalformedString));
        assert_eq!(parse(&["a b"]), Err(InvalidKey::NotVisibleAscii));
        assert_eq!(parse(&["a", "b"]), Err(InvalidKey::Repeated));
        let long = "k".repeat(256);
        assert_eq!(
            IdempotencyKey::try_from(long.as_str()),
            Err(InvalidKey::TooLong)
        );
        assert!(IdempotencyKey::try_from("k".repeat(255).as_str()).is_ok());
    }

    #[test]
    fn absent_header_is_no_key() {
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn header_name_accepts_django_meta_spelling() {
        assert_eq!(
            normalise_header_name("HTTP_IDEMPOTENCY_KEY"),
            Some(HeaderName::from_static("idempotency-key"))
        );
        assert_eq!(
            normalise_header_name("X-Request-Key"),
            Some(HeaderName::from_static("x-request-key"))
        );
        assert_eq!(normalise_header_name("bad header"), None);
    }
}
