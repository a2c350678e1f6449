//! A node's side of a decentralized run: θ₀, the inner steps on assigned batches and
//! the encoded pseudo-gradient. The outer step on the accepted set is
//! [`tessera_outer::OuterState::apply`]. The hub runs the same outer step to keep the checkpoint that
//! joiners start from; every honest node reaches the same θ bit for bit.
//!
//! A round's update depends on more than θ and the assigned batches: the AdamW moments
//! and step and the error-feedback residual carry over from earlier rounds. That
//! [`PrivateState`] is what a node commits to (its [`PrivateState::digest`]) before a
//! round and reveals when audited, so a validator can [`Worker::replay`] the round from
//! θ, that state, the batches and the seed and compare blobs. On the CPU with the same
//! number of threads a replay is byte-identical (`tests/replay.rs`); across thread
//! counts the reductions inside libtorch's kernels are split differently and the update
//! differs in its last bits (`examples/replay_threads.rs` measures by how much).

use tch::{Device, Kind, Tensor};
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

/// What a worker carries from one round to the next besides θ: the AdamW step count
/// and moments (flattened, parameters in their fixed order) and the error-feedback
/// residual. θ itself is reloaded from the outer state every round.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivateState {
    pub adam_step: u64,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    pub residual: Vec<f32>,
}

/// Domain separation for [`PrivateState::digest`], so the digest of a state can never
/// equal the hash of another kind of byte string the protocol hashes.
const PRIVATE_STATE_CONTEXT: &str = "tessera private state v1";

impl PrivateState {
    /// blake3 over the step (u64 little-endian), then the first moments, the second
    /// moments and the residual as little-endian f32, each part prefixed by its length
    /// (u64) so no two states share bytes.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(PRIVATE_STATE_CONTEXT);
        h.update(&self.adam_step.to_le_bytes());
        let mut buf = Vec::with_capacity(4 * 16384);
        for part in [&self.adam_m, &self.adam_v, &self.residual] {
            h.update(&(part.len() as u64).to_le_bytes());
            for chunk in part.chunks(16384) {
                buf.clear();
                for v in chunk {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                h.update(&buf);
            }
        }
        *h.finalize().as_bytes()
    }
}

