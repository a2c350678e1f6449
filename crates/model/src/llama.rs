//! The Llama-style decoder: RMSNorm, rotary embeddings in the Hugging Face
//! `rotate_half` layout, grouped-query attention through the fused
//! scaled-dot-product-attention kernel, and a SwiGLU MLP.
//!
//! Parameters live in one ordered list named by their Hugging Face checkpoint paths
//! (`model.layers.{i}.self_attn.q_proj.weight`), so the same list serves a fresh
//! initialisation, a checkpoint, the optimizer state and the hash of θ. Each layer keeps
//! indices into that list rather than its own copies.

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;

/// Standard deviation of the normal initialisation, as in Hugging Face Llama.
const INIT_STD: f64 = 0.02;

/// Indices of one decoder layer's tensors in [`Llama::params`].
#[derive(Debug, Clone, Copy)]
struct LayerIds {
    input_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    post_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// A named parameter tensor.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
}

/// The model: its configuration, its ordered parameters, and rotary tables.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    params: Vec<Param>,
    embed: usize,
    layers: Vec<LayerIds>,
    norm: usize,
    /// `None` when the output projection reuses the embedding table.
    lm_head: Option<usize>,
    rope_cos: Tensor,
    rope_sin: Tensor,
    device: Device,
    /// Kind that matrix multiplies and attention run in. Parameters, the residual
    /// stream and norms stay f32; `BFloat16` here is mixed precision with f32 master
    /// weights (what CUDA autocast does for these ops).
    compute_kind: Kind,
}

