//! Node identities: an ed25519 key pair. The public key in lowercase hex (64
//! characters) is the node's id in the ledger and on the wire. Key files hold the
//! 32-byte secret as hex on one line and are created readable by the owner only.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// A public key as 64 lowercase hex characters.
pub type PublicKeyHex = String;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Tessera key file (expected 64 hex characters on one line)")]
    Format { path: PathBuf },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("`{text}` is not a public key (expected 64 hex characters)")]
    PublicKey { text: String },
}

/// A node's signing key.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public_hex())
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2N` lowercase hex digits: the one text form of keys and signatures.
///
/// Story: `u8::from_str_radix` takes a leading `+` and upper case, so one key had
/// several ids (the one with `+` broke the ledger's id rules and stopped every payout)
/// and one signature several spellings (each passed the replay guard again).
pub(crate) fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(bytes[2 * i])? << 4 | digit(bytes[2 * i + 1])?;
    }
    Some(out)
}

impl Identity {
    /// A new key from the operating system's generator.
    pub fn generate() -> Identity {
        Identity {
            key: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// A key from 32 secret bytes (tests and simulation derive them from a seed).
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        Identity {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// A 32-byte secret for another protocol's key (the blob transport's endpoint),
    /// derived from this key under `context` so that no signature made with one key
    /// can be replayed as the other's.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.key.as_bytes())
    }

    pub fn public_hex(&self) -> PublicKeyHex {
        to_hex(self.key.verifying_key().as_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> String {
        to_hex(&self.key.sign(message).to_bytes())
    }

    /// Writes a new key file; refuses to overwrite one.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        use std::io::Write;
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io(e)
            }
        })?;
        writeln!(f, "{}", to_hex(&self.key.to_bytes())).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Loads the key file at `path`, or creates one there when it is absent; says
    /// whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityError> {
        if path.exists() {
            return Ok((Identity::load(path)?, false));
        }
        let id = Identity::generate();
        id.save_new(path)?;
        Ok((id, true))
    }

    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let secret = from_hex::<32>(text.trim()).ok_or_else(|| IdentityError::Format {
            path: path.to_path_buf(),
        })?;
        Ok(Identity::from_secret(secret))
    }
}

/// Checks `signature` (hex) by `public` (hex) over `message`. Malformed hex is `false`.
pub fn verify(public: &str, message: &[u8], signature: &str) -> bool {
    let (Some(pk), Some(sig)) = (from_hex::<32>(public), from_hex::<64>(signature)) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    key.verify(message, &Signature::from_bytes(&sig)).is_ok()
}

/// A signature's one text form (128 lowercase hex digits) as bytes.
pub fn signature_from_hex(text: &str) -> Option<[u8; 64]> {
    from_hex::<64>(text)
}

/// Checks `signature` by the key `public` over `message`.
pub fn verify_bytes(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    key.verify(message, &Signature::from_bytes(signature))
        .is_ok()
}

/// Validates a public key's text form.
pub fn parse_public(text: &str) -> Result<PublicKeyHex, IdentityError> {
    let bytes = from_hex::<32>(text).ok_or_else(|| IdentityError::PublicKey {
        text: text.to_string(),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| IdentityError::PublicKey {
        text: text.to_string(),
    })?;
    Ok(text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate();
        let path = dir.path().join("node.key");
        id.save_new(&path).unwrap();
        assert!(matches!(
            id.save_new(&path),
            Err(IdentityError::Exists { .. })
        ));
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_hex(), id.public_hex());
        let sig = loaded.sign(b"hello");
        assert!(verify(&id.public_hex(), b"hello", &sig));
        assert!(!verify(&id.public_hex(), b"hellO", &sig));
        assert!(!verify(&Identity::generate().public_hex(), b"hello", &sig));
        assert!(!verify("zz", b"hello", &sig));
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Format { .. })
        ));
        assert!(parse_public(&id.public_hex()).is_ok());
        assert!(parse_public("abc").is_err());
        // One text form: no upper case, no sign.
        assert!(parse_public(&id.public_hex().to_uppercase()).is_err());
        assert!(!verify(&id.public_hex(), b"hello", &sig.to_uppercase()));
        let plus = format!("+{}", &sig[1..]);
        assert!(!verify(&id.public_hex(), b"hello", &plus));
    }
}
