//! What the hub shows people, read-only and unsigned (nothing here needs a key):
//!
//! - the page at `/`, its script and the vendored chart library (uPlot), embedded in
//!   the binary ([`asset`]);
//! - `GET /api/history?from=R`: one [`RoundStats`] per closed round, the data behind
//!   the page's charts, kept in `state_dir/dashboard.sqlite` so a restarted or
//!   finished run shows its whole history;
//! - `GET /api/ledger`: the run's pool, treasury, payouts and each node's earnings
//!   ([`ledger_view`]).
//!
//! None of it is consensus: the round records and the ledger are the truth; the
//! history adds what only the hub saw (when rounds opened and closed, the losses nodes
//! reported) and a validation bpb the hub measures on a fixed slice of the validation
//! set after each outer step, on a thread of its own so the engine never waits for it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use tessera_ledger::{Account, Amount};
use tessera_protocol::wire::{FinalEval, NodeStats, RunInfo};
use tessera_protocol::NodeId;
use tessera_train::data::Dataset;

/// The history database in the state directory.
pub const HISTORY_DB: &str = "dashboard.sqlite";
const FINAL_EVAL_KEY: &str = "final_eval";
const NODE_STATS_KEY: &str = "node_stats";
/// Most rows one `/api/history` reply carries; the page asks again from the last.
pub const HISTORY_PAGE_MAX: usize = 1000;
/// Validation evaluations queued at once; past it a round's bpb is skipped (`null`),
/// so a slow evaluation never holds θ copies without bound.
const EVALS_QUEUED_MAX: usize = 2;

/// One closed round as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundStats {
    pub round: u64,
    /// When the round opened at this hub, ms since the epoch (absent when it opened
    /// before a restart).
    pub started_ms: Option<u64>,
    pub closed_ms: u64,
    /// Members when it closed.
    pub members: u64,
    pub accepted: u64,
    pub late: u64,
    /// Committed but refused by the validator.
    pub refused: u64,
    /// Members dropped while it was open (silent past the timeout, or ejected).
    pub dropped: u64,
    pub tokens: u64,
    /// The training loss (nats per token) accepted nodes last reported: mean, min, max.
    pub loss_mean: Option<f64>,
    pub loss_min: Option<f64>,
    pub loss_max: Option<f64>,
    /// Bits per byte of θ after this round's outer step on the first `eval_tokens`
    /// tokens of the validation set (absent when not evaluated).
    pub val_bpb: Option<f64>,
    /// Blob bytes every node that reported traffic sent and received, in total.
    pub bytes_moved: u64,
}

/// A job for the history thread.
enum Job {
    Closed {
        stats: RoundStats,
        theta: Option<Vec<f32>>,
    },
    /// A value kept for a restarted hub (`meta` table): see [`History::kept`].
    Keep(&'static str, String),
}

/// What a finished run's page needs that the engine does not keep across a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Kept {
    /// The final checkpoint's evaluation and directory.
    pub final_eval: Option<(FinalEval, String)>,
    /// Members' last reported statistics, as of the last round closed.
    pub node_stats: BTreeMap<NodeId, NodeStats>,
}

/// The per-round history: rows in memory for the API, written to SQLite by a thread
/// that also evaluates θ.
#[derive(Clone)]
pub struct History {
    rows: Arc<RwLock<Vec<RoundStats>>>,
    jobs: std::sync::mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    /// What the history held when the hub started.
    pub kept: Arc<Kept>,
}

