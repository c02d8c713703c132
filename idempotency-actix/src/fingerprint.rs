//! Request fingerprints: what makes a retry "the same request".

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

/// A 256-bit digest of what a request asked for, stored with its record.
///
/// A retry whose fingerprint differs from the stored one reused a key for another payload and
/// is answered with 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

/// Computes a request's [`Fingerprint`] from its content type and body.
///
/// Implemented for closures `Fn(Option<&str>, &[u8]) -> Fingerprint`. The default is
/// [`BodyFingerprint`] (exact bytes); [`JsonFingerprint`] compares JSON bodies as values, so
/// that key order and whitespace do not matter.
pub trait Fingerprinter: Send + Sync + 'static {
    /// The fingerprint of a request with this content type and body.
    fn fingerprint(&self, content_type: Option<&str>, body: &[u8]) -> Fingerprint;
}

impl<F> Fingerprinter for F
where
    F: Fn(Option<&str>, &[u8]) -> Fingerprint + Send + Sync + 'static,
{
    fn fingerprint(&self, content_type: Option<&str>, body: &[u8]) -> Fingerprint {
        self(content_type, body)
    }
}

/// The default fingerprint: SHA-256 of the length-prefixed content type and the exact body bytes.
///
/// ```
/// use idempotency_actix::{BodyFingerprint, Fingerprinter};
///
/// let json = Some("application/json");
/// assert_eq!(BodyFingerprint.fingerprint(json, b"{}"), BodyFingerprint.fingerprint(json, b"{}"));
/// assert_ne!(BodyFingerprint.fingerprint(json, b"{}"), BodyFingerprint.fingerprint(json, b"[]"));
/// assert_ne!(BodyFingerprint.fingerprint(json, b"{}"), BodyFingerprint.fingerprint(None, b"{}"));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyFingerprint;

impl Fingerprinter for BodyFingerprint {
    fn fingerprint(&self, content_type: Option<&str>, body: &[u8]) -> Fingerprint {
        // The hashed input starts with 0 or 1; `JsonFingerprint`'s starts with `JSON_DOMAIN`,
        // so an exact-bytes fingerprint never equals a canonical-JSON one.
        let mut hasher = Sha256::new();
        match content_type {
            Some(content_type) => {
                hasher.update([1]);
                hasher.update((content_type.len() as u64).to_be_bytes());
                hasher.update(content_type);
            }
            None => hasher.update([0]),
        }
        hasher.update(body);
        Fingerprint(hasher.finalize().into())
    }
}

/// The first byte of every canonical-JSON fingerprint input; [`BodyFingerprint`]'s inputs start
/// with 0 or 1.
const JSON_DOMAIN: u8 = 2;

/// Compares JSON bodies as JSON values: key order and insignificant whitespace do not matter.
///
/// For a request whose content type is `application/json` or `application/*+json` (parameters
/// such as `charset` ignored, case-insensitive) and whose body parses as JSON, the fingerprint
/// is a SHA-256 of the media type and of a canonical form of the parsed value:
///
/// - object members are compared by key, whatever their order or spacing; with duplicate keys
///   the last one counts (as [`serde_json`] parses them);
/// - array order matters: `[1,2]` and `[2,1]` are different requests;
/// - strings are compared after unescaping: `"A"` and `"A"` are the same string;
/// - numbers are compared as `serde_json` parses them: an integer (`1`, `-7`) is an integer,
///   anything with a fraction or an exponent (`1.0`, `1e0`) is a 64-bit float. So `1.0` and
///   `1e0` are the same number, but **`1` and `1.0` are different requests**: many
///   deserialisers (serde's integer fields among them) accept one and refuse the other, so a
///   client that changed one into the other may not be asking for the same thing.
///
/// Any other request (another content type, none, a body that is not valid JSON, an empty body,
/// JSON nested deeper than `serde_json`'s recursion limit of 128) is fingerprinted exactly as
/// [`BodyFingerprint`] does, byte for byte. The two kinds of fingerprint are domain-separated:
/// a body compared as bytes never matches a body compared as JSON.
///
/// It is opt-in, not the default: switching a running service to it changes the fingerprint
/// of every JSON request already stored, so a retry of a request stored before the switch is
/// answered 422 until its record expires; and it parses every keyed JSON body, which costs time
/// and allocations proportional to the body. Select it with
/// [`IdempotencyMiddlewareBuilder::fingerprint`](crate::IdempotencyMiddlewareBuilder::fingerprint):
///
/// ```
/// use idempotency_actix::{Fingerprinter, IdempotencyMiddleware, JsonFingerprint, MemoryStore};
///
/// let json = Some("application/json");
/// assert_eq!(
///     JsonFingerprint.fingerprint(json, br#"{"amount":100,"currency":"EUR"}"#),
///     JsonFingerprint.fingerprint(json, br#"{ "currency": "EUR", "amount": 100 }"#),
/// );
/// assert_ne!(
///     JsonFingerprint.fingerprint(json, br#"{"amount":100}"#),
///     JsonFingerprint.fingerprint(json, br#"{"amount":101}"#),
/// );
///
/// let middleware = IdempotencyMiddleware::builder(MemoryStore::default())
///     .fingerprint(JsonFingerprint)
///     .build();
/// # let _ = middleware;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFingerprint;