impl Llama {
    /// A freshly initialised model. Initial values come from our own generator seeded
    /// by `seed` and each tensor's position, not from libtorch's global one, so every
    /// node (and every thread) builds the same θ₀ from the same seed on any device.
    pub fn new(config: &LlamaConfig, device: Device, seed: u64) -> Llama {
        config
            .validate()
            .expect("LlamaConfig must be validated before building a model");
        let mut params = Vec::new();
        let d = config.hidden_size as i64;
        let kv = (config.num_key_value_heads * config.head_dim()) as i64;
        let ff = config.intermediate_size as i64;
        let v = config.vocab_size as i64;
        // Residual projections are scaled down with depth (GPT-2) so the residual stream's
        // variance does not grow with the number of layers at initialisation.
        let residual_std = INIT_STD / (2.0 * config.num_hidden_layers as f64).sqrt();
        let mut add = |name: String, shape: &[i64], std: Option<f64>| -> usize {
            let t = match std {
                Some(std) => normal_init(
                    shape,
                    std,
                    seed ^ (params.len() as u64).wrapping_mul(0xA076_1D64_78BD_642F),
                )
                .to_device(device),
                None => Tensor::ones(shape, (Kind::Float, device)),
            };
            params.push(Param {
                name,
                tensor: t.set_requires_grad(true),
            });
            params.len() - 1
        };
        let embed = add("model.embed_tokens.weight".into(), &[v, d], Some(INIT_STD));
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(LayerIds {
                input_norm: add(format!("{p}.input_layernorm.weight"), &[d], None),
                q: add(
                    format!("{p}.self_attn.q_proj.weight"),
                    &[d, d],
                    Some(INIT_STD),
                ),
                k: add(
                    format!("{p}.self_attn.k_proj.weight"),
                    &[kv, d],
                    Some(INIT_STD),
                ),
                v: add(
                    format!("{p}.self_attn.v_proj.weight"),
                    &[kv, d],
                    Some(INIT_STD),
                ),
                o: add(
                    format!("{p}.self_attn.o_proj.weight"),
                    &[d, d],
                    Some(residual_std),
                ),
                post_norm: add(format!("{p}.post_attention_layernorm.weight"), &[d], None),
                gate: add(
                    format!("{p}.mlp.gate_proj.weight"),
                    &[ff, d],
                    Some(INIT_STD),
                ),
                up: add(format!("{p}.mlp.up_proj.weight"), &[ff, d], Some(INIT_STD)),
                down: add(
                    format!("{p}.mlp.down_proj.weight"),
                    &[d, ff],
                    Some(residual_std),
                ),
            });
        }
        let norm = add("model.norm.weight".into(), &[d], None);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| add("lm_head.weight".into(), &[v, d], Some(INIT_STD)));
        let (rope_cos, rope_sin) = rope_tables(config, device);
        let model = Llama {
            config: config.clone(),
            params,
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            device,
            compute_kind: Kind::Float,
        };
        debug_assert_eq!(model.numel() as u64, config.params_total());
        model
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs matrix multiplies and attention in `kind` (`Float` or `BFloat16`).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// The parameters in their fixed order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Number of scalar parameters actually allocated.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    // `x += y` on a tch tensor is an in-place `add_`, which would overwrite the
    // residual stream that RMSNorm saved for the backward pass.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, seq]");
        assert!(
            t as usize <= self.config.max_position_embeddings,
            "sequence of {t} tokens exceeds max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let c = &self.config;
        let (h, kvh, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let eps = c.rms_norm_eps;
        let d = c.hidden_size as i64;
        let ck = self.compute_kind;
        let w = |i: usize| &self.params[i].tensor;
        let lin = |x: &Tensor, i: usize| x.to_kind(ck).linear::<Tensor>(&w(i).to_kind(ck), None);
        let cos = self.rope_cos.narrow(0, 0, t).to_kind(ck);
        let sin = self.rope_sin.narrow(0, 0, t).to_kind(ck);

        let mut x = Tensor::embedding(w(self.embed), input_ids, -1, false, false);
        for l in &self.layers {
            let hn = x.rms_norm([d], Some(w(l.input_norm)), eps);
            let q = lin(&hn, l.q).view([b, t, h, hd]).transpose(1, 2);
            let k = lin(&hn, l.k).view([b, t, kvh, hd]).transpose(1, 2);
            let v = lin(&hn, l.v).view([b, t, kvh, hd]).transpose(1, 2);
            let q = apply_rope(&q, &cos, &sin);
            let k = apply_rope(&k, &cos, &sin);
            let (k, v) = if kvh == h {
                (k, v)
            } else {
                let rep = h / kvh;
                (
                    k.repeat_interleave_self_int(rep, 1, None),
                    v.repeat_interleave_self_int(rep, 1, None),
                )
            };
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, false,
            );
            let a = a.transpose(1, 2).reshape([b, t, d]);
            x = x + lin(&a, l.o).to_kind(Kind::Float);
            let hn = x.rms_norm([d], Some(w(l.post_norm)), eps);
            let gated = lin(&hn, l.gate).silu() * lin(&hn, l.up);
            x = x + lin(&gated, l.down).to_kind(Kind::Float);
        }
        let x = x.rms_norm([d], Some(w(self.norm)), eps);
        lin(&x, self.lm_head.unwrap_or(self.embed))
    }

    /// Mean next-token cross-entropy (nats) of `tokens` `[batch, seq + 1]`.
    pub fn loss(&self, tokens: &Tensor) -> Tensor {
        let t = tokens.size()[1];
        let inputs = tokens.narrow(1, 0, t - 1);
        let targets = tokens.narrow(1, 1, t - 1);
        let logits = self.forward(&inputs);
        let v = self.config.vocab_size as i64;
        logits
            .view([-1, v])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &targets.reshape([-1]),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
    }

    /// Per-token next-token cross-entropy (nats) of `tokens` `[batch, seq + 1]`,
    /// shaped `[batch, seq]`, computed without gradients.
    pub fn token_nll(&self, tokens: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let t = tokens.size()[1];
            let inputs = tokens.narrow(1, 0, t - 1);
            let targets = tokens.narrow(1, 1, t - 1);
            let logits = self.forward(&inputs).to_kind(Kind::Float);
            let v = self.config.vocab_size as i64;
            logits
                .view([-1, v])
                .cross_entropy_loss::<Tensor>(
                    &targets.reshape([-1]),
                    None,
                    tch::Reduction::None,
                    -100,
                    0.0,
                )
                .view([targets.size()[0], t - 1])
        })
    }

    /// Zeroes every parameter's gradient.
    pub fn zero_grad(&self) {
        for p in &self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Copies `value` into parameter `index` (shapes must already match).
    pub fn set_param(&self, index: usize, value: &Tensor) {
        tch::no_grad(|| {
            let mut t = self.params[index].tensor.shallow_clone();
            t.copy_(value);
        });
    }
}

