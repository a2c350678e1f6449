//! `tessera data seal`: the file I/O of sealing a prepared data set.
//!
//! Two passes. The first reads the plaintext manifest and the size of every file, and
//! builds the sealed manifest (all but the ciphertext hashes), so that the
//! `manifest_id` every chunk is bound to is known before anything is encrypted. The
//! second streams each file a 64 KiB chunk at a time: hash the plaintext, encrypt it
//! in place, hash and write the ciphertext. At most one chunk of plaintext is held,
//! and the plaintext's hash is checked against the plaintext manifest at the end.
//!
//! Crash model: each item goes to `NAME.tmp`, is synced and renamed; `sealed.json` is
//! written the same way after every item, so a directory with `sealed.json` is
//! complete. A failed seal leaves the items it finished (and no `.tmp`); seal again
//! into an empty directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};
use tessera_data_format::{Manifest, MANIFEST_FILE, SHARD_HEADER_BYTES, TOKENIZER_FILE};

use crate::format::{chunk_count, chunk_plaintext_bytes, Header, ItemSealer};
use crate::limits::{
    CHUNK_PLAINTEXT_BYTES, HEADER_BYTES, ITEM_CIPHERTEXT_BYTES_MAX, NONCE_PREFIX_BYTES, TAG_BYTES,
};
use crate::{
    item_file_name, sealed_len, Role, SealError, SealKeys, SealedItem, SealedManifest,
    SEALED_MANIFEST_FILE, SEAL_VERSION,
};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A plaintext file to seal.
struct Source {
    path: PathBuf,
    role: Role,
    tokens: u64,
    bytes: u64,
    blake3: String,
}

/// Seals the prepared data set in `src` into `out` (created if missing): one
/// `item-NNNN.sealed` per item and `sealed.json`. Returns the manifest and the keys;
/// the keys are not written anywhere (save them with [`SealKeys::save`], outside
/// `out`). Files of the same names in `out` are replaced; the CLI refuses a non-empty
/// `out`.
pub fn seal_dataset(src: &Path, out: &Path) -> Result<(SealedManifest, SealKeys), SealError> {
    let mpath = src.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mpath).map_err(io_err(&mpath))?;
    let plain = Manifest::parse(&text).map_err(|e| SealError::SourceManifest {
        path: mpath.clone(),
        message: e.to_string(),
    })?;

    let tokenizer = src.join(TOKENIZER_FILE);
    let mut sources = vec![Source {
        bytes: std::fs::metadata(&tokenizer)
            .map_err(io_err(&tokenizer))?
            .len(),
        path: tokenizer,
        role: Role::Tokenizer,
        tokens: 0,
        blake3: plain.tokenizer_blake3.clone(),
    }];
    let shards = plain
        .train
        .iter()
        .map(|e| (Role::Train, e))
        .chain(plain.val.iter().map(|e| (Role::Val, e)));
    for (role, entry) in shards {
        let path = src.join(&entry.file);
        let bytes = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        let expected = entry
            .tokens
            .checked_mul(plain.token_bytes as u64)
            .and_then(|b| b.checked_add(SHARD_HEADER_BYTES as u64))
            .unwrap_or(u64::MAX);
        if bytes != expected {
            return Err(SealError::SourceLength {
                path,
                expected,
                actual: bytes,
            });
        }
        sources.push(Source {
            path,
            role,
            tokens: entry.tokens,
            bytes,
            blake3: entry.blake3.clone(),
        });
    }

    let mut items = Vec::with_capacity(sources.len());
    for (index, s) in sources.iter().enumerate() {
        let ciphertext_bytes = sealed_len(s.bytes).unwrap_or(u64::MAX);
        if ciphertext_bytes > ITEM_CIPHERTEXT_BYTES_MAX {
            return Err(SealError::ItemTooLarge {
                path: s.path.clone(),
                ciphertext_bytes,
                max: ITEM_CIPHERTEXT_BYTES_MAX,
            });
        }
        items.push(SealedItem {
            // Checked against ITEMS_MAX (< 2^32) by `check` below.
            index: index as u32,
            role: s.role,
            file: item_file_name(index as u32),
            plaintext_bytes: s.bytes,
            tokens: s.tokens,
            ciphertext_bytes,
            // Not part of the manifest id; filled in as each item is sealed.
            ciphertext_blake3: "0".repeat(64),
        });
    }
    let mut dataset_id = [0u8; 32];
    OsRng.fill_bytes(&mut dataset_id);
    let mut manifest = SealedManifest {
        format_version: SEAL_VERSION,
        dataset_id,
        vocab_size: plain.vocab_size,
        end_of_text_id: plain.end_of_text_id,
        token_bytes: plain.token_bytes,
        train_text_bytes: plain.train_text_bytes,
        val_text_bytes: plain.val_text_bytes,
        items,
    };
    // A prepared set this format cannot carry (too many shards, an odd token width)
    // is refused before anything is written.
    manifest.check().map_err(|e| SealError::SourceManifest {
        path: mpath.clone(),
        message: e.to_string(),
    })?;
    let manifest_id = manifest.manifest_id();

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut keys = Vec::with_capacity(sources.len());
    for (s, item) in sources.iter().zip(manifest.items.iter_mut()) {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
        OsRng.fill_bytes(&mut nonce_prefix);
        let header = Header {
            index: item.index,
            plaintext_bytes: item.plaintext_bytes,
            nonce_prefix,
        };
        item.ciphertext_blake3 = seal_file(s, &out.join(&item.file), &key, &manifest_id, &header)?;
        keys.push(key);
    }

    let json = manifest.to_json();
    // What was written must read back as written: a bug otherwise, not bad input.
    assert_eq!(
        SealedManifest::parse(&json).expect("a sealed manifest parses"),
        manifest
    );
    let path = out.join(SEALED_MANIFEST_FILE);
    write_atomic(&path, json.as_bytes()).map_err(io_err(&path))?;
    if let Ok(d) = std::fs::File::open(out) {
        let _ = d.sync_all();
    }
    Ok((manifest, SealKeys::new(dataset_id, manifest_id, keys)))
}

