//! `tessera`: the one binary. Each subcommand is glue over the library crates; the
//! work happens in `tessera-model` and `tessera-train`.
//!
//! Exit codes: 0 success, 1 an error (printed with its cause chain), 2 bad usage.

mod attest_cli;
mod bench;
mod bench_ledger;
mod byzantine;
mod demo;
mod experiment;
mod ledger_cli;
mod netdemo;
mod plan_cli;
mod progress;
mod relay_cli;
mod seal_cli;
mod sim;
mod status_cli;
mod validator_cli;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::Device;
use tessera_model::{checkpoint, Preset, PRESETS};
use tessera_train::data::{prepare, Dataset, PrepareOptions};
use tessera_train::eval::{evaluate_text, generate, SampleOptions};
use tessera_train::trainer::{resolve_checkpoint, train, Budget, TrainOptions};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Train one open language model together, verifiably"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the model series.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Prepare data sets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a model on one node.
    Train(TrainArgs),
    /// Report loss and bits per byte of a checkpoint on a text file.
    Eval(EvalArgs),
    /// Sample text from a checkpoint.
    Generate(GenerateArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A hub and four nodes on loopback train `micro` on the bundled corpus (or, with
    /// --single, one process trains it), then a summary and a checkpoint.
    Demo(demo::DemoArgs),
    /// Experiments that produce the figures in docs/results.md.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Run a hub: coordinate a decentralized run described by a TOML file.
    Hub {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a contributor node against a hub.
    Node(NodeArgs),
    /// Judge every round of a hub's run again from public data and report whether the
    /// hub's verdicts agree (start it with the run).
    Validator(validator_cli::ValidatorArgs),
    /// What a run of a preset would take: layout, memory, traffic, time and cost.
    Plan(plan_cli::PlanArgs),
    /// A run at a glance in the terminal (what the hub's dashboard at `/` shows): once,
    /// or with --watch until Ctrl-C.
    Status(status_cli::StatusArgs),
    /// A run's relay, for contributors behind NATs (see README: join a run over the
    /// internet).
    #[command(subcommand)]
    Relay(relay_cli::RelayCommand),
    /// Simulate a run of thousands of nodes on virtual time over the real engines, with
    /// seeded faults; the same seed gives the same trace hash.
    Sim(sim::SimArgs),
    /// Create a node identity (ed25519 key file) and print its public key.
    Keygen {
        /// Where to write the key; refuses to overwrite.
        #[arg(long, default_value = "tessera.key")]
        out: PathBuf,
    },
    /// The token ledger: sales, run funding, payouts, stake, revenue, Merkle proofs.
    Ledger(ledger_cli::LedgerArgs),
    /// TEE evidence: verify TDX quotes and SEV-SNP reports offline; make a test PKI.
    #[command(subcommand)]
    Attest(attest_cli::AttestCommand),
    /// The data owner's key server: releases a sealed data set's keys to attested nodes.
    #[command(subcommand)]
    Keys(attest_cli::KeysCommand),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// List presets with exact parameter counts, FLOPs per token and training memory.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Train a byte-level BPE tokenizer and write tokenized shards with a manifest.
    Prepare {
        /// UTF-8 text files (one document each).
        #[arg(long = "input", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Vocabulary size of the trained tokenizer.
        #[arg(long = "vocab", default_value_t = 2048)]
        vocab_size: usize,
        /// Fraction of each file (its end) held out for validation.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Use this tokenizer.json instead of training one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Maximum tokens per shard file.
        #[arg(long, default_value_t = 1 << 24)]
        shard_tokens: usize,
    },
    /// Encrypt a prepared data set for a private run: per-item keys (to the data
    /// owner's key server), ciphertext and a public manifest (what the hub publishes).
    Seal {
        /// A data set from `tessera data prepare`.
        #[arg(long)]
        data: PathBuf,
        /// Where the sealed data set goes (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Where the keys go (mode 0600; refuses to overwrite). Keep them secret.
        #[arg(long)]
        keys: PathBuf,
    },
}

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Model preset (see `tessera model list`).
    #[arg(long, default_value = "micro")]
    preset: String,
    /// A directory written by `tessera data prepare`.
    #[arg(long)]
    data: PathBuf,
    /// Run directory: checkpoints, metrics. An existing run there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Train for this many minutes (converted to steps after timing the first ones).
    #[arg(long, conflicts_with = "steps")]
    minutes: Option<f64>,
    /// Train for this many steps.
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences per step.
    #[arg(long = "batch", default_value_t = 16)]
    batch_size: usize,
    /// Tokens per sequence (at most the preset's context).
    #[arg(long = "seq", default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long = "warmup", default_value_t = 50)]
    warmup_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Validate every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Where and how computation runs.
#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads for libtorch (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl RuntimeArgs {
    /// Applies the thread count and returns the device.
    pub fn setup(&self) -> Result<(Device, usize)> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(threads as i32);
        let device = match self.device.as_str() {
            "auto" => Device::cuda_if_available(),
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda(0),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::Cuda(n),
                None => bail!("unknown --device `{other}`; expected auto, cpu, cuda or cuda:N"),
            },
        };
        if device.is_cuda() && !tch::Cuda::is_available() {
            bail!(
                "--device {} asked for CUDA but no CUDA device is available",
                self.device
            );
        }
        Ok((device, threads))
    }
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Any UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args)]
struct NodeArgs {
    /// The hub's base URL, e.g. http://127.0.0.1:7000
    #[arg(long)]
    hub: String,
    /// The hub's public key (the hub prints it at start). Every reply from the hub
    /// must be signed by it; without it the node trusts the first key it sees.
    #[arg(long)]
    hub_key: Option<String>,
    /// A PEM certificate to trust for an HTTPS hub whose certificate is self-signed.
    #[arg(long)]
    hub_ca: Option<PathBuf>,
    /// Identity key file (created if missing).
    #[arg(long, default_value = "tessera.key")]
    key: PathBuf,
    /// Where downloaded data sets are cached.
    #[arg(long, default_value = "runs/node-cache")]
    cache: PathBuf,
    /// Limit blob upload and download to this many megabits per second each way.
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// UDP address of the node's blob endpoint (iroh). Default: loopback when the hub
    /// is on this machine, every interface (port chosen by the system) otherwise; the
    /// run's relays reach a node behind a NAT either way.
    #[arg(long)]
    blob_bind: Option<std::net::SocketAddr>,
    /// TEST TOOL: cheat on purpose, to see verification catch it. One of zero, noise,
    /// scale:K, sign-flip, copy, copy-noise, stale, wrong-data, lazy[:F], collude
    /// (see `tessera_train::adversary`). A cheating node's pay is forfeited and its
    /// stake slashed; never use it in a run you care about.
    #[arg(long, value_name = "MODE")]
    adversary: Option<tessera_train::adversary::Adversary>,
    /// TEST TOOL: under sharded aggregation, publish a wrong shard whenever this node
    /// aggregates one, to see the hub catch it (the node is ejected and its stake
    /// slashed).
    #[arg(long)]
    wrong_shards: bool,
    /// How this node attests for a private run's data keys: `configfs` inside a TDX
    /// or SEV-SNP confidential VM (collateral from $TESSERA_PCCS_URL or Intel's PCS),
    /// `configfs:PCCS_URL`, or `test:SEED_FILE` (the test PKI, for tests and local demos).
    #[arg(long, value_name = "PROVIDER")]
    attest: Option<String>,
    /// Measure instead of joining: train N rounds of the run's batches alone from θ₀,
    /// print the tokens per second and exit (the denominator of a node's utilization
    /// in the run, on the same machine with the same --threads).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    alone_rounds: Option<u64>,
    /// When the node stops, print what it did in the run (rounds, tokens, score, audits,
    /// earnings; also printed as a line on stderr) as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// DiLoCo (M workers, each codec) against the DDP-equivalent baseline.
    Diloco(experiment::DilocoArgs),
    /// A grid of DiLoCo rows kept in a resumable JSON-lines file (a row already there
    /// is not recomputed), and their frontier of bytes per node against bits per byte.
    Sweep(experiment::SweepArgs),
    /// Verified work against adversarial nodes: M workers, some adversarial (a test
    /// tool), judged by one validator configuration; one row per adversary mode.
    Byzantine(byzantine::ByzantineArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training tokens/s and MFU, against a PyTorch eager reference of the same model.
    Train(bench::BenchArgs),
    /// Durable ledger throughput: single transfers and 1,000-contributor payouts.
    Ledger(bench_ledger::LedgerBenchArgs),
}

fn main() {
    tessera_net::install_tls_provider();
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model(ModelCommand::List { json }) => model_list(json),
        Command::Data(DataCommand::Prepare {
            inputs,
            out,
            vocab_size,
            val_fraction,
            tokenizer,
            shard_tokens,
        }) => {
            let m = prepare(&PrepareOptions {
                inputs,
                out: out.clone(),
                vocab_size,
                val_fraction,
                tokenizer,
                shard_tokens_max: shard_tokens,
            })?;
            let count =
                |s: &[tessera_train::data::ShardEntry]| s.iter().map(|e| e.tokens).sum::<u64>();
            println!(
                "prepared {}: vocab {}, {} train tokens in {} shard(s), {} validation tokens ({} bytes)",
                out.display(),
                m.vocab_size,
                count(&m.train),
                m.train.len(),
                count(&m.val),
                m.val_text_bytes
            );
            Ok(())
        }
        Command::Data(DataCommand::Seal { data, out, keys }) => seal_cli::seal(&data, &out, &keys),
        Command::Attest(c) => attest_cli::attest(c),
        Command::Keys(c) => attest_cli::keys(c),
        Command::Train(args) => {
            let summary = run_train(&args)?;
            print_train_summary(&summary);
            Ok(())
        }
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
        Command::Bench(BenchCommand::Train(args)) => bench::run(args),
        Command::Bench(BenchCommand::Ledger(args)) => bench_ledger::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Ledger(args) => ledger_cli::run(args),
        Command::Experiment(ExperimentCommand::Diloco(args)) => experiment::diloco(args),
        Command::Experiment(ExperimentCommand::Sweep(args)) => experiment::sweep(args),
        Command::Experiment(ExperimentCommand::Byzantine(args)) => byzantine::run(args),
        Command::Sim(args) => sim::run_cli(args),
        Command::Validator(args) => validator_cli::run(args),
        Command::Relay(cmd) => relay_cli::run(cmd),
        Command::Plan(args) => plan_cli::run(args),
        Command::Status(args) => status_cli::run(args),
        Command::Hub { config } => {
            let config = tessera_hub::HubConfig::load(&config)?;
            tokio::runtime::Runtime::new()?.block_on(tessera_hub::serve(config))
        }
        Command::Node(args) => {
            let (device, _) = args.runtime.setup()?;
            let (identity, _) = tessera_protocol::Identity::load_or_create(&args.key)?;
            let hub_key = match &args.hub_key {
                Some(text) => {
                    Some(tessera_protocol::NodeId::from_hex(text).with_context(|| {
                        "--hub-key: give the 64-hex-digit key the hub printed at start"
                    })?)
                }
                None => None,
            };
            if let Some(b) = args.bandwidth_mbps {
                if !(b > 0.0 && b.is_finite()) {
                    bail!("--bandwidth-mbps must be positive, got {b}");
                }
            }
            let blob_bind = args
                .blob_bind
                .unwrap_or_else(|| tessera_node::default_blob_bind(&args.hub));
            tessera_node::run(tessera_node::NodeOptions {
                hub: args.hub,
                hub_key,
                hub_ca: args.hub_ca,
                identity,
                cache_dir: args.cache,
                device,
                bandwidth_mbps: args.bandwidth_mbps,
                blob_bind,
                adversary: args.adversary,
                wrong_shards: args.wrong_shards,
                attest: args.attest,
                alone_rounds: args.alone_rounds,
                json: args.json,
            })
        }
        Command::Keygen { out } => {
            let id = tessera_protocol::Identity::generate();
            id.save_new(&out)?;
            println!("{}", id.public_hex());
            eprintln!(
                "wrote {} (keep it secret; the line above is the public key)",
                out.display()
            );
            Ok(())
        }
    }
}