impl History {
    /// Opens (or creates) the history in `state_dir` and starts its thread.
    /// `eval_tokens == 0` turns the validation evaluation off.
    pub fn open(
        state_dir: &Path,
        info: Arc<RunInfo>,
        data: Arc<Dataset>,
        eval_tokens: usize,
    ) -> Result<History> {
        let path = state_dir.join(HISTORY_DB);
        let db = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, stats TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let meta = |key: &str| -> Result<Option<String>> {
            let mut q = db.prepare("SELECT value FROM meta WHERE key = ?1")?;
            let mut it = q.query([key])?;
            Ok(match it.next()? {
                Some(row) => Some(row.get(0)?),
                None => None,
            })
        };
        let mut kept = Kept::default();
        if let Some(text) = meta(FINAL_EVAL_KEY)? {
            kept.final_eval = Some(serde_json::from_str(&text).with_context(|| {
                format!("{}: `{FINAL_EVAL_KEY}` does not parse", path.display())
            })?);
        }
        if let Some(text) = meta(NODE_STATS_KEY)? {
            kept.node_stats = serde_json::from_str(&text).with_context(|| {
                format!("{}: `{NODE_STATS_KEY}` does not parse", path.display())
            })?;
        }
        let mut rows = Vec::new();
        {
            let mut q = db.prepare("SELECT round, stats FROM rounds ORDER BY round")?;
            let mut it = q.query([])?;
            while let Some(row) = it.next()? {
                let round: i64 = row.get(0)?;
                let text: String = row.get(1)?;
                let stats: RoundStats = serde_json::from_str(&text).with_context(|| {
                    format!("{}: round {round} is not a round's stats", path.display())
                })?;
                rows.push(stats);
            }
        }
        let rows = Arc::new(RwLock::new(rows));
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        {
            let rows = rows.clone();
            let queued = queued.clone();
            std::thread::Builder::new()
                .name("hub-history".into())
                .spawn(move || {
                    let mut eval = Evaluator::new(info, data, eval_tokens);
                    for job in rx {
                        let (mut stats, theta) = match job {
                            Job::Closed { stats, theta } => (stats, theta),
                            Job::Keep(key, value) => {
                                if let Err(e) = db.execute(
                                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                                    params![key, value],
                                ) {
                                    eprintln!("hub: writing the dashboard history failed: {e}");
                                }
                                continue;
                            }
                        };
                        if let Some(theta) = theta {
                            stats.val_bpb = eval.bpb(&theta);
                            queued.fetch_sub(1, Ordering::SeqCst);
                        }
                        let text = serde_json::to_string(&stats).expect("stats encode");
                        if let Err(e) = db.execute(
                            "INSERT OR REPLACE INTO rounds (round, stats) VALUES (?1, ?2)",
                            params![stats.round as i64, text],
                        ) {
                            eprintln!("hub: writing the dashboard history failed: {e}");
                        }
                        let mut rows = rows.write().expect("history lock");
                        match rows.binary_search_by_key(&stats.round, |r| r.round) {
                            Ok(i) => rows[i] = stats,
                            Err(i) => rows.insert(i, stats),
                        }
                    }
                })?;
        }
        Ok(History {
            rows,
            jobs,
            queued,
            kept: Arc::new(kept),
        })
    }

    /// Keeps the final evaluation for a restarted hub.
    pub fn keep_final_eval(&self, eval: FinalEval, dir: &str) {
        let text = serde_json::to_string(&(eval, dir)).expect("encode");
        let _ = self.jobs.send(Job::Keep(FINAL_EVAL_KEY, text));
    }

    /// Keeps members' last statistics for a restarted hub.
    pub fn keep_node_stats(&self, stats: &BTreeMap<NodeId, NodeStats>) {
        let text = serde_json::to_string(stats).expect("encode");
        let _ = self.jobs.send(Job::Keep(NODE_STATS_KEY, text));
    }

    /// Whether a round closing now should hand θ over for evaluation.
    pub fn wants_theta(&self, round: u64, every: u64) -> bool {
        every > 0
            && round.is_multiple_of(every)
            && self.queued.load(Ordering::SeqCst) < EVALS_QUEUED_MAX
    }

