//! Data sets: byte-level BPE tokenizer training, tokenized shards, and a manifest
//! with the blake3 hash of every file.
//!
//! A prepared data set is a directory:
//!
//! ```text
//! manifest.json        what is here, with hashes and token counts
//! tokenizer.json       Hugging Face tokenizer (byte-level BPE)
//! train-00000.bin ...  token shards
//! val-00000.bin ...
//! ```
//!
//! A shard is a 32-byte header (`magic`, format version, bytes per token, token count,
//! reserved) followed by little-endian tokens. Shards are memory-mapped and read by
//! index; a data set much larger than memory trains without loading it. Opening a
//! shard checks its length against the header (truncation) and its blake3 hash against
//! the manifest (corruption) before any token is used.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

// The manifest and the shard format live in `tessera-data-format`, which builds without
// libtorch or tokenizers so that their parsers can be fuzzed (`fuzz/`); these paths
// keep working.
use tessera_data_format::{hash_hex, ShardError, MANIFEST_VERSION};
pub use tessera_data_format::{
    is_plain_file_name, Manifest, ShardEntry, SourceEntry, MANIFEST_FILE, TOKENIZER_FILE,
};
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Why a data set could not be prepared or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An input file is not valid UTF-8.
    #[error("{path}: not valid UTF-8 at byte {offset}; convert the file to UTF-8 first")]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The inputs hold no text to train on.
    #[error("no text to train on: every input file is empty")]
    Empty,
    /// A bad option value.
    #[error("{0}")]
    Option(String),
    /// The tokenizer could not be trained, loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The data directory has no tokenizer.
    #[error("{path}: tokenizer.json is missing; re-run `tessera data prepare`")]
    MissingTokenizer { path: PathBuf },
    /// The manifest is missing or malformed.
    #[error("{path}: bad manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    /// A shard is shorter or longer than its header says.
    #[error("{path}: shard is truncated or padded: {actual} bytes, header implies {expected}")]
    ShardLength {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A shard's header is not a Tessera shard header.
    #[error("{path}: not a Tessera token shard ({message})")]
    ShardHeader { path: PathBuf, message: String },
    /// A shard's content hash differs from the manifest.
    #[error(
        "{path}: blake3 {actual} does not match the manifest's {expected}; the shard is corrupt"
    )]
    ShardHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A shard holds a token id outside the tokenizer's vocabulary.
    #[error("{path}: token {token} at index {index} is outside the vocabulary of {vocab}")]
    TokenRange {
        path: PathBuf,
        index: usize,
        token: u32,
        vocab: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A shard check's error, naming the shard's path.
fn shard_error(path: &Path, e: ShardError) -> DataError {
    let path = path.to_path_buf();
    match e {
        ShardError::Header(message) => DataError::ShardHeader { path, message },
        ShardError::Length { expected, actual } => DataError::ShardLength {
            path,
            expected,
            actual,
        },
        ShardError::Hash { expected, actual } => DataError::ShardHash {
            path,
            expected,
            actual,
        },
        ShardError::TokenRange {
            index,
            token,
            vocab,
        } => DataError::TokenRange {
            path,
            index,
            token,
            vocab,
        },
        // `ShardError` is non-exhaustive; a check added there reads as a bad header.
        other => DataError::ShardHeader {
            path,
            message: other.to_string(),
        },
    }
}

/// Options of `tessera data prepare`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub vocab_size: usize,
    pub val_fraction: f64,
    /// Use this tokenizer instead of training one.
    pub tokenizer: Option<PathBuf>,
    pub shard_tokens_max: usize,
}

/// Splits `text` so the last `fraction` of its bytes (cut at a line break where one is
/// near, always at a character boundary) is held out for validation.
fn split_validation(text: &str, fraction: f64) -> (&str, &str) {
    if fraction <= 0.0 || text.is_empty() {
        return (text, "");
    }
    let mut cut = ((text.len() as f64) * (1.0 - fraction)) as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    if let Some(nl) = text[cut..].find('\n') {
        // Prefer a line boundary when one is within 1% of the text.
        if nl <= text.len() / 100 {
            cut += nl + 1;
        }
    }
    text.split_at(cut)
}

