//! FNV-1a, 64 bits: a hash stable across restarts, platforms, builds and
//! Rust versions (std's hasher is promised none of these), for page tokens'
//! query hashes and the dashboard's ETags. Not for anything an attacker
//! must not be able to collide.

pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash of `bytes` alone.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut hash = Self::new();
        hash.eat(bytes);
        hash.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Fnv;

    #[test]
    fn fnv1a_matches_its_reference_values() {
        assert_eq!(Fnv::of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv::of(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