    /// Records a closed round; `theta` (when given) is evaluated first.
    pub fn record(&self, stats: RoundStats, theta: Option<Vec<f32>>) {
        if theta.is_some() {
            self.queued.fetch_add(1, Ordering::SeqCst);
        }
        let _ = self.jobs.send(Job::Closed { stats, theta });
    }

    /// Up to [`HISTORY_PAGE_MAX`] rounds from `from` on.
    pub fn page(&self, from: u64) -> Vec<RoundStats> {
        page_of(&self.rows.read().expect("history lock"), from)
    }

    /// The validation bpb of the latest round evaluated.
    pub fn last_bpb(&self) -> Option<f64> {
        let rows = self.rows.read().expect("history lock");
        rows.iter().rev().find_map(|r| r.val_bpb)
    }

    /// The latest recorded round.
    pub fn last(&self) -> Option<RoundStats> {
        self.rows.read().expect("history lock").last().cloned()
    }
}

/// θ's bits per byte on a fixed validation slice, with one model kept between rounds.
struct Evaluator {
    info: Arc<RunInfo>,
    data: Arc<Dataset>,
    eval_tokens: usize,
    ready: Option<(tessera_model::Llama, Vec<Vec<i64>>, Vec<u32>)>,
}

impl Evaluator {
    fn new(info: Arc<RunInfo>, data: Arc<Dataset>, eval_tokens: usize) -> Evaluator {
        Evaluator {
            info,
            data,
            eval_tokens,
            ready: None,
        }
    }

    fn bpb(&mut self, theta: &[f32]) -> Option<f64> {
        if self.eval_tokens == 0 {
            return None;
        }
        let spec = &self.info.spec;
        let (model, windows, byte_lens) = self.ready.get_or_insert_with(|| {
            let model = tessera_model::Llama::new(&self.info.model, tch::Device::Cpu, spec.seed);
            let windows = self.data.validation_windows(spec.seq_len, self.eval_tokens);
            let byte_lens = tessera_train::data::token_byte_lengths(&self.data.tokenizer);
            (model, windows, byte_lens)
        });
        if windows.is_empty() || theta.len() != self.info.model.params_total() as usize {
            return None;
        }
        tessera_train::diloco::load_flat(model, theta);
        let e = tessera_train::eval::evaluate_windows(model, windows, 8, byte_lens);
        e.bpb.is_finite().then_some(e.bpb)
    }
}

/// The run's side of the ledger, for anyone to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerView {
    /// Whether the hub keeps a ledger (without one the run pays nobody).
    pub enabled: bool,
    /// Balances in tokens, as exact decimal strings.
    pub pool: String,
    pub treasury: String,
    pub supply: String,
    pub reward_per_round: String,
    /// The Merkle root of every balance now, and the latest one an epoch recorded.
    pub root: String,
    pub epoch_root: Option<(u64, String)>,
    /// Each paid round: what the pool paid out.
    pub paid: Vec<PaidRound>,
    pub paid_total: String,
    /// What each node (hex id) was paid by this run.
    pub earned: BTreeMap<String, String>,
    /// Tokens taken from stakes of this run by slashing, in all and per node (hex id).
    pub slashed: String,
    pub slashed_nodes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaidRound {
    pub round: u64,
    pub amount: String,
    pub nodes: u64,
}

fn tokens(units: u128) -> String {
    Amount(units).tokens_string()
}

