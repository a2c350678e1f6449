//! Every limit of a sealed data set, with why it is what it is.
//!
//! The format constants (chunk size, header and tag sizes) are fixed by
//! [`SEAL_VERSION`](crate::SEAL_VERSION): changing one is a new format version.

/// Plaintext bytes per STREAM chunk (the last chunk of an item may be shorter, and
/// is empty only when the whole item is). Large enough that the 16-byte tag per chunk
/// costs 0.02%, small enough that sealing holds one chunk of plaintext at a time.
pub const CHUNK_PLAINTEXT_BYTES: usize = 64 << 10;

/// Poly1305 tag bytes after each chunk's ciphertext.
pub const TAG_BYTES: usize = 16;

/// Bytes of the item file header: magic (8), format version (u32), item index (u32),
/// plaintext bytes (u64), STREAM nonce prefix (7), reserved (1, zero).
pub const HEADER_BYTES: usize = 32;

/// Bytes of the STREAM nonce prefix: ChaCha20-Poly1305's 12-byte nonce less STREAM's
/// 4-byte big-endian chunk counter and 1-byte last-chunk flag.
pub const NONCE_PREFIX_BYTES: usize = 7;

/// Largest sealed item file. A node downloads every item from its hub, and a hub
/// serves no data-set file larger than `tessera_protocol::limits::DATA_FILE_BYTES_MAX`
/// (equal to this; a test of this crate checks that they agree). `tessera data
/// prepare` cuts shards far below it.
pub const ITEM_CIPHERTEXT_BYTES_MAX: u64 = 1 << 30;

/// Most items (the tokenizer and every shard) in one sealed data set. At the default
/// of 2^24 tokens per shard this is over a trillion tokens.
pub const ITEMS_MAX: usize = 1 << 16;

/// Bytes one item takes in `sealed.json` at most, pretty-printed: a 255-byte file
/// name, a 64-digit hash, four numbers and the field names fit in 512.
pub const ITEM_JSON_BYTES_MAX: usize = 512;

/// Largest `sealed.json` that is parsed (checked before the JSON is decoded, so that
/// the item list serde allocates is bounded by it).
pub const SEALED_MANIFEST_BYTES_MAX: usize = ITEMS_MAX * ITEM_JSON_BYTES_MAX + 4096;

/// Largest keys file that is parsed: one key is about 110 bytes pretty-printed.
pub const KEYS_FILE_BYTES_MAX: usize = ITEMS_MAX * 256 + 4096;

// The STREAM construction (`StreamBE32`) counts chunks in a u32 and refuses the
// largest value for any chunk but the last.
const _: () = assert!(
    ITEM_CIPHERTEXT_BYTES_MAX / (CHUNK_PLAINTEXT_BYTES as u64) < u32::MAX as u64,
    "an item's chunks must fit STREAM's 32-bit counter"
);
// Item indices are u32 on disk and in the AAD.
const _: () = assert!(ITEMS_MAX <= u32::MAX as usize);
// The largest item is addressable in memory on the 64-bit hosts Tessera runs on.
const _: () = assert!(ITEM_CIPHERTEXT_BYTES_MAX <= usize::MAX as u64);
const _: () = assert!(HEADER_BYTES == 8 + 4 + 4 + 8 + NONCE_PREFIX_BYTES + 1);
