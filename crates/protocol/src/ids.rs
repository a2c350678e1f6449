//! 32-byte identifiers on the wire: node ids (ed25519 public keys) and content hashes
//! (blake3). Each has exactly one text form, 64 lowercase hex characters; any other
//! spelling (upper case, a sign, whitespace, another length) is refused, so one key or
//! one blob can never appear under two names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why text is not a 32-byte id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a {what} (expected 64 lowercase hex characters)")]
pub struct IdError {
    pub what: &'static str,
    /// The input, cut to 80 characters and with control characters escaped.
    pub shown: String,
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Parses exactly 64 lowercase hex characters.
pub fn parse_hex32(text: &str, what: &'static str) -> Result<[u8; 32], IdError> {
    let err = || IdError {
        what,
        shown: text.chars().take(80).flat_map(char::escape_debug).collect(),
    };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = nibble(bytes[2 * i]).ok_or_else(err)?;
        let lo = nibble(bytes[2 * i + 1]).ok_or_else(err)?;
        *o = hi << 4 | lo;
    }
    Ok(out)
}

fn write_hex(bytes: &[u8; 32], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn from_hex(text: &str) -> Result<$name, IdError> {
                parse_hex32(text, $what).map($name)
            }

            pub fn to_hex(&self) -> String {
                self.to_string()
            }

            /// The first `n` hex characters, for logs.
            pub fn short(&self, n: usize) -> String {
                let mut s = self.to_string();
                s.truncate(n);
                s
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                write_hex(&self.0, f)?;
                f.write_str(")")
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<$name, IdError> {
                $name::from_hex(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::from_hex(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

id32!(
    /// A node's id: its ed25519 public key. Also its contributor id in the ledger.
    NodeId,
    "node id"
);
id32!(
    /// A blake3 content hash: of an update blob, a checkpoint, θ, or a data manifest.
    Hash32,
    "blake3 hash"
);

impl Hash32 {
    pub fn of(bytes: &[u8]) -> Hash32 {
        Hash32(*blake3::hash(bytes).as_bytes())
    }
}

impl From<blake3::Hash> for Hash32 {
    fn from(h: blake3::Hash) -> Hash32 {
        Hash32(*h.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_text_form_only() {
        let id = NodeId([0xab; 32]);
        let text = id.to_string();
        assert_eq!(text, "ab".repeat(32));
        assert_eq!(NodeId::from_hex(&text), Ok(id));
        for bad in [
            "AB".repeat(32),
            format!("+{}", &text[1..]),
            format!(" {}", &text[1..]),
            text[..62].to_string(),
            format!("{text}00"),
            format!("{}é", &text[..62]),
        ] {
            assert!(NodeId::from_hex(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn serde_is_the_hex_string() {
        let h = Hash32::of(b"x");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<Hash32>(&json).unwrap(), h);
        assert!(serde_json::from_str::<Hash32>(&json.to_uppercase()).is_err());
    }

    #[test]
    fn errors_escape_what_they_show() {
        let e = Hash32::from_hex("a\nb").unwrap_err();
        assert!(e.to_string().contains("a\\nb"), "{e}");
    }
}
