//! PSK mode: one cluster-wide pre-shared key. There is no default key: the caller passes the
//! bytes (the binary reads them from a file or an environment variable), and keys that are
//! short or visibly non-random are refused.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::PskError;
use crate::wire::KeyId;

/// Minimum PSK length in bytes.
pub const MIN_PSK_LEN: usize = 32;
/// Minimum estimated entropy (bits): length × log2(distinct byte values).
pub const MIN_PSK_ENTROPY_BITS: f64 = 128.0;

/// A validated pre-shared key. Zeroized on drop.
pub struct Psk {
    key: Zeroizing<Vec<u8>>,
    id: KeyId,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk {{ id: {} }}", self.id)
    }
}

impl Psk {
    /// Validate and wrap a key. Refuses keys shorter than [`MIN_PSK_LEN`], with fewer than 8
    /// distinct byte values, periodic (a repeated pattern), an arithmetic run (`abcdef...`,
    /// `0000...`), or whose estimated entropy (length × log2 of the distinct byte count, which
    /// catches text from a tiny alphabet such as all digits) is under 128 bits.
    pub fn new(bytes: &[u8]) -> Result<Psk, PskError> {
        check_entropy(bytes)?;
        let key = Zeroizing::new(bytes.to_vec());
        let id = psk_id(&key);
        Ok(Psk { key, id })
    }

    /// The PSK id carried in tokens (first 8 bytes of HMAC-SHA256(psk, "tessera/v1/psk-id")).
    /// Nodes with different keys have different ids, so a wrong key is reported as such.
    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.key
    }
}

fn psk_id(key: &[u8]) -> KeyId {
    let mut id = [0u8; 8];
    // HMAC accepts keys of any length; new_from_slice cannot fail here.
    if let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        mac.update(b"tessera/v1/psk-id");
        id.copy_from_slice(&mac.finalize().into_bytes()[..8]);
    }
    KeyId(id)
}

fn check_entropy(b: &[u8]) -> Result<(), PskError> {
    if b.len() < MIN_PSK_LEN {
        return Err(PskError::TooShort {
            len: b.len(),
            min: MIN_PSK_LEN,
        });
    }
    let mut seen = [false; 256];
    for &x in b {
        seen[x as usize] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < 8 {
        return Err(PskError::LowEntropy("fewer than 8 distinct byte values"));
    }
    for period in 1..=b.len() / 2 {
        if (period..b.len()).all(|i| b[i] == b[i - period]) {
            return Err(PskError::LowEntropy("the key is a repeated pattern"));
        }
    }
    // Longest run with a constant difference between neighbours ("abcdef", "13579").
    let mut longest = 1;
    let mut run = 1;
    for i in 2..b.len() {
        if b[i].wrapping_sub(b[i - 1]) == b[i - 1].wrapping_sub(b[i - 2]) {
            run += 1;
            longest = longest.max(run + 1);
        } else {
            run = 1;
        }
    }
    if longest * 2 > b.len() {
        return Err(PskError::LowEntropy(
            "more than half the key is an arithmetic run",
        ));
    }
    let bits = b.len() as f64 * (distinct as f64).log2();
    if bits < MIN_PSK_ENTROPY_BITS {
        return Err(PskError::LowEntropy(
            "too few distinct symbols for the length (e.g. digits only): under 128 bits estimated",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        let err = Psk::new(b"0123456789abcdefghijklmnopqrstu").unwrap_err();
        assert_eq!(err, PskError::TooShort { len: 31, min: 32 });
    }

    #[test]
    fn visibly_non_random_keys_are_refused() {
        let cases: [&[u8]; 6] = [
            &[0u8; 32],
            b"abababababababababababababababab",
            b"passwordpasswordpasswordpassword",
            b"abcdefghijklmnopqrstuvwxyz012345",
            b"12345678901234567890123456789012",
            b"31415926535897932384626433832795",
        ];
        for c in cases {
            assert!(
                matches!(Psk::new(c), Err(PskError::LowEntropy(_))),
                "{:?} accepted",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn random_looking_keys_are_accepted_with_distinct_ids() {
        let a = Psk::new(b"q8Zr2LkP0xWm7vTn4YbJc9Hs1GfDe5Ua").unwrap();
        let b = Psk::new(b"hex:9f86d081884c7d659a2feaa0c55ad015").unwrap();
        assert_ne!(a.id(), b.id());
        use sha2::Digest;
        let raw = Sha256::digest(b"any 32 random bytes");
        Psk::new(&raw).unwrap();
    }
}
