//! A data set as a node downloads it from its hub: `manifest.json` and token shards,
//! through `tessera-data-format` (what `tessera_train::data::Dataset::open` calls).

use tessera_data_format::{
    check_shard, encode_shard, hash_hex, is_plain_file_name, shard_header, token_at, Manifest,
    ShardEntry, SHARD_HEADER_BYTES,
};
use tessera_model_config::Preset;

/// `Manifest::parse` on the text of `manifest.json`, then what the hub and a node
/// compute from an accepted manifest.
pub fn manifest(data: &[u8]) {
    let Some(text) = crate::text(data) else {
        return;
    };
    let Ok(manifest) = Manifest::parse(text) else {
        return;
    };
    // Every shard it names is a file inside the data directory.
    assert!(manifest
        .train
        .iter()
        .chain(&manifest.val)
        .all(|e| is_plain_file_name(&e.file)));
    // No floats: the manifest round-trips exactly.
    let json = serde_json::to_string(&manifest).expect("a manifest serialises");
    assert_eq!(Manifest::parse(&json).as_ref(), Ok(&manifest));
    // The hub sizes the model to the data set's vocabulary and the node checks the
    // hub's model against the same rule (`Preset::config_for_vocab`).
    for preset in ["nano", "micro"] {
        let config = Preset::by_name(preset)
            .expect("a preset")
            .config_for_vocab(manifest.vocab_size);
        assert!(config.vocab_size >= manifest.vocab_size);
    }
}

/// The vocabulary the shard target checks token ids against (`micro`'s).
pub const VOCAB: usize = 2048;

/// `check_shard` on a shard's bytes, against a manifest entry with the token count the
/// header claims and the bytes' own hash (so that the token range check is reached).
pub fn shard(data: &[u8]) {
    let claimed = data
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let entry = ShardEntry {
        file: "train-00000.bin".into(),
        tokens: claimed,
        blake3: hash_hex(data),
    };
    let header = shard_header(data);
    let Ok(checked) = check_shard(data, &entry, VOCAB) else {
        return;
    };
    assert_eq!(header, Ok(checked));
    let len = checked.tokens as usize;
    assert_eq!(data.len(), SHARD_HEADER_BYTES + len * checked.token_bytes);
    let tokens: Vec<u32> = (0..len)
        .map(|i| token_at(data, checked.token_bytes, i))
        .collect();
    assert!(tokens.iter().all(|&t| (t as usize) < VOCAB));
    // The encoder writes the same bytes, but for the 8 reserved header bytes, which
    // the reader ignores.
    let again = encode_shard(&tokens, checked.token_bytes as u32);
    assert_eq!(again[..24], data[..24]);
    assert_eq!(again[SHARD_HEADER_BYTES..], data[SHARD_HEADER_BYTES..]);
}
