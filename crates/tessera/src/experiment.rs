//! `tessera experiment diloco`: DiLoCo with each codec against its DDP equivalent on
//! the same token budget and data (see `tessera_train::diloco`); `tessera experiment
//! sweep`: a grid of such rows kept in a resumable JSON-lines file, and their frontier
//! of bytes against bits per byte (see `tessera_train::sweep`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_model::Preset;
use tessera_outer::Aggregator;
use tessera_protocol::RunSpec;
use tessera_train::anchors::{Format, RunCodecSettings};
use tessera_train::diloco::{run, ExperimentOptions, ExperimentRow, Progress};
use tessera_train::sweep::{self, DilocoKey, SweepKey, SweepLine};

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
    let rows = run(&opts, device, &mut printer())?;
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

/// Progress on stderr: each row's start and end, and its loss every 15 s.
fn printer() -> impl FnMut(Progress<'_>) {
    let mut last_print = std::time::Instant::now();
    move |p| match p {
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
    }
}

/// A grid of DiLoCo rows and their baseline, each kept in `--out` under its settings.
/// Settings not on the grid default to the run defaults (`RunSpec::default`), as in
/// `tessera experiment diloco`. Every list flag is comma separated; the grid is their
/// product (a codec ignores the flags it has no use for, and anchors keep their own
/// settings, so repeats collapse).
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// A prepared data set.
    #[arg(long)]
    data: PathBuf,
    /// The JSON-lines file rows are read from and appended to (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Inner steps in total (the baseline's global steps).
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    #[arg(long)]
    preset: Option<String>,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Sequences per worker per step.
    #[arg(long = "batch")]
    batch_size: Option<usize>,
    #[arg(long = "seq")]
    seq_len: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long = "warmup")]
    warmup_steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// mean, median, trimmed_mean, norm_clip or clipped_mean.
    #[arg(long)]
    aggregator: Option<Aggregator>,
    /// Formats on the grid: none, int8, topk, lowrank, sparseloco, intellect-int8.
    #[arg(long, default_value = "topk", value_delimiter = ',')]
    codecs: Vec<Format>,
    /// Inner steps per round (H) on the grid.
    #[arg(long, value_delimiter = ',')]
    inner_steps: Vec<u64>,
    /// Elements kept per 4096-element chunk by `topk`, on the grid.
    #[arg(long, value_delimiter = ',')]
    topk: Vec<u32>,
    /// Bits per `topk` value on the grid.
    #[arg(long, value_delimiter = ',')]
    topk_bits: Vec<u8>,
    /// Outer learning rates on the grid, for every Tessera codec (default: the run's,
    /// which differs for dense and sparse codecs).
    #[arg(long, value_delimiter = ',')]
    outer_lr: Vec<f32>,
    /// Error-feedback decays on the grid.
    #[arg(long, value_delimiter = ',')]
    ef_decay: Vec<f32>,
    /// Run every DiLoCo row with the one-step-delayed outer update.
    #[arg(long)]
    overlap: bool,
    /// Print the table of the rows already in the file and which grid rows are still
    /// unmeasured; compute nothing (for a sweep still running, or killed).
    #[arg(long)]
    no_run: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// A list flag's values, or the default alone when the flag was not given.
fn or_default<T: Copy>(values: &[T], default: T) -> Vec<T> {
    if values.is_empty() {
        vec![default]
    } else {
        values.to_vec()
    }
}

