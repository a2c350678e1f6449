//! A sealed data set as a node downloads it from its hub: `sealed.json` and the sealed
//! items, through `tessera-seal` (what the node calls before `Dataset::from_sealed`).

use tessera_data_format::{hash_hex, is_plain_file_name, SHARD_HEADER_BYTES};
use tessera_seal::limits::ITEM_CIPHERTEXT_BYTES_MAX;
use tessera_seal::{
    item_file_name, open_item, seal_item, sealed_len, Role, SealedItem, SealedManifest,
    SEAL_VERSION,
};

/// `SealedManifest::parse` on the text of `sealed.json`, then what a node relies on in
/// an accepted manifest.
pub fn manifest(data: &[u8]) {
    let Some(text) = crate::text(data) else {
        return;
    };
    let Ok(manifest) = SealedManifest::parse(text) else {
        return;
    };
    assert_eq!(manifest.items[0].role, Role::Tokenizer);
    let mut names = std::collections::HashSet::new();
    for (i, item) in manifest.items.iter().enumerate() {
        assert_eq!(item.index as usize, i);
        assert!(is_plain_file_name(&item.file));
        assert!(names.insert(item.file.as_str()), "{} twice", item.file);
        // The sizes a node allocates by are consistent and bounded.
        assert_eq!(
            sealed_len(item.plaintext_bytes),
            Some(item.ciphertext_bytes)
        );
        assert!(item.ciphertext_bytes <= ITEM_CIPHERTEXT_BYTES_MAX);
        if item.role != Role::Tokenizer {
            assert_eq!(
                item.plaintext_bytes,
                SHARD_HEADER_BYTES as u64 + item.tokens * manifest.token_bytes as u64
            );
        }
    }
    // No floats: the manifest round-trips exactly, to the same id.
    let again = SealedManifest::parse(&manifest.to_json()).expect("re-encoded manifest parses");
    assert_eq!(again, manifest);
    assert_eq!(again.manifest_id(), manifest.manifest_id());
}

/// The key every seed of `sealed_item` is sealed with.
pub const KEY: [u8; 32] = [0x42; 32];

/// The manifest `sealed_item` checks an item against: a tokenizer and one train shard
/// of `plaintext_bytes` (`None` if no 2-byte-token shard is that long), with the
/// shard's ciphertext hash set to `ciphertext`'s. The hash is not part of the
/// manifest id, so a seed sealed under this manifest opens whatever the hash.
pub fn item_manifest(plaintext_bytes: u64, ciphertext: &[u8]) -> Option<SealedManifest> {
    let tokens = plaintext_bytes.checked_sub(SHARD_HEADER_BYTES as u64)?;
    if tokens % 2 != 0 {
        return None;
    }
    let item = |index: u32, role, plaintext_bytes, tokens| -> Option<SealedItem> {
        Some(SealedItem {
            index,
            role,
            file: item_file_name(index),
            plaintext_bytes,
            tokens,
            ciphertext_bytes: sealed_len(plaintext_bytes)?,
            ciphertext_blake3: hash_hex(ciphertext),
        })
    };
    let manifest = SealedManifest {
        format_version: SEAL_VERSION,
        dataset_id: [7; 32],
        vocab_size: 2048,
        end_of_text_id: 0,
        token_bytes: 2,
        train_text_bytes: 1000,
        val_text_bytes: 0,
        items: vec![
            item(0, Role::Tokenizer, 100, 0)?,
            item(1, Role::Train, plaintext_bytes, tokens / 2)?,
        ],
    };
    // As a node gets it: through the parser (which refuses sizes past the limits).
    SealedManifest::parse(&manifest.to_json()).ok()
}

/// `open_item` on the bytes of item 1, against the manifest its header's length
/// implies (so that the length and hash checks pass and decryption is reached).
pub fn item(data: &[u8]) {
    let Some(claimed) = data.get(16..24) else {
        return;
    };
    let claimed = u64::from_le_bytes(claimed.try_into().expect("8 bytes"));
    let Some(manifest) = item_manifest(claimed, data) else {
        return;
    };
    let Ok(plaintext) = open_item(&manifest, 1, &KEY, data) else {
        return;
    };
    assert_eq!(plaintext.len() as u64, claimed);
    // STREAM is deterministic given key, nonce and AAD: the item re-seals to itself.
    let nonce_prefix = data[24..31].try_into().expect("7 bytes");
    assert!(seal_item(&manifest, 1, &KEY, nonce_prefix, &plaintext) == data);
    // And it is item 1 only.
    assert!(open_item(&manifest, 0, &KEY, data).is_err());
}
