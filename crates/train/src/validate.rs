//! Scoring an update by what it does to the model, with the primitives a validator
//! computes and `tessera-verify` judges.
//!
//! The gain of an update Δ on a set of sequences is the loss at θ minus the loss at
//! θ − lr·Δ. The caller picks the step: `tessera experiment byzantine` uses the
//! update's share of the outer step (outer lr ÷ updates averaged), because one sparse
//! update taken alone at the full outer lr overshoots and raises the loss even when it
//! is honest (measured: every honest update of rounds 5-10 of a `micro` run). On
//! held-out sequences it says whether Δ improves the model at all. On the node's own
//! assigned sequences against random training sequences it says whether Δ was trained
//! on the data the node was given: training lowers the loss on the sequences trained
//! more than on others, so an honest node's own-data indicator (own gain − random gain)
//! is positive and a node that trained elsewhere, or not at all, has none. On 2
//! sequences of each that difference is about as large as its noise;
//! `tessera experiment byzantine` therefore scores every update on its own sequences
//! and on other nodes' and fits how easy each set is to improve and how good each
//! update is, so the margin compares like with like.
//!
//! Scoring is forward passes only, on a few sequences (a validator subsamples), so it
//! costs a small fraction of the training it checks. [`Scorer`] counts its FLOPs with
//! the model's own figure (a forward pass is a third of a training step's 6 per
//! parameter per token), so an experiment can report verification ÷ training FLOPs.
//!
//! Nothing here decides: thresholds, flags and pay live in `tessera-verify`, which has
//! no tensors.

use tch::{Device, Tensor};
use tessera_model::{Llama, LlamaConfig};

use crate::data::{Dataset, Windows};
use crate::diloco::load_flat;
use crate::rng::SplitMix64;
use crate::trainer::Sampler;

/// A model replica for scoring, with a count of the FLOPs it spent.
pub struct Scorer {
    model: Llama,
    forward_flops_per_token: u64,
    flops: u64,
}

impl Scorer {
    /// A scorer for `config` at context length `seq_len`. Its parameters are replaced
    /// by every call, so the initial values do not matter.
    pub fn new(config: &LlamaConfig, seq_len: usize, device: Device) -> Scorer {
        Scorer {
            model: Llama::new(config, device, 0),
            forward_flops_per_token: forward_flops_per_token(config, seq_len),
            flops: 0,
        }
    }

    /// Mean next-token loss (nats) at `theta` of each set of sequences
    /// (`[count, seq_len + 1]` tokens each), loading θ once.
    pub fn losses_at(&mut self, theta: &[f32], sets: &[&Tensor]) -> Vec<f64> {
        load_flat(&self.model, theta);
        sets.iter()
            .map(|tokens| {
                let (count, width) = tokens.size2().expect("sequences are [count, seq_len + 1]");
                self.flops += self.forward_flops_per_token * (count * (width - 1)) as u64;
                let loss = tch::no_grad(|| self.model.loss(&tokens.to_device(self.model.device())));
                f64::try_from(loss).unwrap_or(f64::NAN)
            })
            .collect()
    }

    /// The gain of `update` on each set: `before[i]` (the loss at θ on set `i`, from
    /// [`Scorer::losses_at`], shared by every update of a round) minus the loss at
    /// θ − `outer_lr`·Δ. Positive: the update lowers the loss there.
    pub fn gains(
        &mut self,
        theta: &[f32],
        before: &[f64],
        update: &[f32],
        outer_lr: f32,
        sets: &[&Tensor],
    ) -> Vec<f64> {
        assert_eq!(before.len(), sets.len(), "one loss before per set");
        let after = self.losses_at(&stepped(theta, update, outer_lr), sets);
        before.iter().zip(after).map(|(b, a)| b - a).collect()
    }

    /// The gain of `update` on one set of sequences: loss at θ minus loss at
    /// θ − `outer_lr`·Δ.
    pub fn gain(
        &mut self,
        theta: &[f32],
        update: &[f32],
        outer_lr: f32,
        sequences: &Tensor,
    ) -> f64 {
        let before = self.losses_at(theta, &[sequences]);
        self.gains(theta, &before, update, outer_lr, &[sequences])[0]
    }

    /// FLOPs spent by this scorer so far.
    pub fn flops(&self) -> u64 {
        self.flops
    }
}

