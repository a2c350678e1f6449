//! `tessera bench train`: training throughput and model FLOPs utilisation (MFU), with a
//! PyTorch eager reference of the same model, weights and batch run on the same
//! threads in the same invocation, so the ratio compares like with like.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tch::{Device, Tensor};
use tessera_model::{checkpoint, Llama, Preset};
use tessera_train::optim::{AdamW, AdamWConfig};
use tessera_train::rng::SplitMix64;
use tessera_train::trainer::train_step;

use crate::RuntimeArgs;

const REFERENCE_SCRIPT: &str = include_str!("../../../python/reference_train.py");
const LR: f64 = 1e-3;
const GRAD_CLIP: f64 = 1.0;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value = "micro")]
    preset: String,
    #[arg(long = "batch", default_value_t = 16)]
    batch_size: usize,
    #[arg(long = "seq", default_value_t = 128)]
    seq_len: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Timed rounds; the fastest counts (the least disturbed by other work).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Untimed steps first (allocation, kernel selection).
    #[arg(long, default_value_t = 3)]
    warmup_steps: usize,
    /// Skip the PyTorch eager reference.
    #[arg(long)]
    no_reference: bool,
    /// Python with torch 2.11.0 and safetensors (default: $TESSERA_PYTHON, then the
    /// project's .venv, then python3).
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Serialize)]
struct Report {
    preset: String,
    params: u64,
    device: String,
    threads: usize,
    batch_size: usize,
    seq_len: usize,
    tokens_per_second: f64,
    flops_per_token: u64,
    achieved_flops: f64,
    peak_flops: Option<f64>,
    peak_derivation: String,
    mfu: Option<f64>,
    first_loss: f64,
    reference: Option<Reference>,
    ratio_to_reference: Option<f64>,
}

#[derive(Serialize, serde::Deserialize, Clone)]
struct Reference {
    tokens_per_second: f64,
    first_loss: f64,
    torch: String,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (device, threads) = args.runtime.setup()?;
    if args.steps == 0 || args.rounds == 0 {
        bail!("--steps and --rounds must be positive");
    }
    let config = Preset::by_name(&args.preset)?.config();
    if args.seq_len > config.max_position_embeddings {
        bail!(
            "--seq {} exceeds the preset's context of {}",
            args.seq_len,
            config.max_position_embeddings
        );
    }
    let mut model = Llama::new(&config, device, 0);
    if device.is_cuda() {
        model.set_compute_kind(tch::Kind::BFloat16);
    }
    let adamw = AdamWConfig::default();
    let mut optim = AdamW::new(&model, adamw);
    let mut rng = SplitMix64::new(1);
    let tokens: Vec<i64> = (0..args.batch_size * (args.seq_len + 1))
        .map(|_| rng.below(config.vocab_size as u64) as i64)
        .collect();
    let batch = Tensor::from_slice(&tokens).view([args.batch_size as i64, args.seq_len as i64 + 1]);

    // The reference gets the initial weights and the batch through files.
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let weights = scratch.path().join("weights.safetensors");
    if !args.no_reference {
        let named: Vec<(&str, &Tensor)> = model
            .params()
            .iter()
            .map(|p| (p.name.as_str(), &p.tensor))
            .collect();
        checkpoint::write_safetensors(&weights, &named)?;
        let raw: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(scratch.path().join("batch.bin"), raw)?;
    }