/// Seals one file to `dest` (through `dest.tmp`); returns the ciphertext's blake3.
fn seal_file(
    s: &Source,
    dest: &Path,
    key: &[u8; 32],
    manifest_id: &[u8; 32],
    header: &Header,
) -> Result<String, SealError> {
    let tmp = dest.with_extension("sealed.tmp");
    let sealed = (|| {
        let mut input = std::fs::File::open(&s.path).map_err(io_err(&s.path))?;
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut output = std::io::BufWriter::new(file);
        let mut ciphertext_hash = blake3::Hasher::new();
        let mut plaintext_hash = blake3::Hasher::new();
        let header_bytes = header.encode();
        output.write_all(&header_bytes).map_err(io_err(&tmp))?;
        ciphertext_hash.update(&header_bytes);
        let mut written = HEADER_BYTES as u64;
        let mut sealer = ItemSealer::new(key, manifest_id, header);
        let mut buf = Vec::with_capacity(CHUNK_PLAINTEXT_BYTES + TAG_BYTES);
        for chunk in 0..chunk_count(s.bytes) {
            buf.clear();
            buf.resize(chunk_plaintext_bytes(s.bytes, chunk), 0);
            input.read_exact(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => changed_length(s),
                _ => io_err(&s.path)(e),
            })?;
            plaintext_hash.update(&buf);
            sealer.seal_chunk(&mut buf);
            ciphertext_hash.update(&buf);
            output.write_all(&buf).map_err(io_err(&tmp))?;
            written += buf.len() as u64;
        }
        assert!(sealer.is_done());
        if input.read(&mut [0u8; 1]).map_err(io_err(&s.path))? != 0 {
            return Err(changed_length(s));
        }
        let actual = plaintext_hash.finalize().to_hex().to_string();
        if actual != s.blake3 {
            return Err(SealError::SourceHash {
                path: s.path.clone(),
                expected: s.blake3.clone(),
                actual,
            });
        }
        assert_eq!(Some(written), sealed_len(s.bytes));
        let file = output
            .into_inner()
            .map_err(|e| io_err(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
        Ok(ciphertext_hash.finalize().to_hex().to_string())
    })();
    if sealed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    sealed
}

/// The error for a source file whose length changed while it was sealed.
fn changed_length(s: &Source) -> SealError {
    SealError::SourceLength {
        path: s.path.clone(),
        expected: s.bytes,
        actual: std::fs::metadata(&s.path).map_or(0, |m| m.len()),
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
