//! `tessera experiment diloco`: DiLoCo with each codec against its DDP equivalent on
//! the same token budget and data (see `tessera_train::diloco`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tessera_model::Preset;
use tessera_train::diloco::{run, ExperimentOptions, Progress};
use tessera_train::outer::{Aggregator, Codec};

use crate::RuntimeArgs;

#[derive(Args, Debug)]
pub struct DilocoArgs {
    #[arg(long, default_value = "micro")]
    preset: String,
    /// A prepared data set (default: the bundled corpus, prepared under runs/).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Sequences per worker per step.
    #[arg(long = "batch", default_value_t = 8)]
    batch_size: usize,
    #[arg(long = "seq", default_value_t = 128)]
    seq_len: usize,
    /// Inner steps per round (H).
    #[arg(long, default_value_t = 5)]
    inner_steps: u64,
    /// Total inner steps (the baseline's global steps).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long = "warmup", default_value_t = 25)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    outer_lr: f32,
    /// Outer learning rate for `topk` rows. A sparse update moves θ only where it has
    /// values, and the rest waits in the error-feedback residual; a larger outer step
    /// makes up for that lag.
    #[arg(long, default_value_t = 2.5)]
    sparse_outer_lr: f32,
    #[arg(long, default_value_t = 0.0)]
    outer_momentum: f32,
    /// How much unsent error-feedback residual carries to the next round (1 = all).
    #[arg(long, default_value_t = 0.95)]
    ef_decay: f32,
    /// Codecs to compare: none, int8, topk, lowrank (comma separated).
    #[arg(long, default_value = "none,int8,topk", value_delimiter = ',')]
    codecs: Vec<String>,
    /// Elements kept per 4096-element chunk by `topk`.
    #[arg(long, default_value_t = 44)]
    topk: u32,
    /// Rank of each 1024 × 256 block's update under `lowrank`.
    #[arg(long, default_value_t = 4)]
    rank: u32,
    /// Bits per value kept by `topk` (a sign and 2^(bits−1) magnitudes).
    #[arg(long, default_value_t = 4)]
    topk_bits: u8,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the DDP-equivalent baseline (to compare DiLoCo settings among themselves).
    #[arg(long)]
    no_baseline: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn diloco(args: DilocoArgs) -> Result<()> {
    let (device, _) = args.runtime.setup()?;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => crate::demo::bundled_data(&PathBuf::from("runs"))?,
    };
    let manifest = tessera_train::Dataset::open(&data)?.manifest;
    let mut model = Preset::by_name(&args.preset)?.config();
    model.vocab_size = manifest.vocab_size.div_ceil(64) * 64;
    let codecs = args
        .codecs
        .iter()
        .map(|c| {
            let k = if c == "lowrank" { args.rank } else { args.topk };
            Codec::parse(c, k, args.topk_bits).map_err(anyhow::Error::msg)
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = ExperimentOptions {
        model,
        data,
        workers: args.workers,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        inner_steps: args.inner_steps,
        total_steps: args.steps,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        grad_clip: 1.0,
        outer_lr: args.outer_lr,
        sparse_outer_lr: args.sparse_outer_lr,
        outer_momentum: args.outer_momentum,
        ef_decay: args.ef_decay,
        aggregator: Aggregator::Mean,
        codecs,
        seed: args.seed,
        eval_tokens_max: 1 << 16,
        baseline: !args.no_baseline,
    };
    let mut last_print = std::time::Instant::now();
    let rows = run(&opts, device, &mut |p| match p {
        Progress::Started { name } => eprintln!("running {name}"),
        Progress::Step {
            name,
            step,
            total,
            loss,
        } => {
            if last_print.elapsed().as_secs() >= 15 || step == total {
                last_print = std::time::Instant::now();
                eprintln!("  {name}: step {step}/{total} loss {loss:.4}");
            }
        }
        Progress::Finished { row } => {
            eprintln!(
                "  {}: val bpb {:.4}, {:.1}x fewer bytes than DDP, {:.0} s",
                row.name, row.val_bpb, row.reduction_vs_ddp, row.seconds
            )
        }
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"options": opts, "rows": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<42} {:>8} {:>8} {:>14} {:>10}",
        "configuration", "val bpb", "vs base", "bytes/node", "vs DDP"
    );
    for r in &rows {
        println!(
            "{:<42} {:>8.4} {:>+7.2}% {:>14} {:>9.1}x",
            r.name,
            r.val_bpb,
            r.bpb_gap * 100.0,
            crate::human_bytes(r.bytes_per_node),
            r.reduction_vs_ddp
        );
    }
    Ok(())
}
