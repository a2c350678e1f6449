//! `tessera experiment byzantine`: verified work against adversarial nodes.
//!
//! The round protocol simulated in one process, with the real pieces: every worker
//! trains its assigned batches through `tessera_train::worker` (the node's code), the
//! adversaries of `tessera_train::adversary` (a test tool) hand in their mode's update,
//! and a validator judges with `tessera-verify` from what the protocol gives it and
//! nothing else: the committed updates in commit order, the hash of each node's private
//! state, the previous round's updates, losses it measures with
//! `tessera_train::validate`, and replays of the updates it audits. It never asks who
//! is adversarial; one `VerifyConfig::default()` judges every row, honest rows included.
//!
//! A round: each active node commits to its private state (AdamW moments and step,
//! error-feedback residual) and trains; updates are committed in a seeded order with
//! copiers after the update they copy (commit before reveal); then the validator
//! finds copies of this round's earlier commits and of last round's updates (stale),
//! scores each update on its own assigned sequences and on other nodes' (its gain on
//! data it was not assigned and its own-data margin, `cross_evidence`) and takes its
//! norm, judges with the [`History`] of earlier rounds, replays the audited updates
//! (refused-on-a-measurement first, then the most suspicious) from the revealed state
//! and compares, settles the verdicts and the history, and aggregates the accepted
//! updates with the clipped mean, in node order. Pay (tokens × score) waits in escrow
//! for `escrow_rounds`; a failed audit or a proven copy (of this round's or the
//! previous round's updates) forfeits the node's escrow and ejects it.
//!
//! Workers train on `--threads` threads at once, each running libtorch on one thread,
//! so a row's result does not depend on how many run at once, and a replay on the
//! validator's thread reproduces an honest blob byte for byte. That also makes
//! training memoizable exactly ([`Memo`]): rows share the rounds they train from the
//! same θ and state, which is most of them, since a row whose adversaries are all
//! refused follows the honest-only reference's θ bit for bit. The honest-only
//! reference trains exactly the batches the honest workers of a mode's row train.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::{Device, Tensor};
use tessera_model::{Llama, LlamaConfig, Preset};
use tessera_outer::{decode_for, Codec};
use tessera_protocol::{Identity, NodeId, RunSpec};
use tessera_train::adversary::{Adversary, Knowledge, Submission, MODE_NAMES};
use tessera_train::data::{token_byte_lengths, Windows};
use tessera_train::diloco::load_flat;
use tessera_train::eval::evaluate_windows;
use tessera_train::rng::{permutation, SplitMix64};
use tessera_train::validate::{own_set, scored_sets, training_flops, Scorer};
use tessera_train::worker::{initial_state, OuterState, PrivateState, Worker};
use tessera_train::Dataset;
use tessera_verify::{
    audit_compare, audit_picks, copies_in_round, cross_evidence, judge, norm, settle, AuditOutcome,
    Escrow, Evidence, Flag, History, VerifyConfig,
};

use crate::RuntimeArgs;

/// Offset of the batches `wrong-data` trains on: far beyond any batch a run assigns.
const UNASSIGNED_BATCH_OFFSET: u64 = 1 << 32;
/// Validation tokens the final bits-per-byte figure is measured on (as `diloco`).
const EVAL_TOKENS_MAX: usize = 1 << 16;