    let batch = batch.to_device(device);
    let mut first_loss = f64::NAN;
    for i in 0..args.warmup_steps.max(1) {
        let loss = f64::try_from(train_step(&model, &mut optim, &batch, LR, GRAD_CLIP))?;
        if i == 0 {
            first_loss = loss;
        }
    }
    let mut best = f64::INFINITY;
    for _ in 0..args.rounds {
        let start = Instant::now();
        for _ in 0..args.steps {
            let _ = f64::try_from(train_step(&model, &mut optim, &batch, LR, GRAD_CLIP))?;
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    let tokens_per_second = (args.steps * args.batch_size * args.seq_len) as f64 / best;
    let flops_per_token = config.flops_per_token(args.seq_len);
    let achieved_flops = flops_per_token as f64 * tokens_per_second;
    let (peak_flops, peak_derivation) = peak_flops(device, threads);

    let reference = if args.no_reference {
        None
    } else {
        let spec = serde_json::json!({
            "config": config,
            "weights": weights,
            "batch": scratch.path().join("batch.bin"),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "threads": threads,
            "device": if device.is_cuda() { "cuda" } else { "cpu" },
            "lr": LR,
            "beta1": adamw.beta1,
            "beta2": adamw.beta2,
            "eps": adamw.eps,
            "weight_decay": adamw.weight_decay,
            "grad_clip": GRAD_CLIP,
            "warmup_steps": args.warmup_steps.max(1),
            "steps": args.steps,
            "rounds": args.rounds,
        });
        Some(run_reference(&args, scratch.path(), &spec)?)
    };
    let report = Report {
        preset: args.preset.clone(),
        params: config.params_total(),
        device: format!("{device:?}"),
        threads,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        tokens_per_second,
        flops_per_token,
        achieved_flops,
        peak_flops,
        peak_derivation,
        mfu: peak_flops.map(|p| achieved_flops / p),
        first_loss,
        ratio_to_reference: reference
            .as_ref()
            .map(|r| tokens_per_second / r.tokens_per_second),
        reference,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} ({} params) on {} with {} thread(s), batch {}x{}",
        report.preset, report.params, report.device, threads, args.batch_size, args.seq_len
    );
    println!(
        "tessera:   {:>10.0} tokens/s, {:.2} GFLOP/s",
        tokens_per_second,
        achieved_flops / 1e9
    );
    match report.mfu {
        Some(mfu) => println!(
            "MFU:       {:>10.1}% of {} ",
            mfu * 100.0,
            report.peak_derivation
        ),
        None => println!("MFU:       unknown peak ({})", report.peak_derivation),
    }
    if let (Some(r), Some(ratio)) = (&report.reference, report.ratio_to_reference) {
        println!(
            "pytorch:   {:>10.0} tokens/s (torch {}, eager)",
            r.tokens_per_second, r.torch
        );
        println!("ratio:     {ratio:>10.3} (tessera / pytorch eager)");
        println!(
            "first-step loss: tessera {:.6}, pytorch {:.6}",
            first_loss, r.first_loss
        );
    }
    Ok(())
}

fn run_reference(
    args: &BenchArgs,
    scratch: &std::path::Path,
    spec: &serde_json::Value,
) -> Result<Reference> {
    let script = scratch.join("reference_train.py");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    let spec_path = scratch.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
    let python = args
        .python
        .clone()
        .unwrap_or_else(tessera_train::python::find);
    let out = Command::new(&python)
        .arg(&script)
        .arg(&spec_path)
        .output()
        .with_context(|| format!("running the PyTorch reference with {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the PyTorch reference failed ({}): {}\nhint: pass --python PATH to a Python with torch and safetensors, or --no-reference",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading the reference's output `{line}`"))
}

/// The machine's peak FLOP/s for this run and how it was derived. CPU: threads ×
/// clock × f32 FLOPs per cycle from the widest FMA the CPU reports (AVX-512: 2 units ×
/// 16 lanes × 2; AVX2: 2 × 8 × 2). CUDA: the vendor's dense bf16 tensor-core figure.
fn peak_flops(device: Device, threads: usize) -> (Option<f64>, String) {
    if let Device::Cuda(_) = device {
        let name = Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let table = [
            ("H200", 989.4e12),
            ("H100", 989.4e12),
            ("A100", 312e12),
            ("L40S", 362.05e12),
            ("4090", 165.2e12),
        ];
        return match table.iter().find(|(k, _)| name.contains(k)) {
            Some((k, f)) => (
                Some(*f),
                format!("{name}: {k} dense bf16 peak {:.1} TFLOP/s", f / 1e12),
            ),
            None => (None, format!("no peak known for GPU `{name}`")),
        };
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let (per_cycle, isa) = if has("avx512f") {
        (64.0, "AVX-512 FMA")
    } else if has("avx2") && has("fma") {
        (32.0, "AVX2 FMA")
    } else {
        (8.0, "SSE")
    };
    match mhz {
        Some(mhz) => {
            let peak = threads as f64 * mhz * 1e6 * per_cycle;
            (
                Some(peak),
                format!(
                    "{:.1} GFLOP/s = {threads} core(s) x {:.2} GHz x {per_cycle} f32 FLOP/cycle ({isa})",
                    peak / 1e9,
                    mhz / 1e3
                ),
            )
        }
        None => (None, "no clock in /proc/cpuinfo".into()),
    }
}
