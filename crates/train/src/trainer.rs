//! Single-node training: the inner loop, periodic validation, and resumable checkpoints.
//!
//! A run directory holds numbered checkpoints and a pointer to the newest complete one:
//!
//! ```text
//! latest                 "step-000120", replaced atomically after a checkpoint is whole
//! step-000120/           config.json, model.safetensors, tokenizer.json (Hugging Face),
//!                        optimizer.safetensors (AdamW moments), train_state.json
//! metrics.jsonl          one line per logged step and per validation
//! ```
//!
//! Everything that decides the next step is in the checkpoint: parameters, moments,
//! the step count (which fixes the learning rate and, with the seed, the data order)
//! and the loss history. Data order is a pure function of (seed, sample index), so no
//! generator state needs saving and a resumed run continues bit-for-bit.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tessera_model::{checkpoint, CheckpointError, Llama, LlamaConfig};

use crate::data::{token_byte_lengths, DataError, Dataset, Windows};
use crate::eval::{evaluate_windows, EvalResult};
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::rng::permutation;

const LATEST_FILE: &str = "latest";
const STATE_FILE: &str = "train_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";
/// Checkpoints kept on disk; older ones are deleted once a newer one is complete.
const CHECKPOINTS_KEPT: usize = 2;

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A setting is out of range or inconsistent with the data.
    #[error("{0}")]
    Option(String),
    /// The output directory holds a run with different settings.
    #[error("{path} holds a run with different settings ({what}); pass a new --out or the original settings")]
    Mismatch { path: PathBuf, what: String },
    /// The loss became NaN or infinite.
    #[error("loss is {loss} at step {step}; lower --lr or check the data")]
    Diverged { step: u64, loss: f64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    Steps(u64),
    /// Wall-clock minutes; converted to a step count after the first steps are timed,
    /// and that count is saved so a resumed run follows the same schedule.
    Minutes(f64),
}

/// Everything `tessera train` takes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub model: LlamaConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    pub budget: Budget,
    pub seed: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
    pub eval_every: u64,
    /// Validation uses at most this many tokens (the first windows of the split).
    pub eval_tokens_max: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

/// The saved progress of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub options: TrainOptions,
    pub step: u64,
    pub total_steps: u64,
    pub tokens_seen: u64,
    /// Training loss of every step so far, in order.
    pub losses: Vec<f64>,
    pub evals: Vec<(u64, EvalResult)>,
    pub train_seconds: f64,
}

/// What the loop reports to its caller (progress display, tests).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        resumed_from: Option<u64>,
        total_steps: u64,
        params: u64,
    },
    Step {
        step: u64,
        total_steps: u64,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
    },
    Eval {
        step: u64,
        result: EvalResult,
    },
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
}

/// The result of a finished (or stopped) run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub total_steps: u64,
    pub tokens_seen: u64,
    pub final_loss: f64,
    pub final_eval: Option<EvalResult>,
    pub checkpoint: PathBuf,
    pub tokens_per_second: f64,
    pub stopped_early: bool,
}

/// The data order: sample `i` of a run is window `perm_e[i mod n]` of epoch
/// `e = i div n`, with a fresh seeded permutation per epoch. Anyone with the seed can
/// recompute which window any sample is.
#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    epoch: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    pub fn new(seed: u64) -> Sampler {
        Sampler { seed, epoch: None }
    }

    /// The window index of sample `sample` among `n` windows.
    pub fn window(&mut self, sample: u64, n: usize) -> usize {
        let epoch = sample / n as u64;
        if self
            .epoch
            .as_ref()
            .is_none_or(|e| e.0 != epoch || e.1.len() != n)
        {
            self.epoch = Some((
                epoch,
                permutation(n, self.seed ^ epoch.wrapping_mul(0x9E37_79B9)),
            ));
        }
        self.epoch.as_ref().expect("just set").1[(sample % n as u64) as usize] as usize
    }

    /// Samples `first..first + count` as a `[count, seq_len + 1]` tensor on `device`.
    pub fn batch(
        &mut self,
        data: &Dataset,
        windows: &Windows,
        first: u64,
        count: usize,
        device: Device,
    ) -> Tensor {
        let mut flat = Vec::new();
        for j in 0..count as u64 {
            let w = self.window(first + j, windows.len());
            windows.read(&data.train, w, &mut flat);
        }
        let width = (flat.len() / count.max(1)) as i64;
        Tensor::from_slice(&flat)
            .view([count as i64, width])
            .to_device(device)
    }
}

