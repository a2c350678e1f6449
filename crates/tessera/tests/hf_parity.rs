//! Tessera checkpoints must load in Hugging Face `transformers` and give the same
//! logits: that is the promise to researchers who download our models. This test
//! writes checkpoints of two shapes (tied embeddings with grouped-query attention,
//! untied with full attention), loads each with `LlamaForCausalLM.from_pretrained` on
//! CPU, and compares logits and tokenization.

use std::process::Command;

use tch::{Device, Kind, Tensor};
use tessera_model::{checkpoint, Llama, Preset};
use tessera_train::data::{encode_text, train_tokenizer};

const TEXT: &str = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\
    It is the east, and Juliet is the sun. Café, 東京, 🚀.\r\n";

fn check(tie: bool, kv_heads: usize) {
    let corpus = TEXT.repeat(30);
    let tokenizer = train_tokenizer(&[corpus.as_str()], 320).unwrap();
    let tok_json = tokenizer.to_string(false).unwrap();
    let mut config = Preset::by_name("nano").unwrap().config();
    config.vocab_size = tokenizer.get_vocab_size(true).div_ceil(64) * 64;
    config.tie_word_embeddings = tie;
    config.num_key_value_heads = kv_heads;
    let model = Llama::new(&config, Device::Cpu, 5);
    // Scale the initial weights up so logits are O(1) and differences would show.
    for (i, p) in model.params().iter().enumerate() {
        let scaled = if p.tensor.dim() == 1 {
            &p.tensor + Tensor::randn(p.tensor.size(), (Kind::Float, Device::Cpu)) * 0.3
        } else {
            &p.tensor * 8.0
        };
        model.set_param(i, &scaled);
    }
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&model, tok_json.as_bytes(), dir.path()).unwrap();

    let ids: Vec<u32> = encode_text(&tokenizer, TEXT).unwrap();
    assert!(ids.len() >= 20, "{ids:?}");
    let row: Vec<i64> = ids[..20].iter().map(|&t| t as i64).collect();
    let mut batch = row.clone();
    batch.extend(row.iter().rev());
    let input = Tensor::from_slice(&batch).view([2, 20]);
    let logits = tch::no_grad(|| model.forward(&input));
    let max_logit = f64::try_from(logits.abs().max()).unwrap();
    assert!(
        max_logit > 1.0,
        "logits too small to make the comparison meaningful: {max_logit}"
    );
    let flat: Vec<f32> = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
    let v = config.vocab_size;
    let nested: Vec<Vec<Vec<f32>>> = flat
        .chunks(20 * v)
        .map(|b| b.chunks(v).map(|r| r.to_vec()).collect())
        .collect();
    let expected = serde_json::json!({
        "input_ids": [row, row.iter().rev().copied().collect::<Vec<_>>()],
        "logits": nested,
        "text": TEXT,
        "token_ids": ids,
    });
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../python/hf_parity.py");
    let python = tessera_train::python::find();
    let out = Command::new(&python)
        .arg(script)
        .arg(dir.path())
        .arg(&expected_path)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; run `make setup` first", python.display()));
    assert!(
        out.status.success(),
        "transformers could not load the checkpoint:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let diff = report["max_abs_diff"].as_f64().unwrap();
    eprintln!("tie={tie} kv_heads={kv_heads}: max abs logit difference {diff:e}, largest logit {max_logit:.2}");
    assert!(
        diff <= 1e-4,
        "logits differ from transformers by {diff} (tie={tie}, kv={kv_heads})"
    );
    assert_eq!(report["shape"], serde_json::json!([2, 20, v]));
    assert_eq!(
        report["tokenizer_agrees"], true,
        "tokenization differs: {report}"
    );
}

#[test]
fn tied_gqa_checkpoint_matches_transformers() {
    check(true, 2);
}

#[test]
fn untied_full_attention_checkpoint_matches_transformers() {
    check(false, 4);
}
