//! The on-disk format of a prepared data set: `manifest.json` (what the directory
//! holds, with blake3 hashes and token counts) and the token shard (a 32-byte header,
//! then little-endian tokens).
//!
//! A node downloads both from its hub, so they are untrusted bytes. Their parsers live
//! here, apart from the tokenizer and the training loop in `tessera-train`, so that
//! they build without libtorch or `tokenizers` and are fuzzed on their own (`fuzz/`,
//! targets `data_manifest` and `data_shard`). The key design choice is that a shard is
//! checked whole before any token is trusted: header, length against the header,
//! token count against the manifest, content hash, then every token against the
//! vocabulary.
//!
//! This crate reads no files and maps no memory: callers pass bytes (`tessera-train`
//! passes a memory map) and map [`ShardError`] and [`ManifestError`] to errors that
//! name the path.

use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "manifest.json";
/// The tokenizer of a prepared data set (Hugging Face `tokenizer.json`, byte-level BPE).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The manifest format this version reads and writes.
pub const MANIFEST_VERSION: u32 = 1;
/// The largest vocabulary: token ids are u32.
pub const VOCAB_MAX: usize = 1 << 32;
pub const SHARD_MAGIC: [u8; 8] = *b"TSRSHARD";
pub const SHARD_VERSION: u32 = 1;
/// Magic (8), version (u32), bytes per token (u32), token count (u64), reserved (u64).
pub const SHARD_HEADER_BYTES: usize = 32;

/// One shard as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: u64,
    pub blake3: String,
}

/// One input file as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceEntry {
    pub path: String,
    pub bytes: u64,
    pub blake3: String,
}

/// `manifest.json`: everything needed to check and read a prepared data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tokenizer_blake3: String,
    pub vocab_size: usize,
    pub end_of_text_id: u32,
    pub token_bytes: u32,
    pub train_text_bytes: u64,
    pub val_text_bytes: u64,
    pub sources: Vec<SourceEntry>,
    pub train: Vec<ShardEntry>,
    pub val: Vec<ShardEntry>,
}

/// Why text is not a manifest this version reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Not JSON, or a field is missing or of the wrong type (serde's message).
    #[error("{0}")]
    Json(String),
    /// Another format version than [`MANIFEST_VERSION`].
    #[error("format_version {found}, expected {MANIFEST_VERSION}")]
    Version { found: u32 },
    /// A vocabulary size no u32 token id can index, or none at all.
    #[error("vocab_size {vocab_size} is outside 1..={VOCAB_MAX} (token ids are u32)")]
    Vocab { vocab_size: usize },
    /// A shard named by a path rather than a plain file name (see [`is_plain_file_name`]).
    #[error("shard file `{file}` is not a plain file name (1-255 characters of A-Z a-z 0-9 . - _, not starting with `.`)")]
    ShardName { file: String },
}

/// A file name a data set may list: 1-255 bytes of `[A-Za-z0-9._-]`, not starting with
/// `.`, so joined to the data directory it names a file inside it. (Nodes apply the
/// same rule to the file list a hub serves.)
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

impl Manifest {
    /// Parses `manifest.json` and checks its format version, its vocabulary size, and
    /// that every shard is a plain file name.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| ManifestError::Json(e.to_string()))?;
        if manifest.format_version != MANIFEST_VERSION {
            return Err(ManifestError::Version {
                found: manifest.format_version,
            });
        }
        if !(1..=VOCAB_MAX).contains(&manifest.vocab_size) {
            return Err(ManifestError::Vocab {
                vocab_size: manifest.vocab_size,
            });
        }
        if let Some(e) = manifest
            .train
            .iter()
            .chain(&manifest.val)
            .find(|e| !is_plain_file_name(&e.file))
        {
            return Err(ManifestError::ShardName {
                file: e.file.escape_debug().to_string(),
            });
        }
        Ok(manifest)
    }
}

/// Why bytes are not the shard a manifest entry describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The header is not a Tessera shard header, or disagrees with the manifest.
    #[error("not a Tessera token shard ({0})")]
    Header(String),
    /// The shard is shorter or longer than its header says.
    #[error("shard is truncated or padded: {actual} bytes, header implies {expected}")]
    Length { expected: u64, actual: u64 },
    /// The content hash differs from the manifest's.
    #[error("blake3 {actual} does not match the manifest's {expected}; the shard is corrupt")]
    Hash { expected: String, actual: String },
    /// A token id outside the tokenizer's vocabulary.
    #[error("token {token} at index {index} is outside the vocabulary of {vocab}")]
    TokenRange {
        index: usize,
        token: u32,
        vocab: usize,
    },
}