/// One inner step: forward, backward, gradient clipping, AdamW. Returns the loss
/// tensor (reading it synchronises with the device).
pub fn train_step(
    model: &Llama,
    optim: &mut AdamW,
    batch: &Tensor,
    lr: f64,
    grad_clip: f64,
) -> Tensor {
    model.zero_grad();
    let loss = model.loss(batch);
    loss.backward();
    let _norm = clip_grad_norm(model, grad_clip);
    optim.step(model, lr);
    loss.detach()
}

/// Resolves a checkpoint argument: a checkpoint directory itself, or a run directory
/// whose `latest` names one.
pub fn resolve_checkpoint(dir: &Path) -> PathBuf {
    if dir.join(checkpoint::CONFIG_FILE).exists() {
        return dir.to_path_buf();
    }
    match std::fs::read_to_string(dir.join(LATEST_FILE)) {
        Ok(name) => dir.join(name.trim()),
        Err(_) => dir.to_path_buf(),
    }
}

struct Run<'a> {
    opts: &'a TrainOptions,
    data: Dataset,
    model: Llama,
    optim: AdamW,
    state: TrainState,
    windows: Windows,
    val_windows: Vec<Vec<i64>>,
    byte_lens: Vec<u32>,
    metrics: std::fs::File,
}

/// Runs (or resumes) training. `on_event` may return `ControlFlow::Break` to stop
/// after the current step without a final checkpoint, as an interruption would.
pub fn train(
    opts: &TrainOptions,
    device: Device,
    on_event: &mut dyn FnMut(&Event) -> ControlFlow<()>,
) -> Result<Summary, TrainError> {
    validate(opts)?;
    let data = Dataset::open(&opts.data)?;
    if data.manifest.vocab_size > opts.model.vocab_size {
        return Err(TrainError::Option(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            data.manifest.vocab_size, opts.model.vocab_size
        )));
    }
    let windows = Windows::new(&data.train, opts.seq_len);
    if windows.len() < opts.batch_size {
        return Err(TrainError::Option(format!(
            "the training split has {} windows of {} tokens, fewer than one batch of {}",
            windows.len(),
            opts.seq_len + 1,
            opts.batch_size
        )));
    }
    let val_windows = data.validation_windows(opts.seq_len, opts.eval_tokens_max);
    let byte_lens = token_byte_lengths(&data.tokenizer);
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;

    let mut model = Llama::new(&opts.model, device, opts.seed);
    if device.is_cuda() {
        model.set_compute_kind(Kind::BFloat16);
    }
    let mut optim = AdamW::new(&model, opts.adamw);
    let mut resumed_from = None;
    let state = match std::fs::read_to_string(opts.out.join(LATEST_FILE)) {
        Ok(name) => {
            let dir = opts.out.join(name.trim());
            let state = restore(&dir, opts, &model, &mut optim)?;
            resumed_from = Some(state.step);
            state
        }
        Err(_) => TrainState {
            options: opts.clone(),
            step: 0,
            total_steps: match opts.budget {
                Budget::Steps(s) => s,
                Budget::Minutes(_) => 0,
            },
            tokens_seen: 0,
            losses: Vec::new(),
            evals: Vec::new(),
            train_seconds: 0.0,
        },
    };
    let mpath = opts.out.join(METRICS_FILE);
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&mpath)
        .map_err(io_err(&mpath))?;
    let mut run = Run {
        opts,
        data,
        model,
        optim,
        state,
        windows,
        val_windows,
        byte_lens,
        metrics,
    };
    let _ = on_event(&Event::Started {
        resumed_from,
        total_steps: run.state.total_steps,
        params: run.model.numel() as u64,
    });
    run.train_loop(on_event)
}

fn validate(opts: &TrainOptions) -> Result<(), TrainError> {
    opts.model
        .validate()
        .map_err(|e| TrainError::Option(e.to_string()))?;
    let bad = |m: String| Err(TrainError::Option(m));
    if opts.batch_size == 0 || opts.seq_len == 0 {
        return bad("--batch and --seq must be positive".into());
    }
    if opts.seq_len > opts.model.max_position_embeddings {
        return bad(format!(
            "--seq {} exceeds the model's context of {} tokens",
            opts.seq_len, opts.model.max_position_embeddings
        ));
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad(format!("--lr must be a positive number, got {}", opts.lr));
    }
    match opts.budget {
        Budget::Steps(0) => bad("--steps must be positive".into()),
        Budget::Minutes(m) if !(m > 0.0 && m.is_finite()) => {
            bad(format!("--minutes must be positive, got {m}"))
        }
        _ => Ok(()),
    }
}

