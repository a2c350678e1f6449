//! Checkpoint loading: `model.safetensors` (and the trainer's `optimizer.safetensors`)
//! and `config.json`.
//!
//! `tessera_model::checkpoint::read_safetensors` does not parse safetensors itself: it
//! calls `safetensors::SafeTensors::deserialize` on the file's bytes, refuses a dtype
//! other than F32, BF16 and F16 and a dimension beyond `i64`, and hands every tensor's
//! shape (as `i64`) and bytes to libtorch. libtorch is not linked here, so the target
//! calls the same function, makes the same refusals, and asserts what libtorch then
//! relies on: exactly `elements × dtype size` bytes, and an element count that fits
//! `i64` as well.

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use tessera_model_config::LlamaConfig;

pub fn safetensors(data: &[u8]) {
    let Ok(st) = SafeTensors::deserialize(data) else {
        return;
    };
    for (name, view) in st.tensors() {
        let size = match view.dtype() {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            // The loader refuses every other dtype by name.
            _ => continue,
        };
        // The loader refuses a dimension beyond `i64` (the target found the shape
        // `[0, 2^63]`: zero elements, so safetensors' byte count checks out).
        if view.shape().iter().any(|&d| i64::try_from(d).is_err()) {
            continue;
        }
        let elements = view
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .expect("safetensors checks the element count");
        assert!(i64::try_from(elements).is_ok(), "tensor `{name}`");
        assert_eq!(view.data().len(), elements * size, "tensor `{name}`");
    }
}

/// `LlamaConfig::from_hf_json` on `config.json`, then the arithmetic the loader and the
/// planners do with an accepted configuration.
pub fn config(data: &[u8]) {
    let Some(text) = crate::text(data) else {
        return;
    };
    let Ok(config) = LlamaConfig::from_hf_json(text) else {
        return;
    };
    let _ = config.head_dim();
    let params = config.params_total();
    let _ = config.flops_per_token(config.max_position_embeddings);
    let _ = config.training_memory().total_bytes();
    assert!(params > 0);
    // What the checkpoint writer emits reads back as the same configuration.
    let written = config.to_hf_json().to_string();
    let again = LlamaConfig::from_hf_json(&written).expect("a written config.json reads back");
    assert_eq!(again.vocab_size, config.vocab_size);
    assert_eq!(again.hidden_size, config.hidden_size);
    assert_eq!(again.num_hidden_layers, config.num_hidden_layers);
}
