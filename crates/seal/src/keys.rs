//! The owner's keys file: one random 32-byte key per item, and the ids of the sealed
//! data set the keys open. It is a secret; it is written with mode 0600, never
//! replaces an existing file, and never goes into the published directory.
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "dataset_id": "64 hex digits",
//!   "manifest_id": "64 hex digits",
//!   "keys": [ { "index": 0, "key_hex": "64 hex digits" }, ... ]
//! }
//! ```

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::limits::{ITEMS_MAX, KEYS_FILE_BYTES_MAX};
use crate::{parse_hex32, SealError, SealedManifest, SEAL_VERSION};

/// The keys of one sealed data set. `Debug` shows the ids and the key count, never a
/// key.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKeys {
    pub dataset_id: [u8; 32],
    pub manifest_id: [u8; 32],
    /// Key of item `i` at position `i`.
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeys")
            .field("dataset_id", &hex::encode(self.dataset_id))
            .field("manifest_id", &hex::encode(self.manifest_id))
            .field(
                "keys",
                &format_args!("[{} keys, redacted]", self.keys.len()),
            )
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysJson {
    format_version: u32,
    dataset_id: String,
    manifest_id: String,
    keys: Vec<KeyJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyJson {
    index: u32,
    key_hex: String,
}

impl SealKeys {
    pub(crate) fn new(dataset_id: [u8; 32], manifest_id: [u8; 32], keys: Vec<[u8; 32]>) -> Self {
        SealKeys {
            dataset_id,
            manifest_id,
            keys,
        }
    }

    /// The key of item `index`.
    pub fn key(&self, index: u32) -> Option<&[u8; 32]> {
        self.keys.get(index as usize)
    }

    /// How many keys (one per item).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Parses a keys file strictly: size before decoding, no unknown fields, format
    /// version, ids and keys as 64 lowercase hex digits, indices `0..n` in order.
    pub fn parse(text: &str) -> Result<SealKeys, SealError> {
        let bad = |message: String| SealError::Keys(message);
        if text.len() > KEYS_FILE_BYTES_MAX {
            return Err(bad(format!(
                "{} bytes, more than the {KEYS_FILE_BYTES_MAX} allowed",
                text.len()
            )));
        }
        // Not serde's message: it can quote the input, which holds keys.
        let json: KeysJson = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not a keys file ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if json.format_version != SEAL_VERSION {
            return Err(bad(format!(
                "format_version {}, expected {SEAL_VERSION}",
                json.format_version
            )));
        }
        let id = |name: &str, text: &str| {
            parse_hex32(text).ok_or_else(|| bad(format!("{name} is not 64 lowercase hex digits")))
        };
        let dataset_id = id("dataset_id", &json.dataset_id)?;
        let manifest_id = id("manifest_id", &json.manifest_id)?;
        if json.keys.is_empty() || json.keys.len() > ITEMS_MAX {
            return Err(bad(format!(
                "{} keys, expected 1..={ITEMS_MAX}",
                json.keys.len()
            )));
        }
        let mut keys = Vec::with_capacity(json.keys.len());
        for (position, k) in json.keys.iter().enumerate() {
            if k.index as usize != position {
                return Err(bad(format!(
                    "key for item {} is at position {position}; keys must be listed by index from 0",
                    k.index
                )));
            }
            keys.push(parse_hex32(&k.key_hex).ok_or_else(|| {
                bad(format!(
                    "key_hex of item {} is not 64 lowercase hex digits",
                    k.index
                ))
            })?);
        }
        Ok(SealKeys {
            dataset_id,
            manifest_id,
            keys,
        })
    }

    /// The keys file's text.
    pub fn to_json(&self) -> String {
        let json = KeysJson {
            format_version: SEAL_VERSION,
            dataset_id: hex::encode(self.dataset_id),
            manifest_id: hex::encode(self.manifest_id),
            keys: self
                .keys
                .iter()
                .enumerate()
                .map(|(i, k)| KeyJson {
                    index: i as u32,
                    key_hex: hex::encode(k),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&json).expect("keys serialise")
    }

    /// Checks that these are the keys of `manifest`: same data set, same manifest id,
    /// one key per item.
    pub fn check_manifest(&self, manifest: &SealedManifest) -> Result<(), SealError> {
        let mismatch = |m: String| Err(SealError::KeysMismatch(m));
        if self.dataset_id != manifest.dataset_id {
            return mismatch(format!(
                "keys for dataset_id {}, the manifest is {}",
                hex::encode(self.dataset_id),
                hex::encode(manifest.dataset_id)
            ));
        }
        let manifest_id = manifest.manifest_id();
        if self.manifest_id != manifest_id {
            return mismatch(format!(
                "keys for manifest_id {}, the manifest is {}",
                hex::encode(self.manifest_id),
                hex::encode(manifest_id)
            ));
        }
        if self.keys.len() != manifest.items.len() {
            return mismatch(format!(
                "{} keys for {} items",
                self.keys.len(),
                manifest.items.len()
            ));
        }
        Ok(())
    }

    /// Writes the keys file at `path` with mode 0600, atomically, and never over an
    /// existing file ([`SealError::KeysExist`]): the bytes go to a temporary file in
    /// the same directory, are synced, and are then hard-linked to `path`, which fails
    /// if `path` exists.
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.symlink_metadata().is_ok() {
            return Err(SealError::KeysExist {
                path: path.to_path_buf(),
            });
        }
        let name = path
            .file_name()
            .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SealError::KeysExist {
                    path: path.to_path_buf(),
                })
            }
            other => other.map_err(io)?,
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}
