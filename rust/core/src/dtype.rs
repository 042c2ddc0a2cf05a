//! The safetensors dtypes and their sizes in bits.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F4,
    F6E2M3,
    F6E3M2,
}

const NAMES: [(Dtype, &str, u64); 20] = [
    (Dtype::Bool, "BOOL", 8),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
    (Dtype::C64, "C64", 64),
    (Dtype::F8E4M3, "F8_E4M3", 8),
    (Dtype::F8E5M2, "F8_E5M2", 8),
    (Dtype::F8E8M0, "F8_E8M0", 8),
    (Dtype::F4, "F4", 4),
    (Dtype::F6E2M3, "F6_E2M3", 6),
    (Dtype::F6E3M2, "F6_E3M2", 6),
];

impl Dtype {
    /// Size of one element in bits (4 and 6 for the sub-byte kinds).
    pub fn bits(self) -> u64 {
        NAMES
            .iter()
            .find(|(d, _, _)| *d == self)
            .map(|e| e.2)
            .unwrap_or(8)
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(d, _, _)| *d == self)
            .map(|e| e.1)
            .unwrap_or("?")
    }

    /// Bytes taken by `numel` elements, or None on overflow or a sub-byte count that does
    /// not fill whole bytes.
    pub fn nbytes(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl FromStr for Dtype {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        NAMES
            .iter()
            .find(|(_, n, _)| *n == s)
            .map(|e| e.0)
            .ok_or(())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n, _) in NAMES {
            assert_eq!(n.parse::<Dtype>(), Ok(d));
            assert_eq!(d.to_string(), n);
        }
        assert!("bf16".parse::<Dtype>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(Dtype::BF16.nbytes(3), Some(6));
        assert_eq!(Dtype::F4.nbytes(4), Some(2));
        assert_eq!(Dtype::F4.nbytes(3), None);
        assert_eq!(Dtype::F6E2M3.nbytes(4), Some(3));
        assert_eq!(Dtype::F64.nbytes(u64::MAX), None);
    }
}