#[derive(Args, Debug)]
pub struct ByzantineArgs {
    /// A prepared data set (default: the bundled corpus, prepared under runs/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Adversary modes, one row each (comma separated): zero, noise, scale:K,
    /// sign-flip, copy, copy-noise, stale, wrong-data, lazy[:F], collude.
    #[arg(long, value_delimiter = ',', default_values_t = MODE_NAMES.iter().map(|s| s.to_string()))]
    modes: Vec<String>,
    /// Rounds per row (default: 20, i.e. 100 inner steps per worker at H = 5).
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Workers per row, adversaries included.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Adversaries among the workers in a mode's row.
    #[arg(long, default_value_t = 2)]
    adversaries: usize,
    /// Skip the reference row with only the honest workers of a mode's row.
    #[arg(long)]
    no_reference: bool,
    #[arg(long)]
    preset: Option<String>,
    /// Sequences per worker per step.
    #[arg(long = "batch")]
    batch_size: Option<usize>,
    #[arg(long = "seq")]
    seq_len: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    json: bool,
    /// The validator configuration, as JSON (`tessera_verify::VerifyConfig`; missing
    /// fields take their defaults). Default: `VerifyConfig::default()`, the one
    /// configuration every row is judged with.
    #[arg(long)]
    verify: Option<PathBuf>,
    /// Write every round's evidence, judgements, copy findings and audits here, one
    /// JSON object per line.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// How accepted updates are combined: `clipped_mean` (the run default), `mean`,
    /// `median`, `trimmed_mean` or `norm_clip`.
    #[arg(long, default_value = "clipped_mean")]
    aggregator: tessera_outer::Aggregator,
    /// Accept every update unjudged (no refusals, audits or ejections): to measure what
    /// the aggregator alone does under attack.
    #[arg(long)]
    no_validator: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// One row of the experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `honest-8`, `honest-6` or the adversaries' mode.
    pub mode: String,
    pub workers: usize,
    pub adversaries: usize,
    /// Adversarial updates submitted: an adversary's updates other than its honest one
    /// (crafted, or trained on other or fewer batches than assigned).
    pub adversary_updates: u64,
    /// Of those, the fraction left out of the aggregate and unpaid (null without
    /// adversaries).
    pub caught_fraction: Option<f64>,
    /// Rounds until the last adversary was ejected (null when one never was).
    pub rounds_to_eject: Option<u64>,
    /// Adversaries ejected by the end.
    pub adversaries_ejected: usize,
    /// Honest updates left out of the aggregate or paid less than in full.
    pub honest_downweighted_fraction: f64,
    /// Honest nodes whose escrow was forfeited (must be 0).
    pub honest_slashed: usize,
    /// Adversaries' share of the pay released, 0-1.
    pub adversary_payout_share: f64,
    pub val_bpb: f64,
    /// (bpb − honest-only bpb) / honest-only bpb.
    pub bpb_gap: f64,
    /// Validator FLOPs (scoring and replays) ÷ FLOPs of the training assigned.
    pub verification_flops_fraction: f64,
    /// The scoring part of it.
    pub scoring_flops_fraction: f64,
    /// Replays ÷ updates judged.
    pub audit_rate: f64,
    pub audits: u64,
    pub audits_failed: u64,
    /// Node rounds trained in this row (catching up included), and answered by the
    /// memo instead (see `Memo`).
    pub rounds_trained: u64,
    pub rounds_memoized: u64,
    pub seconds: f64,
}

/// The run settings one row uses.
struct Setup {
    spec: RunSpec,
    model: LlamaConfig,
    codec: Codec,
    data: Dataset,
    windows: Windows,
    val: Vec<Vec<i64>>,
    byte_lens: Vec<u32>,
    device: Device,
    threads: usize,
    verify: VerifyConfig,
    aggregator: tessera_outer::Aggregator,
    no_validator: bool,
}

pub fn run(args: ByzantineArgs) -> Result<()> {
    let (device, threads) = args.runtime.setup()?;
    // Each worker runs libtorch on one thread and `threads` of them run at once (see
    // the module doc), so the main thread uses one too.
    tch::set_num_threads(1);
    if args.workers == 0 || args.adversaries >= args.workers {
        bail!(
            "--adversaries {} must be fewer than --workers {}",
            args.adversaries,
            args.workers
        );
    }
    let modes = args
        .modes
        .iter()
        .map(|m| m.parse::<Adversary>())
        .collect::<Result<Vec<_>, _>>()?;
    let d = RunSpec::default();
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None => crate::demo::bundled_data(&PathBuf::from("runs"))?,
    };
    let data = Dataset::open(&data_dir)
        .with_context(|| format!("opening the data set {}", data_dir.display()))?;
    let preset = args.preset.clone().unwrap_or(d.preset.clone());
    let spec = RunSpec {
        run_id: "byzantine".into(),
        preset: preset.clone(),
        rounds: args.rounds,
        batch_size: args.batch_size.unwrap_or(d.batch_size),
        seq_len: args.seq_len.unwrap_or(d.seq_len),
        seed: args.seed.unwrap_or(d.seed),
        ..d
    };
    spec.validate().context("run settings")?;
    let model = Preset::by_name(&preset)?.config_for_vocab(data.manifest.vocab_size);
    let windows = Windows::new(&data.train, spec.seq_len);
    let val = data.validation_windows(spec.seq_len, EVAL_TOKENS_MAX);
    if val.is_empty() {
        bail!(
            "the data set holds no validation window of {} tokens; the final evaluation needs one",
            spec.seq_len
        );
    }
    let setup = Setup {
        codec: spec.codec().map_err(anyhow::Error::msg)?,
        byte_lens: token_byte_lengths(&data.tokenizer),
        spec,
        model,
        data,
        windows,
        val,
        device,
        threads,
        verify: match &args.verify {
            None => VerifyConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| {
                    format!("{} is not a validator configuration", path.display())
                })?
            }
        },
        aggregator: args.aggregator,
        no_validator: args.no_validator,
    };

    let m = args.workers;
    let honest_rows = if args.no_reference || args.adversaries == 0 {
        1
    } else {
        2
    };
    let mut trace = match &args.trace {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let total_rounds = (honest_rows + modes.len()) as u64 * setup.spec.rounds;
    let bar = (!args.json).then(|| progress_bar(total_rounds));
    let mut rows = Vec::new();
    let mut plan: Vec<(String, usize, Option<Adversary>)> = vec![(format!("honest-{m}"), m, None)];
    if honest_rows == 2 {
        let h = m - args.adversaries;
        plan.push((format!("honest-{h}"), h, None));
    }
    for mode in &modes {
        plan.push((mode.to_string(), m, Some(*mode)));
    }
    let mut memo = Memo::default();
    for (name, workers, mode) in plan {
        let adversaries = if mode.is_some() { args.adversaries } else { 0 };
        if let Some(bar) = &bar {
            bar.set_message(name.clone());
        }
        let mut row = run_row(
            &setup,
            &name,
            workers,
            m,
            adversaries,
            mode,
            &mut memo,
            &mut trace,
            &mut || {
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            },
        )?;
        let base: Option<f64> = rows.first().map(|r: &Row| r.val_bpb);
        row.bpb_gap = base.map_or(0.0, |b| (row.val_bpb - b) / b);
        if let Some(bar) = &bar {
            bar.println(summary_line(&row));
        }
        rows.push(row);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "rows": rows,
                "verify": setup.verify,
                "spec": setup.spec,
                "workers": m,
                "adversaries": args.adversaries,
                "threads": setup.threads,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "mode", "caught", "eject", "honest↓", "adv pay", "bpb", "vs hon", "verif", "secs"
    );
    for r in &rows {
        println!(
            "{:<12} {:>7} {:>7} {:>6.1}% {:>6.2}% {:>8.4} {:>+7.2}% {:>7.1}% {:>7.0}",
            r.mode,
            r.caught_fraction
                .map_or("–".into(), |c| format!("{:.1}%", c * 100.0)),
            r.rounds_to_eject.map_or("–".into(), |e| e.to_string()),
            r.honest_downweighted_fraction * 100.0,
            r.adversary_payout_share * 100.0,
            r.val_bpb,
            r.bpb_gap * 100.0,
            r.verification_flops_fraction * 100.0,
            r.seconds
        );
    }
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total.max(1));
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} round {pos}/{len} {msg} ETA {eta}")
            .expect("valid template"),
    );
    bar
}