impl Fingerprinter for JsonFingerprint {
    fn fingerprint(&self, content_type: Option<&str>, body: &[u8]) -> Fingerprint {
        let Some(media_type) = content_type.and_then(json_media_type) else {
            return BodyFingerprint.fingerprint(content_type, body);
        };
        // serde_json refuses nesting deeper than 128 levels, so neither parsing nor the
        // recursive walk below can overflow the stack on a hostile body.
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return BodyFingerprint.fingerprint(content_type, body);
        };
        let mut hasher = Sha256::new();
        hasher.update([JSON_DOMAIN]);
        hash_bytes(&mut hasher, media_type.as_bytes());
        hash_value(&mut hasher, &value);
        Fingerprint(hasher.finalize().into())
    }
}

/// The lowercased media type of a JSON content type (`application/json`,
/// `application/*+json`), without its parameters; `None` for anything else.
fn json_media_type(content_type: &str) -> Option<String> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let subtype = essence.strip_prefix("application/")?;
    let is_json = subtype == "json"
        || subtype
            .strip_suffix("+json")
            .is_some_and(|prefix| !prefix.is_empty() && !prefix.contains('/'));
    is_json.then_some(essence)
}

fn hash_bytes(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// Feeds a self-delimiting encoding of `value` to `hasher`: a tag per kind, lengths before
/// strings and containers, object members sorted by key. Keys are sorted here rather than
/// relying on `serde_json::Map`'s order, which is insertion order when another crate in the
/// build enables serde_json's `preserve_order` feature.
fn hash_value(hasher: &mut Sha256, value: &Value) {
    match value {
        Value::Null => hasher.update(b"n"),
        Value::Bool(false) => hasher.update(b"f"),
        Value::Bool(true) => hasher.update(b"t"),
        Value::Number(number) => hash_number(hasher, number),
        Value::String(string) => {
            hasher.update(b"s");
            hash_bytes(hasher, string.as_bytes());
        }
        Value::Array(items) => {
            hasher.update(b"[");
            hasher.update((items.len() as u64).to_be_bytes());
            for item in items {
                hash_value(hasher, item);
            }
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
            hasher.update(b"{");
            hasher.update((sorted.len() as u64).to_be_bytes());
            for (key, member) in sorted {
                hash_bytes(hasher, key.as_bytes());
                hash_value(hasher, member);
            }
        }
    }
}

/// Integers by value (whether serde_json held them as `u64` or `i64`), other numbers by their
/// `f64` bits. Going through the accessors rather than the text keeps `1e2` and `100.0` equal
/// even when serde_json's `arbitrary_precision` feature keeps numbers as written.
fn hash_number(hasher: &mut Sha256, number: &Number) {
    if let Some(integer) = number
        .as_u64()
        .map(i128::from)
        .or_else(|| number.as_i64().map(i128::from))
    {
        hasher.update(b"i");
        hasher.update(integer.to_be_bytes());
    } else if let Some(float) = number.as_f64() {
        hasher.update(b"d");
        hasher.update(float.to_bits().to_be_bytes());
    } else {
        // Only reachable with `arbitrary_precision` and a number no f64 holds: compare its text.
        hasher.update(b"x");
        hash_bytes(hasher, number.to_string().as_bytes());
    }
}

/// Turns payload checking off: every retry matches, whatever its body (the Python package's
/// behaviour with a key encoder that ignores the body).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFingerprint;

impl Fingerprinter for NoFingerprint {
    fn fingerprint(&self, _content_type: Option<&str>, _body: &[u8]) -> Fingerprint {
        Fingerprint([0; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn json(body: &str) -> Fingerprint {
        JsonFingerprint.fingerprint(JSON, body.as_bytes())
    }

    #[test]
    fn whitespace_and_key_order_do_not_change_a_json_fingerprint() {
        assert_eq!(json(r#"{"amount":100}"#), json(r#"{ "amount" : 100 }"#));
        assert_eq!(json(r#"{"b":1,"a":2}"#), json(r#"{"a":2,"b":1}"#));
        assert_eq!(
            json(r#"{"order":{"lines":[{"sku":"x","qty":1}],"to":"a"}}"#),
            json("{\n  \"order\": {\"to\": \"a\",\n \"lines\": [ {\"qty\": 1, \"sku\": \"x\"} ]}\n}\n"),
            "nested objects are compared by key too"
        );
        assert_eq!(
            json(r#""\u0041""#),
            json(r#""A""#),
            "strings compare unescaped"
        );
    }

    #[test]
    fn values_array_order_and_types_still_change_a_json_fingerprint() {
        assert_ne!(json(r#"{"amount":100}"#), json(r#"{"amount":101}"#));
        assert_ne!(json("[1,2]"), json("[2,1]"), "array order matters");
        assert_ne!(json(r#"{"a":"1"}"#), json(r#"{"a":1}"#));
        assert_ne!(json(r#"{"a":null}"#), json("{}"));
        assert_ne!(json(r#"{"a":{}}"#), json(r#"{"a":[]}"#));
        assert_ne!(json(r#"["ab","c"]"#), json(r#"["a","bc"]"#));
        assert_ne!(json(r#"{"ab":"c"}"#), json(r#"{"a":"bc"}"#));
        assert_ne!(json("true"), json("false"));
    }

    #[test]
    fn integers_and_floats_are_different_numbers() {
        assert_ne!(json(r#"{"amount":1}"#), json(r#"{"amount":1.0}"#));
        assert_eq!(json(r#"{"amount":1.0}"#), json(r#"{"amount":1e0}"#));
        assert_eq!(json(r#"{"amount":100.0}"#), json(r#"{"amount":1E2}"#));
        assert_ne!(json("-1"), json("18446744073709551615"));
        assert_eq!(json("-1"), json(" -1 "));
    }

    #[test]
    fn json_suffix_types_are_json_and_parameters_do_not_matter() {
        let body = br#"{"b":1,"a":2}"#;
        let reordered = br#"{"a":2,"b":1}"#;
        for content_type in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
            "application/vnd.api+json ; charset=UTF-8",
        ] {
            assert_eq!(
                JsonFingerprint.fingerprint(Some(content_type), body),
                JsonFingerprint.fingerprint(Some(content_type), reordered),
                "{content_type}"
            );
        }
        assert_eq!(
            JsonFingerprint.fingerprint(Some("application/json; charset=utf-8"), body),
            JsonFingerprint.fingerprint(Some("application/json"), reordered)
        );
        assert_ne!(
            JsonFingerprint.fingerprint(Some("application/json"), body),
            JsonFingerprint.fingerprint(Some("application/merge-patch+json"), body),
            "the media type stays part of the request"
        );
    }

    #[test]
    fn other_content_types_and_invalid_json_are_compared_byte_for_byte() {
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("application/+json"),
            Some("text/json"),
            Some("application/jsonp"),
        ] {
            let body = br#"{"b":1,"a":2}"#;
            assert_eq!(
                JsonFingerprint.fingerprint(content_type, body),
                BodyFingerprint.fingerprint(content_type, body),
                "{content_type:?}"
            );
            assert_ne!(
                JsonFingerprint.fingerprint(content_type, body),
                JsonFingerprint.fingerprint(content_type, br#"{"a":2,"b":1}"#),
                "{content_type:?}"
            );
        }
        for invalid in [&b""[..], b"{", b"{} trailing", b"\xff\xfe", b"{\"a\":1,}"] {
            assert_eq!(
                JsonFingerprint.fingerprint(JSON, invalid),
                BodyFingerprint.fingerprint(JSON, invalid),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn a_json_fingerprint_never_equals_an_exact_bytes_one() {
        for body in [&b"{}"[..], b"[]", b"null", b"1", br#"{"amount":100}"#] {
            assert_ne!(
                JsonFingerprint.fingerprint(JSON, body),
                BodyFingerprint.fingerprint(JSON, body),
                "{body:?}"
            );
            assert_ne!(
                JsonFingerprint.fingerprint(JSON, body),
                BodyFingerprint.fingerprint(None, body),
                "{body:?}"
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_fingerprinted_as_bytes_without_overflowing_the_stack() {
        let depth = 100_000;
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(
            JsonFingerprint.fingerprint(JSON, body.as_bytes()),
            BodyFingerprint.fingerprint(JSON, body.as_bytes()),
            "beyond serde_json's recursion limit the body is compared as bytes"
        );
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        assert_eq!(
            JsonFingerprint.fingerprint(JSON, objects.as_bytes()),
            BodyFingerprint.fingerprint(JSON, objects.as_bytes())
        );
        // Within the limit the body is still compared as JSON.
        let shallow = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let spaced = format!("{} {}", "[".repeat(100), "]".repeat(100));
        assert_eq!(
            JsonFingerprint.fingerprint(JSON, shallow.as_bytes()),
            JsonFingerprint.fingerprint(JSON, spaced.as_bytes())
        );
    }
}
