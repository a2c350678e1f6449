//! Checkpoint loading: `model.safetensors` (and the trainer's `optimizer.safetensors`)
//! and `config.json`.
//!
//! `tessera_model::checkpoint::read_safetensors` does not parse safetensors itself: it
//! calls `safetensors::SafeTensors::deserialize` on the file's bytes and hands every
//! tensor's shape (as `i64`) and bytes to libtorch. libtorch is not linked here, so the
//! target calls the same function and asserts what the loader relies on before it
//! copies bytes into a tensor: a dtype it accepts, every dimension representable as
//! `i64`, and exactly `elements × dtype size` bytes.

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
        let mut elements = 1usize;
        for &dim in view.shape() {
            assert!(
                i64::try_from(dim).is_ok(),
                "tensor `{name}` has dimension {dim}, which is negative as the loader's i64"
            );
            elements = elements
                .checked_mul(dim)
                .expect("safetensors checks the element count");
        }
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
