//! Sealed data sets: a prepared data set (see `tessera-data-format`) encrypted item by
//! item, so that a private corpus can be published through a hub and trained on by
//! attested nodes without its plaintext touching a node's disk.
//!
//! `tessera data seal` ([`seal_dataset`]) turns a prepared directory into two things:
//! a public directory the hub publishes (`sealed.json` and one `item-NNNN.sealed` per
//! item) and the owner's secret keys file ([`SealKeys`], one random key per item),
//! which goes to the data owner's key server and never into the published directory.
//! Item 0 is the tokenizer (it was trained on the private text and its merges reveal
//! it), then the train shards in manifest order, then the validation shards.
//!
//! The key design choice is that every item is bound to its place. Each item is
//! encrypted with STREAM (`EncryptorBE32`) over ChaCha20-Poly1305 in 64 KiB chunks, and
//! every chunk's associated data is `b"tessera-seal-v1" || manifest_id || index ||
//! header`. The [`SealedManifest::manifest_id`] is a hash of everything public about
//! the data set but the ciphertext hashes (which cannot be known before encrypting),
//! including a random `dataset_id`. So a ciphertext moved to another index or to
//! another data set, a reordered, dropped or altered chunk, a changed header, or a
//! forged manifest all fail authentication, whatever the hub serves. The plaintext
//! `manifest.json` is not published: its plaintext hashes would let anyone confirm a
//! guess of a shard or the tokenizer. The sealed manifest says what a run needs in
//! public (vocabulary, token width, text bytes for bits per byte, sizes).
//!
//! What this crate does not do: it fetches no keys and talks to no key server, it
//! never writes plaintext (sealing streams a chunk at a time from the prepared files;
//! [`open_item`] decrypts into memory and returns the bytes), it does not hide item
//! sizes or token counts (they are public), and it does not zeroize keys or
//! plaintext in memory. It depends on no tokenizer and no libtorch, so its parsers are
//! fuzzed on their own (`fuzz/`, target `sealed`).
//!
//! # Layout
//!
//! A sealed item file is a 32-byte header, then the STREAM chunks, each the chunk's
//! ciphertext followed by its 16-byte Poly1305 tag:
//!
//! ```text
//! offset size
//!  0      8   magic "TSRSEAL1"
//!  8      4   format version, u32 LE (1)
//! 12      4   item index, u32 LE
//! 16      8   plaintext bytes, u64 LE
//! 24      7   STREAM nonce prefix (random per item)
//! 31      1   reserved, 0
//! 32      …   chunks: 64 KiB of plaintext each (the last shorter; one empty chunk for
//!             an empty item), each + 16 bytes of tag
//! ```
//!
//! The ChaCha20-Poly1305 nonce of chunk `i` is `prefix (7) || i as u32 BE || last`,
//! where `last` is 1 for the last chunk and 0 otherwise (aead's `StreamBE32`). The
//! file is `32 + plaintext + 16 * max(1, ceil(plaintext / 65536))` bytes.
//!
//! The `manifest_id` is blake3 over this encoding (integers little-endian):
//!
//! ```text
//! b"tessera-seal-v1/manifest_id"       27 bytes, domain
//! format_version                      u32
//! dataset_id                          32 bytes
//! vocab_size                          u64
//! end_of_text_id                      u32
//! token_bytes                         u32
//! train_text_bytes                    u64
//! val_text_bytes                      u64
//! item count                          u32
//! per item, in index order:
//!   index                             u32
//!   role                              u8: 0 tokenizer, 1 train, 2 val
//!   file name length                  u32
//!   file name                         ASCII bytes
//!   plaintext_bytes                   u64
//!   tokens                            u64
//!   ciphertext_bytes                  u64
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_data_format::{is_plain_file_name, SHARD_HEADER_BYTES, VOCAB_MAX};

mod format;
mod keys;
pub mod limits;
mod seal;

pub use format::{chunk_count, sealed_len, AAD_DOMAIN, ITEM_MAGIC};
pub use keys::SealKeys;
pub use seal::seal_dataset;

use limits::{HEADER_BYTES, ITEMS_MAX, ITEM_CIPHERTEXT_BYTES_MAX, SEALED_MANIFEST_BYTES_MAX};

/// The sealed format this version reads and writes (of `sealed.json`, the keys file
/// and every item file).
pub const SEAL_VERSION: u32 = 1;

/// The public manifest in a sealed directory.
pub const SEALED_MANIFEST_FILE: &str = "sealed.json";

