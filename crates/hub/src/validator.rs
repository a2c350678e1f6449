//! The hub's in-process validator: it judges each round's commits before the round
//! closes, and replays the updates picked for audit once their nodes reveal the private
//! state they committed to.
//!
//! Judging reads what the protocol gives a validator and nothing else: the round's
//! committed updates in commit order (blob files the commit handler stored), last
//! round's accepted updates (a stale update copies one), the checkpoint θ the round
//! trained from, each node's assigned batches, and losses it measures itself on a few
//! sequences of each node's batches, drawn by a seed derived from the round's commits
//! and scored across nodes exactly as `tessera experiment byzantine` scores
//! (`tessera_train::validate::own_set`, `scored_sets`, `tessera_verify::cross_evidence`). The
//! decision is `tessera_verify`'s: the same [`VerifyConfig`] as `tessera experiment
//! byzantine`. What a validator carries from round to round ([`History`]: each node's
//! accumulated own-data evidence, the audit credit) only aims audits; it is kept in
//! `validator.json` in the state directory, written atomically after every round.
//!
//! An audit is asynchronous: the round closes with the verdicts (the audited update is
//! counted as judged), the node reveals its state through `POST /reveal`, and
//! [`replay`] recomputes its update from θ, that state and its batches on a thread of
//! its own; the result comes back to the engine as [`crate::engine::HubInput::Audited`].
//! A round's pay waits in escrow until its audits are decided.

use std::path::PathBuf;

use std::sync::Arc;
use tch::Device;
use tch::Tensor;
use tessera_model::LlamaConfig;
use tessera_outer::{decode_for, OuterState};
use tessera_protocol::wire::Verdict;
use tessera_protocol::{NodeId, RunSpec};
use tessera_train::data::{Dataset, Windows};
use tessera_train::rng::SplitMix64;
use tessera_train::validate::{own_set, scored_sets, Scorer};
use tessera_train::worker::{PrivateState, StepState, Worker};
use tessera_verify::{
    audit_compare, audit_picks, copies_in_round, cross_evidence, judge, norm, settle, AuditOutcome,
    Evidence, Flag, History, VerifyConfig,
};

use crate::engine::Judging;

/// The history file in the state directory.
pub const HISTORY_FILE: &str = "validator.json";

/// The validator's resources: the data, a scoring replica and its history.
pub struct Validator {
    spec: RunSpec,
    model: LlamaConfig,
    data: Arc<Dataset>,
    windows: Windows,
    scorer: Option<Scorer>,
    cfg: VerifyConfig,
    history: History,
    history_path: PathBuf,
}

