//! Deterministic helpers for tests, test vectors, benchmarks and fuzzing. NOT for production:
//! [`SeededRng`] is predictable by design.

use std::convert::Infallible;

use rand_core::{TryCryptoRng, TryRng};
use sha2::{Digest, Sha256};

/// A predictable "CSPRNG": SHA-256 in counter mode over a seed. Lets tests and the committed
/// test vectors produce the same keys, certificates and nonces on every run.
#[derive(Debug, Clone)]
pub struct SeededRng {
    seed: [u8; 32],
    counter: u64,
    buf: [u8; 32],
    used: usize,
}

impl SeededRng {
    /// From a seed label.
    pub fn new(seed: &[u8]) -> Self {
        SeededRng {
            seed: Sha256::digest(seed).into(),
            counter: 0,
            buf: [0; 32],
            used: 32,
        }
    }

    /// 16 bytes, e.g. a nonce.
    pub fn nonce(&mut self) -> [u8; 16] {
        let mut n = [0u8; 16];
        self.fill(&mut n);
        n
    }

    fn fill(&mut self, dst: &mut [u8]) {
        for b in dst {
            if self.used == 32 {
                let mut hs = Sha256::new();
                hs.update(self.seed);
                hs.update(self.counter.to_be_bytes());
                self.buf = hs.finalize().into();
                self.counter += 1;
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }
}

impl TryRng for SeededRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

impl TryCryptoRng for SeededRng {}