/// Trains a byte-level BPE tokenizer on `texts` with an end-of-text special token.
pub fn train_tokenizer(texts: &[&str], vocab_size: usize) -> Result<Tokenizer, DataError> {
    let tok_err = |e: tokenizers::Error| DataError::Tokenizer {
        path: PathBuf::from("<training>"),
        message: e.to_string(),
    };
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let lines = texts.iter().flat_map(|t| t.split_inclusive('\n'));
    tokenizer.train(&mut trainer, lines).map_err(tok_err)?;
    Ok(tokenizer)
}

/// Loads a tokenizer and checks that it is byte-level, which bits-per-byte needs.
pub fn load_tokenizer_json(json: &str, path: &Path) -> Result<Tokenizer, DataError> {
    let tokenizer = Tokenizer::from_bytes(json.as_bytes()).map_err(|e| DataError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    match tokenizer.get_decoder() {
        Some(DecoderWrapper::ByteLevel(_)) => Ok(tokenizer),
        _ => Err(DataError::Tokenizer {
            path: path.to_path_buf(),
            message: "decoder is not ByteLevel; Tessera needs a byte-level BPE tokenizer".into(),
        }),
    }
}

/// Bytes of text each token id stands for. A byte-level token's string has one
/// character per byte; special tokens stand for no text.
pub fn token_byte_lengths(tokenizer: &Tokenizer) -> Vec<u32> {
    let vocab = tokenizer.get_vocab_size(true);
    let specials: std::collections::HashSet<u32> = tokenizer
        .get_added_vocabulary()
        .get_vocab()
        .values()
        .copied()
        .collect();
    (0..vocab as u32)
        .map(|id| match tokenizer.id_to_token(id) {
            Some(_) if specials.contains(&id) => 0,
            Some(s) => s.chars().count() as u32,
            None => 0,
        })
        .collect()
}

/// Tokenizes `text` in line-aligned chunks so memory stays bounded on large inputs.
pub fn encode_text(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, DataError> {
    const CHUNK_BYTES: usize = 1 << 20;
    let mut out = Vec::with_capacity(text.len() / 3);
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(CHUNK_BYTES);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        if end < rest.len() {
            if let Some(nl) = rest[..end].rfind('\n') {
                end = nl + 1;
            }
        }
        let enc = tokenizer
            .encode_fast(&rest[..end], false)
            .map_err(|e| DataError::Tokenizer {
                path: PathBuf::from("<encode>"),
                message: e.to_string(),
            })?;
        out.extend_from_slice(enc.get_ids());
        rest = &rest[end..];
    }
    Ok(out)
}

fn write_shards(
    dir: &Path,
    prefix: &str,
    tokens: &[u32],
    token_bytes: u32,
    shard_tokens_max: usize,
) -> Result<Vec<ShardEntry>, DataError> {
    let mut entries = Vec::new();
    for (i, chunk) in tokens.chunks(shard_tokens_max.max(1)).enumerate() {
        let file = format!("{prefix}-{i:05}.bin");
        let bytes = tessera_data_format::encode_shard(chunk, token_bytes);
        let path = dir.join(&file);
        tessera_model::checkpoint::write_atomic(&path, &bytes).map_err(io_err(&path))?;
        entries.push(ShardEntry {
            file,
            tokens: chunk.len() as u64,
            blake3: hash_hex(&bytes),
        });
    }
    Ok(entries)
}

/// Runs `tessera data prepare`: validates and splits the inputs, trains (or loads) the
/// tokenizer on the training part only, and writes shards, tokenizer and manifest.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest, DataError> {
    if !(0.0..0.5).contains(&opts.val_fraction) {
        return Err(DataError::Option(format!(
            "--val-fraction must be in [0, 0.5), got {}",
            opts.val_fraction
        )));
    }
    if opts.vocab_size < 257 || opts.vocab_size > u32::MAX as usize {
        return Err(DataError::Option(format!(
            "--vocab must be at least 257 (256 bytes + end-of-text), got {}",
            opts.vocab_size
        )));
    }
    if opts.inputs.is_empty() {
        return Err(DataError::Option("give at least one --input file".into()));
    }
    let mut texts = Vec::new();
    let mut sources = Vec::new();
    for path in &opts.inputs {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        sources.push(SourceEntry {
            path: path.display().to_string(),
            bytes: bytes.len() as u64,
            blake3: hash_hex(&bytes),
        });
        let text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
            path: path.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        texts.push(text);
    }
    if texts.iter().all(|t| t.is_empty()) {
        return Err(DataError::Empty);
    }
    let splits: Vec<(&str, &str)> = texts
        .iter()
        .map(|t| split_validation(t, opts.val_fraction))
        .collect();
    let tokenizer = match &opts.tokenizer {
        Some(path) => {
            let json = std::fs::read_to_string(path).map_err(io_err(path))?;
            load_tokenizer_json(&json, path)?
        }
        None => {
            let train_texts: Vec<&str> = splits.iter().map(|s| s.0).collect();
            train_tokenizer(&train_texts, opts.vocab_size)?
        }
    };
    let vocab_size = tokenizer.get_vocab_size(true);
    let end_of_text_id =
        tokenizer
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| DataError::Tokenizer {
                path: opts.tokenizer.clone().unwrap_or_default(),
                message: format!("has no `{END_OF_TEXT}` token"),
            })?;
    let token_bytes = if vocab_size <= u16::MAX as usize + 1 {
        2
    } else {
        4
    };

    let mut train_tokens = Vec::new();
    let mut val_tokens = Vec::new();
    for (train, val) in &splits {
        train_tokens.extend(encode_text(&tokenizer, train)?);
        train_tokens.push(end_of_text_id);
        if !val.is_empty() {
            val_tokens.extend(encode_text(&tokenizer, val)?);
            val_tokens.push(end_of_text_id);
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let tok_json = tokenizer
        .to_string(true)
        .map_err(|e| DataError::Tokenizer {
            path: opts.out.join(TOKENIZER_FILE),
            message: e.to_string(),
        })?;
    let tok_path = opts.out.join(TOKENIZER_FILE);
    tessera_model::checkpoint::write_atomic(&tok_path, tok_json.as_bytes())
        .map_err(io_err(&tok_path))?;
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        tokenizer_blake3: hash_hex(tok_json.as_bytes()),
        vocab_size,
        end_of_text_id,
        token_bytes,
        train_text_bytes: splits.iter().map(|s| s.0.len() as u64).sum(),
        val_text_bytes: splits.iter().map(|s| s.1.len() as u64).sum(),
        sources,
        train: write_shards(
            &opts.out,
            "train",
            &train_tokens,
            token_bytes,
            opts.shard_tokens_max,
        )?,
        val: write_shards(
            &opts.out,
            "val",
            &val_tokens,
            token_bytes,
            opts.shard_tokens_max,
        )?,
    };
    let path = opts.out.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    tessera_model::checkpoint::write_atomic(&path, &json).map_err(io_err(&path))?;
    Ok(manifest)
}