/// The ledger view of `run` (a hub without a ledger shows `enabled: false`);
/// `slashes` are the run's slash requests: (node hex id, request id).
pub fn ledger_view<S: tessera_ledger::Store>(
    ledger: Option<&tessera_ledger::Ledger<S>>,
    run: &str,
    slashes: impl Iterator<Item = (String, String)>,
) -> LedgerView {
    let Some(ledger) = ledger else {
        return LedgerView {
            enabled: false,
            pool: tokens(0),
            treasury: tokens(0),
            supply: tokens(0),
            reward_per_round: tokens(0),
            root: String::new(),
            epoch_root: None,
            paid: Vec::new(),
            paid_total: tokens(0),
            earned: BTreeMap::new(),
            slashed: tokens(0),
            slashed_nodes: BTreeMap::new(),
        };
    };
    let state = ledger.state();
    let balance = |a: Account| state.balance(&a).unwrap_or(0);
    let mut paid = Vec::new();
    let mut paid_total = 0u128;
    let mut earned: BTreeMap<String, u128> = BTreeMap::new();
    let mut slashed = 0u128;
    let info = state.run(run);
    if let Some(info) = info {
        for (round, request) in &info.paid {
            let Some(receipt) = state.receipt(request) else {
                continue;
            };
            let mut amount = 0u128;
            for t in &receipt.transfers {
                if let Account::Contributor(c) = &t.credit {
                    amount += t.amount.0;
                    *earned.entry(c.clone()).or_default() += t.amount.0;
                }
            }
            paid_total += amount;
            paid.push(PaidRound {
                round: *round,
                amount: tokens(amount),
                nodes: receipt.transfers.len() as u64,
            });
        }
    }
    let mut slashed_nodes = BTreeMap::new();
    for (node, id) in slashes {
        if let Some(receipt) = state.receipt(&id) {
            let amount = receipt.transfers.iter().map(|t| t.amount.0).sum::<u128>();
            slashed += amount;
            slashed_nodes.insert(node, tokens(amount));
        }
    }
    LedgerView {
        enabled: true,
        pool: tokens(balance(Account::Pool(run.to_string()))),
        treasury: tokens(balance(Account::Treasury)),
        supply: tokens(state.supply()),
        reward_per_round: tokens(info.map_or(0, |i| i.reward_per_round)),
        root: state.root(),
        epoch_root: state
            .epochs()
            .last_key_value()
            .map(|(e, r)| (*e, r.clone())),
        paid,
        paid_total: tokens(paid_total),
        earned: earned.into_iter().map(|(c, a)| (c, tokens(a))).collect(),
        slashed: tokens(slashed),
        slashed_nodes,
    }
}

/// An embedded file: its bytes and content type.
pub fn asset(name: &str) -> Option<(&'static [u8], &'static str)> {
    Some(match name {
        "index.html" => (
            include_bytes!("../assets/index.html").as_slice(),
            "text/html; charset=utf-8",
        ),
        "dashboard.js" => (
            include_bytes!("../assets/dashboard.js").as_slice(),
            "text/javascript; charset=utf-8",
        ),
        "dashboard.css" => (
            include_bytes!("../assets/dashboard.css").as_slice(),
            "text/css; charset=utf-8",
        ),
        "uPlot.iife.min.js" => (
            include_bytes!("../assets/vendor/uPlot.iife.min.js").as_slice(),
            "text/javascript; charset=utf-8",
        ),
        "uPlot.min.css" => (
            include_bytes!("../assets/vendor/uPlot.min.css").as_slice(),
            "text/css; charset=utf-8",
        ),
        "favicon.svg" => (
            include_bytes!("../assets/favicon.svg").as_slice(),
            "image/svg+xml",
        ),
        _ => return None,
    })
}

/// How stale a public read may be: `/summary` and `/metrics` are computed at most once
/// per this many milliseconds however many people watch (and again at once when a
/// round closes, a member joins or leaves, an audit is decided or the run finishes),
/// so viewers can't hold up the engine thread that also closes rounds.
pub const PUBLIC_READ_MAX_AGE_MS: u64 = 250;

/// A value recomputed only when older than its age limit.
pub struct Cached<T> {
    value: Option<(u64, T)>,
}

impl<T: Clone> Cached<T> {
    pub fn new() -> Cached<T> {
        Cached { value: None }
    }