pub fn sweep(args: SweepArgs) -> Result<()> {
    let (device, _) = args.runtime.setup()?;
    let d = RunSpec::default();
    let manifest = tessera_train::Dataset::open(&args.data)
        .with_context(|| format!("opening the data set {}", args.data.display()))?
        .manifest;
    let preset = args.preset.clone().unwrap_or(d.preset.clone());
    let model = Preset::by_name(&preset)?.config_for_vocab(manifest.vocab_size);
    let aggregator = args.aggregator.unwrap_or(d.aggregator);
    let work = SweepKey {
        data: sweep::data_id(&manifest),
        preset,
        steps: args.steps,
        workers: args.workers,
        batch_size: args.batch_size.unwrap_or(d.batch_size),
        seq_len: args.seq_len.unwrap_or(d.seq_len),
        lr: args.lr.unwrap_or(d.lr),
        warmup_steps: args.warmup_steps.unwrap_or(d.warmup_steps),
        seed: args.seed.unwrap_or(d.seed),
        aggregator: aggregator.name().to_string(),
        diloco: None,
    };
    // `None`: the run's outer learning rate for the codec (dense or sparse).
    let outer_lrs: Vec<Option<f32>> = if args.outer_lr.is_empty() {
        vec![None]
    } else {
        args.outer_lr.iter().copied().map(Some).collect()
    };
    let mut grid = vec![work.clone()];
    for &format in &args.codecs {
        for h in or_default(&args.inner_steps, d.inner_steps) {
            if h == 0 || h > args.steps {
                bail!("--inner-steps {h} must be 1..={} (--steps)", args.steps);
            }
            for k in or_default(&args.topk, d.topk) {
                for bits in or_default(&args.topk_bits, d.topk_bits) {
                    for ef_decay in or_default(&args.ef_decay, d.ef_decay) {
                        for &lr in &outer_lrs {
                            let settings = RunCodecSettings {
                                topk: k,
                                topk_bits: bits,
                                rank: d.rank,
                                outer_lr: lr.unwrap_or(d.outer_lr),
                                sparse_outer_lr: lr.unwrap_or(d.sparse_outer_lr),
                                outer_momentum: d.outer_momentum,
                                ef_decay,
                            };
                            let row = format.row(&settings).map_err(anyhow::Error::msg)?;
                            grid.push(SweepKey {
                                diloco: Some(DilocoKey {
                                    format: format.to_string(),
                                    inner_steps: h,
                                    overlap: args.overlap,
                                    row,
                                }),
                                ..work.clone()
                            });
                        }
                    }
                }
            }
        }
    }

    let text = read_sweep(&args.out)?;
    let parsed = sweep::parse(&text);
    if !parsed.unreadable.is_empty() {
        eprintln!(
            "{}: skipping unreadable line(s) {:?} (a row cut short by a kill is recomputed)",
            args.out.display(),
            parsed.unreadable
        );
    }
    let todo = sweep::pending(&grid, &parsed.lines);
    eprintln!(
        "{} grid row(s), {} already in {}, {} to run",
        grid.len(),
        grid.len() - todo.len(),
        args.out.display(),
        todo.len()
    );
    if args.no_run {
        for key in &todo {
            match &key.diloco {
                None => eprintln!("unmeasured: the baseline"),
                Some(k) => eprintln!(
                    "unmeasured: {} H={}{}",
                    k.row.label,
                    k.inner_steps,
                    if k.overlap { " overlap" } else { "" }
                ),
            }
        }
        print_frontier(&work.read_back(), &parsed.lines);
        return Ok(());
    }
    for (i, key) in todo.iter().enumerate() {
        eprintln!("[{}/{}]", i + 1, todo.len());
        let (inner_steps, rows, overlap) = match &key.diloco {
            None => (d.inner_steps.min(key.steps), Vec::new(), false),
            Some(k) => (k.inner_steps, vec![k.row.clone()], k.overlap),
        };
        let opts = ExperimentOptions {
            model: model.clone(),
            data: args.data.clone(),
            workers: key.workers,
            batch_size: key.batch_size,
            seq_len: key.seq_len,
            inner_steps,
            total_steps: key.steps,
            lr: key.lr,
            warmup_steps: key.warmup_steps,
            grad_clip: d.grad_clip,
            aggregator,
            rows,
            overlap,
            seed: key.seed,
            eval_tokens_max: 1 << 16,
            baseline: key.diloco.is_none(),
        };
        let mut rows = run(&opts, device, &mut printer())?;
        let row = rows.pop().context("the experiment returned no row")?;
        // The baseline is first on the grid, so it is in the file before any row
        // that is compared with it.
        let baseline_bpb = match &key.diloco {
            None => row.val_bpb,
            Some(_) => sweep::parse(&read_sweep(&args.out)?)
                .lines
                .iter()
                .find(|l| l.key == key.baseline().read_back())
                .map(|l| l.row.val_bpb)
                .context("the baseline row is missing from the sweep file")?,
        };
        append_sweep(&args.out, &SweepLine::new(key.clone(), row, baseline_bpb))?;
    }

    let lines = sweep::parse(&read_sweep(&args.out)?).lines;
    print_frontier(&work.read_back(), &lines);
    Ok(())
}

fn read_sweep(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading the sweep file {}", path.display())),
    }
}

/// Appends one row and syncs it, so a row reported done is on disk.
fn append_sweep(path: &Path, line: &SweepLine) -> Result<()> {
    let prefix = sweep::append_prefix(&read_sweep(path)?);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the sweep file {} to append", path.display()))?;
    f.write_all(format!("{prefix}{}\n", line.to_line()).as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("appending to the sweep file {}", path.display()))
}

/// Every row of the file done on the same work as `work`, fewest bytes first, with
/// the frontier marked and the best reduction within 3% of the baseline.
fn print_frontier(work: &SweepKey, lines: &[SweepLine]) {
    let baseline = lines.iter().find(|l| l.key == *work).map(|l| &l.row);
    let mut diloco: Vec<&SweepLine> = lines
        .iter()
        .filter(|l| l.key.diloco.is_some() && l.key.same_work(work))
        .collect();
    diloco.sort_by_key(|l| l.row.bytes_per_node);
    let rows: Vec<&ExperimentRow> = diloco.iter().map(|l| &l.row).collect();
    let front = sweep::frontier(&rows);
    let base_bpb = baseline.map_or(f64::NAN, |b| b.val_bpb);
    println!(
        "{} steps on data {} (* = on the frontier of bytes against bpb)",
        work.steps, work.data
    );
    println!(
        "  {:<58} {:>8} {:>8} {:>12} {:>10}",
        "configuration", "val bpb", "vs base", "bytes/node", "vs DDP"
    );
    if let Some(b) = baseline {
        println!(
            "  {:<58} {:>8.4} {:>8} {:>12} {:>9.1}x",
            b.name,
            b.val_bpb,
            "–",
            crate::human_bytes(b.bytes_per_node),
            1.0
        );
    }
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{} {:<58} {:>8.4} {:>+7.2}% {:>12} {:>9.1}x",
            if front.contains(&i) { "*" } else { " " },
            r.name,
            r.val_bpb,
            (r.val_bpb - base_bpb) / base_bpb * 100.0,
            crate::human_bytes(r.bytes_per_node),
            r.reduction_vs_ddp
        );
    }
    match baseline {
        None => println!("no baseline row yet: the gaps are unknown"),
        Some(b) => match sweep::best_within(&rows, b.val_bpb, 0.03) {
            Some(i) => println!(
                "best within 3% of the baseline's {:.4}: {} at {:.4} ({:+.2}%), {:.1}x fewer bytes than DDP",
                b.val_bpb,
                rows[i].name,
                rows[i].val_bpb,
                (rows[i].val_bpb - b.val_bpb) / b.val_bpb * 100.0,
                rows[i].reduction_vs_ddp
            ),
            None => println!(
                "no row within 3% of the baseline's {:.4} bpb",
                b.val_bpb
            ),
        },
    }
}
