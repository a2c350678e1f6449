//! Sealing a small prepared data set written by hand, opening every item, and every
//! refusal: wrong keys, moved, foreign, truncated or altered ciphertexts, and sealed
//! manifests and keys files that are not what they claim.

use std::path::Path;

use tessera_data_format::{
    encode_shard, hash_hex, Manifest, ShardEntry, MANIFEST_FILE, MANIFEST_VERSION, TOKENIZER_FILE,
};
use tessera_seal::limits::{CHUNK_PLAINTEXT_BYTES, HEADER_BYTES, TAG_BYTES};
use tessera_seal::{
    open_item, seal_dataset, seal_item, sealed_len, Role, SealError, SealKeys, SealedManifest,
    SEALED_MANIFEST_FILE,
};

const VOCAB: usize = 300;
const TOKENIZER: &str =
    r#"{"version":"1.0","model":{"type":"BPE","secret merges":"private text"}}"#;

/// Writes a prepared data set: a tokenizer, three train shards (the first two of the
/// same size and more than one chunk each) and one val shard. Returns the plaintext
/// of every item by index.
fn prepared(dir: &Path) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let tokens = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) ^ seed) % VOCAB as u32)
            .collect()
    };
    let shards = [
        ("train-00000.bin", tokens(40_000, 1)),
        ("train-00001.bin", tokens(40_000, 2)),
        ("train-00002.bin", tokens(1_234, 3)),
        ("val-00000.bin", tokens(777, 4)),
    ];
    let mut plaintexts = vec![TOKENIZER.as_bytes().to_vec()];
    let mut entries = Vec::new();
    for (file, t) in &shards {
        let bytes = encode_shard(t, 2);
        std::fs::write(dir.join(file), &bytes).unwrap();
        entries.push(ShardEntry {
            file: file.to_string(),
            tokens: t.len() as u64,
            blake3: hash_hex(&bytes),
        });
        plaintexts.push(bytes);
    }
    std::fs::write(dir.join(TOKENIZER_FILE), TOKENIZER).unwrap();
    let val = entries.split_off(3);
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        tokenizer_blake3: hash_hex(TOKENIZER.as_bytes()),
        vocab_size: VOCAB,
        end_of_text_id: 299,
        token_bytes: 2,
        train_text_bytes: 250_000,
        val_text_bytes: 2_000,
        sources: vec![],
        train: entries,
        val,
    };
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    plaintexts
}

struct Sealed {
    _dir: tempfile::TempDir,
    out: std::path::PathBuf,
    manifest: SealedManifest,
    keys: SealKeys,
    plaintexts: Vec<Vec<u8>>,
}

impl Sealed {
    fn ciphertext(&self, index: u32) -> Vec<u8> {
        std::fs::read(self.out.join(&self.manifest.items[index as usize].file)).unwrap()
    }

    fn key(&self, index: u32) -> &[u8; 32] {
        self.keys.key(index).unwrap()
    }

    /// The manifest as a hub could forge it: item `index`'s hash set to that of
    /// `ciphertext` (the hash is not part of the manifest id).
    fn with_hash(&self, index: u32, ciphertext: &[u8]) -> SealedManifest {
        let mut m = self.manifest.clone();
        m.items[index as usize].ciphertext_blake3 = hash_hex(ciphertext);
        m
    }
}

fn sealed() -> Sealed {
    let dir = tempfile::tempdir().unwrap();
    let plaintexts = prepared(&dir.path().join("data"));
    let out = dir.path().join("sealed");
    let (manifest, keys) = seal_dataset(&dir.path().join("data"), &out).unwrap();
    Sealed {
        _dir: dir,
        out,
        manifest,
        keys,
        plaintexts,
    }
}

fn assert_decrypt_fails(e: SealError, index: u32) {
    assert!(
        matches!(e, SealError::Decrypt { index: i, .. } if i == index),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("item {index} ")), "{e}");
}

