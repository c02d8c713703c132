//! Storage key encoders: how (scope, method, path, key) becomes the key a store sees.

use actix_web::http::Method;
use sha2::{Digest, Sha256};

use crate::IdempotencyKey;

/// Everything an encoder may use to build a storage key.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct KeyParts<'a> {
    /// The validated client key.
    pub key: &'a IdempotencyKey,
    /// The caller scope from the configured [`CallerScope`](crate::CallerScope).
    pub scope: Option<&'a str>,
    /// The request method.
    pub method: &'a Method,
    /// The request path, without the query string.
    pub path: &'a str,
    /// The raw request body.
    pub body: &'a [u8],
    /// The raw `Authorization` header value, if any.
    pub authorization: Option<&'a [u8]>,
}

impl<'a> KeyParts<'a> {
    /// Bundles the parts of one request; `scope` and `authorization` start empty.
    pub fn new(key: &'a IdempotencyKey, method: &'a Method, path: &'a str, body: &'a [u8]) -> Self {
        Self {
            key,
            scope: None,
            method,
            path,
            body,
            authorization: None,
        }
    }

    /// Sets the caller scope.
    pub fn scope(mut self, scope: Option<&'a str>) -> Self {
        self.scope = scope;
        self
    }

    /// Sets the raw `Authorization` header value.
    pub fn authorization(mut self, authorization: Option<&'a [u8]>) -> Self {
        self.authorization = authorization;
        self
    }
}

/// Turns a request's parts into the key its record is stored under.
///
/// Implemented for closures `Fn(&KeyParts<'_>) -> String`. Two requests are the same operation
/// exactly when their storage keys are equal; the request body belongs in the fingerprint
/// (see [`Fingerprinter`](crate::Fingerprinter)), not the key, so that a reused key with another
/// payload is answered with 422 instead of silently running again.
pub trait KeyEncoder: Send + Sync + 'static {
    /// The storage key for these parts.
    fn encode(&self, parts: &KeyParts<'_>) -> String;
}

