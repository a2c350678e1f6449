//! `tessera demo`: the README's main command. Prepares the bundled corpus, trains the
//! `micro` preset for a few minutes with a progress display, evaluates it, and samples.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tessera_train::data::{prepare, PrepareOptions, MANIFEST_FILE};
use tessera_train::eval::{generate, SampleOptions};

use crate::{run_train, RuntimeArgs, TrainArgs};

/// The default corpus, shipped inside the binary so the demo needs no files.
const CORPUS: &str = include_str!("../../../data/tinyshakespeare.txt");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Train on one node instead of a hub with four nodes.
    #[arg(long)]
    single: bool,
    /// Minutes of training (single-node demo).
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// Nodes (decentralized demo).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Rounds (decentralized demo; default: the run default, 40).
    #[arg(long)]
    rounds: Option<u64>,
    /// Inner steps per round (decentralized demo; default: the run default, 5).
    #[arg(long)]
    inner_steps: Option<u64>,
    /// Update codec: none, int8, topk or lowrank (decentralized demo; default: the run
    /// default, topk).
    #[arg(long)]
    codec: Option<tessera_outer::CodecKind>,
    /// Working directory for the corpus, data set and run.
    #[arg(long, default_value = "runs/demo")]
    dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A private run (decentralized demo): the corpus is sealed, and a key server
    /// releases its keys only to nodes that attest (with the test PKI here; with
    /// `--attest configfs` inside a TDX or SEV-SNP guest).
    #[arg(long, conflicts_with = "single")]
    private: bool,
    /// Overlap communication with compute (the run setting `overlap`; decentralized
    /// demo): each node trains the next round while the open one is judged and
    /// exchanged.
    #[arg(long, conflicts_with = "single")]
    overlap: bool,
    /// Measure utilization (decentralized demo): first one node trains 8 rounds alone
    /// (`tessera node --alone-rounds 8`, one thread), then each node's tokens per second
    /// in the run, from the start of its first round's training to the end of its
    /// last, is printed against that.
    #[arg(long, conflicts_with = "single")]
    utilization: bool,
    /// Limit each node's blob upload and download to this many megabits per second
    /// (decentralized demo).
    #[arg(long, conflicts_with = "single")]
    bandwidth_mbps: Option<f64>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Prepares the bundled corpus under `dir/data` (once) and returns that directory.
pub fn bundled_data(dir: &std::path::Path) -> Result<PathBuf> {
    let data = dir.join("data");
    if !data.join(MANIFEST_FILE).exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let corpus = dir.join("tinyshakespeare.txt");
        std::fs::write(&corpus, CORPUS).with_context(|| format!("writing {}", corpus.display()))?;
        eprintln!(
            "preparing the bundled corpus (tinyshakespeare, {} bytes)",
            CORPUS.len()
        );
        let m = prepare(&PrepareOptions {
            inputs: vec![corpus],
            out: data.clone(),
            vocab_size: 2048,
            val_fraction: 0.1,
            tokenizer: None,
            shard_tokens_max: 1 << 24,
        })?;
        eprintln!(
            "tokenizer: vocab {}; {} validation bytes held out",
            m.vocab_size, m.val_text_bytes
        );
    }
    Ok(data)
}

pub fn run(args: DemoArgs) -> Result<()> {
    if !args.single {
        let defaults = tessera_protocol::RunSpec::default();
        let demo = crate::netdemo::NetDemo {
            nodes: args.nodes,
            rounds: args.rounds.unwrap_or(defaults.rounds),
            inner_steps: args.inner_steps.unwrap_or(defaults.inner_steps),
            codec: args.codec.unwrap_or(defaults.codec),
            seed: args.seed,
            private: args.private,
            overlap: args.overlap,
            utilization: args.utilization,
            bandwidth_mbps: args.bandwidth_mbps,
        };
        return crate::netdemo::run(&args.dir, &demo);
    }
    let data = bundled_data(&args.dir)?;
    // A fresh run every time: the demo shows training from scratch.
    let out = args.dir.join("run");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    let train_args = TrainArgs {
        preset: "micro".into(),
        data,
        out: out.clone(),
        minutes: Some(args.minutes),
        steps: None,
        seed: args.seed,
        batch_size: 16,
        seq_len: 128,
        lr: 3e-3,
        warmup_steps: 50,
        grad_clip: 1.0,
        weight_decay: 0.1,
        eval_every: 100,
        checkpoint_every: 500,
        runtime: RuntimeArgs {
            device: args.runtime.device.clone(),
            threads: args.runtime.threads,
        },
    };
    let summary = run_train(&train_args)?;
    let (device, _) = args.runtime.setup()?;
    let (model, tokenizer) = crate::load_checkpoint(&summary.checkpoint, device)?;
    let sample = generate(
        &model,
        &tokenizer,
        "ROMEO:",
        &SampleOptions {
            tokens: 120,
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            seed: args.seed,
        },
    )?;
    println!("---- sample ----\n{sample}\n----------------");
    println!(
        "trained micro for {} steps ({} tokens, {:.0} tokens/s)",
        summary.steps, summary.tokens_seen, summary.tokens_per_second
    );
    if let Some(e) = summary.final_eval {
        println!(
            "validation: {:.4} bits per byte (loss {:.4} nats/token)",
            e.bpb, e.loss
        );
    }
    println!("checkpoint: {}", summary.checkpoint.display());
    println!(
        "next: tessera generate --checkpoint {} --prompt 'JULIET:'",
        summary.checkpoint.display()
    );
    Ok(())
}
