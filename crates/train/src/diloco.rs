//! DiLoCo against its data-parallel equivalent, on one machine.
//!
//! The baseline trains one model with a global batch of `workers × batch_size`
//! sequences per step: exactly what DDP over `workers` nodes computes. Each DiLoCo
//! configuration trains `workers` replicas that start every round from the shared θ,
//! take `inner_steps` AdamW steps on their share of the *same* samples the baseline's
//! global batch holds at those steps, send their pseudo-gradients θ − θᵢ through a codec
//! (with error feedback), and apply the aggregated pseudo-gradient with the Nesterov
//! outer step. Same token budget, same data, same inner hyper-parameters; what differs
//! is how often and how much is communicated.
//!
//! Communication is counted per node, sent plus received. DDP: a ring all-reduce of the
//! f32 gradient every step, `2·2(M−1)/M·4N` bytes. DiLoCo with all-to-all exchange:
//! each node uploads its blob to the `M−1` others and downloads theirs every round.
//!
//! Each DiLoCo row is a [`RowSpec`]: a codec with the outer settings it runs with, so
//! formats published by others (see [`crate::anchors`]) run beside Tessera's own on
//! the same work.
//!
//! **Overlap** (`overlap`): the one-step-delayed outer update. Round `t`'s
//! pseudo-gradients travel while round `t+1`'s inner steps run, so round `t+1` starts
//! from θ as it was before round `t`'s aggregate arrived, and the outer step applied at
//! the end of round `t+1` is round `t`'s aggregate:
//! `θ_{t+2} = outer(θ_{t+1}, agg_t)`. Every replica applies the same aggregate to the
//! same θ, so θ stays identical (and bit-deterministic) on every node after each outer
//! step. This is the delayed-outer-gradient variant of Kale, Douillard & Donchev,
//! "Eager updates for overlapped communication and computation in DiLoCo" (2025), not
//! their eager variant, which mixes each worker's own fresh update into its θ and so
//! lets replicas differ. The last round's aggregate is applied when it arrives, after
//! the last inner step: a run takes as many outer steps as rounds either way, and sends
//! as many blobs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tessera_model::{Llama, LlamaConfig};

use crate::data::{token_byte_lengths, Dataset, Windows};
use crate::eval::{evaluate_windows, EvalResult};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::outer::{
    aggregate, decode, encode, theta_hash, Aggregator, Codec, CodecError, Nesterov,
};
use crate::trainer::{train_step, Sampler, TrainError};

/// One DiLoCo row: a codec and the outer settings it runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowSpec {
    /// What tables call the row: the codec's name, or an anchor's name with its codec.
    pub label: String,
    pub codec: Codec,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    /// Error-feedback decay (see [`crate::outer::encode`]); 0 turns error feedback off.
    pub ef_decay: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExperimentOptions {
    pub model: LlamaConfig,
    pub data: PathBuf,
    pub workers: usize,
    /// Sequences per worker per inner step (the baseline uses `workers ×` this).
    pub batch_size: usize,
    pub seq_len: usize,
    pub inner_steps: u64,
    /// Inner steps in total (the baseline takes this many global steps).
    pub total_steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub aggregator: Aggregator,
    /// The DiLoCo rows, run in this order after the baseline.
    pub rows: Vec<RowSpec>,
    /// Apply each round's aggregate one round late (see the module docs).
    pub overlap: bool,
    pub seed: u64,
    pub eval_tokens_max: usize,
    /// Run the DDP-equivalent baseline first (the gaps are relative to it).
    pub baseline: bool,
}

/// One line of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRow {
    pub name: String,
    pub val_loss: f64,
    pub val_bpb: f64,
    /// Relative to the baseline's bpb: (bpb − baseline) / baseline.
    pub bpb_gap: f64,
    /// Bytes one node sends plus receives over the whole run.
    pub bytes_per_node: u64,
    /// What a DDP all-reduce of f32 gradients needs per node for the same steps.
    pub ddp_bytes_per_node: u64,
    pub reduction_vs_ddp: f64,
    pub rounds: u64,
    pub theta_hash: String,
    pub seconds: f64,
}

/// Progress reports for a display.
pub enum Progress<'a> {
    Started {
        name: &'a str,
    },
    Step {
        name: &'a str,
        step: u64,
        total: u64,
        loss: f64,
    },
    Finished {
        row: &'a ExperimentRow,
    },
}

