//! `tessera experiment diloco`: DiLoCo with each codec against its DDP equivalent on
//! the same token budget and data (see `tessera_train::diloco`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tessera_model::Preset;
use tessera_outer::Aggregator;
use tessera_protocol::RunSpec;
use tessera_train::anchors::{Format, RunCodecSettings};
use tessera_train::diloco::{run, ExperimentOptions, Progress};

use crate::RuntimeArgs;

/// Every training setting defaults to the run default (`RunSpec::default`), so the
/// experiment measures what a run ships with; the flags exist to compare others.
#[derive(Args, Debug)]
pub struct DilocoArgs {
    #[arg(long)]
    preset: Option<String>,
    /// A prepared data set (default: the bundled corpus, prepared under runs/).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Sequences per worker per step.
    #[arg(long = "batch")]
    batch_size: Option<usize>,
    #[arg(long = "seq")]
    seq_len: Option<usize>,
    /// Inner steps per round (H).
    #[arg(long)]
    inner_steps: Option<u64>,
    /// Total inner steps (the baseline's global steps; default: rounds × H of the run
    /// defaults).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long = "warmup")]
    warmup_steps: Option<u64>,
    /// Outer learning rate for dense codecs.
    #[arg(long)]
    outer_lr: Option<f32>,
    /// Outer learning rate for `topk` rows. A sparse update moves θ only where it has
    /// values, and the rest waits in the error-feedback residual; a larger outer step
    /// makes up for that lag.
    #[arg(long)]
    sparse_outer_lr: Option<f32>,
    #[arg(long)]
    outer_momentum: Option<f32>,
    /// How much unsent error-feedback residual carries to the next round (1 = all).
    #[arg(long)]
    ef_decay: Option<f32>,
    /// Formats to compare (comma separated): Tessera's codecs none, int8, topk and
    /// lowrank, and the anchors sparseloco (SparseLoCo's top-k 64/4096 at 2 bits,
    /// error-feedback decay 0.95, outer lr 1) and intellect-int8 (INTELLECT-1's int8,
    /// no error feedback); anchors keep their own settings whatever the flags say.
    #[arg(long, default_value = "none,int8,topk", value_delimiter = ',')]
    codecs: Vec<Format>,
    /// Elements kept per 4096-element chunk by `topk`.
    #[arg(long)]
    topk: Option<u32>,
    /// Rank of each 1024 × 256 block's update under `lowrank`.
    #[arg(long)]
    rank: Option<u32>,
    /// Bits per value kept by `topk` (a sign and 2^(bits−1) magnitudes).
    #[arg(long)]
    topk_bits: Option<u8>,
    /// mean, median, trimmed_mean or norm_clip.
    #[arg(long)]
    aggregator: Option<Aggregator>,
    #[arg(long)]
    seed: Option<u64>,
    /// One-step-delayed outer update: round t's pseudo-gradients are exchanged while
    /// round t+1's inner steps run, and applied at the end of round t+1 (θ stays the
    /// same on every node).
    #[arg(long)]
    overlap: bool,
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
    let d = RunSpec::default();
    let data = match &args.data {
        Some(d) => d.clone(),
        None => crate::demo::bundled_data(&PathBuf::from("runs"))?,
    };
    let manifest = tessera_train::Dataset::open(&data)?.manifest;
    let model = Preset::by_name(args.preset.as_deref().unwrap_or(&d.preset))?
        .config_for_vocab(manifest.vocab_size);
    let settings = RunCodecSettings {
        topk: args.topk.unwrap_or(d.topk),
        topk_bits: args.topk_bits.unwrap_or(d.topk_bits),
        rank: args.rank.unwrap_or(d.rank),
        outer_lr: args.outer_lr.unwrap_or(d.outer_lr),
        sparse_outer_lr: args.sparse_outer_lr.unwrap_or(d.sparse_outer_lr),
        outer_momentum: args.outer_momentum.unwrap_or(d.outer_momentum),
        ef_decay: args.ef_decay.unwrap_or(d.ef_decay),
    };
    let rows = args
        .codecs
        .iter()
        .map(|f| f.row(&settings).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let inner_steps = args.inner_steps.unwrap_or(d.inner_steps);
    let opts = ExperimentOptions {
        model,
        data,
        workers: args.workers,
        batch_size: args.batch_size.unwrap_or(d.batch_size),
        seq_len: args.seq_len.unwrap_or(d.seq_len),
        inner_steps,
        total_steps: args.steps.unwrap_or(d.rounds * d.inner_steps),
        lr: args.lr.unwrap_or(d.lr),
        warmup_steps: args.warmup_steps.unwrap_or(d.warmup_steps),
        grad_clip: d.grad_clip,
        aggregator: args.aggregator.unwrap_or(d.aggregator),
        rows,
        overlap: args.overlap,
        seed: args.seed.unwrap_or(d.seed),
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