/// θ − `lr`·Δ: where the outer step would take θ if `update` were the only one.
pub fn stepped(theta: &[f32], update: &[f32], lr: f32) -> Vec<f32> {
    assert_eq!(theta.len(), update.len(), "update must match θ");
    theta.iter().zip(update).map(|(t, d)| t - lr * d).collect()
}

/// The own-data indicator: gain on the node's assigned sequences minus gain on random
/// training sequences. Near zero for an update not trained on the assigned data.
pub fn own_data_indicator(gain_own: f64, gain_random: f64) -> f64 {
    gain_own - gain_random
}

/// Forward FLOPs per predicted token: a third of the training figure (forward 2,
/// backward 4 per parameter, and the same split for attention).
pub fn forward_flops_per_token(config: &LlamaConfig, seq_len: usize) -> u64 {
    config.flops_per_token(seq_len) / 3
}

/// FLOPs to train on `tokens` predicted tokens at context length `seq_len`.
pub fn training_flops(config: &LlamaConfig, seq_len: usize, tokens: u64) -> u64 {
    config.flops_per_token(seq_len) * tokens
}

/// Training samples `samples` of the run's data order as one `[count, seq_len + 1]`
/// tensor: a subsample of a node's batches, or random training sequences.
pub fn sequences(
    sampler: &mut Sampler,
    data: &Dataset,
    windows: &Windows,
    samples: &[u64],
    device: Device,
) -> Tensor {
    let mut flat = Vec::new();
    for &s in samples {
        let w = sampler.window(s, windows.len());
        windows.read(&data.train, w, &mut flat);
    }
    let width = (flat.len() / samples.len().max(1)) as i64;
    Tensor::from_slice(&flat)
        .view([samples.len() as i64, width])
        .to_device(device)
}

/// Validation windows (as from [`Dataset::validation_windows`]) as one tensor.
pub fn held_out(windows: &[Vec<i64>], device: Device) -> Tensor {
    let width = windows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<i64> = windows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([windows.len() as i64, width])
        .to_device(device)
}

/// Sequences of a node's assigned batches in its scoring set: few and short, because
/// scoring must stay a small fraction of the training it checks.
pub const SCORE_SEQUENCES: usize = 2;
/// Tokens scored of each sequence (at most the run's sequence length).
pub const SCORE_TOKENS: usize = 64;
/// Other nodes' sets each update is scored on besides its own. With 8 nodes an update
/// costs 5 sets of 2 × 64 tokens forward, plus its share of the losses at θ: about 5%
/// of the 5 × 8 × 128 tokens of training it checks.
pub const SCORE_OTHER_SETS: usize = 4;

/// A node's scoring set: [`SCORE_SEQUENCES`] distinct samples drawn by `rng` among the
/// samples of its assigned `batches` (batch `b` is samples `b·B .. (b+1)·B` of the
/// run's data order), the first [`SCORE_TOKENS`] tokens of each (at most `seq_len`).
#[allow(clippy::too_many_arguments)]
pub fn own_set(
    rng: &mut SplitMix64,
    batches: &[u64],
    batch_size: u64,
    seq_len: usize,
    seed: u64,
    data: &Dataset,
    windows: &Windows,
    device: Device,
) -> Tensor {
    let range = batches.len() as u64 * batch_size;
    let mut picks: Vec<u64> = Vec::with_capacity(SCORE_SEQUENCES);
    while picks.len() < SCORE_SEQUENCES.min(range as usize) {
        let x = rng.below(range);
        let sample = batches[(x / batch_size) as usize] * batch_size + x % batch_size;
        if !picks.contains(&sample) {
            picks.push(sample);
        }
    }
    let mut sampler = Sampler::new(seed);
    let tokens = SCORE_TOKENS.min(seq_len) as i64 + 1;
    sequences(&mut sampler, data, windows, &picks, device).narrow(1, 0, tokens)
}

/// The sets update `u` of a round of `m` is scored on: its own, then the next
/// [`SCORE_OTHER_SETS`] in commit order, cyclically.
pub fn scored_sets(u: usize, m: usize) -> Vec<usize> {
    let others = SCORE_OTHER_SETS.min(m.saturating_sub(1));
    (0..=others).map(|k| (u + k) % m).collect()
}
