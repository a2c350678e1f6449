//! Model configuration: the Hugging Face `config.json` mirror, the named presets of the
//! Tessera series, and the arithmetic every planner needs (exact parameter counts,
//! FLOPs per token, training memory per replica). Nothing here touches a tensor.

pub mod plan;

use serde::{Deserialize, Serialize};

/// The fields of a Hugging Face `LlamaForCausalLM` `config.json` that define the
/// network. Serialised with the extra keys `transformers` expects, so a checkpoint
/// directory loads with `from_pretrained` unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
}

/// Why a configuration cannot describe a working model.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("config field `{field}` must be positive, got 0")]
    Zero { field: &'static str },
    /// `hidden_size` must split evenly into attention heads.
    #[error("hidden_size {hidden_size} is not divisible by num_attention_heads {heads}")]
    HeadsSplit { hidden_size: usize, heads: usize },
    /// Query heads must group evenly over key/value heads.
    #[error("num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")]
    KvGroups { heads: usize, kv_heads: usize },
    /// Rotary embeddings rotate pairs of channels, so the head dimension must be even.
    #[error("head dimension {head_dim} must be even for rotary embeddings")]
    OddHeadDim { head_dim: usize },
    /// The preset name is not one of the series.
    #[error("unknown preset `{name}`; expected one of: {known}")]
    UnknownPreset { name: String, known: String },
    /// The parameter count, the training memory or the FLOPs per token at the full
    /// context overflow 64 bits: no machine holds such a model.
    #[error(
        "sizes overflow 64-bit counts (vocab {vocab_size}, hidden {hidden_size}, \
         intermediate {intermediate_size}, layers {layers}, context {context})"
    )]
    TooLarge {
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        layers: usize,
        context: usize,
    },
}

/// Why the counting methods panic: only a configuration [`LlamaConfig::validate`]
/// refuses can overflow them.
const OVERFLOW: &str = "model sizes overflow u64; LlamaConfig::validate refuses them";

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the relations between fields that the model code relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::HeadsSplit {
                hidden_size: self.hidden_size,
                heads: self.num_attention_heads,
            });
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError::KvGroups {
                heads: self.num_attention_heads,
                kv_heads: self.num_key_value_heads,
            });
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim {
                head_dim: self.head_dim(),
            });
        }
        let counts = self
            .checked_training_memory()
            .and(self.checked_flops_per_token(self.max_position_embeddings));
        if counts.is_none() {
            return Err(ConfigError::TooLarge {
                vocab_size: self.vocab_size,
                hidden_size: self.hidden_size,
                intermediate_size: self.intermediate_size,
                layers: self.num_hidden_layers,
                context: self.max_position_embeddings,
            });
        }
        Ok(())
    }

    fn checked_params_per_layer(&self) -> Option<u64> {
        let d = self.hidden_size as u64;
        let kv = (self.num_key_value_heads as u64).checked_mul(self.head_dim() as u64)?;
        let ff = self.intermediate_size as u64;
        let attention = d
            .checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
        let mlp = d.checked_mul(ff)?.checked_mul(3)?;
        attention.checked_add(mlp)?.checked_add(d.checked_mul(2)?)
    }

    /// The embedding table alone.
    fn checked_table(&self) -> Option<u64> {
        (self.vocab_size as u64).checked_mul(self.hidden_size as u64)
    }

    fn checked_params_embedding(&self) -> Option<u64> {
        let table = self.checked_table()?;
        if self.tie_word_embeddings {
            Some(table)
        } else {
            table.checked_mul(2)
        }
    }

    fn checked_params_total(&self) -> Option<u64> {
        let layers =
            (self.num_hidden_layers as u64).checked_mul(self.checked_params_per_layer()?)?;
        self.checked_params_embedding()?
            .checked_add(layers)?
            .checked_add(self.hidden_size as u64)
    }

    fn checked_flops_per_token(&self, seq_len: usize) -> Option<u64> {
        let lookup_only = if self.tie_word_embeddings {
            0
        } else {
            self.checked_table()?
        };
        // The total holds the table, so this cannot underflow.
        let matmul_params = self.checked_params_total()? - lookup_only;
        let attention = 12u64
            .checked_mul(self.num_hidden_layers as u64)?
            .checked_mul(self.hidden_size as u64)?
            .checked_mul(seq_len as u64)?;
        matmul_params.checked_mul(6)?.checked_add(attention)
    }

    fn checked_training_memory(&self) -> Option<TrainingMemory> {
        let n = self.checked_params_total()?;
        // 12 bytes a parameter in all, so the total fits when this does.
        n.checked_mul(12)?;
        Some(TrainingMemory {
            weights_bytes: 2 * n,
            grads_bytes: 2 * n,
            optimizer_bytes: 8 * n,
        })
    }

    /// Parameters in one decoder layer: attention projections, SwiGLU MLP, two RMSNorms.
    ///
    /// This and the other counts panic on sizes that overflow `u64`, which a valid
    /// configuration never has.
    pub fn params_per_layer(&self) -> u64 {
        self.checked_params_per_layer().expect(OVERFLOW)
    }

    /// The embedding table (and the separate output head when embeddings are untied).
    pub fn params_embedding(&self) -> u64 {
        self.checked_params_embedding().expect(OVERFLOW)
    }

    /// The exact number of trainable parameters, matching the tensors the model creates.
    pub fn params_total(&self) -> u64 {
        self.checked_params_total().expect(OVERFLOW)
    }

    /// Training FLOPs per token at context length `seq_len`: 6 per parameter that takes
    /// part in a matrix multiply (every parameter except the input embedding lookup, which
    /// is a gather; a tied table still does the output projection) plus the attention
    /// score and value products, 12·L·d·T (forward 4·L·d·T, backward twice that).
    pub fn flops_per_token(&self, seq_len: usize) -> u64 {
        self.checked_flops_per_token(seq_len).expect(OVERFLOW)
    }

    /// Bytes to train one replica: bf16 weights and gradients plus f32 AdamW moments.
    /// Activations depend on the batch and checkpointing and are not included.
    pub fn training_memory(&self) -> TrainingMemory {
        self.checked_training_memory().expect(OVERFLOW)
    }

    /// The `config.json` text `transformers` reads for `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let extra = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "head_dim": self.head_dim(),
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "rope_scaling": null,
            "torch_dtype": "float32",
            "bos_token_id": null,
            "eos_token_id": null,
        });
        let (serde_json::Value::Object(map), serde_json::Value::Object(more)) = (&mut value, extra)
        else {
            unreachable!("both are JSON objects")
        };
        map.extend(more);
        value
    }

    /// Reads a `config.json`, ignoring the keys Tessera does not use, and validates it.
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("config.json is not JSON: {e}"))?;
        let arch = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama");
        if arch != "llama" {
            return Err(format!(
                "config.json has model_type `{arch}`, expected `llama`"
            ));
        }
        let config: LlamaConfig = serde_json::from_value(value)
            .map_err(|e| format!("config.json is missing or has a bad field: {e}"))?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// Bytes of training state per replica (see [`LlamaConfig::training_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrainingMemory {
    pub weights_bytes: u64,
    pub grads_bytes: u64,
    pub optimizer_bytes: u64,
}

