//! Request fingerprints: what makes a retry "the same request".

use sha2::{Digest, Sha256};

/// A 256-bit digest of what a request asked for, stored with its record.
///
/// A retry whose fingerprint differs from the stored one reused a key for another payload and
/// is answered with 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

/// Computes a request's [`Fingerprint`] from its content type and body.
///
/// Implemented for closures `Fn(Option<&str>, &[u8]) -> Fingerprint`, for example to
/// canonicalise JSON before hashing. The default is [`BodyFingerprint`].
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

/// Turns payload checking off: every retry matches, whatever its body (the Python package's
/// behaviour with a key encoder that ignores the body).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFingerprint;

impl Fingerprinter for NoFingerprint {
    fn fingerprint(&self, _content_type: Option<&str>, _body: &[u8]) -> Fingerprint {
        Fingerprint([0; 32])
    }
}