/// Writes a step count and three parameter-sized vectors as little-endian bytes.
fn vectors_to_bytes(step: u64, parts: [&[f32]; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 * parts.iter().map(|p| p.len()).sum::<usize>());
    out.extend_from_slice(&step.to_le_bytes());
    for part in parts {
        for v in part {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parses [`vectors_to_bytes`] for `params` elements each: exactly that length, every
/// value finite, and the second vector (second moments) non-negative.
fn vectors_from_bytes(bytes: &[u8], params: usize) -> Result<(u64, [Vec<f32>; 3]), String> {
    let expected = params
        .checked_mul(12)
        .and_then(|n| n.checked_add(8))
        .ok_or("a state that large can't exist")?;
    if bytes.len() != expected {
        return Err(format!(
            "a state of {params} parameters is {expected} bytes, not {}",
            bytes.len()
        ));
    }
    let step = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let floats = |k: usize| -> Result<Vec<f32>, String> {
        let start = 8 + 4 * params * k;
        bytes[start..start + 4 * params]
            .chunks_exact(4)
            .map(|c| {
                let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                if !v.is_finite() || (k == 1 && v < 0.0) {
                    return Err(format!("state value {v} is not allowed"));
                }
                Ok(v)
            })
            .collect()
    };
    Ok((step, [floats(0)?, floats(1)?, floats(2)?]))
}

impl PrivateState {
    /// The one byte form an audited node reveals: the step (u64 little-endian), then
    /// the first moments, the second moments and the residual as little-endian f32,
    /// `params` each.
    pub fn to_bytes(&self) -> Vec<u8> {
        vectors_to_bytes(self.adam_step, [&self.adam_m, &self.adam_v, &self.residual])
    }

    /// Parses [`PrivateState::to_bytes`] for a model of `params` parameters: exactly
    /// that length, and every value finite (second moments also non-negative).
    pub fn from_bytes(bytes: &[u8], params: usize) -> Result<PrivateState, String> {
        let (adam_step, [adam_m, adam_v, residual]) = vectors_from_bytes(bytes, params)?;
        Ok(PrivateState {
            adam_step,
            adam_m,
            adam_v,
            residual,
        })
    }
}

/// The replica after one inner step: what a node hands in, step by step, when a replay
/// of its round differs from its update (a refereed replay checks each step alone).
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    pub adam_step: u64,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    pub theta: Vec<f32>,
}

impl StepState {
    /// The step, first moments, second moments and θ, as [`PrivateState::to_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        vectors_to_bytes(self.adam_step, [&self.adam_m, &self.adam_v, &self.theta])
    }

    /// Parses [`StepState::to_bytes`] strictly, as [`PrivateState::from_bytes`].
    pub fn from_bytes(bytes: &[u8], params: usize) -> Result<StepState, String> {
        let (adam_step, [adam_m, adam_v, theta]) = vectors_from_bytes(bytes, params)?;
        Ok(StepState {
            adam_step,
            adam_m,
            adam_v,
            theta,
        })
    }
}

/// A [`PrivateState`] that does not fit the worker's model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "private state has {m} first moments, {v} second moments and a residual of {residual}; \
     the model has {params} parameters"
)]
pub struct StateShapeError {
    pub m: usize,
    pub v: usize,
    pub residual: usize,
    pub params: usize,
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
        let mut loss_sum = 0.0;
        for (h, &batch_index) in batches.iter().enumerate() {
            loss_sum += self.inner_step(state.round, h, batch_index, data, windows);
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

    /// [`Worker::train_round`] from the carried state `before`, also returning the
    /// replica after every inner step: what a node hands in when a replay of its round
    /// is disputed. This worker's own state is replaced.
    pub fn trail(
        &mut self,
        state: &OuterState,
        before: &PrivateState,
        data: &Dataset,
        windows: &Windows,
        batches: &[u64],
    ) -> Result<Vec<StepState>, StateShapeError> {
        self.restore(before)?;
        load_flat(&self.model, &state.theta);
        let mut out = Vec::with_capacity(batches.len());
        for (h, &batch) in batches.iter().enumerate() {
            self.inner_step(state.round, h, batch, data, windows);
            out.push(self.step_state());
        }
        Ok(out)
    }

    /// One inner step checked alone: from `from` (the replica after step `h − 1`, or
    /// θ and the carried state for `h = 0`), trains the `h`-th batch of round `round`
    /// and returns the replica after it.
    #[allow(clippy::too_many_arguments)]
    pub fn step_from(
        &mut self,
        round: u64,
        h: usize,
        from: &StepState,
        batch: u64,
        data: &Dataset,
        windows: &Windows,
    ) -> Result<StepState, StateShapeError> {
        self.restore(&PrivateState {
            adam_step: from.adam_step,
            adam_m: from.adam_m.clone(),
            adam_v: from.adam_v.clone(),
            residual: vec![0.0; self.residual.len()],
        })?;
        load_flat(&self.model, &from.theta);
        self.inner_step(round, h, batch, data, windows);
        Ok(self.step_state())
    }

    /// The update a node's last step gives: θ of the round minus θ after the last step,
    /// encoded with the residual it carried into the round.
    pub fn encode_from(&self, theta: &[f32], last: &StepState, residual: &[f32]) -> Vec<u8> {
        let delta: Vec<f32> = theta.iter().zip(&last.theta).map(|(t, l)| t - l).collect();
        let mut residual = residual.to_vec();
        encode(self.codec, &delta, &mut residual, self.spec.ef_decay)
    }

    /// The `h`-th inner step of round `round` on batch `batch`; returns its loss.
    fn inner_step(
        &mut self,
        round: u64,
        h: usize,
        batch: u64,
        data: &Dataset,
        windows: &Windows,
    ) -> f64 {
        let b = self.spec.batch_size as u64;
        let tokens = self
            .sampler
            .batch(data, windows, batch * b, b as usize, self.model.device());
        let step = round * self.spec.inner_steps + h as u64;
        let lr = lr_at(
            step,
            self.spec.lr,
            self.spec.warmup_steps,
            self.spec.total_steps(),
            0.1,
        );
        f64::try_from(train_step(
            &self.model,
            &mut self.optim,
            &tokens,
            lr,
            self.spec.grad_clip,
        ))
        .unwrap_or(f64::NAN)
    }

    fn step_state(&self) -> StepState {
        let p = self.private_state();
        StepState {
            adam_step: p.adam_step,
            adam_m: p.adam_m,
            adam_v: p.adam_v,
            theta: flatten(&self.model),
        }
    }

    /// The run's codec, which every update of this worker is encoded with.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// A copy of the state this worker carries into its next round.
    /// Sharded aggregation's re-compression residual: what the round's aggregate
    /// dropped of this worker's sent update (`sent`) goes back into its error-feedback
    /// residual (`tessera_outer::shard::keep_what_was_dropped`).
    pub fn keep_what_was_dropped(&mut self, sent: &[f32], applied: &[f32]) {
        tessera_outer::shard::keep_what_was_dropped(sent, applied, &mut self.residual);
    }

    pub fn private_state(&self) -> PrivateState {
        let flat = |ts: &[Tensor]| {
            let mut out = Vec::with_capacity(self.residual.len());
            for t in ts {
                let t = t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1);
                out.extend(Vec::<f32>::try_from(&t).expect("f32 tensor"));
            }
            out
        };
        PrivateState {
            adam_step: self.optim.step,
            adam_m: flat(&self.optim.m),
            adam_v: flat(&self.optim.v),
            residual: self.residual.clone(),
        }
    }

