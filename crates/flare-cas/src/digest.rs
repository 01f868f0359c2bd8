//! Algorithm-tagged BLAKE3 digests.

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::CasError;

/// The only algorithm this store writes; the tag keeps the format open to others.
pub const ALGORITHM: &str = "blake3";

/// A BLAKE3 digest, written `blake3:<64 lowercase hex>` (Display, FromStr and serde).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Wrap raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64-character lowercase hex part, without the algorithm tag.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse the bare hex part (no tag), as used in store file names.
    pub fn from_hex(hex_part: &str) -> Result<Digest, CasError> {
        let bad =
            |reason: &str| CasError::InvalidDigest { input: hex_part.to_owned(), reason: reason.into() };
        if hex_part.len() != 64 {
            return Err(bad("expected 64 hex characters"));
        }
        if hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("hex must be lowercase"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|e| bad(&format!("bad hex: {e}")))?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALGORITHM}:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = CasError;

    fn from_str(s: &str) -> Result<Digest, CasError> {
        let Some((algo, hex_part)) = s.split_once(':') else {
            return Err(CasError::InvalidDigest {
                input: s.to_owned(),
                reason: format!("expected `{ALGORITHM}:<hex>`"),
            });
        };
        if algo != ALGORITHM {
            return Err(CasError::InvalidDigest {
                input: s.to_owned(),
                reason: format!("unsupported algorithm {algo:?} (only {ALGORITHM} is supported)"),
            });
        }
        Digest::from_hex(hex_part).map_err(|e| match e {
            CasError::InvalidDigest { reason, .. } => CasError::InvalidDigest { input: s.to_owned(), reason },
            other => other,
        })
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Streaming hasher: feed bytes with [`Hasher::update`] (or `io::Write`), then finalize.
#[derive(Default, Clone)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Hasher {
        Hasher(blake3::Hasher::new())
    }

    /// Add bytes.
    pub fn update(&mut self, data: &[u8]) -> &mut Hasher {
        self.0.update(data);
        self
    }

    /// The digest of everything fed so far.
    pub fn finalize(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

impl io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_display_parse_serde() {
        let d = Digest::of(b"hello");
        let s = d.to_string();
        assert!(s.starts_with("blake3:"));
        assert_eq!(s.len(), 7 + 64);
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        // Known BLAKE3 test vector for the empty input.
        assert_eq!(Digest::of(b"").hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    }

    #[test]
    fn streaming_equals_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hel").update(b"lo");
        assert_eq!(h.finalize(), Digest::of(b"hello"));
    }

    #[test]
    fn parse_errors_are_clear() {
        let hex64 = "a".repeat(64);
        let cases = [
            (format!("sha256:{hex64}"), "unsupported algorithm"),
            (hex64.clone(), "expected `blake3:<hex>`"),
            ("blake3:abcd".to_owned(), "64 hex"),
            (format!("blake3:{}", "g".repeat(64)), "bad hex"),
            (format!("blake3:{}", "A".repeat(64)), "lowercase"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Digest>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        assert!(serde_json::from_str::<Digest>("\"md5:00\"").is_err());
    }
}
