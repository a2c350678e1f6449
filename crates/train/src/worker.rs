//! A node's side of a decentralized run: the run's shared settings ([`RunSpec`]), the
//! inner steps on assigned batches, the encoded pseudo-gradient, and the outer step
//! on the accepted set. The hub runs the same outer step to keep the checkpoint that
//! joiners start from; every honest node reaches the same θ bit for bit.

use serde::{Deserialize, Serialize};
use tch::Device;
use tessera_model::{Llama, LlamaConfig};

use crate::data::{Dataset, Windows};
use crate::diloco::{flatten, load_flat};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::outer::{
    aggregate, decode, encode, theta_hash, Aggregator, Codec, CodecError, Nesterov,
};
use crate::trainer::{train_step, Sampler};

/// Everything a node needs to take part in a run; the hub serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub run_id: String,
    pub model: LlamaConfig,
    /// blake3 of the data set's manifest, so a node checks it trains on the right data.
    pub data_manifest_blake3: String,
    pub batch_size: usize,
    pub seq_len: usize,
    pub inner_steps: u64,
    pub rounds_total: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    pub codec: Codec,
    /// How much of the unsent error-feedback residual carries into the next round.
    #[serde(default = "full_carry")]
    pub ef_decay: f32,
    pub aggregator: Aggregator,
    pub seed: u64,
}

fn full_carry() -> f32 {
    1.0
}

impl RunSpec {
    /// Tokens one batch holds.
    pub fn tokens_per_batch(&self) -> u64 {
        (self.batch_size * self.seq_len) as u64
    }
}

/// θ with the outer optimizer's velocity: what a joiner needs to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterState {
    pub round: u64,
    pub theta: Vec<f32>,
    pub outer: Nesterov,
}

impl OuterState {
    pub fn initial(spec: &RunSpec) -> OuterState {
        let model = Llama::new(&spec.model, Device::Cpu, spec.seed);
        let theta = flatten(&model);
        let outer = Nesterov::new(theta.len(), spec.outer_lr, spec.outer_momentum);
        OuterState {
            round: 0,
            theta,
            outer,
        }
    }

    pub fn hash(&self) -> String {
        theta_hash(&self.theta)
    }

    /// Decodes the accepted updates (in node-id order), aggregates them, and takes the
    /// outer step; the state moves to the next round.
    pub fn apply(&mut self, spec: &RunSpec, blobs: &[Vec<u8>]) -> Result<(), CodecError> {
        if !blobs.is_empty() {
            let n = self.theta.len() as u64;
            let updates = blobs
                .iter()
                .map(|b| decode(b, n))
                .collect::<Result<Vec<_>, _>>()?;
            let g = aggregate(spec.aggregator, &updates);
            self.outer.step(&mut self.theta, &g);
        }
        self.round += 1;
        Ok(())
    }

    /// `round`, θ and velocity as little-endian bytes (a checkpoint blob).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.theta.len());
        out.extend_from_slice(&self.round.to_le_bytes());
        for v in self.theta.iter().chain(&self.outer.velocity) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(spec: &RunSpec, bytes: &[u8]) -> Result<OuterState, String> {
        let n = spec.model.params_total() as usize;
        if bytes.len() != 8 + 8 * n {
            return Err(format!(
                "checkpoint is {} bytes; the run's model needs {}",
                bytes.len(),
                8 + 8 * n
            ));
        }
        let round = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let floats: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let (theta, velocity) = floats.split_at(n);
        let mut outer = Nesterov::new(n, spec.outer_lr, spec.outer_momentum);
        outer.velocity = velocity.to_vec();
        Ok(OuterState {
            round,
            theta: theta.to_vec(),
            outer,
        })
    }
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
    model: Llama,
    optim: AdamW,
    residual: Vec<f32>,
    sampler: Sampler,
}

impl Worker {
    pub fn new(spec: RunSpec, device: Device) -> Worker {
        let model = Llama::new(&spec.model, device, spec.seed);
        let optim = AdamW::new(&model, AdamWConfig::default());
        let residual = vec![0.0; model.numel()];
        let sampler = Sampler::new(spec.seed);
        Worker {
            spec,
            model,
            optim,
            residual,
            sampler,
        }
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
        let total_steps = self.spec.rounds_total * self.spec.inner_steps;
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
        let blob = encode(
            self.spec.codec,
            &delta,
            &mut self.residual,
            self.spec.ef_decay,
        );
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