/// Where a shard's bytes live.
enum ShardBytes {
    /// A prepared shard file, mapped read-only.
    Mapped(memmap2::Mmap),
    /// A decrypted sealed shard, in memory only (its plaintext is never on disk).
    Owned(Vec<u8>),
}

impl ShardBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(map) => map,
            ShardBytes::Owned(bytes) => bytes,
        }
    }
}

// Not derived: a derived `Debug` of owned bytes would print a private shard's tokens
// into any log that shows a `Dataset`.
impl std::fmt::Debug for ShardBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardBytes::Mapped(map) => write!(f, "Mapped({} bytes)", map.len()),
            ShardBytes::Owned(bytes) => write!(f, "Owned({} bytes)", bytes.len()),
        }
    }
}

/// A verified token shard: memory-mapped from a prepared data set, or held in memory
/// when it was decrypted from a sealed one.
#[derive(Debug)]
pub struct Shard {
    bytes: ShardBytes,
    token_bytes: usize,
    len: usize,
}

impl Shard {
    /// Opens a shard, checking header, length, content hash and token range.
    pub fn open(path: &Path, entry: &ShardEntry, vocab: usize) -> Result<Shard, DataError> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the shard is opened read-only and Tessera never writes a shard in
        // place (writes go to a temporary file and are renamed), so the mapping's bytes
        // do not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        Shard::checked(ShardBytes::Mapped(map), path, entry, vocab)
    }

    /// A shard from bytes in memory, with the checks of [`Shard::open`]. Errors name
    /// `entry.file`.
    pub fn from_bytes(
        bytes: Vec<u8>,
        entry: &ShardEntry,
        vocab: usize,
    ) -> Result<Shard, DataError> {
        Shard::checked(
            ShardBytes::Owned(bytes),
            Path::new(&entry.file),
            entry,
            vocab,
        )
    }

    fn checked(
        bytes: ShardBytes,
        path: &Path,
        entry: &ShardEntry,
        vocab: usize,
    ) -> Result<Shard, DataError> {
        let header = tessera_data_format::check_shard(bytes.bytes(), entry, vocab)
            .map_err(|e| shard_error(path, e))?;
        Ok(Shard {
            bytes,
            token_bytes: header.token_bytes,
            len: header.tokens as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The token at `index`.
    pub fn get(&self, index: usize) -> u32 {
        assert!(
            index < self.len,
            "token index {index} out of range {}",
            self.len
        );
        tessera_data_format::token_at(self.bytes.bytes(), self.token_bytes, index)
    }

    /// Appends tokens `start..start + count` to `out`.
    pub fn read_into(&self, start: usize, count: usize, out: &mut Vec<i64>) {
        out.extend((start..start + count).map(|i| self.get(i) as i64));
    }
}

/// A prepared data set opened for reading.
#[derive(Debug)]
pub struct Dataset {
    /// The directory [`Dataset::open`] read; empty for a data set built in memory by
    /// [`Dataset::from_sealed`]. Nothing in the workspace reads it.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tokenizer_json: String,
    pub tokenizer: Tokenizer,
    pub train: Vec<Shard>,
    pub val: Vec<Shard>,
}

impl Dataset {
    /// Opens `dir`, verifying the manifest, the tokenizer hash and every shard.
    pub fn open(dir: &Path) -> Result<Dataset, DataError> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(io_err(&mpath))?;
        let manifest = Manifest::parse(&text).map_err(|e| DataError::Manifest {
            path: mpath.clone(),
            message: e.to_string(),
        })?;
        let tpath = dir.join(TOKENIZER_FILE);
        if !tpath.exists() {
            return Err(DataError::MissingTokenizer { path: tpath });
        }
        let tokenizer_json = std::fs::read_to_string(&tpath).map_err(io_err(&tpath))?;
        let actual = hash_hex(tokenizer_json.as_bytes());
        if actual != manifest.tokenizer_blake3 {
            return Err(DataError::ShardHash {
                path: tpath,
                expected: manifest.tokenizer_blake3,
                actual,
            });
        }
        let tokenizer = load_tokenizer_json(&tokenizer_json, &tpath)?;
        let open_all = |entries: &[ShardEntry]| -> Result<Vec<Shard>, DataError> {
            entries
                .iter()
                .map(|e| Shard::open(&dir.join(&e.file), e, manifest.vocab_size))
                .collect()
        };
        let train = open_all(&manifest.train)?;
        let val = open_all(&manifest.val)?;
        Ok(Dataset {
            dir: dir.to_path_buf(),
            tokenizer_json,
            tokenizer,
            train,
            val,
            manifest,
        })
    }

    /// A data set from the decrypted items of a sealed one (see `tessera-seal`):
    /// `plaintexts[i]` is item `i` as `tessera_seal::open_item` returned it. Nothing is
    /// read from or written to disk. The plaintext [`Manifest`] is rebuilt in memory:
    /// shards are named by their sealed file names (which errors name), their hashes
    /// are of the plaintexts given, and it lists no sources (sealing does not publish
    /// them). Every shard then gets the checks of [`Dataset::open`] (header, token
    /// count against the sealed manifest, token range), and each item's length must be
    /// the sealed manifest's, so items passed out of order are refused where their
    /// sizes differ. `dir` is empty.
    pub fn from_sealed(
        sealed: &tessera_seal::SealedManifest,
        plaintexts: Vec<Vec<u8>>,
    ) -> Result<Dataset, DataError> {
        use tessera_seal::Role;
        if plaintexts.len() != sealed.items.len() {
            return Err(DataError::Manifest {
                path: PathBuf::from(tessera_seal::SEALED_MANIFEST_FILE),
                message: format!(
                    "{} decrypted items for the {} items it lists",
                    plaintexts.len(),
                    sealed.items.len()
                ),
            });
        }
        let mut tokenizer_bytes = None;
        let mut train = Vec::new();
        let mut val = Vec::new();
        let mut manifest = Manifest {
            format_version: MANIFEST_VERSION,
            tokenizer_blake3: String::new(),
            vocab_size: sealed.vocab_size,
            end_of_text_id: sealed.end_of_text_id,
            token_bytes: sealed.token_bytes,
            train_text_bytes: sealed.train_text_bytes,
            val_text_bytes: sealed.val_text_bytes,
            sources: vec![],
            train: vec![],
            val: vec![],
        };
        for (item, bytes) in sealed.items.iter().zip(plaintexts) {
            let path = PathBuf::from(&item.file);
            if bytes.len() as u64 != item.plaintext_bytes {
                return Err(DataError::ShardLength {
                    path,
                    expected: item.plaintext_bytes,
                    actual: bytes.len() as u64,
                });
            }
            let entry = ShardEntry {
                file: item.file.clone(),
                tokens: item.tokens,
                blake3: hash_hex(&bytes),
            };
            match item.role {
                Role::Tokenizer => {
                    manifest.tokenizer_blake3 = entry.blake3;
                    tokenizer_bytes = Some((bytes, path));
                }
                Role::Train => {
                    train.push(Shard::from_bytes(bytes, &entry, sealed.vocab_size)?);
                    manifest.train.push(entry);
                }
                Role::Val => {
                    val.push(Shard::from_bytes(bytes, &entry, sealed.vocab_size)?);
                    manifest.val.push(entry);
                }
            }
        }
        // `SealedManifest::parse` puts the tokenizer at item 0; a manifest built by
        // hand may not have.
        let Some((bytes, path)) = tokenizer_bytes else {
            return Err(DataError::MissingTokenizer {
                path: PathBuf::from(tessera_seal::SEALED_MANIFEST_FILE),
            });
        };
        let tokenizer_json = String::from_utf8(bytes).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: format!("not UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        })?;
        let tokenizer = load_tokenizer_json(&tokenizer_json, &path)?;
        Ok(Dataset {
            dir: PathBuf::new(),
            manifest,
            tokenizer_json,
            tokenizer,
            train,
            val,
        })
    }
}

/// Fixed-length windows of `seq_len + 1` tokens over a list of shards: window `w` of a
/// shard starts at `w * seq_len`, so consecutive windows share one token and every token
/// but a shard's first is a prediction target exactly once.
#[derive(Debug, Clone)]
pub struct Windows {
    seq_len: usize,
    /// Cumulative window counts per shard, for index → (shard, offset).
    starts: Vec<usize>,
}

impl Windows {
    pub fn new(shards: &[Shard], seq_len: usize) -> Windows {
        let mut starts = vec![0];
        for s in shards {
            let n = s.len().saturating_sub(1) / seq_len;
            starts.push(starts.last().expect("non-empty") + n);
        }
        Windows { seq_len, starts }
    }

    pub fn len(&self) -> usize {
        *self.starts.last().expect("non-empty")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends window `index` (`seq_len + 1` tokens) to `out`.
    pub fn read(&self, shards: &[Shard], index: usize, out: &mut Vec<i64>) {
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        let offset = (index - self.starts[shard]) * self.seq_len;
        shards[shard].read_into(offset, self.seq_len + 1, out);
    }
}

impl Dataset {
    /// The first validation windows (`seq_len + 1` tokens each), at most
    /// `tokens_max` predicted tokens in all: the fixed set every validation pass scores.
    pub fn validation_windows(&self, seq_len: usize, tokens_max: usize) -> Vec<Vec<i64>> {
        let windows = Windows::new(&self.val, seq_len);
        let n = windows.len().min(tokens_max / seq_len.max(1));
        (0..n)
            .map(|i| {
                let mut w = Vec::with_capacity(seq_len + 1);
                windows.read(&self.val, i, &mut w);
                w
            })
            .collect()
    }

    /// The file names of the data set (manifest, tokenizer, shards).
    pub fn files(&self) -> Vec<String> {
        let shards = self
            .manifest
            .train
            .iter()
            .chain(&self.manifest.val)
            .map(|s| s.file.clone());
        [MANIFEST_FILE.to_string(), TOKENIZER_FILE.to_string()]
            .into_iter()
            .chain(shards)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "First Citizen:\r\nBefore we proceed any further, hear me speak.\n\
        Café naïve — 東京 🚀 emoji\n\nAll:\nSpeak, speak.\n";

    fn prepared(dir: &Path) -> Manifest {
        let input = dir.join("in.txt");
        std::fs::write(&input, TEXT.repeat(40)).unwrap();
        prepare(&PrepareOptions {
            inputs: vec![input],
            out: dir.join("data"),
            vocab_size: 300,
            val_fraction: 0.1,
            tokenizer: None,
            shard_tokens_max: 1000,
        })
        .unwrap()
    }

    #[test]
    fn prepare_round_trips_unicode_and_crlf() {
        let dir = tempfile::tempdir().unwrap();
        let m = prepared(dir.path());
        assert!(
            m.train.len() > 1,
            "small shard limit should give several shards"
        );
        let ds = Dataset::open(&dir.path().join("data")).unwrap();
        let mut ids = Vec::new();
        for s in &ds.train {
            ids.extend((0..s.len()).map(|i| s.get(i)));
        }
        let decoded = ds.tokenizer.decode(&ids, true).unwrap();
        let full = TEXT.repeat(40);
        let (train, _) = split_validation(&full, 0.1);
        assert_eq!(decoded, train);
        // Byte lengths per token add up to the text's byte count.
        let lens = token_byte_lengths(&ds.tokenizer);
        let bytes: u64 = ids.iter().map(|&i| lens[i as usize] as u64).sum();
        assert_eq!(bytes, m.train_text_bytes);
    }

    #[test]
    fn truncated_and_corrupt_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = prepared(dir.path());
        let shard = dir.path().join("data").join(&m.train[0].file);
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
        let err = Dataset::open(&dir.path().join("data")).unwrap_err();
        assert!(matches!(err, DataError::ShardLength { .. }), "{err}");
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        std::fs::write(&shard, &flipped).unwrap();
        let err = Dataset::open(&dir.path().join("data")).unwrap_err();
        assert!(matches!(err, DataError::ShardHash { .. }), "{err}");
        std::fs::write(&shard, &bytes).unwrap();
        std::fs::remove_file(dir.path().join("data").join(TOKENIZER_FILE)).unwrap();
        let err = Dataset::open(&dir.path().join("data")).unwrap_err();
        assert!(matches!(err, DataError::MissingTokenizer { .. }), "{err}");
    }

    #[test]
    fn invalid_utf8_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("bad.txt");
        std::fs::write(&input, b"hello \xff world").unwrap();
        let err = prepare(&PrepareOptions {
            inputs: vec![input],
            out: dir.path().join("out"),
            vocab_size: 300,
            val_fraction: 0.1,
            tokenizer: None,
            shard_tokens_max: 1000,
        })
        .unwrap_err();
        assert!(matches!(err, DataError::NotUtf8 { offset: 6, .. }), "{err}");
        assert!(err.to_string().contains("bad.txt"));
    }

    /// Seals a prepared data set, opens every item in memory as a node would, and
    /// checks that the data set built from the plaintexts is the one on disk.
    #[test]
    fn a_sealed_data_set_opens_to_the_same_tokens() {
        let dir = tempfile::tempdir().unwrap();
        prepared(dir.path());
        let data = dir.path().join("data");
        let (sealed, keys) = tessera_seal::seal_dataset(&data, &dir.path().join("sealed")).unwrap();
        let open = |index: u32| {
            let item = &sealed.items[index as usize];
            let ciphertext = std::fs::read(dir.path().join("sealed").join(&item.file)).unwrap();
            tessera_seal::open_item(&sealed, index, keys.key(index).unwrap(), &ciphertext).unwrap()
        };
        let plaintexts: Vec<Vec<u8>> = (0..sealed.items.len() as u32).map(open).collect();
        let from_disk = Dataset::open(&data).unwrap();
        let from_sealed = Dataset::from_sealed(&sealed, plaintexts.clone()).unwrap();
        let tokens = |shards: &[Shard]| -> Vec<Vec<u32>> {
            shards
                .iter()
                .map(|s| (0..s.len()).map(|i| s.get(i)).collect())
                .collect()
        };
        assert!(from_disk.train.len() > 1);
        assert_eq!(tokens(&from_sealed.train), tokens(&from_disk.train));
        assert_eq!(tokens(&from_sealed.val), tokens(&from_disk.val));
        assert_eq!(from_sealed.tokenizer_json, from_disk.tokenizer_json);
        let (a, b) = (&from_sealed.manifest, &from_disk.manifest);
        assert_eq!(a.tokenizer_blake3, b.tokenizer_blake3);
        assert_eq!(
            (
                a.vocab_size,
                a.end_of_text_id,
                a.token_bytes,
                a.train_text_bytes,
                a.val_text_bytes
            ),
            (
                b.vocab_size,
                b.end_of_text_id,
                b.token_bytes,
                b.train_text_bytes,
                b.val_text_bytes
            )
        );
        let hashes = |m: &Manifest| -> Vec<(u64, String)> {
            m.train
                .iter()
                .chain(&m.val)
                .map(|e| (e.tokens, e.blake3.clone()))
                .collect()
        };
        assert_eq!(hashes(a), hashes(b));
        assert!(a.sources.is_empty(), "sealing publishes no sources");
        assert_eq!(from_sealed.dir, PathBuf::new());
        assert_eq!(
            from_sealed.validation_windows(16, 1000),
            from_disk.validation_windows(16, 1000)
        );
        let shown = format!("{:?}", from_sealed.train[0]);
        assert!(shown.contains("Owned(") && shown.len() < 200, "{shown}");

        // Items out of order or missing are refused.
        let mut swapped = plaintexts.clone();
        swapped.swap(0, 1);
        let err = Dataset::from_sealed(&sealed, swapped).unwrap_err();
        assert!(matches!(err, DataError::ShardLength { .. }), "{err}");
        let err = Dataset::from_sealed(&sealed, plaintexts[1..].to_vec()).unwrap_err();
        assert!(matches!(err, DataError::Manifest { .. }), "{err}");
        // A shard whose tokens the sealed manifest miscounts is refused by name.
        let mut miscounted = sealed.clone();
        miscounted.items[1].tokens -= 1;
        miscounted.items[1].plaintext_bytes -= u64::from(sealed.token_bytes);
        let mut short = plaintexts.clone();
        let len = short[1].len() - sealed.token_bytes as usize;
        short[1].truncate(len);
        let err = Dataset::from_sealed(&miscounted, short).unwrap_err();
        assert!(err.to_string().contains(&sealed.items[1].file), "{err}");
    }

    #[test]
    fn windows_cover_every_target_once() {
        let dir = tempfile::tempdir().unwrap();
        prepared(dir.path());
        let ds = Dataset::open(&dir.path().join("data")).unwrap();
        let w = Windows::new(&ds.train, 16);
        let expected: usize = ds.train.iter().map(|s| (s.len() - 1) / 16).sum();
        assert_eq!(w.len(), expected);
        let mut out = Vec::new();
        w.read(&ds.train, w.len() - 1, &mut out);
        assert_eq!(out.len(), 17);
    }
}