fn summary_line(r: &Row) -> String {
    format!(
        "  {}: caught {}, honest downweighted {:.1}%, adversary pay {:.2}%, bpb {:.4} ({:+.2}%), \
         verification {:.1}% of training FLOPs, {:.0} s",
        r.mode,
        r.caught_fraction
            .map_or("–".into(), |c| format!("{:.1}%", c * 100.0)),
        r.honest_downweighted_fraction * 100.0,
        r.adversary_payout_share * 100.0,
        r.val_bpb,
        r.bpb_gap * 100.0,
        r.verification_flops_fraction * 100.0,
        r.seconds
    )
}

/// A simulated node: its trainer, its place in the batch assignment, and (a test
/// tool) its adversarial mode.
struct Node {
    id: NodeId,
    slot: u64,
    worker: Worker,
    adversary: Option<Adversary>,
    /// The round it was ejected in.
    ejected: Option<u64>,
    /// Its last trained update (what `stale` resubmits).
    earlier: Option<Vec<f32>>,
    /// The digest of the private state it carries into its next round.
    digest: [u8; 32],
    /// Rounds the memo answered that `worker` has not trained yet, oldest first: the
    /// round's outer state and the batches. They are trained before the worker next
    /// trains or reveals its state.
    behind: Vec<(Arc<OuterState>, Vec<u64>)>,
}

impl Node {
    /// Trains the rounds the memo answered, so `worker` holds the state `digest`
    /// names; checks that it does.
    fn catch_up(&mut self, data: &Dataset, windows: &Windows) {
        if self.behind.is_empty() {
            return;
        }
        for (st, batches) in self.behind.drain(..) {
            self.worker.train_round(&st, data, windows, &batches);
        }
        assert_eq!(
            self.worker.state_digest(),
            self.digest,
            "a memo answer differs from training: training is not deterministic"
        );
    }
}

/// Exact memoization of training: a round's blob and the digest of the state it leaves,
/// keyed by everything the result depends on — θ and its round (the learning-rate
/// schedule), the digest of the private state trained from, the batches, and the
/// libtorch thread count (one). Training is byte-identical for the same inputs on one
/// thread (`crates/train/tests/replay.rs`), so an answer from the memo is the blob the
/// training would give; a node catching up checks the state digest it reaches against
/// the memo's ([`Node::catch_up`]). It lets rows whose θ stays the same share the honest
/// workers' training (a row whose adversaries are all refused follows honest-6's θ),
/// and answers the replay of an update that was trained as assigned. Verification FLOPs
/// count every replay as computed.
#[derive(Default)]
struct Memo {
    entries: HashMap<[u8; 32], Trained>,
    /// Final bits per byte by the digest of θ: rows that end at the same θ are
    /// evaluated once.
    evals: HashMap<[u8; 32], f64>,
}

#[derive(Clone)]
struct Trained {
    blob: Vec<u8>,
    after: [u8; 32],
}

/// Libtorch threads a worker trains on; part of the memo key.
const TRAIN_THREADS: u64 = 1;