#[test]
fn a_sealed_data_set_opens_to_its_plaintext() {
    let s = sealed();
    let m = &s.manifest;
    assert_eq!(m.items.len(), 5);
    let roles: Vec<Role> = m.items.iter().map(|i| i.role).collect();
    assert_eq!(
        roles,
        [
            Role::Tokenizer,
            Role::Train,
            Role::Train,
            Role::Train,
            Role::Val
        ]
    );
    assert_eq!(m.items[3].file, "item-0003.sealed");
    assert_eq!(
        (m.vocab_size, m.end_of_text_id, m.token_bytes),
        (300, 299, 2)
    );
    assert_eq!((m.train_text_bytes, m.val_text_bytes), (250_000, 2_000));
    assert_eq!(m.items[1].tokens, 40_000);
    assert_eq!(m.items[0].tokens, 0);
    // The published directory is the sealed manifest and the items, nothing else.
    let mut listed: Vec<String> = std::fs::read_dir(&s.out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut files = m.files();
    files.sort();
    assert_eq!(listed, files);
    let text = std::fs::read_to_string(s.out.join(SEALED_MANIFEST_FILE)).unwrap();
    assert_eq!(&SealedManifest::parse(&text).unwrap(), m);
    // No plaintext hash is published.
    for p in &s.plaintexts {
        assert!(!text.contains(&hash_hex(p)));
    }
    s.keys.check_manifest(m).unwrap();
    for (index, plaintext) in s.plaintexts.iter().enumerate() {
        let index = index as u32;
        let ciphertext = s.ciphertext(index);
        assert_eq!(
            ciphertext.len() as u64,
            sealed_len(plaintext.len() as u64).unwrap()
        );
        // No 16 plaintext bytes past a shard's header appear in the ciphertext.
        let needle = &plaintext[32..48];
        assert!(!ciphertext.windows(16).any(|w| w == needle));
        let opened = open_item(m, index, s.key(index), &ciphertext).unwrap();
        assert_eq!(&opened, plaintext, "item {index}");
    }
}

/// `seal_item` (in memory) writes what `seal_dataset` (streaming from files) wrote,
/// given the same key and nonce prefix.
#[test]
fn sealing_in_memory_matches_sealing_from_files() {
    let s = sealed();
    for (index, plaintext) in s.plaintexts.iter().enumerate() {
        let index = index as u32;
        let file = s.ciphertext(index);
        let nonce_prefix: [u8; 7] = file[24..31].try_into().unwrap();
        let again = seal_item(&s.manifest, index, s.key(index), nonce_prefix, plaintext);
        assert!(again == file, "item {index}");
    }
}

#[test]
fn keys_files_are_private_strict_and_never_replaced() {
    let s = sealed();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owner.keys.json");
    s.keys.save(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(SealKeys::parse(&text).unwrap(), s.keys);
    let e = s.keys.save(&path).unwrap_err();
    assert!(matches!(e, SealError::KeysExist { .. }), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary left"
    );
    let key0 = hex(s.key(0));
    assert!(text.contains(&key0));
    assert!(
        !format!("{:?}", s.keys).contains(&key0),
        "Debug shows no key"
    );

    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        edit(&mut j);
        let e = SealKeys::parse(&j.to_string()).unwrap_err();
        assert!(matches!(e, SealError::Keys(_)), "{e}");
        // A refusal never quotes a key.
        assert!(!e.to_string().contains(&key0), "{e}");
        e
    };
    refused(&|j| j["extra"] = 1.into());
    refused(&|j| j["format_version"] = 2.into());
    refused(&|j| j["keys"][1]["index"] = 2.into());
    refused(&|j| j["keys"][0]["key_hex"] = key0.to_uppercase().into());
    refused(&|j| j["keys"][0]["key_hex"] = key0[..62].into());
    refused(&|j| j["keys"] = serde_json::json!([]));
    refused(&|j| j["keys"][0]["key_hex"] = 5.into());
    // The keys of another seal of the same data do not fit this manifest.
    let other = sealed();
    let e = other.keys.check_manifest(&s.manifest).unwrap_err();
    assert!(matches!(e, SealError::KeysMismatch(_)), "{e}");
    json["keys"].as_array_mut().unwrap().pop();
    let fewer = SealKeys::parse(&json.to_string()).unwrap();
    let e = fewer.check_manifest(&s.manifest).unwrap_err();
    assert!(e.to_string().contains("4 keys for 5 items"), "{e}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_wrong_key_does_not_open_an_item() {
    let s = sealed();
    for index in 0..5u32 {
        let ciphertext = s.ciphertext(index);
        let neighbour = s.key((index + 1) % 5);
        let e = open_item(&s.manifest, index, neighbour, &ciphertext).unwrap_err();
        assert_decrypt_fails(e, index);
        let mut flipped = *s.key(index);
        flipped[31] ^= 1;
        let e = open_item(&s.manifest, index, &flipped, &ciphertext).unwrap_err();
        assert!(matches!(e, SealError::Decrypt { chunk: 0, .. }), "{e}");
    }
}

#[test]
fn an_item_moved_to_another_index_does_not_open() {
    let s = sealed();
    // Items 1 and 2 are shards of the same size.
    let one = s.ciphertext(1);
    assert_eq!(one.len() as u64, s.manifest.items[2].ciphertext_bytes);
    // As the manifest stands, the hash gives it away.
    let e = open_item(&s.manifest, 2, s.key(1), &one).unwrap_err();
    assert!(
        matches!(e, SealError::CiphertextHash { index: 2, .. }),
        "{e}"
    );
    // With the hash forged, the header does.
    let e = open_item(&s.with_hash(2, &one), 2, s.key(1), &one).unwrap_err();
    assert!(matches!(e, SealError::Header { index: 2, .. }), "{e}");
    assert!(e.to_string().contains("is item 1, not item 2"), "{e}");
    // With the header's index rewritten too, the AAD does, whichever key is used.
    let mut moved = one.clone();
    moved[12..16].copy_from_slice(&2u32.to_le_bytes());
    let forged = s.with_hash(2, &moved);
    for key in [s.key(1), s.key(2)] {
        assert_decrypt_fails(open_item(&forged, 2, key, &moved).unwrap_err(), 2);
    }
}

#[test]
fn an_item_of_another_data_set_does_not_open() {
    let a = sealed();
    let b = sealed();
    assert_ne!(a.manifest.manifest_id(), b.manifest.manifest_id());
    // Same data, same sizes: only the random dataset_id differs.
    for (ia, ib) in a.manifest.items.iter().zip(&b.manifest.items) {
        assert_eq!(
            (ia.plaintext_bytes, ia.ciphertext_bytes),
            (ib.plaintext_bytes, ib.ciphertext_bytes)
        );
    }
    let foreign = b.ciphertext(1);
    let forged = a.with_hash(1, &foreign);
    // Even with the other set's key for it, the manifest id in the AAD differs.
    for key in [b.key(1), a.key(1)] {
        assert_decrypt_fails(open_item(&forged, 1, key, &foreign).unwrap_err(), 1);
    }
}

#[test]
fn truncated_padded_and_flipped_ciphertexts_do_not_open() {
    let s = sealed();
    let index = 1;
    let good = s.ciphertext(index);
    let chunk = CHUNK_PLAINTEXT_BYTES + TAG_BYTES;
    assert!(good.len() > HEADER_BYTES + chunk, "item 1 has two chunks");

    for bad in [&good[..good.len() - 1], &good[..HEADER_BYTES + chunk]] {
        let e = open_item(&s.manifest, index, s.key(index), bad).unwrap_err();
        assert!(
            matches!(e, SealError::CiphertextLength { index: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("item-0001.sealed"), "{e}");
    }
    let mut padded = good.clone();
    padded.push(0);
    let e = open_item(&s.manifest, index, s.key(index), &padded).unwrap_err();
    assert!(matches!(e, SealError::CiphertextLength { .. }), "{e}");

    // (offset, what refuses it once the hash is forged to match)
    let last = good.len() - 1;
    let flips = [
        (0, "header"),                         // magic
        (13, "header"),                        // index
        (17, "header"),                        // plaintext length
        (24, "chunk 0"),                       // nonce prefix
        (31, "header"),                        // reserved
        (HEADER_BYTES, "chunk 0"),             // first chunk's ciphertext
        (HEADER_BYTES + chunk - 1, "chunk 0"), // first chunk's tag
        (HEADER_BYTES + chunk, "chunk 1"),     // last chunk's ciphertext
        (last, "chunk 1"),                     // last chunk's tag
    ];
    for (at, refused_by) in flips {
        let mut flipped = good.clone();
        flipped[at] ^= 0x40;
        let e = open_item(&s.manifest, index, s.key(index), &flipped).unwrap_err();
        assert!(
            matches!(e, SealError::CiphertextHash { .. }),
            "byte {at}: {e}"
        );
        let e =
            open_item(&s.with_hash(index, &flipped), index, s.key(index), &flipped).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(refused_by), "byte {at}: {text}");
        assert!(
            text.contains("item 1 (`item-0001.sealed`)"),
            "byte {at}: {text}"
        );
    }
}

#[test]
fn chunks_reordered_or_dropped_do_not_open_even_with_a_forged_manifest() {
    let s = sealed();
    let index = 1;
    let good = s.ciphertext(index);
    let chunk = CHUNK_PLAINTEXT_BYTES + TAG_BYTES;
    let body = &good[HEADER_BYTES..];
    // Reordered: the last chunk first. The sizes differ, so swap within the first
    // chunk's room by moving the last chunk to the front of a same-length body.
    let mut reordered = good[..HEADER_BYTES].to_vec();
    reordered.extend_from_slice(&body[chunk..]);
    reordered.extend_from_slice(&body[..chunk]);
    assert_eq!(reordered.len(), good.len());
    let e = open_item(
        &s.with_hash(index, &reordered),
        index,
        s.key(index),
        &reordered,
    )
    .unwrap_err();
    assert_decrypt_fails(e, index);

    // Dropped: the last chunk, with a manifest and header rewritten to the length of
    // one full chunk. The manifest id changes with it, so the first chunk fails.
    let mut dropped = good[..HEADER_BYTES + chunk].to_vec();
    let plaintext = CHUNK_PLAINTEXT_BYTES as u64;
    dropped[16..24].copy_from_slice(&plaintext.to_le_bytes());
    let mut forged = s.with_hash(index, &dropped);
    let item = &mut forged.items[index as usize];
    item.plaintext_bytes = plaintext;
    item.tokens = (plaintext - 32) / 2;
    item.ciphertext_bytes = dropped.len() as u64;
    let forged = SealedManifest::parse(&forged.to_json()).expect("a consistent forgery");
    let e = open_item(&forged, index, s.key(index), &dropped).unwrap_err();
    assert_decrypt_fails(e, index);
}

#[test]
fn malformed_sealed_manifests_are_refused() {
    let s = sealed();
    let m = &s.manifest;
    let refused = |edited: SealedManifest, expect: &str| {
        // `to_json` states the recomputed id, so these reach the field checks.
        let e = SealedManifest::parse(&edited.to_json()).unwrap_err();
        assert!(matches!(e, SealError::Manifest(_)), "{e}");
        assert!(
            e.to_string().contains(expect),
            "expected `{expect}` in: {e}"
        );
    };
    let edit = |f: &dyn Fn(&mut SealedManifest)| {
        let mut c = m.clone();
        f(&mut c);
        c
    };
    for bad in [
        "../x.sealed",
        "/etc/passwd",
        "a/b",
        ".hidden",
        "",
        SEALED_MANIFEST_FILE,
    ] {
        refused(
            edit(&|c| c.items[2].file = bad.into()),
            "not a plain file name",
        );
    }
    refused(
        edit(&|c| c.items[2].file = c.items[1].file.clone()),
        "listed twice",
    );
    refused(
        edit(&|c| c.items.swap(1, 2)),
        "item 2 (`item-0002.sealed`) is at position 1",
    );
    refused(edit(&|c| c.items[3].index = 7), "item 7");
    refused(edit(&|c| c.items[0].role = Role::Train), "role Train");
    refused(
        edit(&|c| c.items[2].role = Role::Tokenizer),
        "role Tokenizer",
    );
    refused(
        edit(&|c| {
            c.items[2].role = Role::Val;
        }),
        "item 3 (`item-0003.sealed`) has role Train",
    );
    refused(edit(&|c| c.items[1].ciphertext_bytes += 1), "seal to");
    refused(edit(&|c| c.items[1].plaintext_bytes += 2), "make a");
    refused(edit(&|c| c.items[1].tokens += 1), "make a");
    refused(edit(&|c| c.items[1].tokens = u64::MAX / 2), "make a");
    refused(
        edit(&|c| c.items[0].tokens = 1),
        "the tokenizer has 1 tokens",
    );
    refused(
        edit(&|c| c.items[4].ciphertext_blake3 = c.items[4].ciphertext_blake3.to_uppercase()),
        "lowercase hex",
    );
    refused(edit(&|c| c.items.clear()), "0 items");
    refused(edit(&|c| c.token_bytes = 3), "token_bytes 3");
    refused(edit(&|c| c.vocab_size = 0), "vocab_size 0");
    refused(
        edit(&|c| c.vocab_size = 70_000),
        "does not fit 2-byte tokens",
    );
    refused(edit(&|c| c.end_of_text_id = 300), "end_of_text_id 300");
    refused(edit(&|c| c.format_version = 2), "format_version 2");
    let huge = edit(&|c| {
        c.items[3].tokens = 1 << 30;
        c.items[3].plaintext_bytes = 32 + (1 << 31);
        c.items[3].ciphertext_bytes = sealed_len(c.items[3].plaintext_bytes).unwrap();
    });
    refused(huge, "a node downloads");

    // Edits to the JSON that leave the stated id alone are caught by it.
    let text = m.to_json();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let parse_edited = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        f(&mut j);
        SealedManifest::parse(&j.to_string())
    };
    let edits: [&dyn Fn(&mut serde_json::Value); 3] = [
        &|j| j["train_text_bytes"] = 1.into(),
        &|j| j["val_text_bytes"] = 1.into(),
        &|j| j["dataset_id"] = "00".repeat(32).into(),
    ];
    for f in edits {
        let e = parse_edited(f).unwrap_err();
        assert!(matches!(e, SealError::ManifestId { .. }), "{e}");
    }
    // The ciphertext hashes are not part of the id.
    let ok = parse_edited(&|j| j["items"][1]["ciphertext_blake3"] = "ab".repeat(32).into());
    assert_eq!(ok.unwrap().manifest_id(), m.manifest_id());
    let edits: [&dyn Fn(&mut serde_json::Value); 5] = [
        &|j| j["extra"] = 1.into(),
        &|j| j["items"][1]["extra"] = 1.into(),
        &|j| j["items"][1]["role"] = "test".into(),
        &|j| j["manifest_id"] = "zz".into(),
        &|j| j["dataset_id"] = "AB".repeat(32).into(),
    ];
    for f in edits {
        let e = parse_edited(f).unwrap_err();
        assert!(matches!(e, SealError::Manifest(_)), "{e}");
    }
    let long = format!(
        "{text}{}",
        " ".repeat(tessera_seal::limits::SEALED_MANIFEST_BYTES_MAX)
    );
    let e = SealedManifest::parse(&long).unwrap_err();
    assert!(e.to_string().contains("more than the"), "{e}");
}

#[test]
fn a_corrupt_prepared_set_is_not_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    prepared(&data);
    let shard = data.join("train-00001.bin");
    let good = std::fs::read(&shard).unwrap();
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(&shard, &flipped).unwrap();
    let out = dir.path().join("sealed");
    let e = seal_dataset(&data, &out).unwrap_err();
    assert!(matches!(e, SealError::SourceHash { .. }), "{e}");
    assert!(e.to_string().contains("train-00001.bin"), "{e}");
    // The item sealed before it stays; the failed one leaves no temporary behind.
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.iter().all(|f| !f.ends_with(".tmp")), "{left:?}");
    assert!(!left.contains(&SEALED_MANIFEST_FILE.to_string()));

    std::fs::write(&shard, &good[..good.len() - 2]).unwrap();
    let e = seal_dataset(&data, &dir.path().join("sealed2")).unwrap_err();
    assert!(matches!(e, SealError::SourceLength { .. }), "{e}");
    std::fs::write(&shard, &good).unwrap();
    std::fs::write(data.join(TOKENIZER_FILE), "{}").unwrap();
    let e = seal_dataset(&data, &dir.path().join("sealed3")).unwrap_err();
    assert!(matches!(e, SealError::SourceHash { .. }), "{e}");
    assert!(e.to_string().contains(TOKENIZER_FILE), "{e}");
}

#[test]
fn the_largest_item_is_a_file_a_node_downloads() {
    assert_eq!(
        tessera_seal::limits::ITEM_CIPHERTEXT_BYTES_MAX,
        tessera_protocol::limits::DATA_FILE_BYTES_MAX as u64
    );
    // And the largest sealed.json fits the same download limit.
    const {
        assert!(
            tessera_seal::limits::SEALED_MANIFEST_BYTES_MAX
                <= tessera_protocol::limits::DATA_FILE_BYTES_MAX
        )
    };
}