/// A tensor of normal samples with standard deviation `std`, by Box–Muller over
/// SplitMix64: identical on every machine for the same seed.
fn normal_init(shape: &[i64], std: f64, seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut values = Vec::with_capacity(n as usize);
    while values.len() < n as usize {
        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = std::f64::consts::TAU * u2;
        values.push((r * theta.cos()) as f32);
        values.push((r * theta.sin()) as f32);
    }
    values.truncate(n as usize);
    Tensor::from_slice(&values).view(shape)
}

/// cos/sin tables `[max_positions, head_dim]` in the Hugging Face layout: the
/// frequencies repeated twice along the channel axis, matching `rotate_half`.
fn rope_tables(config: &LlamaConfig, device: Device) -> (Tensor, Tensor) {
    let hd = config.head_dim() as i64;
    let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / hd as f64;
    let inv_freq = (Tensor::from(config.rope_theta as f32).pow(&exponents)).reciprocal();
    let positions = Tensor::arange(
        config.max_position_embeddings as i64,
        (Kind::Int64, Device::Cpu),
    )
    .to_kind(Kind::Float);
    let freqs = positions.unsqueeze(1).matmul(&inv_freq.unsqueeze(0));
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_device(device), emb.sin().to_device(device))
}

/// `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn allocated_parameters_match_the_counted_ones() {
        for name in ["nano", "micro"] {
            let c = Preset::by_name(name).unwrap().config();
            let m = Llama::new(&c, Device::Cpu, 1);
            assert_eq!(m.numel() as u64, c.params_total(), "{name}");
        }
        let mut c = Preset::by_name("nano").unwrap().config();
        c.tie_word_embeddings = false;
        let m = Llama::new(&c, Device::Cpu, 1);
        assert_eq!(m.numel() as u64, c.params_total());
        assert_eq!(m.params().last().unwrap().name, "lm_head.weight");
    }

    #[test]
    fn forward_is_causal() {
        // Changing a later token must not change the logits at earlier positions.
        let c = Preset::by_name("nano").unwrap().config();
        let m = Llama::new(&c, Device::Cpu, 1);
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 99]).view([1, 6]);
        let (la, lb) = tch::no_grad(|| (m.forward(&a), m.forward(&b)));
        let early = |l: &Tensor| l.narrow(1, 0, 5);
        assert!(early(&la).allclose(&early(&lb), 1e-6, 1e-6, false));
        assert!(!la
            .narrow(1, 5, 1)
            .allclose(&lb.narrow(1, 5, 1), 1e-6, 1e-6, false));
    }

    #[test]
    fn untrained_loss_is_near_uniform() {
        let c = Preset::by_name("nano").unwrap().config();
        let m = Llama::new(&c, Device::Cpu, 1);
        let tokens = Tensor::randint(c.vocab_size as i64, [4, 33], (Kind::Int64, Device::Cpu));
        let loss = f64::try_from(m.loss(&tokens)).unwrap();
        let uniform = (c.vocab_size as f64).ln();
        assert!(
            (loss - uniform).abs() < 0.1,
            "loss {loss} vs ln(V) {uniform}"
        );
    }
}