fn model_list(json: bool) -> Result<()> {
    let rows: Vec<serde_json::Value> = PRESETS
        .iter()
        .map(|p| {
            let c = p.config();
            let mem = c.training_memory();
            serde_json::json!({
                "name": p.name,
                "params": c.params_total(),
                "nominal_params": p.nominal_params,
                "deviation_from_name": p.deviation_from_name(),
                "layers": c.num_hidden_layers,
                "hidden_size": c.hidden_size,
                "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads,
                "intermediate_size": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "context": c.max_position_embeddings,
                "tied_embeddings": c.tie_word_embeddings,
                "flops_per_token": c.flops_per_token(c.max_position_embeddings),
                "training_memory_bytes": {
                    "weights_bf16": mem.weights_bytes,
                    "grads_bf16": mem.grads_bytes,
                    "adamw_f32": mem.optimizer_bytes,
                    "total": mem.total_bytes(),
                },
                "summary": p.summary,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<6} {:>17} {:>8} {:>6} {:>6} {:>8} {:>11} {:>12}  summary",
        "preset", "parameters", "vs name", "layers", "width", "context", "GFLOP/tok", "train mem"
    );
    for (p, r) in PRESETS.iter().zip(&rows) {
        let c = p.config();
        println!(
            "{:<6} {:>17} {:>8} {:>6} {:>6} {:>8} {:>11.3} {:>12}  {}",
            p.name,
            group_digits(c.params_total()),
            p.deviation_from_name()
                .map_or("-".into(), |d| format!("{:+.2}%", d * 100.0)),
            c.num_hidden_layers,
            c.hidden_size,
            c.max_position_embeddings,
            r["flops_per_token"].as_u64().unwrap_or(0) as f64 / 1e9,
            human_bytes(c.training_memory().total_bytes()),
            p.summary
        );
    }
    println!(
        "FLOPs per token at the preset's context: 6·(matmul parameters) + 12·layers·width·context."
    );
    println!("Training memory per replica: bf16 weights and gradients + f32 AdamW moments (12 bytes/parameter), activations excluded.");
    Ok(())
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Builds the training options: the preset's shape with the vocabulary sized to the
/// data set's tokenizer (rounded up to a multiple of 64 for matrix-multiply speed).
pub fn train_options(args: &TrainArgs) -> Result<TrainOptions> {
    let preset = Preset::by_name(&args.preset)?;
    let manifest_path = args.data.join(tessera_train::data::MANIFEST_FILE);
    let manifest: tessera_train::data::Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).with_context(|| {
            format!(
                "reading {}; run `tessera data prepare` first",
                manifest_path.display()
            )
        })?)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let model = preset.config_for_vocab(manifest.vocab_size);
    let budget = match (args.minutes, args.steps) {
        (Some(m), None) => Budget::Minutes(m),
        (None, Some(s)) => Budget::Steps(s),
        (None, None) => bail!("give a budget: --minutes M or --steps S"),
        (Some(_), Some(_)) => unreachable!("clap rejects both"),
    };
    Ok(TrainOptions {
        model,
        data: args.data.clone(),
        out: args.out.clone(),
        budget,
        seed: args.seed,
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        lr: args.lr,
        min_lr_ratio: 0.1,
        warmup_steps: args.warmup_steps,
        grad_clip: args.grad_clip,
        adamw: tessera_train::optim::AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        eval_every: args.eval_every,
        eval_tokens_max: 1 << 16,
        checkpoint_every: args.checkpoint_every,
        log_every: 10,
    })
}

pub fn run_train(args: &TrainArgs) -> Result<tessera_train::Summary> {
    let (device, threads) = args.runtime.setup()?;
    let opts = train_options(args)?;
    eprintln!(
        "training {} ({} parameters at vocab {}) on {:?} with {threads} thread(s)",
        args.preset,
        group_digits(opts.model.params_total()),
        opts.model.vocab_size,
        device
    );
    let mut progress = progress::TrainProgress::new();
    let summary = train(&opts, device, &mut |e| {
        progress.on_event(e);
        ControlFlow::Continue(())
    })?;
    progress.finish();
    Ok(summary)
}

fn print_train_summary(s: &tessera_train::Summary) {
    println!(
        "trained {} steps ({} tokens, {:.0} tokens/s); final loss {:.4}",
        s.steps, s.tokens_seen, s.tokens_per_second, s.final_loss
    );
    if let Some(e) = s.final_eval {
        println!("validation: loss {:.4}, {:.4} bits per byte", e.loss, e.bpb);
    }
    println!("checkpoint: {}", s.checkpoint.display());
}

fn load_checkpoint(
    dir: &Path,
    device: Device,
) -> Result<(tessera_model::Llama, tokenizers::Tokenizer)> {
    let dir = resolve_checkpoint(dir);
    let (mut model, tok_json) = checkpoint::load(&dir, device)
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    if device.is_cuda() {
        model.set_compute_kind(tch::Kind::BFloat16);
    }
    let tokenizer =
        tessera_train::data::load_tokenizer_json(&tok_json, &dir.join(checkpoint::TOKENIZER_FILE))?;
    Ok((model, tokenizer))
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let (device, _) = args.runtime.setup()?;
    let (model, tokenizer) = load_checkpoint(&args.checkpoint, device)?;
    let bytes =
        std::fs::read(&args.text).with_context(|| format!("reading {}", args.text.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 at byte {}",
            args.text.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let r = evaluate_text(&model, &tokenizer, &text, args.batch.max(1))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: loss {:.4} nats/token, {:.4} bits per byte over {} tokens ({} bytes)",
            args.text.display(),
            r.loss,
            r.bpb,
            r.tokens,
            r.bytes
        );
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let (device, _) = args.runtime.setup()?;
    if !(0.0..=1.0).contains(&args.top_p) || args.temperature < 0.0 {
        bail!("--top-p must be in [0, 1] and --temperature non-negative");
    }
    let (model, tokenizer) = load_checkpoint(&args.checkpoint, device)?;
    let text = generate(
        &model,
        &tokenizer,
        &args.prompt,
        &SampleOptions {
            tokens: args.tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
    )?;
    println!("{text}");
    Ok(())
}

/// Opens a data set to check it before long work starts.
pub fn check_data(dir: &Path) -> Result<()> {
    Dataset::open(dir).with_context(|| format!("opening data set {}", dir.display()))?;
    Ok(())
}