/// Loads a checkpoint's parameters, moments and state, after checking that it belongs
/// to a run with the same settings.
fn restore(
    dir: &Path,
    opts: &TrainOptions,
    model: &Llama,
    optim: &mut AdamW,
) -> Result<TrainState, TrainError> {
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(io_err(&spath))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| {
        TrainError::Option(format!("{}: corrupt train state: {e}", spath.display()))
    })?;
    let saved = &state.options;
    let mismatch = |what: &str| {
        Err(TrainError::Mismatch {
            path: opts.out.clone(),
            what: what.to_string(),
        })
    };
    if saved.model != opts.model {
        return mismatch("model shape");
    }
    if (saved.seed, saved.batch_size, saved.seq_len) != (opts.seed, opts.batch_size, opts.seq_len) {
        return mismatch("seed, batch or sequence length");
    }
    checkpoint::load_weights(model, &dir.join(checkpoint::WEIGHTS_FILE))?;
    let moments = checkpoint::read_safetensors(&dir.join(OPTIMIZER_FILE))?;
    for (i, p) in model.params().iter().enumerate() {
        for (slot, prefix) in [(&mut optim.m[i], "m"), (&mut optim.v[i], "v")] {
            let name = format!("{prefix}.{}", p.name);
            let t = moments.get(&name).ok_or_else(|| CheckpointError::Missing {
                path: dir.join(OPTIMIZER_FILE),
                name: name.clone(),
            })?;
            if t.size() != p.tensor.size() {
                return Err(CheckpointError::Shape {
                    path: dir.join(OPTIMIZER_FILE),
                    name,
                    expected: p.tensor.size(),
                    found: t.size(),
                }
                .into());
            }
            *slot = t.to_device(model.device());
        }
    }
    optim.step = state.step;
    Ok(state)
}