impl TrainingMemory {
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.grads_bytes + self.optimizer_bytes
    }
}

/// A named member of the model series.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    /// The size the name promises, in parameters; `None` for the small test models,
    /// whose names are not sizes.
    pub nominal_params: Option<u64>,
    pub summary: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    max_position_embeddings: usize,
    tie_word_embeddings: bool,
}

/// The Llama 3 tokenizer size, used by every preset from `500m` up so checkpoints of
/// the series share a vocabulary.
const VOCAB_SERIES: usize = 128_256;

/// The series, smallest first. The large members follow the public Llama 3 shapes
/// where one exists (8B, 70B, 405B); `1.4t` extends the same proportions.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "nano",
        nominal_params: None,
        summary: "0.13M parameters; unit tests and resume checks",
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 192,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
    },
    Preset {
        name: "micro",
        nominal_params: None,
        summary: "about 3.6M parameters at vocab 2048; CPU demos in minutes",
        vocab_size: 2048,
        hidden_size: 256,
        intermediate_size: 768,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
    },
    Preset {
        name: "small",
        nominal_params: None,
        summary: "about 42M parameters at vocab 32000; a single-GPU smoke test",
        vocab_size: 32_000,
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
    },
    Preset {
        name: "500m",
        nominal_params: Some(500_000_000),
        summary: "the first model of the series",
        vocab_size: VOCAB_SERIES,
        hidden_size: 1280,
        intermediate_size: 4096,
        num_hidden_layers: 16,
        num_attention_heads: 16,
        num_key_value_heads: 8,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
    },
    Preset {
        name: "1b",
        nominal_params: Some(1_000_000_000),
        summary: "Llama 3.2 1B width, a narrower MLP",
        vocab_size: VOCAB_SERIES,
        hidden_size: 2048,
        intermediate_size: 5888,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
    },
    Preset {
        name: "8b",
        nominal_params: Some(8_000_000_000),
        summary: "Llama 3 8B shape",
        vocab_size: VOCAB_SERIES,
        hidden_size: 4096,
        intermediate_size: 14_336,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
    },
    Preset {
        name: "70b",
        nominal_params: Some(70_000_000_000),
        summary: "Llama 3 70B shape",
        vocab_size: VOCAB_SERIES,
        hidden_size: 8192,
        intermediate_size: 28_672,
        num_hidden_layers: 80,
        num_attention_heads: 64,
        num_key_value_heads: 8,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
    },
    Preset {
        name: "405b",
        nominal_params: Some(405_000_000_000),
        summary: "Llama 3.1 405B shape",
        vocab_size: VOCAB_SERIES,
        hidden_size: 16_384,
        intermediate_size: 53_248,
        num_hidden_layers: 126,
        num_attention_heads: 128,
        num_key_value_heads: 8,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
    },
    Preset {
        name: "1.4t",
        nominal_params: Some(1_400_000_000_000),
        summary: "the series' dense frontier: 164 layers of width 24576",
        vocab_size: VOCAB_SERIES,
        hidden_size: 24_576,
        intermediate_size: 98_304,
        num_hidden_layers: 164,
        num_attention_heads: 192,
        num_key_value_heads: 16,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
    },
];