/// Domain of the `manifest_id` hash (see the crate documentation).
pub const MANIFEST_ID_DOMAIN: &[u8] = b"tessera-seal-v1/manifest_id";

/// The file name of item `index` in a sealed directory.
pub fn item_file_name(index: u32) -> String {
    format!("item-{index:04}.sealed")
}

/// Why a data set could not be sealed, or a sealed manifest, keys file or item could
/// not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The prepared data set's `manifest.json` is malformed.
    #[error("{path}: bad manifest: {message}; re-run `tessera data prepare`")]
    SourceManifest { path: PathBuf, message: String },
    /// A file of the prepared data set has another length than its manifest implies.
    #[error("{path}: {actual} bytes, the manifest implies {expected}; the data set is corrupt or changed after `tessera data prepare`")]
    SourceLength {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A file of the prepared data set has another hash than its manifest says.
    #[error("{path}: blake3 {actual} does not match the manifest's {expected}; the data set is corrupt or changed after `tessera data prepare`")]
    SourceHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// An item would seal to a file larger than a node downloads.
    #[error("{path}: sealed it would be {ciphertext_bytes} bytes, more than the {max} a node downloads; re-run `tessera data prepare` with a smaller --shard-tokens")]
    ItemTooLarge {
        path: PathBuf,
        ciphertext_bytes: u64,
        max: u64,
    },
    /// `sealed.json` is not a sealed manifest this version reads (the message names
    /// the field or item and the values involved).
    #[error("sealed manifest: {0}")]
    Manifest(String),
    /// `sealed.json` states another `manifest_id` than its contents hash to.
    #[error("sealed manifest: states manifest_id {stated}, but its contents hash to {computed}; it was edited after sealing")]
    ManifestId { stated: String, computed: String },
    /// The keys file is not one this version reads.
    #[error("keys file: {0}")]
    Keys(String),
    /// The keys are not the keys of this sealed manifest.
    #[error("the keys are for another sealed data set: {0}")]
    KeysMismatch(String),
    /// The keys file exists; saving would replace the keys of an earlier seal.
    #[error("{path} exists; replacing it would lose the keys of an earlier seal: choose another keys path")]
    KeysExist { path: PathBuf },
    /// An item index past the manifest's items.
    #[error("no item {index}: the sealed manifest lists {items} items")]
    NoItem { index: u32, items: usize },
    /// A ciphertext of another length than the manifest says.
    #[error("item {index} (`{file}`): {actual} bytes, the sealed manifest says {expected}; the file is truncated, padded or another item")]
    CiphertextLength {
        index: u32,
        file: String,
        expected: u64,
        actual: u64,
    },
    /// A ciphertext of another hash than the manifest says.
    #[error("item {index} (`{file}`): blake3 {actual} does not match the sealed manifest's {expected}; the file is corrupt or another item")]
    CiphertextHash {
        index: u32,
        file: String,
        expected: String,
        actual: String,
    },
    /// The item's header is not a sealed item header, or names another item or length.
    #[error("item {index} (`{file}`): bad header: {message}")]
    Header {
        index: u32,
        file: String,
        message: String,
    },
    /// A chunk did not authenticate.
    #[error("item {index} (`{file}`): chunk {chunk} does not authenticate: the key is wrong, or the ciphertext was altered, reordered or truncated, or belongs to another item or data set")]
    Decrypt {
        index: u32,
        file: String,
        chunk: u64,
    },
}

/// What an item holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `tokenizer.json` (item 0, and only item 0).
    Tokenizer,
    /// A training shard.
    Train,
    /// A validation shard.
    Val,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Tokenizer => 0,
            Role::Train => 1,
            Role::Val => 2,
        }
    }
}

/// One sealed item as `sealed.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedItem {
    pub index: u32,
    pub role: Role,
    /// The sealed file's name in the sealed directory (a plain file name).
    pub file: String,
    pub plaintext_bytes: u64,
    /// Tokens in the shard; 0 for the tokenizer.
    pub tokens: u64,
    pub ciphertext_bytes: u64,
    /// blake3 of the sealed file, 64 lowercase hex digits.
    pub ciphertext_blake3: String,
}

/// `sealed.json`: the public description of a sealed data set. Parse it with
/// [`SealedManifest::parse`]; the fields are public to read, and a value built or
/// changed by hand is only as consistent as its author made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedManifest {
    pub format_version: u32,
    /// Random, chosen at sealing: no two seals share a `manifest_id`, even of the same
    /// data.
    pub dataset_id: [u8; 32],
    pub vocab_size: usize,
    pub end_of_text_id: u32,
    /// Bytes per token in the shards (2 or 4).
    pub token_bytes: u32,
    /// Bytes of text behind the train and validation tokens (for bits per byte).
    pub train_text_bytes: u64,
    pub val_text_bytes: u64,
    /// Index `i` at position `i`: the tokenizer, the train shards, the val shards.
    pub items: Vec<SealedItem>,
}

