//! The memory store's form of a storage key: 33 bytes inline, never a heap allocation.
//!
//! Encoders hand the store text, and the default ones hand it 64 hex digits of a SHA-256
//! digest. Kept as text, each record and reservation would carry a 64-byte heap string (80 with
//! the allocator's rounding) and an allocation per request; kept as the 32 bytes the digits
//! spell, it costs neither. Any other text (a custom encoder's) is replaced by its own SHA-256
//! digest, which is as collision-free as the default encoder itself. The two kinds are tagged
//! apart, so a key that spells a digest in hex can never meet a key that was hashed.

use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};

/// A storage key as the memory store holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MemoryKey {
    /// 64 lower-case hex digits, decoded.
    Spelled([u8; 32]),
    /// Any other key, by its SHA-256 digest.
    Hashed([u8; 32]),
}

impl MemoryKey {
    pub(super) fn new(key: &str) -> Self {
        decode_hex(key).map_or_else(
            || Self::Hashed(Sha256::digest(key.as_bytes()).into()),
            Self::Spelled,
        )
    }
}

/// The 32 bytes as four words: the maps' seeded hasher mixes each word at once, where a byte
/// slice would take its slower path for long input on every lookup (several per request).
/// The tag is left out: two keys that differ only in it share a bucket, and equality tells
/// them apart.
impl Hash for MemoryKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (Self::Spelled(bytes) | Self::Hashed(bytes)) = self;
        for word in bytes.chunks_exact(8) {
            let mut eight = [0; 8];
            eight.copy_from_slice(word);
            state.write_u64(u64::from_le_bytes(eight));
        }
    }
}

/// The 32 bytes that 64 lower-case hex digits spell. Upper-case digits are not accepted, so
/// that each spelled key has exactly one text form.
fn decode_hex(key: &str) -> Option<[u8; 32]> {
    let digits = key.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    // Table lookups without a branch per digit: digest digits are random, and a branch per
    // digit would be mispredicted half the time.
    let mut bytes = [0; 32];
    let mut invalid = 0;
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        let (high, low) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    (invalid & NOT_A_DIGIT == 0).then_some(bytes)
}

/// What a byte is worth as a lower-case hex digit, or [`NOT_A_DIGIT`].
static NIBBLES: [u8; 256] = {
    let mut table = [NOT_A_DIGIT; 256];
    let mut digit = 0;
    while digit < 16 {
        table[b"0123456789abcdef"[digit] as usize] = digit as u8;
        digit += 1;
    }
    table
};
const NOT_A_DIGIT: u8 = 0xf0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digests_are_decoded_and_other_text_is_hashed() {
        let hex = "00ff".repeat(16);
        assert_eq!(
            MemoryKey::new(&hex),
            MemoryKey::Spelled(std::array::from_fn(|i| if i % 2 == 0 { 0 } else { 0xff }))
        );
        assert!(matches!(
            MemoryKey::new(&hex.to_uppercase()),
            MemoryKey::Hashed(_)
        ));
        assert!(matches!(MemoryKey::new("short"), MemoryKey::Hashed(_)));
        assert!(matches!(
            MemoryKey::new(&"g".repeat(64)),
            MemoryKey::Hashed(_)
        ));
    }

    #[test]
    fn a_key_spelling_another_keys_digest_stays_apart_from_it() {
        let custom = "tenant-1:order-7";
        let digest: [u8; 32] = Sha256::digest(custom.as_bytes()).into();
        let spelled: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_ne!(MemoryKey::new(custom), MemoryKey::new(&spelled));
        assert_eq!(MemoryKey::new(custom), MemoryKey::new(custom));
    }
}