    /// Elements of an update (the model's parameter count).
    pub fn params(&self) -> usize {
        self.residual.len()
    }

    /// The digest a node commits to before a round (see [`PrivateState::digest`]).
    pub fn state_digest(&self) -> [u8; 32] {
        self.private_state().digest()
    }

    /// Replaces this worker's carried state, e.g. with one an audited node revealed.
    /// A state of another model's size is refused and changes nothing.
    pub fn restore(&mut self, state: &PrivateState) -> Result<(), StateShapeError> {
        let params = self.residual.len();
        if state.adam_m.len() != params
            || state.adam_v.len() != params
            || state.residual.len() != params
        {
            return Err(StateShapeError {
                m: state.adam_m.len(),
                v: state.adam_v.len(),
                residual: state.residual.len(),
                params,
            });
        }
        let device = self.model.device();
        let mut o = 0;
        for (i, p) in self.model.params().iter().enumerate() {
            let n = p.tensor.numel();
            let shape = p.tensor.size();
            let load = |flat: &[f32]| {
                Tensor::from_slice(&flat[o..o + n])
                    .view(shape.as_slice())
                    .to_device(device)
            };
            self.optim.m[i] = load(&state.adam_m);
            self.optim.v[i] = load(&state.adam_v);
            o += n;
        }
        self.optim.step = state.adam_step;
        self.residual.copy_from_slice(&state.residual);
        Ok(())
    }

    /// Recomputes a round exactly as [`Worker::train_round`] computed it, from θ of
    /// `state`, the carried state the node had before the round and its batches: what
    /// a validator does to audit an update. This worker's own state is replaced.
    pub fn replay(
        &mut self,
        state: &OuterState,
        before: &PrivateState,
        data: &Dataset,
        windows: &Windows,
        batches: &[u64],
    ) -> Result<Vec<u8>, StateShapeError> {
        self.restore(before)?;
        Ok(self.train_round(state, data, windows, batches).blob)
    }

    /// The replica as the last round left it (θᵢ after the inner steps).
    pub fn trained_model(&self) -> &Llama {
        &self.model
    }

    /// The model with θ loaded, for evaluation or a checkpoint.
    pub fn model_at(&self, state: &OuterState) -> &Llama {
        load_flat(&self.model, &state.theta);
        &self.model
    }
}

#[cfg(test)]
mod tests {
    use super::PrivateState;

    /// Story: an audited node's revealed state crosses a trust boundary; only the one
    /// byte form of the model's size, with finite values, is taken.
    #[test]
    fn a_revealed_state_parses_strictly() {
        let s = PrivateState {
            adam_step: 7,
            adam_m: vec![0.5, -1.0],
            adam_v: vec![0.25, 0.0],
            residual: vec![1e-3, -2.0],
        };
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 8 + 12 * 2);
        assert_eq!(PrivateState::from_bytes(&bytes, 2), Ok(s.clone()));
        assert!(PrivateState::from_bytes(&bytes, 3).is_err());
        assert!(PrivateState::from_bytes(&bytes[..bytes.len() - 1], 2).is_err());
        let mut nan = bytes.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(PrivateState::from_bytes(&nan, 2).is_err());
        let mut negative_v = bytes;
        negative_v[16..20].copy_from_slice(&(-1.0f32).to_le_bytes());
        assert!(PrivateState::from_bytes(&negative_v, 2).is_err());
        assert!(PrivateState::from_bytes(&[], usize::MAX).is_err());
    }
}