/// θ as one f32 vector, parameters in their fixed order.
pub fn flatten(model: &Llama) -> Vec<f32> {
    let mut out = Vec::with_capacity(model.numel());
    for p in model.params() {
        let t = p
            .tensor
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1);
        out.extend(Vec::<f32>::try_from(&t).expect("f32 tensor"));
    }
    out
}

/// Loads a flat θ (as from [`flatten`]) into the model.
pub fn load_flat(model: &Llama, theta: &[f32]) {
    let mut o = 0;
    for (i, p) in model.params().iter().enumerate() {
        let n = p.tensor.numel();
        let t = Tensor::from_slice(&theta[o..o + n])
            .view(p.tensor.size().as_slice())
            .to_device(model.device());
        model.set_param(i, &t);
        o += n;
    }
}

struct Setup {
    data: Dataset,
    windows: Windows,
    val: Vec<Vec<i64>>,
    byte_lens: Vec<u32>,
}

fn evaluate(model: &Llama, s: &Setup, batch: usize) -> EvalResult {
    evaluate_windows(model, &s.val, batch, &s.byte_lens)
}

/// Runs the baseline and every codec; rows come back in that order.
pub fn run(
    opts: &ExperimentOptions,
    device: Device,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<ExperimentRow>, TrainError> {
    if opts.workers == 0 || opts.inner_steps == 0 || opts.total_steps < opts.inner_steps {
        return Err(TrainError::Option(
            "need workers ≥ 1, inner steps ≥ 1 and total steps ≥ inner steps".into(),
        ));
    }
    let data = Dataset::open(&opts.data)?;
    let windows = Windows::new(&data.train, opts.seq_len);
    let val = data.validation_windows(opts.seq_len, opts.eval_tokens_max);
    let byte_lens = token_byte_lengths(&data.tokenizer);
    let setup = Setup {
        data,
        windows,
        val,
        byte_lens,
    };
    let m = opts.workers;
    let n_params = opts.model.params_total();
    // Ring all-reduce per node per step: 2(M−1)/M of the gradient out and the same in.
    let ddp_bytes_per_node = (opts.total_steps as f64 * 2.0 * 2.0 * (m as f64 - 1.0) / m as f64
        * 4.0
        * n_params as f64) as u64;

    let mut rows = Vec::new();
    let mut base_bpb = f64::NAN;
    if opts.baseline {
        let baseline = baseline(opts, device, &setup, ddp_bytes_per_node, progress);
        base_bpb = baseline.val_bpb;
        rows.push(baseline);
    }
    for spec in &opts.rows {
        let mut row = diloco(opts, spec, device, &setup, ddp_bytes_per_node, progress)?;
        row.bpb_gap = (row.val_bpb - base_bpb) / base_bpb;
        rows.push(row);
    }
    Ok(rows)
}

fn baseline(
    opts: &ExperimentOptions,
    device: Device,
    s: &Setup,
    ddp_bytes_per_node: u64,
    progress: &mut dyn FnMut(Progress<'_>),
) -> ExperimentRow {
    let name = format!(
        "ddp-equivalent (global batch {})",
        opts.workers * opts.batch_size
    );
    progress(Progress::Started { name: &name });
    let start = std::time::Instant::now();
    let model = Llama::new(&opts.model, device, opts.seed);
    let mut optim = AdamW::new(&model, AdamWConfig::default());
    let mut sampler = Sampler::new(opts.seed);
    let global = (opts.workers * opts.batch_size) as u64;
    for step in 0..opts.total_steps {
        let batch = sampler.batch(&s.data, &s.windows, step * global, global as usize, device);
        let lr = lr_at(step, opts.lr, opts.warmup_steps, opts.total_steps, 0.1);
        let loss = f64::try_from(train_step(&model, &mut optim, &batch, lr, opts.grad_clip))
            .unwrap_or(f64::NAN);
        progress(Progress::Step {
            name: &name,
            step: step + 1,
            total: opts.total_steps,
            loss,
        });
    }
    let e = evaluate(&model, s, opts.batch_size);
    let row = ExperimentRow {
        name,
        val_loss: e.loss,
        val_bpb: e.bpb,
        bpb_gap: 0.0,
        bytes_per_node: ddp_bytes_per_node,
        ddp_bytes_per_node,
        reduction_vs_ddp: 1.0,
        rounds: opts.total_steps,
        theta_hash: theta_hash(&flatten(&model)),
        seconds: start.elapsed().as_secs_f64(),
    };
    progress(Progress::Finished { row: &row });
    row
}

fn diloco(
    opts: &ExperimentOptions,
    spec: &RowSpec,
    device: Device,
    s: &Setup,
    ddp_bytes_per_node: u64,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ExperimentRow, TrainError> {
    let m = opts.workers;
    let codec = spec.codec;
    let name = format!(
        "diloco M={m} H={} {} outer lr {}{}",
        opts.inner_steps,
        spec.label,
        spec.outer_lr,
        if opts.overlap { " overlap" } else { "" }
    );
    progress(Progress::Started { name: &name });
    let start = std::time::Instant::now();
    // Every replica starts from the same θ₀ as the baseline (same seed).
    let workers: Vec<Llama> = (0..m)
        .map(|_| Llama::new(&opts.model, device, opts.seed))
        .collect();
    let mut optims: Vec<AdamW> = workers
        .iter()
        .map(|w| AdamW::new(w, AdamWConfig::default()))
        .collect();
    let mut theta = flatten(&workers[0]);
    let n = theta.len();
    let mut residuals = vec![vec![0f32; n]; m];
    let mut outer = Nesterov::new(n, spec.outer_lr, spec.outer_momentum);
    // Under overlap, the aggregate that arrives during the next round's inner steps.
    let mut in_flight: Option<Vec<f32>> = None;
    let mut sampler = Sampler::new(opts.seed);
    let global = (m * opts.batch_size) as u64;
    let rounds = opts.total_steps / opts.inner_steps;
    let mut bytes_per_node = 0u64;
    for round in 0..rounds {
        let mut blobs = Vec::with_capacity(m);
        let mut loss_sum = 0.0;
        for (i, (model, optim)) in workers.iter().zip(optims.iter_mut()).enumerate() {
            load_flat(model, &theta);
            for h in 0..opts.inner_steps {
                let step = round * opts.inner_steps + h;
                let first = step * global + (i * opts.batch_size) as u64;
                let batch = sampler.batch(&s.data, &s.windows, first, opts.batch_size, device);
                let lr = lr_at(step, opts.lr, opts.warmup_steps, opts.total_steps, 0.1);
                let loss = train_step(model, optim, &batch, lr, opts.grad_clip);
                if h + 1 == opts.inner_steps {
                    loss_sum += f64::try_from(loss).unwrap_or(f64::NAN);
                }
            }
            let local = flatten(model);
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(t, l)| t - l).collect();
            blobs.push(encode(codec, &delta, &mut residuals[i], spec.ef_decay));
        }
        // All-to-all: each node uploads its blob to the others and downloads theirs.
        let own = blobs[0].len() as u64;
        let others: u64 = blobs[1..].iter().map(|b| b.len() as u64).sum();
        bytes_per_node += own * (m as u64 - 1) + others;
        // A worker whose training diverged sends NaN or infinity, which no decoder
        // accepts; any other refusal of our own encoding would be a bug.
        let decoded = blobs
            .iter()
            .map(|b| match decode(b, n as u64) {
                Err(CodecError::NotFinite { .. }) => Err(TrainError::Diverged {
                    step: (round + 1) * opts.inner_steps,
                    loss: loss_sum / m as f64,
                }),
                other => Ok(other.expect("our own encoding decodes")),
            })
            .collect::<Result<Vec<Vec<f32>>, TrainError>>()?;
        let pseudo_gradient = aggregate(opts.aggregator, &decoded);
        if opts.overlap {
            // Round t's aggregate is applied at the end of round t+1.
            if let Some(late) = in_flight.replace(pseudo_gradient) {
                outer.step(&mut theta, &late);
            }
        } else {
            outer.step(&mut theta, &pseudo_gradient);
        }
        progress(Progress::Step {
            name: &name,
            step: (round + 1) * opts.inner_steps,
            total: rounds * opts.inner_steps,
            loss: loss_sum / m as f64,
        });
    }
    // The last round's aggregate arrives after the last inner step.
    if let Some(late) = in_flight.take() {
        outer.step(&mut theta, &late);
    }
    load_flat(&workers[0], &theta);
    let e = evaluate(&workers[0], s, opts.batch_size);
    let row = ExperimentRow {
        name,
        val_loss: e.loss,
        val_bpb: e.bpb,
        bpb_gap: 0.0,
        bytes_per_node,
        ddp_bytes_per_node,
        reduction_vs_ddp: ddp_bytes_per_node as f64 / bytes_per_node.max(1) as f64,
        rounds,
        theta_hash: theta_hash(&theta),
        seconds: start.elapsed().as_secs_f64(),
    };
    progress(Progress::Finished { row: &row });
    Ok(row)
}