/// The JSON form: the manifest with its `manifest_id` stated, hex for byte strings.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedManifestJson {
    format_version: u32,
    dataset_id: String,
    manifest_id: String,
    vocab_size: usize,
    end_of_text_id: u32,
    token_bytes: u32,
    train_text_bytes: u64,
    val_text_bytes: u64,
    items: Vec<SealedItem>,
}

/// 32 bytes from 64 lowercase hex digits (the one text form, so that a value has one
/// spelling).
pub(crate) fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

impl SealedManifest {
    /// Parses `sealed.json` and checks it whole: size before decoding, format version,
    /// vocabulary and token width, items `0..n` in order with the tokenizer first, then
    /// train, then val shards, plain and distinct file names, every size consistent
    /// (shard bytes from tokens, ciphertext bytes from plaintext bytes), hashes in
    /// lowercase hex, and the stated `manifest_id` against the recomputed one.
    pub fn parse(text: &str) -> Result<SealedManifest, SealError> {
        if text.len() > SEALED_MANIFEST_BYTES_MAX {
            return Err(SealError::Manifest(format!(
                "{} bytes, more than the {SEALED_MANIFEST_BYTES_MAX} allowed",
                text.len()
            )));
        }
        let json: SealedManifestJson =
            serde_json::from_str(text).map_err(|e| SealError::Manifest(e.to_string()))?;
        if json.format_version != SEAL_VERSION {
            return Err(SealError::Manifest(format!(
                "format_version {}, expected {SEAL_VERSION}",
                json.format_version
            )));
        }
        let dataset_id = parse_hex32(&json.dataset_id).ok_or_else(|| {
            SealError::Manifest(format!(
                "dataset_id `{}` is not 64 lowercase hex digits",
                json.dataset_id.escape_debug()
            ))
        })?;
        let stated = parse_hex32(&json.manifest_id).ok_or_else(|| {
            SealError::Manifest(format!(
                "manifest_id `{}` is not 64 lowercase hex digits",
                json.manifest_id.escape_debug()
            ))
        })?;
        let manifest = SealedManifest {
            format_version: json.format_version,
            dataset_id,
            vocab_size: json.vocab_size,
            end_of_text_id: json.end_of_text_id,
            token_bytes: json.token_bytes,
            train_text_bytes: json.train_text_bytes,
            val_text_bytes: json.val_text_bytes,
            items: json.items,
        };
        manifest.check()?;
        let computed = manifest.manifest_id();
        if computed != stated {
            return Err(SealError::ManifestId {
                stated: hex::encode(stated),
                computed: hex::encode(computed),
            });
        }
        Ok(manifest)
    }

