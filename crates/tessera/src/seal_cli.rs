//! `tessera data seal --data DIR --out DIR --keys FILE`: glue over
//! `tessera_seal::seal_dataset`. It refuses anything that could lose or publish keys:
//! an existing keys file, a non-empty `out`, and a keys file inside `out` (which the
//! hub publishes whole).

use std::path::Path;

use anyhow::{bail, Context, Result};
use tessera_seal::{seal_dataset, Role};

/// Seals the prepared data set `data` into `out` and writes its keys to `keys`
/// (mode 0600), then prints what was sealed and where each part goes.
pub fn seal(data: &Path, out: &Path, keys: &Path) -> Result<()> {
    if keys.symlink_metadata().is_ok() {
        bail!(
            "{} exists; it may hold the keys of an earlier seal, and without them that \
             sealed data set cannot be opened: choose another --keys path",
            keys.display()
        );
    }
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty: seal into a new or empty directory (it becomes \
                     exactly what the hub publishes)",
                    out.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("--out {} is not a directory", out.display()))
        }
    }
    let keys_dir = match keys.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let keys_dir = keys_dir.canonicalize().with_context(|| {
        format!(
            "the directory of --keys {} does not exist; create it first",
            keys.display()
        )
    })?;
    // Resolved without creating `out`, so that a refusal leaves nothing behind.
    let out_dir = match (out.canonicalize(), out.parent(), out.file_name()) {
        (Ok(dir), _, _) => dir,
        (Err(_), Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            parent
                .canonicalize()
                .with_context(|| {
                    format!("the directory of --out {} does not exist", out.display())
                })?
                .join(name)
        }
        (Err(e), _, _) => {
            return Err(e).with_context(|| format!("resolving --out {}", out.display()))
        }
    };
    if keys_dir.starts_with(&out_dir) {
        bail!(
            "--keys {} is inside --out {}, which the hub publishes: keep the keys \
             outside it",
            keys.display(),
            out.display()
        );
    }

    let (manifest, sealed_keys) =
        seal_dataset(data, out).with_context(|| format!("sealing {}", data.display()))?;
    sealed_keys.save(keys).with_context(|| {
        format!(
            "saving the keys; without them {} cannot be opened: delete it and seal again",
            out.display()
        )
    })?;

    let count = |role| manifest.items_of(role).count();
    let plaintext_bytes: u64 = manifest.items.iter().map(|i| i.plaintext_bytes).sum();
    let ciphertext_bytes: u64 = manifest.items.iter().map(|i| i.ciphertext_bytes).sum();
    println!(
        "sealed {} into {}: {} items (the tokenizer, {} train and {} val shards), \
         {plaintext_bytes} bytes -> {ciphertext_bytes} bytes",
        data.display(),
        out.display(),
        manifest.items.len(),
        count(Role::Train),
        count(Role::Val),
    );
    println!("manifest_id {}", hex::encode(manifest.manifest_id()));
    println!(
        "keys: {} (mode 0600). They are the data owner's secret: give them to the \
         owner's key server (`tessera keys serve --keys {}`), keep a backup, never \
         publish them",
        keys.display(),
        keys.display()
    );
    println!(
        "publish: {} is what the hub serves (it holds no plaintext, no plaintext hashes \
         and no keys)",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(dir: &Path) -> std::path::PathBuf {
        let input = dir.join("in.txt");
        std::fs::write(&input, "private text, line after line.\n".repeat(200)).unwrap();
        let data = dir.join("data");
        tessera_train::data::prepare(&tessera_train::data::PrepareOptions {
            inputs: vec![input],
            out: data.clone(),
            vocab_size: 300,
            val_fraction: 0.1,
            tokenizer: None,
            shard_tokens_max: 500,
        })
        .unwrap();
        data
    }

    #[test]
    fn seal_refuses_to_lose_or_publish_keys() {
        let dir = tempfile::tempdir().unwrap();
        let data = prepared(dir.path());
        let out = dir.path().join("sealed");
        let keys = dir.path().join("owner.keys");
        seal(&data, &out, &keys).unwrap();
        assert!(out.join(tessera_seal::SEALED_MANIFEST_FILE).exists());
        let e = seal(&data, &dir.path().join("other"), &keys).unwrap_err();
        assert!(format!("{e:#}").contains("exists"), "{e:#}");
        let e = seal(&data, &out, &dir.path().join("k2")).unwrap_err();
        assert!(format!("{e:#}").contains("is not empty"), "{e:#}");
        let fresh = dir.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        let e = seal(&data, &fresh, &fresh.join("keys")).unwrap_err();
        assert!(format!("{e:#}").contains("inside --out"), "{e:#}");
        let e = seal(&data, &dir.path().join("new"), &dir.path().join("no/keys")).unwrap_err();
        assert!(format!("{e:#}").contains("create it first"), "{e:#}");
        assert!(
            !dir.path().join("new").exists(),
            "a refusal creates nothing"
        );
    }
}