    /// The value, computed by `f` when none is younger than `max_age_ms` at `now_ms`.
    pub fn get(&mut self, now_ms: u64, max_age_ms: u64, f: impl FnOnce() -> T) -> T {
        if let Some(v) = self.fresh(now_ms, max_age_ms) {
            return v;
        }
        let v = f();
        self.value = Some((now_ms, v.clone()));
        v
    }

    /// The value if one is younger than `max_age_ms` at `now_ms`.
    pub fn fresh(&self, now_ms: u64, max_age_ms: u64) -> Option<T> {
        match &self.value {
            Some((at, v)) if now_ms >= *at && now_ms - at < max_age_ms => Some(v.clone()),
            _ => None,
        }
    }

    /// Forgets the value (the state it was computed from changed in a way that
    /// matters at once).
    pub fn clear(&mut self) {
        self.value = None;
    }
}

impl<T: Clone> Default for Cached<T> {
    fn default() -> Self {
        Cached::new()
    }
}

/// Up to [`HISTORY_PAGE_MAX`] of `rows` (in round order) from round `from` on.
fn page_of(rows: &[RoundStats], from: u64) -> Vec<RoundStats> {
    let start = rows.partition_point(|r| r.round < from);
    rows[start..]
        .iter()
        .take(HISTORY_PAGE_MAX)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: u64) -> RoundStats {
        RoundStats {
            round,
            started_ms: None,
            closed_ms: round,
            members: 1,
            accepted: 1,
            late: 0,
            refused: 0,
            dropped: 0,
            tokens: 1,
            loss_mean: None,
            loss_min: None,
            loss_max: None,
            val_bpb: None,
            bytes_moved: 0,
        }
    }

    /// Row 28: however often it is asked for, a public read is computed at most once
    /// per age limit.
    #[test]
    fn public_reads_are_computed_at_most_once_per_age_limit() {
        let mut c = Cached::new();
        let mut computed = 0;
        for t in 0..PUBLIC_READ_MAX_AGE_MS {
            c.get(5_000 + t, PUBLIC_READ_MAX_AGE_MS, || {
                computed += 1;
                t
            });
        }
        assert_eq!(computed, 1);
        assert_eq!(
            c.get(5_000 + PUBLIC_READ_MAX_AGE_MS, PUBLIC_READ_MAX_AGE_MS, || 7),
            7
        );
        // A clock that went back recomputes rather than trusting the old value.
        assert_eq!(c.get(10, PUBLIC_READ_MAX_AGE_MS, || 8), 8);
        c.clear();
        assert_eq!(c.get(10, PUBLIC_READ_MAX_AGE_MS, || 9), 9);
    }

    /// Row 28: one reply carries at most a page, from the round asked for.
    #[test]
    fn history_replies_are_bounded_pages() {
        let rows: Vec<RoundStats> = (0..2500).map(row).collect();
        let p = page_of(&rows, 0);
        assert_eq!(p.len(), HISTORY_PAGE_MAX);
        assert_eq!(p[0].round, 0);
        let p = page_of(&rows, 2000);
        assert_eq!((p.len(), p[0].round), (500, 2000));
        assert!(page_of(&rows, u64::MAX).is_empty());
    }

    /// Row 28: only the embedded files are served, whatever the name asked for, and the
    /// page never parses what it shows as HTML.
    #[test]
    fn only_embedded_assets_are_served_and_the_page_writes_text_only() {
        for name in [
            "index.html",
            "dashboard.js",
            "dashboard.css",
            "uPlot.iife.min.js",
        ] {
            assert!(asset(name).is_some(), "{name}");
        }
        for name in [
            "../Cargo.toml",
            "..",
            "",
            "/etc/passwd",
            "vendor/uPlot.LICENSE",
            "INDEX.HTML",
        ] {
            assert!(asset(name).is_none(), "{name}");
        }
        let script = std::str::from_utf8(asset("dashboard.js").unwrap().0).unwrap();
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(sink), "the dashboard script uses {sink}");
        }
    }
}