    /// Checks everything [`SealedManifest::parse`] checks but the stated id.
    pub(crate) fn check(&self) -> Result<(), SealError> {
        let bad = |message: String| Err(SealError::Manifest(message));
        if self.format_version != SEAL_VERSION {
            return bad(format!(
                "format_version {}, expected {SEAL_VERSION}",
                self.format_version
            ));
        }
        if !(1..=VOCAB_MAX).contains(&self.vocab_size) {
            return bad(format!(
                "vocab_size {} is outside 1..={VOCAB_MAX} (token ids are u32)",
                self.vocab_size
            ));
        }
        if self.token_bytes != 2 && self.token_bytes != 4 {
            return bad(format!("token_bytes {}, expected 2 or 4", self.token_bytes));
        }
        if self.token_bytes == 2 && self.vocab_size > 1 << 16 {
            return bad(format!(
                "vocab_size {} does not fit 2-byte tokens",
                self.vocab_size
            ));
        }
        if self.end_of_text_id as usize >= self.vocab_size {
            return bad(format!(
                "end_of_text_id {} is outside the vocabulary of {}",
                self.end_of_text_id, self.vocab_size
            ));
        }
        if self.items.is_empty() || self.items.len() > ITEMS_MAX {
            return bad(format!(
                "{} items, expected 1..={ITEMS_MAX} (the tokenizer and the shards)",
                self.items.len()
            ));
        }
        let mut names = std::collections::HashSet::with_capacity(self.items.len());
        let mut previous = Role::Tokenizer;
        for (position, item) in self.items.iter().enumerate() {
            let name = || format!("item {} (`{}`)", item.index, item.file.escape_debug());
            if item.index as usize != position {
                return bad(format!(
                    "{} is at position {position}; items must be listed by index from 0",
                    name()
                ));
            }
            let role_ok = match (position, item.role) {
                (0, Role::Tokenizer) => true,
                (0, _) | (_, Role::Tokenizer) => false,
                // Train shards come before val shards.
                (_, Role::Train) => previous != Role::Val,
                (_, Role::Val) => true,
            };
            if !role_ok {
                return bad(format!(
                    "{} has role {:?}; expected the tokenizer at 0, then train, then val shards",
                    name(),
                    item.role
                ));
            }
            previous = item.role;
            if !is_plain_file_name(&item.file) || item.file == SEALED_MANIFEST_FILE {
                return bad(format!(
                    "{}: not a plain file name (1-255 characters of A-Z a-z 0-9 . - _, not starting with `.`, not `{SEALED_MANIFEST_FILE}`)",
                    name()
                ));
            }
            if !names.insert(item.file.as_str()) {
                return bad(format!("{}: file name listed twice", name()));
            }
            let plaintext_expected = match item.role {
                Role::Tokenizer if item.tokens != 0 => {
                    return bad(format!(
                        "{}: the tokenizer has {} tokens, expected 0",
                        name(),
                        item.tokens
                    ));
                }
                Role::Tokenizer => item.plaintext_bytes,
                Role::Train | Role::Val => item
                    .tokens
                    .checked_mul(self.token_bytes as u64)
                    .and_then(|b| b.checked_add(SHARD_HEADER_BYTES as u64))
                    .unwrap_or(u64::MAX),
            };
            if item.plaintext_bytes != plaintext_expected {
                return bad(format!(
                    "{}: {} plaintext bytes, but {} tokens of {} bytes make a {}-byte shard",
                    name(),
                    item.plaintext_bytes,
                    item.tokens,
                    self.token_bytes,
                    plaintext_expected
                ));
            }
            let ciphertext_expected = sealed_len(item.plaintext_bytes);
            if ciphertext_expected != Some(item.ciphertext_bytes) {
                return bad(format!(
                    "{}: {} ciphertext bytes, but {} plaintext bytes seal to {}",
                    name(),
                    item.ciphertext_bytes,
                    item.plaintext_bytes,
                    ciphertext_expected.map_or("more than 2^64".into(), |b| b.to_string())
                ));
            }
            if item.ciphertext_bytes > ITEM_CIPHERTEXT_BYTES_MAX {
                return bad(format!(
                    "{}: {} ciphertext bytes, more than the {ITEM_CIPHERTEXT_BYTES_MAX} a node downloads",
                    name(),
                    item.ciphertext_bytes
                ));
            }
            if parse_hex32(&item.ciphertext_blake3).is_none() {
                return bad(format!(
                    "{}: ciphertext_blake3 `{}` is not 64 lowercase hex digits",
                    name(),
                    item.ciphertext_blake3.escape_debug()
                ));
            }
        }
        Ok(())
    }

