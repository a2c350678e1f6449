//! The inner optimizer (AdamW), its learning-rate schedule, and gradient clipping.
//!
//! AdamW is written out in tensor ops rather than taken from libtorch's C++ optimizer
//! so its state (the two moments and the step count) is ours to checkpoint and restore
//! bit-exactly. The update is the same arithmetic as `torch.optim.AdamW`.

use tch::Tensor;
use tessera_model::Llama;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Moments for every parameter of a model, in the model's parameter order.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: u64,
}

impl AdamW {
    pub fn new(model: &Llama, config: AdamWConfig) -> AdamW {
        let zeros = || {
            model
                .params()
                .iter()
                .map(|p| p.tensor.zeros_like())
                .collect()
        };
        AdamW {
            config,
            m: zeros(),
            v: zeros(),
            step: 0,
        }
    }

    /// One update at learning rate `lr`. Weight decay applies to matrices only; norms'
    /// gains are not decayed.
    pub fn step(&mut self, model: &Llama, lr: f64) {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        tch::no_grad(|| {
            for (i, p) in model.params().iter().enumerate() {
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let mut w = p.tensor.shallow_clone();
                let (m, v) = (&mut self.m[i], &mut self.v[i]);
                if c.weight_decay > 0.0 && w.dim() >= 2 {
                    let _ = w.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                let _ = v
                    .g_mul_scalar_(c.beta2)
                    .addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let denom = (v.sqrt() / bias2_sqrt).g_add_scalar_(c.eps);
                let _ = w.addcdiv_(&(&*m * (-lr / bias1)), &denom);
            }
        });
    }
}

/// Linear warm-up to `lr_max`, then cosine decay to `lr_max * min_ratio` at `total_steps`.
pub fn lr_at(step: u64, lr_max: f64, warmup_steps: u64, total_steps: u64, min_ratio: f64) -> f64 {
    if step < warmup_steps {
        return lr_max * (step + 1) as f64 / warmup_steps as f64;
    }
    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
    let progress = ((step - warmup_steps) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    lr_max * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping as a tensor (no device synchronisation).
pub fn clip_grad_norm(model: &Llama, max_norm: f64) -> Tensor {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = model
            .params()
            .iter()
            .map(|p| p.tensor.grad())
            .filter(|g| g.defined())
            .collect();
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for g in &grads {
            let _ = g.shallow_clone().g_mul_(&coef);
        }
        total
    })
}