impl Validator {
    pub fn new(
        spec: RunSpec,
        model: LlamaConfig,
        data: Arc<Dataset>,
        cfg: VerifyConfig,
        history_path: PathBuf,
    ) -> Result<Validator, String> {
        let windows = Windows::new(&data.train, spec.seq_len);
        let history = match std::fs::read(&history_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!("{} is not a validator history: {e}", history_path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => History::new(),
            Err(e) => return Err(format!("reading {}: {e}", history_path.display())),
        };
        Ok(Validator {
            spec,
            model,
            data,
            windows,
            scorer: None,
            cfg,
            history,
            history_path,
        })
    }

    /// The verdicts on a round's commits (see the module doc). `theta` is the round's
    /// θ, `updates` the decoded commits in the order of `commits`, `previous` last
    /// round's accepted updates, decoded.
    pub fn verdicts(
        &mut self,
        round: u64,
        theta: &[f32],
        commits: &[Judging],
        updates: &[Vec<f32>],
        previous: &[(NodeId, Vec<f32>)],
    ) -> Result<Vec<Verdict>, String> {
        let started = std::time::Instant::now();
        // Copies among this round's commits (the first committer is credited) and of
        // last round's updates (stale).
        let previous_refs: Vec<(NodeId, &[f32])> =
            previous.iter().map(|(n, u)| (*n, u.as_slice())).collect();
        let committed_refs: Vec<(NodeId, &[f32])> = commits
            .iter()
            .zip(updates)
            .map(|(c, u)| (c.node, u.as_slice()))
            .collect();
        let copies = copies_in_round(&previous_refs, &committed_refs, &self.cfg);

        // Scoring, as `tessera experiment byzantine` scores: each node's set sampled
        // from its assigned batches by the round's seed (which nobody knows before the
        // commits close); the loss at θ on every set once; each update on its own set
        // and the next ones, at its share of the outer step; the cross fit separates
        // its gain on data it was not assigned from its own-data margin.
        let seed = round_seed(round, commits);
        let mut rng = SplitMix64::new(u64::from_le_bytes(seed[..8].try_into().expect("8")));
        let device = Device::Cpu;
        let sets: Vec<Tensor> = commits
            .iter()
            .map(|c| {
                own_set(
                    &mut rng,
                    &c.batches,
                    self.spec.batch_size as u64,
                    self.spec.seq_len,
                    self.spec.seed,
                    &self.data,
                    &self.windows,
                    device,
                )
            })
            .collect();
        let scorer = self
            .scorer
            .get_or_insert_with(|| Scorer::new(&self.model, self.spec.seq_len, device));
        let set_refs: Vec<&Tensor> = sets.iter().collect();
        let before = scorer.losses_at(theta, &set_refs);
        let m = commits.len();
        let share_lr = self.spec.effective_outer_lr() / m.max(1) as f32;
        let gains: Vec<Vec<(usize, f64)>> = updates
            .iter()
            .enumerate()
            .map(|(u, update)| {
                let scored = scored_sets(u, m);
                let tensors: Vec<&Tensor> = scored.iter().map(|&k| &sets[k]).collect();
                let b: Vec<f64> = scored.iter().map(|&k| before[k]).collect();
                let g = scorer.gains(theta, &b, update, share_lr, &tensors);
                scored.into_iter().zip(g).collect()
            })
            .collect();
        let evidence: Vec<Evidence> = commits
            .iter()
            .zip(updates)
            .zip(cross_evidence(&gains))
            .map(|((c, u), (elsewhere, own, expected))| Evidence {
                node: c.node,
                tokens: c.commit.tokens,
                norm: norm(u),
                gain_heldout: elsewhere,
                gain_own: own,
                gain_random: expected,
                stale: copies.stale.contains(&c.node),
                copy_of: copies.copy_of.get(&c.node).copied(),
            })
            .collect();
        let judged = judge(&evidence, &self.history, &self.cfg);
        eprintln!(
            "hub: round {round}: judged {} update(s) in {} ms",
            commits.len(),
            started.elapsed().as_millis()
        );
        let picks = audit_picks(seed, &judged, &self.history, &self.cfg);
        // Audits are decided after the round closes, so the history is settled as if
        // the picks pass (spending their credit and starting their evidence afresh): one
        // that fails ejects its node, which leaves the history anyway. The verdicts
        // themselves stay as judged.
        let assumed: Vec<(NodeId, AuditOutcome)> = picks
            .iter()
            .map(|n| (*n, AuditOutcome::Match { rel_err: 0.0 }))
            .collect();
        settle(&mut judged.clone(), &assumed, &mut self.history, &self.cfg);
        self.save_history()?;
        let norm_median = {
            let mut n: Vec<f64> = evidence.iter().map(|e| e.norm).collect();
            n.sort_by(f64::total_cmp);
            n.get(n.len() / 2).copied().unwrap_or(0.0)
        };
        Ok(commits
            .iter()
            .zip(&judged)
            .zip(&evidence)
            .map(|((c, j), e)| Verdict {
                node: c.node,
                accepted: j.accepted,
                score_ppm: (j.score.clamp(0.0, 1.0) * 1e6).round() as u32,
                flags: j.flags.iter().map(flag_name).collect(),
                norm_ratio_ppm: if norm_median > 0.0 {
                    (e.norm / norm_median * 1e6).round() as u64
                } else {
                    0
                },
                gain_heldout_micro: micro(e.gain_heldout),
                own_margin_micro: micro(e.gain_own - e.gain_random),
                audited: picks.contains(&c.node),
                tokens: c.commit.tokens,
                blob_hash: c.commit.blob_hash,
                state_hash: c.commit.state_hash,
                batches: c.batches.clone(),
            })
            .collect())
    }

    fn save_history(&self) -> Result<(), String> {
        let bytes = serde_json::to_vec(&self.history).map_err(|e| e.to_string())?;
        tessera_model::checkpoint::write_atomic(&self.history_path, &bytes)
            .map_err(|e| format!("writing {}: {e}", self.history_path.display()))
    }
}

fn micro(x: f64) -> i64 {
    if x.is_finite() {
        (x * 1e6).round() as i64
    } else {
        i64::MIN
    }
}

/// A flag as a round record names it.
fn flag_name(f: &Flag) -> String {
    match f {
        Flag::Copy { of } => format!("copy of {}", of.short(12)),
        Flag::Stale => "stale".into(),
        Flag::NormHigh { ratio } => format!("norm_high {ratio:.3}"),
        Flag::NormLow { ratio } => format!("norm_low {ratio:.3}"),
        Flag::Harmful { .. } => "harmful".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The round's seed for scoring samples and audit picks: a hash of its commits in
/// commit order, fixed only when the last commit arrives.
pub fn round_seed(round: u64, commits: &[Judging]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera audit seed v1");
    h.update(&round.to_le_bytes());
    for c in commits {
        h.update(c.node.as_bytes());
        h.update(c.commit.blob_hash.as_bytes());
        h.update(c.commit.state_hash.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// What an audit needs, gathered by the driver.
pub struct Replay {
    pub spec: RunSpec,
    pub model: LlamaConfig,
    /// The run's data set (opened once: a private run's plaintext lives only in memory).
    pub data: Arc<Dataset>,
    /// The checkpoint the round trained from.
    pub checkpoint: Vec<u8>,
    /// The update the node committed.
    pub submitted: Vec<u8>,
    /// The private state it revealed (its digest already checked).
    pub state: PrivateState,
    pub batches: Vec<u64>,
    pub cfg: VerifyConfig,
}

/// Replays an audited round and compares it with what the node committed: `Ok(detail)`
/// when it matches within the tolerance, `Err(detail)` when it does not.
pub fn replay(r: Replay) -> Result<String, String> {
    let params = r.model.params_total() as usize;
    let state = OuterState::from_bytes(
        &r.checkpoint,
        params,
        r.spec.effective_outer_lr(),
        r.spec.outer_momentum,
    )
    .map_err(|e| format!("the round's checkpoint does not load: {e}"))?;
    let data = &r.data;
    let windows = Windows::new(&data.train, r.spec.seq_len);
    let codec = r.spec.codec()?;
    let submitted = decode_for(codec, &r.submitted, params as u64)
        .map_err(|e| format!("the committed update does not decode: {e}"))?;
    let mut worker = Worker::new(r.spec.clone(), &r.model, Device::Cpu)?;
    let blob = worker
        .replay(&state, &r.state, data, &windows, &r.batches)
        .map_err(|e| format!("the revealed state does not fit: {e}"))?;
    let replayed = decode_for(codec, &blob, params as u64).map_err(|e| e.to_string())?;
    match audit_compare(&submitted, &replayed, &r.cfg) {
        AuditOutcome::Match { rel_err } => {
            Ok(format!("replay matches, relative error {rel_err:.2e}"))
        }
        AuditOutcome::Mismatch { rel_err } => Err(format!(
            "replay differs, relative error {rel_err:.3e} over the tolerance {:.0e}",
            r.cfg.audit_tolerance
        )),
    }
}

/// A disputed audit, gathered by the driver: what [`replay`] had, and the node's state
/// after each inner step.
pub struct Referee {
    pub replay: Replay,
    pub trail: Vec<StepState>,
}

/// ‖a − b‖ / ‖scale‖ (0 when the scale is 0 and a equals b).
fn rel(a: &[f32], b: &[f32], scale: f64) -> f64 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    if scale > 0.0 {
        d / scale
    } else if d == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// The refereed replay of a disputed round: every inner step is recomputed alone from
/// the node's own state before it and compared with the node's state after it, and the
/// update from the node's last state. An honest node on other hardware drifts by its
/// arithmetic across steps, so a whole-round replay may differ, yet each of its steps
/// follows from the one before within the tolerance: it passes. A node that skipped,
/// faked or changed work has a first step that does not follow (or an update that
/// does not follow from its last step): that step is named and the audit fails.
/// `Ok(detail)` passes, `Err(detail)` fails.
pub fn referee(r: Referee) -> Result<String, String> {
    let Replay {
        spec,
        model,
        data,
        checkpoint,
        submitted,
        state,
        batches,
        cfg,
    } = r.replay;
    let params = model.params_total() as usize;
    let outer = OuterState::from_bytes(
        &checkpoint,
        params,
        spec.effective_outer_lr(),
        spec.outer_momentum,
    )
    .map_err(|e| format!("the round's checkpoint does not load: {e}"))?;
    if r.trail.len() != batches.len() {
        return Err(format!(
            "refereed replay: the trail has {} steps, the round {}",
            r.trail.len(),
            batches.len()
        ));
    }
    let windows = Windows::new(&data.train, spec.seq_len);
    let codec = spec.codec()?;
    let mut worker = Worker::new(spec.clone(), &model, Device::Cpu)?;
    let mut from = StepState {
        adam_step: state.adam_step,
        adam_m: state.adam_m.clone(),
        adam_v: state.adam_v.clone(),
        theta: outer.theta.clone(),
    };
    let mut worst = 0f64;
    for (h, (theirs, &batch)) in r.trail.iter().zip(&batches).enumerate() {
        let mine = worker
            .step_from(outer.round, h, &from, batch, data.as_ref(), &windows)
            .map_err(|e| format!("refereed replay: {e}"))?;
        // θ is compared relative to the step's own change, the moments to their size.
        let err = rel(
            &mine.theta,
            &theirs.theta,
            norm(
                &mine
                    .theta
                    .iter()
                    .zip(&from.theta)
                    .map(|(a, b)| a - b)
                    .collect::<Vec<_>>(),
            ),
        )
        .max(rel(&mine.adam_m, &theirs.adam_m, norm(&mine.adam_m)))
        .max(rel(&mine.adam_v, &theirs.adam_v, norm(&mine.adam_v)));
        // A NaN error is a failure too.
        let within = err.is_finite() && err <= cfg.audit_tolerance;
        if mine.adam_step != theirs.adam_step || !within {
            return Err(format!(
                "refereed replay: inner step {} of {} does not follow from the node's own \
                 state before it (relative error {err:.3e}, tolerance {:.0e})",
                h + 1,
                batches.len(),
                cfg.audit_tolerance
            ));
        }
        worst = worst.max(err);
        from = theirs.clone();
    }
    let submitted = decode_for(codec, &submitted, params as u64)
        .map_err(|e| format!("the committed update does not decode: {e}"))?;
    let last = r.trail.last().ok_or("refereed replay: an empty trail")?;
    let blob = worker.encode_from(&outer.theta, last, &state.residual);
    let from_last = decode_for(codec, &blob, params as u64).map_err(|e| e.to_string())?;
    match audit_compare(&submitted, &from_last, &cfg) {
        AuditOutcome::Match { rel_err } => Ok(format!(
            "refereed replay passed: each of the {} steps follows from the node's state \
             before it (largest relative error {worst:.2e}) and the update from its last \
             (relative error {rel_err:.2e})",
            batches.len()
        )),
        AuditOutcome::Mismatch { rel_err } => Err(format!(
            "refereed replay: the update does not follow from the node's last step \
             (relative error {rel_err:.3e})"
        )),
    }
}