impl Preset {
    /// The preset trained on a data set whose tokenizer has `data_vocab` tokens: the
    /// embedding table is that vocabulary rounded up to a multiple of 64. The hub, the
    /// trainer, the experiment and the nodes (which check the hub's word for it) all
    /// size the model this way.
    pub fn config_for_vocab(&self, data_vocab: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size: data_vocab.div_ceil(64) * 64,
            ..self.config()
        }
    }

    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    /// Looks a preset up by name.
    pub fn by_name(name: &str) -> Result<&'static Preset, ConfigError> {
        PRESETS
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ConfigError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// How far the exact count is from the size in the name, as a fraction.
    pub fn deviation_from_name(&self) -> Option<f64> {
        let nominal = self.nominal_params? as f64;
        Some((self.config().params_total() as f64 - nominal) / nominal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_within_three_percent_of_its_name() {
        for preset in PRESETS {
            preset.config().validate().unwrap();
            if let Some(dev) = preset.deviation_from_name() {
                assert!(
                    dev.abs() <= 0.03,
                    "{} is {:.2}% off its name",
                    preset.name,
                    dev * 100.0
                );
            }
        }
        assert!(Preset::by_name("1.4t").is_ok());
    }

    #[test]
    fn llama3_8b_count_matches_the_published_figure() {
        // Meta reports 8,030,261,248 parameters for Llama 3 8B.
        assert_eq!(
            Preset::by_name("8b").unwrap().config().params_total(),
            8_030_261_248
        );
    }

    #[test]
    fn validation_names_the_broken_relation() {
        let mut c = Preset::by_name("nano").unwrap().config();
        c.num_key_value_heads = 3;
        assert_eq!(
            c.validate(),
            Err(ConfigError::KvGroups {
                heads: 4,
                kv_heads: 3
            })
        );
        c.num_key_value_heads = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "num_key_value_heads"
            })
        );
        let err = Preset::by_name("9b").unwrap_err().to_string();
        assert!(err.contains("9b") && err.contains("1.4t"), "{err}");
    }

    /// Story: fuzzing (`fuzz/`, target `model_config`) found that `from_hf_json`
    /// accepted a `config.json` whose sizes overflow the parameter count: a
    /// `vocab_size` of 2^64 − 1 passed `validate`, then `params_total` panicked in a
    /// debug build and wrapped to a small, wrong count in release, while a loader sizing
    /// tensors from the same fields would ask for more memory than exists. A
    /// configuration whose parameter count, training memory or FLOPs per token at its
    /// own context does not fit `u64` is now refused.
    #[test]
    fn sizes_whose_counts_overflow_are_refused() {
        let nano = Preset::by_name("nano").unwrap().config();
        let cases = [
            LlamaConfig {
                vocab_size: usize::MAX,
                ..nano.clone()
            },
            LlamaConfig {
                hidden_size: 1 << 40,
                num_attention_heads: 1 << 20,
                num_key_value_heads: 1 << 20,
                ..nano.clone()
            },
            LlamaConfig {
                num_hidden_layers: usize::MAX,
                ..nano.clone()
            },
            LlamaConfig {
                max_position_embeddings: usize::MAX,
                ..nano.clone()
            },
            LlamaConfig {
                intermediate_size: 1 << 62,
                ..nano.clone()
            },
        ];
        for c in cases {
            let e = c.validate().expect_err("an overflowing configuration");
            assert!(e.to_string().contains("overflow"), "{e}");
            let text = serde_json::to_string(&c.to_hf_json()).unwrap();
            assert!(LlamaConfig::from_hf_json(&text).is_err());
        }
        // The largest preset is far from the edge.
        let big = Preset::by_name("1.4t").unwrap().config();
        big.validate().unwrap();
        assert!(big.training_memory().total_bytes() < 1 << 60);
    }

    #[test]
    fn hf_json_round_trips() {
        let c = Preset::by_name("micro").unwrap().config();
        let text = serde_json::to_string(&c.to_hf_json()).unwrap();
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap(), c);
        assert!(LlamaConfig::from_hf_json("{\"model_type\":\"gpt2\"}")
            .unwrap_err()
            .contains("gpt2"));
    }
}