fn theta_digest(theta: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera byzantine theta");
    let mut buf = Vec::with_capacity(4 * 16384);
    for chunk in theta.chunks(16384) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
    *h.finalize().as_bytes()
}

fn memo_key(theta: &[u8; 32], round: u64, before: &[u8; 32], batches: &[u64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera byzantine training memo");
    h.update(theta);
    h.update(&round.to_le_bytes());
    h.update(before);
    h.update(&TRAIN_THREADS.to_le_bytes());
    h.update(&(batches.len() as u64).to_le_bytes());
    for b in batches {
        h.update(&b.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// What one node did in one round, as far as the experiment's bookkeeping goes.
struct Committed {
    node: usize,
    /// An adversary's update that is not the honest one: crafted, or trained on other
    /// or fewer batches than assigned. (`stale` hands in its honest first update.)
    adversarial: bool,
    update: Vec<f32>,
    /// The private state it committed to before training, revealed when audited; kept
    /// only where a replay can't be answered by the memo (the node did not train its
    /// assigned batches this round).
    before: Option<PrivateState>,
    digest: [u8; 32],
}

fn node_id(i: usize) -> NodeId {
    let identity = Identity::from_secret([i as u8; 32]);
    NodeId::from_hex(&identity.public_hex()).expect("a public key is a node id")
}

/// The round's public randomness, known only once its commits closed: it orders the
/// commits here, picks the sequences scored and seeds the audit picks.
fn round_seed(seed: u64, round: u64) -> [u8; 32] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&round.to_le_bytes());
    blake3::derive_key("tessera byzantine round seed", &bytes)
}

#[allow(clippy::too_many_arguments)]
fn run_row(
    s: &Setup,
    name: &str,
    workers: usize,
    stride: usize,
    adversaries: usize,
    mode: Option<Adversary>,
    memo: &mut Memo,
    trace: &mut Option<std::io::BufWriter<std::fs::File>>,
    on_round: &mut dyn FnMut(),
) -> Result<Row> {
    let start = Instant::now();
    let spec = &s.spec;
    let h = spec.inner_steps;
    let b = spec.batch_size as u64;
    let tokens_per_round = h * spec.tokens_per_batch();
    let outer_lr = spec.effective_outer_lr();
    let fresh_digest = Worker::new(spec.clone(), &s.model, s.device)
        .map_err(anyhow::Error::msg)?
        .state_digest();
    let mut nodes = (0..workers)
        .map(|i| {
            // The adversaries are the last workers; the commit order is shuffled every
            // round, so their place says nothing.
            let adversary = (i >= workers - adversaries).then_some(mode).flatten();
            Ok(Node {
                id: node_id(i),
                slot: i as u64,
                worker: Worker::new(spec.clone(), &s.model, s.device)
                    .map_err(anyhow::Error::msg)?,
                adversary,
                ejected: None,
                earlier: None,
                digest: fresh_digest,
                behind: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut state = initial_state(spec, &s.model);
    let n = state.theta.len();
    let mut scorers: Vec<Scorer> = (0..s.threads)
        .map(|_| Scorer::new(&s.model, spec.seq_len, s.device))
        .collect();
    let mut replayers: Vec<Worker> = (0..s.threads)
        .map(|_| Worker::new(spec.clone(), &s.model, s.device).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let mut escrow = Escrow::new(s.verify.escrow_rounds);
    let mut history = History::new();
    let mut released: BTreeMap<NodeId, u128> = BTreeMap::new();
    let mut previous: Vec<(NodeId, Vec<f32>)> = Vec::new();
    let (mut adv_updates, mut adv_caught) = (0u64, 0u64);
    let (mut honest_updates, mut honest_down) = (0u64, 0u64);
    let (mut audits, mut audits_failed, mut judged_total) = (0u64, 0u64, 0u64);
    let (mut training_flops_total, mut replay_flops) = (0u64, 0u64);
    let (mut rounds_trained, mut rounds_memoized) = (0u64, 0u64);

    for round in 0..spec.rounds {
        let seed = round_seed(spec.seed, round);
        // Separate streams, so what the adversaries draw never moves what the
        // validator samples.
        let stream = |k: usize| {
            SplitMix64::new(u64::from_le_bytes(
                seed[8 * k..8 * k + 8].try_into().expect("8 bytes"),
            ))
        };
        let (mut order_rng, mut adversary_rng, mut rng) = (stream(0), stream(1), stream(2));
        // Batches by slot in a row of `stride` workers, so the honest-only reference
        // trains exactly the batches the honest workers of a mode's row train.
        let assigned = |slot: u64| -> Vec<u64> {
            let first = (round * stride as u64 + slot) * h;
            (first..first + h).collect()
        };
        // Commit order: seeded, copiers last (they need an update to copy).
        let active: Vec<usize> = (0..workers)
            .filter(|&i| nodes[i].ejected.is_none())
            .collect();
        let mut order: Vec<usize> = permutation(active.len(), order_rng.next_u64())
            .into_iter()
            .map(|p| active[p as usize])
            .collect();
        order.sort_by_key(|&i| {
            matches!(
                nodes[i].adversary,
                Some(Adversary::Copy | Adversary::CopyNoise)
            )
        });
        training_flops_total +=
            training_flops(&s.model, spec.seq_len, tokens_per_round) * order.len() as u64;

        // Who trains what. A colluder trains only if it is the first of the pair in
        // commit order; the other reuses that crafted update.
        let mut first_colluder = None;
        let plans: Vec<Option<Vec<u64>>> = order
            .iter()
            .map(|&i| {
                let node = &nodes[i];
                let mine = assigned(node.slot);
                match node.adversary {
                    None => Some(mine),
                    Some(a) => {
                        let unassigned: Vec<u64> =
                            mine.iter().map(|b| b + UNASSIGNED_BATCH_OFFSET).collect();
                        let leader_exists = a == Adversary::Collude && first_colluder.is_some();
                        if a == Adversary::Collude && first_colluder.is_none() {
                            first_colluder = Some(i);
                        }
                        let placeholder: [f32; 0] = [];
                        a.batches_to_train(&Knowledge {
                            codec: s.codec,
                            params: n,
                            assigned: &mine,
                            unassigned: &unassigned,
                            earlier: node.earlier.as_deref(),
                            committed_before: None,
                            partner: leader_exists.then_some(&placeholder[..]),
                            seed: 0,
                        })
                    }
                }
            })
            .collect();
        let trains_assigned: Vec<bool> = order
            .iter()
            .zip(&plans)
            .map(|(&i, plan)| plan.as_ref() == Some(&assigned(nodes[i].slot)))
            .collect();

        // Commit to the private state, then train, `threads` workers at once; the memo
        // answers what was trained before from the same inputs.
        let st = Arc::new(state.clone());
        let theta_hash = theta_digest(&state.theta);
        let digests: Vec<[u8; 32]> = order.iter().map(|&i| nodes[i].digest).collect();
        let plan_keys: Vec<Option<[u8; 32]>> = plans
            .iter()
            .zip(&digests)
            .map(|(plan, d)| plan.as_ref().map(|bs| memo_key(&theta_hash, round, d, bs)))
            .collect();
        let mut from_memo: Vec<Option<Trained>> = plan_keys
            .iter()
            .map(|k| k.and_then(|k| memo.entries.get(&k).cloned()))
            .collect();
        let data = &s.data;
        let windows = &s.windows;
        let jobs: Vec<(&mut Node, Option<Vec<u64>>, bool, bool)> = {
            let mut by_index: Vec<Option<&mut Node>> = nodes.iter_mut().map(Some).collect();
            order
                .iter()
                .zip(plans)
                .zip(&from_memo)
                .zip(&trains_assigned)
                .map(|(((&i, plan), hit), &as_assigned)| {
                    (
                        by_index[i].take().expect("each node once"),
                        plan,
                        hit.is_some(),
                        as_assigned,
                    )
                })
                .collect()
        };
        let st_ref = &st;
        #[allow(clippy::type_complexity)]
        let trained: Vec<(Option<Trained>, Option<PrivateState>)> = par_map(
            jobs,
            &mut vec![(); s.threads],
            |_, (node, plan, hit, as_assigned)| {
                // A replay of this round can't come from the memo unless the node
                // trained its assigned batches, so it keeps the state it committed to.
                let before = (!as_assigned).then(|| {
                    node.catch_up(data, windows);
                    node.worker.private_state()
                });
                let work = match (plan, hit) {
                    (None, _) => None,
                    (Some(batches), true) => {
                        node.behind.push((Arc::clone(st_ref), batches));
                        None
                    }
                    (Some(batches), false) => {
                        node.catch_up(data, windows);
                        let blob = node
                            .worker
                            .train_round(st_ref, data, windows, &batches)
                            .blob;
                        Some(Trained {
                            blob,
                            after: node.worker.state_digest(),
                        })
                    }
                };
                (work, before)
            },
        );
        let mut befores: Vec<Option<PrivateState>> = Vec::with_capacity(order.len());
        for (pos, (work, before)) in trained.into_iter().enumerate() {
            befores.push(before);
            if let Some(work) = work {
                rounds_trained += 1;
                let key = plan_keys[pos].expect("a node that trained had a plan");
                memo.entries.insert(key, work.clone());
                from_memo[pos] = Some(work);
            } else if from_memo[pos].is_some() {
                rounds_memoized += 1;
            }
        }
        for (pos, &i) in order.iter().enumerate() {
            if let Some(t) = &from_memo[pos] {
                nodes[i].digest = t.after;
            }
        }

        // Hand in, in commit order.
        let mut committed: Vec<Committed> = Vec::with_capacity(order.len());
        let mut partner: Option<Vec<f32>> = None;
        for (pos, (work, before)) in from_memo.into_iter().zip(befores).enumerate() {
            let i = order[pos];
            let trains_assigned = trains_assigned[pos];
            let digest = digests[pos];
            let mut adversarial = false;
            let decoded_trained = work
                .as_ref()
                .map(|w| decode_for(s.codec, &w.blob, n as u64).context("a worker's own blob"))
                .transpose()?;
            let update = match nodes[i].adversary {
                None => decoded_trained.expect("honest nodes train"),
                Some(a) => {
                    let mine = assigned(nodes[i].slot);
                    // A copier copies an honest-looking update committed before it.
                    let earlier_commits: Vec<&Committed> = committed
                        .iter()
                        .filter(|c| nodes[c.node].adversary.is_none())
                        .collect();
                    let copied = (!earlier_commits.is_empty()).then(|| {
                        earlier_commits[adversary_rng.below(earlier_commits.len() as u64) as usize]
                            .update
                            .as_slice()
                    });
                    let k = Knowledge {
                        codec: s.codec,
                        params: n,
                        assigned: &mine,
                        unassigned: &[],
                        earlier: nodes[i].earlier.as_deref(),
                        committed_before: copied,
                        partner: partner.as_deref(),
                        seed: adversary_rng.next_u64(),
                    };
                    let out = match a.submit(&k, decoded_trained.as_deref()) {
                        Submission::AsTrained => {
                            adversarial = !trains_assigned;
                            decoded_trained.clone().expect("it trained")
                        }
                        Submission::Crafted(blob) => {
                            adversarial = true;
                            decode_for(s.codec, &blob, n as u64).context("a crafted blob")?
                        }
                    };
                    if a == Adversary::Collude && partner.is_none() {
                        partner = Some(out.clone());
                    }
                    if let Some(t) = decoded_trained {
                        nodes[i].earlier = Some(t);
                    }
                    out
                }
            };
            committed.push(Committed {
                node: i,
                adversarial,
                update,
                before,
                digest,
            });
        }

        // The validator. Copies of this round's earlier commits, and of last round's
        // updates (stale), by commit order.
        let previous_refs: Vec<(NodeId, &[f32])> =
            previous.iter().map(|(n, u)| (*n, u.as_slice())).collect();
        let committed_refs: Vec<(NodeId, &[f32])> = committed
            .iter()
            .map(|c| (nodes[c.node].id, c.update.as_slice()))
            .collect();
        let copies = copies_in_round(&previous_refs, &committed_refs, &s.verify);

        // Scoring (see `cross_evidence`): each node's own set, sampled from its
        // assigned batches; the loss at θ on every set once; each update on its own
        // set and the next ones.
        let m = committed.len();
        let own_sets: Vec<Tensor> = committed
            .iter()
            .map(|c| {
                own_set(
                    &mut rng,
                    &assigned(nodes[c.node].slot),
                    b,
                    spec.seq_len,
                    spec.seed,
                    data,
                    windows,
                    s.device,
                )
            })
            .collect();
        let set_refs: Vec<&Tensor> = own_sets.iter().collect();
        let before_losses = scorers[0].losses_at(&state.theta, &set_refs);
        // Each update is scored at its share of the outer step, outer lr ÷ updates in
        // the round (the aggregate averages them): a single update taken at the full
        // outer lr overshoots, and in the first full run every honest update of rounds
        // 5-10 raised the held-out loss that way and was refused as harmful.
        let share_lr = outer_lr / m.max(1) as f32;
        // Tensors are not `Sync`; each job gets shallow clones (read only, shared
        // storage) of the sets it is scored on.
        #[allow(clippy::type_complexity)]
        let score_jobs: Vec<(&[f32], Vec<(usize, Tensor)>)> = committed
            .iter()
            .enumerate()
            .map(|(u, c)| {
                let sets = scored_sets(u, m)
                    .into_iter()
                    .map(|set| (set, own_sets[set].shallow_clone()))
                    .collect();
                (c.update.as_slice(), sets)
            })
            .collect();
        let before_ref = &before_losses;
        let gains: Vec<Vec<(usize, f64)>> =
            par_map(score_jobs, &mut scorers, |scorer, (update, sets)| {
                let tensors: Vec<&Tensor> = sets.iter().map(|(_, t)| t).collect();
                let before: Vec<f64> = sets.iter().map(|(k, _)| before_ref[*k]).collect();
                let g = scorer.gains(&st.theta, &before, update, share_lr, &tensors);
                sets.iter().map(|(k, _)| *k).zip(g).collect()
            });
        let cross = cross_evidence(&gains);
        let evidence: Vec<Evidence> = committed
            .iter()
            .zip(&cross)
            .map(|(c, &(elsewhere, own, expected))| {
                let id = nodes[c.node].id;
                Evidence {
                    node: id,
                    tokens: tokens_per_round,
                    norm: norm(&c.update),
                    gain_heldout: elsewhere,
                    gain_own: own,
                    gain_random: expected,
                    stale: copies.stale.contains(&id),
                    copy_of: copies.copy_of.get(&id).copied(),
                }
            })
            .collect();
        let mut judgements = judge(&evidence, &history, &s.verify);
        if s.no_validator {
            for j in &mut judgements {
                j.accepted = true;
                j.score = 1.0;
                j.flags.clear();
            }
        }
        judged_total += judgements.len() as u64;

        // Replay audits: the audited node reveals the state it committed to. A replay
        // of an update trained as assigned is answered by the memo (the same inputs);
        // the FLOPs are counted all the same.
        let picks = if s.no_validator {
            Vec::new()
        } else {
            audit_picks(seed, &judgements, &history, &s.verify)
        };
        let audit_jobs: Vec<(usize, &Committed, Vec<u64>, Option<Trained>)> = picks
            .iter()
            .map(|id| {
                let pos = committed
                    .iter()
                    .position(|c| nodes[c.node].id == *id)
                    .expect("a pick is a committed node");
                let batches = assigned(nodes[committed[pos].node].slot);
                let known = memo
                    .entries
                    .get(&memo_key(
                        &theta_hash,
                        round,
                        &committed[pos].digest,
                        &batches,
                    ))
                    .cloned();
                (pos, &committed[pos], batches, known)
            })
            .collect();
        let verify = &s.verify;
        let outcomes: Vec<(usize, AuditOutcome)> = par_map(
            audit_jobs,
            &mut replayers,
            |validator, (pos, c, batches, known)| {
                let blob = match (known, &c.before) {
                    (Some(t), _) => Ok(t.blob),
                    (None, Some(before)) if before.digest() == c.digest => validator
                        .replay(st_ref, before, data, windows, &batches)
                        .map_err(|_| ()),
                    // A revealed state that is not the one committed to fails.
                    (None, Some(_)) => Err(()),
                    (None, None) => {
                        panic!("an update trained as assigned is always in the memo")
                    }
                };
                let outcome = match blob.map(|b| decode_for(s.codec, &b, n as u64)) {
                    Ok(Ok(replayed)) => audit_compare(&c.update, &replayed, verify),
                    _ => AuditOutcome::Mismatch {
                        rel_err: f64::INFINITY,
                    },
                };
                (pos, outcome)
            },
        );
        audits += outcomes.len() as u64;
        replay_flops +=
            outcomes.len() as u64 * training_flops(&s.model, spec.seq_len, tokens_per_round);
        let audit_log: Vec<(NodeId, AuditOutcome)> = outcomes
            .iter()
            .map(|(pos, o)| (nodes[committed[*pos].node].id, *o))
            .collect();
        audits_failed += outcomes
            .iter()
            .filter(|(_, o)| matches!(o, AuditOutcome::Mismatch { .. }))
            .count() as u64;
        settle(&mut judgements, &audit_log, &mut history, &s.verify);
        // A failed audit ejects; so does a proven copy, of this round's or last
        // round's work.
        let ejected_now: Vec<usize> = committed
            .iter()
            .zip(&judgements)
            .filter(|(_, j)| {
                j.flags.iter().any(|f| {
                    matches!(
                        f,
                        Flag::AuditFailed { .. } | Flag::Copy { .. } | Flag::Stale
                    )
                })
            })
            .map(|(c, _)| c.node)
            .collect();

        if let Some(out) = trace.as_mut() {
            use std::io::Write;
            let line = serde_json::json!({
                "row": name,
                "round": round,
                "adversarial": committed.iter().map(|c| c.adversarial).collect::<Vec<_>>(),
                "evidence": evidence,
                "gains": gains,
                "judgements": judgements,
                "audits": audit_log,
                "ejected": ejected_now.iter().map(|&i| nodes[i].id).collect::<Vec<_>>(),
            });
            // Flushed every round, so a long run's trace can be read while it runs.
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .context("writing the trace")?;
        }

        // Aggregate, pay into escrow, forfeit, release. The accepted updates are
        // averaged in the order of their nodes, not of their commits, so the aggregate
        // of the same updates is the same bit for bit.
        let mut accepted: Vec<(u64, &[f32])> = committed
            .iter()
            .zip(&judgements)
            .filter(|(_, j)| j.accepted)
            .map(|(c, _)| (nodes[c.node].slot, c.update.as_slice()))
            .collect();
        accepted.sort_by_key(|(slot, _)| *slot);
        if !accepted.is_empty() {
            let owned: Vec<Vec<f32>> = accepted.iter().map(|(_, u)| u.to_vec()).collect();
            let g = tessera_outer::aggregate::aggregate(s.aggregator, &owned);
            state.outer.step(&mut state.theta, &g);
        }
        state.round += 1;
        for (c, j) in committed.iter().zip(&judgements) {
            let node = &nodes[c.node];
            if c.adversarial {
                adv_updates += 1;
                if !j.accepted {
                    adv_caught += 1;
                }
            } else if node.adversary.is_none() {
                honest_updates += 1;
                if !j.accepted || j.score < 1.0 {
                    honest_down += 1;
                }
            }
            if j.accepted {
                let amount = (tokens_per_round as f64 * j.score).round() as u128;
                // An ejected node earns nothing; the escrow refuses it.
                let _ = escrow.credit(round, node.id, amount);
            }
        }
        for i in ejected_now {
            escrow.forfeit(nodes[i].id);
            nodes[i].ejected = Some(round);
            nodes[i].behind.clear();
        }
        for (_, node, amount) in escrow.release(round + 1) {
            *released.entry(node).or_insert(0) += amount;
        }
        previous = committed
            .into_iter()
            .map(|c| (nodes[c.node].id, c.update))
            .collect();
        on_round();
    }
    for (_, node, amount) in escrow.release(u64::MAX) {
        *released.entry(node).or_insert(0) += amount;
    }

    let val_bpb = *memo
        .evals
        .entry(theta_digest(&state.theta))
        .or_insert_with(|| {
            let model = Llama::new(&s.model, s.device, spec.seed);
            load_flat(&model, &state.theta);
            evaluate_windows(&model, &s.val, spec.batch_size, &s.byte_lens).bpb
        });
    let paid_total: u128 = released.values().sum();
    let paid_adv: u128 = nodes
        .iter()
        .filter(|n| n.adversary.is_some())
        .map(|n| released.get(&n.id).copied().unwrap_or(0))
        .sum();
    let adv_nodes: Vec<&Node> = nodes.iter().filter(|n| n.adversary.is_some()).collect();
    let rounds_to_eject = if adv_nodes.is_empty() || adv_nodes.iter().any(|n| n.ejected.is_none()) {
        None
    } else {
        adv_nodes
            .iter()
            .filter_map(|n| n.ejected)
            .max()
            .map(|r| r + 1)
    };
    let scoring_flops: u64 = scorers.iter().map(Scorer::flops).sum();
    Ok(Row {
        mode: name.to_string(),
        workers,
        adversaries,
        adversary_updates: adv_updates,
        caught_fraction: (adv_updates > 0).then(|| adv_caught as f64 / adv_updates as f64),
        rounds_to_eject,
        adversaries_ejected: adv_nodes.iter().filter(|n| n.ejected.is_some()).count(),
        honest_downweighted_fraction: honest_down as f64 / honest_updates.max(1) as f64,
        honest_slashed: nodes
            .iter()
            .filter(|n| n.adversary.is_none() && n.ejected.is_some())
            .count(),
        adversary_payout_share: if paid_total > 0 {
            paid_adv as f64 / paid_total as f64
        } else {
            0.0
        },
        val_bpb,
        bpb_gap: 0.0,
        verification_flops_fraction: (scoring_flops + replay_flops) as f64
            / training_flops_total.max(1) as f64,
        scoring_flops_fraction: scoring_flops as f64 / training_flops_total.max(1) as f64,
        audit_rate: audits as f64 / judged_total.max(1) as f64,
        audits,
        audits_failed,
        rounds_trained,
        rounds_memoized,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Maps `items` on `states.len()` threads (item `i` on thread `i mod threads`, with
/// that thread's state), each running libtorch on one thread; results in item order.
fn par_map<S: Send, T: Send, R: Send>(
    items: Vec<T>,
    states: &mut [S],
    f: impl Fn(&mut S, T) -> R + Sync,
) -> Vec<R> {
    let threads = states.len().clamp(1, items.len().max(1));
    let count = items.len();
    let mut buckets: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        buckets[i % threads].push((i, item));
    }
    let mut out: Vec<Option<R>> = (0..count).map(|_| None).collect();
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = buckets
            .into_iter()
            .zip(states.iter_mut())
            .map(|(bucket, state)| {
                scope.spawn(move || {
                    tch::set_num_threads(1);
                    bucket
                        .into_iter()
                        .map(|(i, item)| (i, f(state, item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, r) in handle.join().expect("a worker thread panicked") {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item is mapped"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_item_order_and_gives_each_thread_its_state() {
        let mut seen = vec![Vec::new(); 3];
        let out = par_map(
            (0..10).collect(),
            &mut seen,
            |mine: &mut Vec<i32>, x: i32| {
                mine.push(x);
                x * x
            },
        );
        assert_eq!(out, (0..10).map(|x| x * x).collect::<Vec<_>>());
        assert_eq!(seen, [vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        let none: Vec<i32> = par_map(Vec::new(), &mut seen, |_, x: i32| x);
        assert!(none.is_empty());
    }

    #[test]
    fn node_ids_are_distinct() {
        let ids: Vec<NodeId> = (0..8).map(node_id).collect();
        for (i, a) in ids.iter().enumerate() {
            assert!(ids[i + 1..].iter().all(|b| a != b));
        }
        assert_ne!(round_seed(0, 1), round_seed(1, 0));
    }
}