impl<F> KeyEncoder for F
where
    F: Fn(&KeyParts<'_>) -> String + Send + Sync + 'static,
{
    fn encode(&self, parts: &KeyParts<'_>) -> String {
        self(parts)
    }
}

/// The default encoder: hex SHA-256 over the length-prefixed scope, method, path and key.
///
/// Length prefixes make the encoding unambiguous (`/a` + `b` never collides with `/ab` + ``).
///
/// ```
/// use actix_web::http::Method;
/// use idempotency_actix::{DefaultKeyEncoder, IdempotencyKey, KeyEncoder, KeyParts};
///
/// let key = IdempotencyKey::try_from("order-1").unwrap();
/// let alice = KeyParts::new(&key, &Method::POST, "/orders", b"{}").scope(Some("alice"));
/// let bob = KeyParts::new(&key, &Method::POST, "/orders", b"{}").scope(Some("bob"));
/// assert_ne!(DefaultKeyEncoder.encode(&alice), DefaultKeyEncoder.encode(&bob));
/// // The body is not part of the key: it is checked through the fingerprint.
/// let other_body = KeyParts::new(&key, &Method::POST, "/orders", b"[]").scope(Some("alice"));
/// assert_eq!(DefaultKeyEncoder.encode(&alice), DefaultKeyEncoder.encode(&other_body));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultKeyEncoder;

impl KeyEncoder for DefaultKeyEncoder {
    fn encode(&self, parts: &KeyParts<'_>) -> String {
        let mut hasher = Sha256::new();
        let scope = parts.scope.map(str::as_bytes);
        hasher.update([u8::from(scope.is_some())]);
        for field in [
            scope.unwrap_or_default(),
            parts.method.as_str().as_bytes(),
            parts.path.as_bytes(),
            parts.key.as_str().as_bytes(),
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        lower_hex(&hasher.finalize())
    }
}

/// Reproduces the Python package's `BasicKeyEncoder` bit for bit: lower-case hex SHA-256 of
/// key ‖ path ‖ method ‖ body ‖ `Authorization` value, with no separators.
///
/// Use it to share a store with a Django service during a migration. It puts the body in the
/// key, so a reused key with another payload is a new operation (no 422), and it scopes by the
/// `Authorization` header only: a custom [`CallerScope`](crate::CallerScope) is ignored.
///
/// ```
/// use actix_web::http::Method;
/// use idempotency_actix::{IdempotencyKey, KeyEncoder, KeyParts, PythonKeyEncoder};
///
/// let key = IdempotencyKey::try_from("MyKey").unwrap();
/// let parts = KeyParts::new(&key, &Method::POST, "/myURL/path/", br#"{"key": "value"}"#);
/// assert_eq!(
///     PythonKeyEncoder.encode(&parts),
///     "da44e9b4dd5bc8e7853a43c8e8f2d2c2de4394f6614ab37dd5507b6f5988aac4"
/// );
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonKeyEncoder;

impl KeyEncoder for PythonKeyEncoder {
    fn encode(&self, parts: &KeyParts<'_>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(parts.key.as_str());
        hasher.update(parts.path);
        hasher.update(parts.method.as_str());
        hasher.update(parts.body);
        if let Some(authorization) = parts.authorization {
            hasher.update(authorization);
        }
        lower_hex(&hasher.finalize())
    }
}

/// A digest as lower-case hex digits, the form stores receive and the memory store decodes.
/// (Written out: `format!("{:x}")` costs several times as much, on every keyed request.)
fn lower_hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(digest.len() * 2);
    for byte in digest {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &str) -> IdempotencyKey {
        IdempotencyKey::try_from(raw).unwrap_or_else(|e| panic!("test key {raw}: {e}"))
    }

    #[test]
    fn python_encoder_matches_reference_vectors() {
        let my_key = key("MyKey");
        let body = br#"{"key": "value"}"#;
        let parts = KeyParts::new(&my_key, &Method::POST, "/myURL/path/", body);
        assert_eq!(
            PythonKeyEncoder.encode(&parts),
            "da44e9b4dd5bc8e7853a43c8e8f2d2c2de4394f6614ab37dd5507b6f5988aac4"
        );
        let with_auth = parts.authorization(Some(b"Bearer 123"));
        assert_eq!(
            PythonKeyEncoder.encode(&with_auth),
            "913f72291888aa92f5faaabe2b4b67e882ebcc5429ed30b705c2aded23e05c68"
        );
    }

    #[test]
    fn python_encoder_matches_multipart_vector() {
        let uuid = key("7495e32b-709b-4fae-bfd4-2497094bf3fd");
        let body = b"--BoUnDaRyStRiNg\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\n1\r\n--BoUnDaRyStRiNg\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nmyvoucher0\r\n--BoUnDaRyStRiNg\r\nContent-Disposition: form-data; name=\"internal_name\"\r\n\r\nmyvoucher0\r\n--BoUnDaRyStRiNg--\r\n";
        let parts = KeyParts::new(&uuid, &Method::POST, "/views/create/", body);
        assert_eq!(
            PythonKeyEncoder.encode(&parts),
            "1f4bc93e1a614e35350605b01133d77c1d4b15dd515e40fc6599ca3ff137143d"
        );
    }

    #[test]
    fn default_encoder_separates_method_path_and_scope() {
        let k = key("k");
        let base = KeyParts::new(&k, &Method::POST, "/a", b"");
        let encoded = DefaultKeyEncoder.encode(&base);
        assert_ne!(
            encoded,
            DefaultKeyEncoder.encode(&KeyParts::new(&k, &Method::PUT, "/a", b""))
        );
        assert_ne!(
            encoded,
            DefaultKeyEncoder.encode(&KeyParts::new(&k, &Method::POST, "/b", b""))
        );
        assert_ne!(encoded, DefaultKeyEncoder.encode(&base.scope(Some(""))));
        assert_eq!(encoded.len(), 64);
    }
}