impl Run<'_> {
    fn batch(&self, step: u64, sampler: &mut Sampler) -> Tensor {
        let b = self.opts.batch_size as u64;
        sampler.batch(
            &self.data,
            &self.windows,
            step * b,
            b as usize,
            self.model.device(),
        )
    }

    fn evaluate(&self) -> Option<EvalResult> {
        (!self.val_windows.is_empty()).then(|| {
            evaluate_windows(
                &self.model,
                &self.val_windows,
                self.opts.batch_size,
                &self.byte_lens,
            )
        })
    }

    fn log(&mut self, line: serde_json::Value) -> Result<(), TrainError> {
        let path = self.opts.out.join(METRICS_FILE);
        writeln!(self.metrics, "{line}").map_err(io_err(&path))
    }

    fn train_loop(
        &mut self,
        on_event: &mut dyn FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<Summary, TrainError> {
        let opts = self.opts;
        let tokens_per_step = (opts.batch_size * opts.seq_len) as u64;
        let mut sampler = Sampler::new(opts.seed);
        let mut stopped_early = false;
        let started = Instant::now();
        let seconds_before = self.state.train_seconds;
        // Timing window for tokens/s and for converting a minute budget into steps.
        let mut timer = (Instant::now(), self.state.step);
        let calibrate_at = self.state.step + opts.warmup_steps.clamp(3, 20);
        let mut last_loss = self.state.losses.last().copied().unwrap_or(f64::NAN);
        let mut last_eval = self.state.evals.last().map(|e| e.1);
        loop {
            let step = self.state.step;
            if self.state.total_steps == 0 && step == calibrate_at {
                let Budget::Minutes(minutes) = opts.budget else {
                    unreachable!("steps budget is set up front")
                };
                let per_step = timer.0.elapsed().as_secs_f64() / (step - timer.1).max(1) as f64;
                // Leave a share of the time for validation passes and checkpoints.
                let usable = minutes * 60.0 * 0.93 - (Instant::now() - started).as_secs_f64();
                self.state.total_steps = step + (usable / per_step).max(1.0) as u64;
            }
            if self.state.total_steps != 0 && step >= self.state.total_steps {
                break;
            }
            let total_for_lr = if self.state.total_steps == 0 {
                u64::MAX
            } else {
                self.state.total_steps
            };
            let lr = lr_at(
                step,
                opts.lr,
                opts.warmup_steps,
                total_for_lr,
                opts.min_lr_ratio,
            );
            let batch = self.batch(step, &mut sampler);
            let loss = train_step(&self.model, &mut self.optim, &batch, lr, opts.grad_clip);
            let loss = f64::try_from(&loss).expect("scalar loss");
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step, loss });
            }
            last_loss = loss;
            self.state.step += 1;
            self.state.tokens_seen += tokens_per_step;
            self.state.losses.push(loss);
            let step = self.state.step;
            let elapsed = timer.0.elapsed().as_secs_f64();
            let tokens_per_second =
                (step - timer.1) as f64 * tokens_per_step as f64 / elapsed.max(1e-9);
            if step.is_multiple_of(opts.log_every.max(1)) || step == self.state.total_steps {
                self.log(serde_json::json!({"step": step, "loss": loss, "lr": lr, "tokens": self.state.tokens_seen, "tokens_per_second": tokens_per_second}))?;
            }
            let flow = on_event(&Event::Step {
                step,
                total_steps: self.state.total_steps,
                loss,
                lr,
                tokens_per_second,
            });
            if step == 2 {
                // The first steps pay one-off allocation costs; time from here on.
                timer = (Instant::now(), step);
            }
            let last = self.state.total_steps != 0 && step >= self.state.total_steps;
            if (opts.eval_every > 0 && step.is_multiple_of(opts.eval_every)) || last {
                if let Some(result) = self.evaluate() {
                    self.state.evals.push((step, result));
                    last_eval = Some(result);
                    self.log(serde_json::json!({"step": step, "val_loss": result.loss, "val_bpb": result.bpb}))?;
                    let _ = on_event(&Event::Eval { step, result });
                }
            }
            if flow.is_break() {
                stopped_early = true;
                break;
            }
            if (opts.checkpoint_every > 0 && step.is_multiple_of(opts.checkpoint_every)) || last {
                self.state.train_seconds = seconds_before + started.elapsed().as_secs_f64();
                let dir = self.save_checkpoint()?;
                let _ = on_event(&Event::Checkpoint { step, dir });
            }
        }
        let trained = self.state.step.saturating_sub(timer.1);
        Ok(Summary {
            steps: self.state.step,
            total_steps: self.state.total_steps,
            tokens_seen: self.state.tokens_seen,
            final_loss: last_loss,
            final_eval: last_eval,
            checkpoint: resolve_checkpoint(&opts.out),
            tokens_per_second: trained as f64 * tokens_per_step as f64
                / timer.0.elapsed().as_secs_f64().max(1e-9),
            stopped_early,
        })
    }

    /// Writes `step-NNNNNN/` completely, then points `latest` at it, then prunes.
    fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let name = format!("step-{:06}", self.state.step);
        let dir = self.opts.out.join(&name);
        checkpoint::save(&self.model, self.data.tokenizer_json.as_bytes(), &dir)?;
        let mut moments: Vec<(String, &Tensor)> = Vec::new();
        for (i, p) in self.model.params().iter().enumerate() {
            moments.push((format!("m.{}", p.name), &self.optim.m[i]));
            moments.push((format!("v.{}", p.name), &self.optim.v[i]));
        }
        let named: Vec<(&str, &Tensor)> = moments.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        checkpoint::write_safetensors(&dir.join(OPTIMIZER_FILE), &named)?;
        let spath = dir.join(STATE_FILE);
        let json = serde_json::to_vec(&self.state).expect("state serialises");
        checkpoint::write_atomic(&spath, &json).map_err(io_err(&spath))?;
        let lpath = self.opts.out.join(LATEST_FILE);
        checkpoint::write_atomic(&lpath, name.as_bytes()).map_err(io_err(&lpath))?;
        prune_checkpoints(&self.opts.out, CHECKPOINTS_KEPT);
        Ok(dir)
    }
}

/// Deletes all but the newest `keep` complete checkpoints. Failures are ignored: an
/// old checkpoint left behind costs disk, not correctness.
fn prune_checkpoints(out: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let mut steps: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    let n = steps.len();
    for name in steps.into_iter().take(n.saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(out.join(name));
    }
}
