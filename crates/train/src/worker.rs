//! A node's side of a decentralized run: θ₀, the inner steps on assigned batches and
//! the encoded pseudo-gradient. The outer step on the accepted set is
//! [`tessera_outer::OuterState::apply`]. The hub runs the same outer step to keep the checkpoint that
//! joiners start from; every honest node reaches the same θ bit for bit.

use tch::Device;
use tessera_model::{Llama, LlamaConfig};
pub use tessera_outer::OuterState;
use tessera_outer::{encode, Codec};
use tessera_protocol::RunSpec;

use crate::data::{Dataset, Windows};
use crate::diloco::{flatten, load_flat};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::trainer::{train_step, Sampler};

/// θ₀ of a run: a pure function of the model's shape and the run's seed, so nodes
/// compute it rather than download it.
pub fn initial_theta(model: &LlamaConfig, seed: u64) -> Vec<f32> {
    flatten(&Llama::new(model, Device::Cpu, seed))
}

/// The outer state a run starts from: θ₀ with zero velocity.
pub fn initial_state(spec: &RunSpec, model: &LlamaConfig) -> OuterState {
    OuterState::from_theta(
        initial_theta(model, spec.seed),
        spec.effective_outer_lr(),
        spec.outer_momentum,
    )
}

/// What a node produced in one round.
#[derive(Debug, Clone)]
pub struct RoundWork {
    pub blob: Vec<u8>,
    pub tokens: u64,
    pub mean_loss: f64,
    pub train_seconds: f64,
}

/// A node's trainer: its replica, inner optimizer and error-feedback residual.
pub struct Worker {
    pub spec: RunSpec,
    codec: Codec,
    model: Llama,
    optim: AdamW,
    residual: Vec<f32>,
    sampler: Sampler,
}

impl Worker {
    pub fn new(spec: RunSpec, model: &LlamaConfig, device: Device) -> Result<Worker, String> {
        let codec = spec.codec()?;
        let model = Llama::new(model, device, spec.seed);
        let optim = AdamW::new(&model, AdamWConfig::default());
        let residual = vec![0.0; model.numel()];
        let sampler = Sampler::new(spec.seed);
        Ok(Worker {
            spec,
            codec,
            model,
            optim,
            residual,
            sampler,
        })
    }

    /// Trains the assigned batches from θ of `state`; batch `b` is samples
    /// `b·B .. (b+1)·B` of the run's data order.
    pub fn train_round(
        &mut self,
        state: &OuterState,
        data: &Dataset,
        windows: &Windows,
        batches: &[u64],
    ) -> RoundWork {
        let start = std::time::Instant::now();
        load_flat(&self.model, &state.theta);
        let b = self.spec.batch_size as u64;
        let total_steps = self.spec.total_steps();
        let mut loss_sum = 0.0;
        for (h, &batch_index) in batches.iter().enumerate() {
            let batch = self.sampler.batch(
                data,
                windows,
                batch_index * b,
                b as usize,
                self.model.device(),
            );
            let step = state.round * self.spec.inner_steps + h as u64;
            let lr = lr_at(step, self.spec.lr, self.spec.warmup_steps, total_steps, 0.1);
            loss_sum += f64::try_from(train_step(
                &self.model,
                &mut self.optim,
                &batch,
                lr,
                self.spec.grad_clip,
            ))
            .unwrap_or(f64::NAN);
        }
        let local = flatten(&self.model);
        let delta: Vec<f32> = state.theta.iter().zip(&local).map(|(t, l)| t - l).collect();
        let blob = encode(self.codec, &delta, &mut self.residual, self.spec.ef_decay);
        RoundWork {
            blob,
            tokens: batches.len() as u64 * self.spec.tokens_per_batch(),
            mean_loss: loss_sum / batches.len().max(1) as f64,
            train_seconds: start.elapsed().as_secs_f64(),
        }
    }

    /// The model with θ loaded, for evaluation or a checkpoint.
    pub fn model_at(&self, state: &OuterState) -> &Llama {
        load_flat(&self.model, &state.theta);
        &self.model
    }
}