    /// blake3 of the canonical encoding of everything but the ciphertext hashes (see
    /// the crate documentation), recomputed on each call. Every chunk of every item is
    /// bound to it.
    pub fn manifest_id(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(MANIFEST_ID_DOMAIN);
        h.update(&self.format_version.to_le_bytes());
        h.update(&self.dataset_id);
        h.update(&(self.vocab_size as u64).to_le_bytes());
        h.update(&self.end_of_text_id.to_le_bytes());
        h.update(&self.token_bytes.to_le_bytes());
        h.update(&self.train_text_bytes.to_le_bytes());
        h.update(&self.val_text_bytes.to_le_bytes());
        h.update(&(self.items.len() as u32).to_le_bytes());
        for item in &self.items {
            h.update(&item.index.to_le_bytes());
            h.update(&[item.role.code()]);
            h.update(&(item.file.len() as u32).to_le_bytes());
            h.update(item.file.as_bytes());
            h.update(&item.plaintext_bytes.to_le_bytes());
            h.update(&item.tokens.to_le_bytes());
            h.update(&item.ciphertext_bytes.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// `sealed.json`, pretty-printed, with the `manifest_id` stated.
    pub fn to_json(&self) -> String {
        let json = SealedManifestJson {
            format_version: self.format_version,
            dataset_id: hex::encode(self.dataset_id),
            manifest_id: hex::encode(self.manifest_id()),
            vocab_size: self.vocab_size,
            end_of_text_id: self.end_of_text_id,
            token_bytes: self.token_bytes,
            train_text_bytes: self.train_text_bytes,
            val_text_bytes: self.val_text_bytes,
            items: self.items.clone(),
        };
        serde_json::to_string_pretty(&json).expect("a sealed manifest serialises")
    }

    /// The files of the sealed directory: `sealed.json`, then the items by index.
    pub fn files(&self) -> Vec<String> {
        std::iter::once(SEALED_MANIFEST_FILE.to_string())
            .chain(self.items.iter().map(|i| i.file.clone()))
            .collect()
    }

    /// The items of one role, in index order.
    pub fn items_of(&self, role: Role) -> impl Iterator<Item = &SealedItem> {
        self.items.iter().filter(move |i| i.role == role)
    }
}

/// Decrypts item `index` of `manifest` from its sealed file's bytes, in memory, and
/// returns the plaintext; it writes nothing anywhere. Before decrypting it checks the
/// ciphertext's length and hash against the manifest and the header against the item;
/// then every chunk must authenticate under `key`, bound to the manifest's id and the
/// index. A wrong key, another item's or data set's file, or a truncated, reordered or
/// altered chunk is an error naming the item.
pub fn open_item(
    manifest: &SealedManifest,
    index: u32,
    key: &[u8; 32],
    ciphertext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let item = manifest
        .items
        .get(index as usize)
        .ok_or(SealError::NoItem {
            index,
            items: manifest.items.len(),
        })?;
    let file = || item.file.clone();
    if ciphertext.len() as u64 != item.ciphertext_bytes {
        return Err(SealError::CiphertextLength {
            index,
            file: file(),
            expected: item.ciphertext_bytes,
            actual: ciphertext.len() as u64,
        });
    }
    let actual = blake3::hash(ciphertext).to_hex().to_string();
    if actual != item.ciphertext_blake3 {
        return Err(SealError::CiphertextHash {
            index,
            file: file(),
            expected: item.ciphertext_blake3.clone(),
            actual,
        });
    }
    let header_err = |message: String| SealError::Header {
        index,
        file: file(),
        message,
    };
    let header_bytes: &[u8; HEADER_BYTES] = ciphertext
        .get(..HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| header_err("shorter than the 32-byte header".into()))?;
    let header = format::Header::decode(header_bytes).map_err(header_err)?;
    if header.index != index {
        return Err(header_err(format!(
            "the file is item {}, not item {index}",
            header.index
        )));
    }
    if header.plaintext_bytes != item.plaintext_bytes {
        return Err(header_err(format!(
            "{} plaintext bytes, the sealed manifest says {}",
            header.plaintext_bytes, item.plaintext_bytes
        )));
    }
    format::open_body(
        key,
        &manifest.manifest_id(),
        &header,
        &ciphertext[HEADER_BYTES..],
        item.plaintext_bytes,
    )
    .map_err(|chunk| SealError::Decrypt {
        index,
        file: file(),
        chunk,
    })
}

/// Seals item `index` of `manifest` from its plaintext in memory, with the given key
/// and nonce prefix: the bytes [`seal_dataset`] would write for them (it streams from
/// the prepared files and draws both at random). For tests, fuzz seeds and tools;
/// the result opens with [`open_item`] once the item's `ciphertext_blake3` is its
/// hash. Panics if there is no such item or `plaintext` is not its length.
pub fn seal_item(
    manifest: &SealedManifest,
    index: u32,
    key: &[u8; 32],
    nonce_prefix: [u8; limits::NONCE_PREFIX_BYTES],
    plaintext: &[u8],
) -> Vec<u8> {
    let item = &manifest.items[index as usize];
    assert_eq!(plaintext.len() as u64, item.plaintext_bytes, "item {index}");
    let header = format::Header {
        index,
        plaintext_bytes: item.plaintext_bytes,
        nonce_prefix,
    };
    let mut sealer = format::ItemSealer::new(key, &manifest.manifest_id(), &header);
    let mut out = Vec::with_capacity(item.ciphertext_bytes as usize);
    out.extend_from_slice(&header.encode());
    let mut rest = plaintext;
    for chunk in 0..chunk_count(item.plaintext_bytes) {
        let (now, after) =
            rest.split_at(format::chunk_plaintext_bytes(item.plaintext_bytes, chunk));
        rest = after;
        let mut buf = now.to_vec();
        sealer.seal_chunk(&mut buf);
        out.extend_from_slice(&buf);
    }
    assert!(sealer.is_done());
    out
}