/// What a valid shard header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    /// 2 or 4.
    pub token_bytes: usize,
    pub tokens: u64,
}

/// blake3 of `bytes` as 64 lowercase hex characters, the form the manifest uses.
pub fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A shard's bytes: the header, then `tokens` little-endian in `token_bytes` (2 or 4)
/// bytes each.
pub fn encode_shard(tokens: &[u32], token_bytes: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SHARD_HEADER_BYTES + tokens.len() * token_bytes as usize);
    bytes.extend_from_slice(&SHARD_MAGIC);
    bytes.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    bytes.extend_from_slice(&token_bytes.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    for &t in tokens {
        match token_bytes {
            2 => bytes.extend_from_slice(&(t as u16).to_le_bytes()),
            _ => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    bytes
}

/// Checks a shard's header and that its length is what the header implies.
pub fn shard_header(bytes: &[u8]) -> Result<ShardHeader, ShardError> {
    let header_err = |message: &str| ShardError::Header(message.to_string());
    if bytes.len() < SHARD_HEADER_BYTES {
        return Err(header_err("shorter than the 32-byte header"));
    }
    if bytes[..8] != SHARD_MAGIC {
        return Err(header_err("bad magic bytes"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != SHARD_VERSION {
        return Err(header_err(&format!(
            "format version {version}, expected {SHARD_VERSION}"
        )));
    }
    let token_bytes = u32_at(12) as usize;
    if token_bytes != 2 && token_bytes != 4 {
        return Err(header_err(&format!(
            "{token_bytes} bytes per token, expected 2 or 4"
        )));
    }
    let tokens = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let expected = tokens
        .checked_mul(token_bytes as u64)
        .and_then(|b| b.checked_add(SHARD_HEADER_BYTES as u64))
        .ok_or_else(|| header_err("token count overflows"))?;
    if expected != bytes.len() as u64 {
        return Err(ShardError::Length {
            expected,
            actual: bytes.len() as u64,
        });
    }
    Ok(ShardHeader {
        token_bytes,
        tokens,
    })
}

/// Checks a whole shard against its manifest `entry` and a vocabulary of `vocab`
/// tokens: header and length, token count, content hash, then every token id.
pub fn check_shard(
    bytes: &[u8],
    entry: &ShardEntry,
    vocab: usize,
) -> Result<ShardHeader, ShardError> {
    let header = shard_header(bytes)?;
    if header.tokens != entry.tokens {
        return Err(ShardError::Header(format!(
            "{} tokens, manifest says {}",
            header.tokens, entry.tokens
        )));
    }
    let actual = hash_hex(bytes);
    if actual != entry.blake3 {
        return Err(ShardError::Hash {
            expected: entry.blake3.clone(),
            actual,
        });
    }
    // The length check above bounds the count by the bytes held, so it fits `usize`.
    let tokens = header.tokens as usize;
    if let Some((index, token)) = (0..tokens)
        .map(|i| (i, token_at(bytes, header.token_bytes, i)))
        .find(|&(_, t)| t as usize >= vocab)
    {
        return Err(ShardError::TokenRange {
            index,
            token,
            vocab,
        });
    }
    Ok(header)
}

/// Token `index` of a shard whose header [`shard_header`] accepted with
/// `token_bytes`. Panics past the end: callers check the index against the count.
pub fn token_at(bytes: &[u8], token_bytes: usize, index: usize) -> u32 {
    let o = SHARD_HEADER_BYTES + index * token_bytes;
    match token_bytes {
        2 => u16::from_le_bytes([bytes[o], bytes[o + 1]]) as u32,
        _ => u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: &[u8], tokens: u64) -> ShardEntry {
        ShardEntry {
            file: "train-00000.bin".into(),
            tokens,
            blake3: hash_hex(bytes),
        }
    }

    #[test]
    fn shards_round_trip_in_both_widths() {
        for width in [2u32, 4] {
            let tokens = [0u32, 1, 299, 42];
            let bytes = encode_shard(&tokens, width);
            assert_eq!(bytes.len(), SHARD_HEADER_BYTES + 4 * width as usize);
            let header = check_shard(&bytes, &entry(&bytes, 4), 300).unwrap();
            assert_eq!(header.token_bytes, width as usize);
            let back: Vec<u32> = (0..4)
                .map(|i| token_at(&bytes, width as usize, i))
                .collect();
            assert_eq!(back, tokens);
        }
    }

    #[test]
    fn bad_shards_are_refused_in_the_order_of_the_checks() {
        let bytes = encode_shard(&[1, 2, 3], 2);
        let e = entry(&bytes, 3);
        assert_eq!(
            shard_header(&bytes[..31]),
            Err(ShardError::Header("shorter than the 32-byte header".into()))
        );
        assert_eq!(
            shard_header(&bytes[..bytes.len() - 1]),
            Err(ShardError::Length {
                expected: 38,
                actual: 37
            })
        );
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            shard_header(&huge),
            Err(ShardError::Header("token count overflows".into()))
        );
        let mut three = bytes.clone();
        three[12] = 3;
        assert!(matches!(shard_header(&three), Err(ShardError::Header(_))));
        assert!(matches!(
            check_shard(&bytes, &entry(&bytes, 4), 300),
            Err(ShardError::Header(_))
        ));
        let mut flipped = bytes.clone();
        flipped[33] ^= 1;
        assert!(matches!(
            check_shard(&flipped, &e, 300),
            Err(ShardError::Hash { .. })
        ));
        assert_eq!(
            check_shard(&bytes, &e, 3),
            Err(ShardError::TokenRange {
                index: 2,
                token: 3,
                vocab: 3
            })
        );
    }

    /// Story: a manifest with a `vocab_size` of 2^64 − 1 parsed, and the hub and every
    /// node size the model from it: `Preset::config_for_vocab` rounds it up to a
    /// multiple of 64, which overflowed (a panic in a debug build, a vocabulary of 0 in
    /// release). The `data_manifest` fuzz target checks that rounding; it failed on a
    /// hand-made input while the target was written (libFuzzer had not produced such a
    /// number in 19.6 million executions). Token ids are u32, so a vocabulary has 1 to
    /// 2^32 entries; the manifest must say so.
    #[test]
    fn a_vocabulary_no_token_id_can_index_is_refused() {
        let m = |vocab_size: usize| Manifest {
            format_version: MANIFEST_VERSION,
            tokenizer_blake3: hash_hex(b"{}"),
            vocab_size,
            end_of_text_id: 0,
            token_bytes: 4,
            train_text_bytes: 10,
            val_text_bytes: 1,
            sources: vec![],
            train: vec![],
            val: vec![],
        };
        for vocab in [0, VOCAB_MAX + 1, usize::MAX] {
            let text = serde_json::to_string(&m(vocab)).unwrap();
            let e = Manifest::parse(&text).unwrap_err();
            assert!(e.to_string().contains(&vocab.to_string()), "{e}");
        }
        let text = serde_json::to_string(&m(VOCAB_MAX)).unwrap();
        assert_eq!(Manifest::parse(&text), Ok(m(VOCAB_MAX)));
    }

    /// Story: writing the `data_manifest` fuzz target showed that a manifest could name
    /// its shards by any path. A node checks the names of the files a hub serves, but
    /// opened the shards the manifest names, so a hub's manifest listing
    /// `../../home/u/.ssh/id_ed25519` or `/proc/self/environ` made the node map and hash
    /// that local file before refusing it. A shard is now a plain file name.
    #[test]
    fn shards_outside_the_data_directory_are_refused() {
        let shard = |file: &str| ShardEntry {
            file: file.into(),
            tokens: 1,
            blake3: hash_hex(b""),
        };
        for bad in ["../x.bin", "/etc/passwd", "a/b.bin", ".hidden", "", "x\ny"] {
            let m = Manifest {
                format_version: MANIFEST_VERSION,
                tokenizer_blake3: hash_hex(b"{}"),
                vocab_size: 300,
                end_of_text_id: 0,
                token_bytes: 2,
                train_text_bytes: 10,
                val_text_bytes: 1,
                sources: vec![],
                train: vec![shard("train-00000.bin")],
                val: vec![shard(bad)],
            };
            let e = Manifest::parse(&serde_json::to_string(&m).unwrap()).unwrap_err();
            assert!(matches!(e, ManifestError::ShardName { .. }), "{bad:?}: {e}");
        }
        assert!(is_plain_file_name("val-00012.bin"));
    }

    #[test]
    fn manifests_parse_and_refuse_other_versions() {
        let m = Manifest {
            format_version: MANIFEST_VERSION,
            tokenizer_blake3: hash_hex(b"{}"),
            vocab_size: 300,
            end_of_text_id: 0,
            token_bytes: 2,
            train_text_bytes: 10,
            val_text_bytes: 1,
            sources: vec![],
            train: vec![],
            val: vec![],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Manifest::parse(&text), Ok(m.clone()));
        let v2 = serde_json::to_string(&Manifest {
            format_version: 2,
            ..m
        })
        .unwrap();
        assert_eq!(
            Manifest::parse(&v2).unwrap_err().to_string(),
            "format_version 2, expected 1"
        );
        assert!(matches!(Manifest::parse("{"), Err(ManifestError::Json(_))));
    }
}
