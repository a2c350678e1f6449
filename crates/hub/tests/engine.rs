//! The hub engine without processes: protocol cases in milliseconds, and the store's
//! crash model (SQLite and the in-memory twin pass the same tests).

use tessera_hub::engine::{HubInput, HubState, OuterStep, StepOutcome};
use tessera_hub::host::Host;
use tessera_hub::store::{HubStore, MemoryHubStore, SqliteHubStore};
use tessera_protocol::wire::{Commit, CommitBody, ErrorCode, NodeStats, PeerAddr, ThetaReport};
use tessera_protocol::{Hash32, NodeId, RunSpec};

/// A deterministic stand-in for the outer step: θ and checkpoint are hashes of where
/// the step started and what it aggregated.
struct HashStep;

impl OuterStep for HashStep {
    fn step(
        &mut self,
        round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        let mut h = blake3::Hasher::new();
        h.update(&round.to_le_bytes());
        h.update(from.as_bytes());
        for (n, b) in accepted {
            h.update(n.as_bytes());
            h.update(b.as_bytes());
        }
        let theta = Hash32::from(h.finalize());
        Ok(StepOutcome {
            theta_after: theta,
            checkpoint: Hash32::of(theta.as_bytes()),
        })
    }
}

/// [`HashStep`] that also shards: each shard's inputs and aggregate are hashes of the
/// round and the shard.
struct ShardStep;

impl OuterStep for ShardStep {
    fn step(
        &mut self,
        r: u64,
        from: Hash32,
        acc: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        HashStep.step(r, from, acc)
    }

    fn step_sharded(
        &mut self,
        r: u64,
        from: Hash32,
        acc: &[(NodeId, Hash32)],
        shards: usize,
    ) -> Result<(StepOutcome, Vec<(Hash32, Hash32)>), String> {
        let hashes = (0..shards as u64)
            .map(|s| {
                let of = |what: &str| Hash32::of(format!("{what} {r} {s}").as_bytes());
                (of("inputs"), of("shard"))
            })
            .collect();
        Ok((HashStep.step(r, from, acc)?, hashes))
    }
}

/// An outer step that fails, to exercise the fail-stop path.
struct Broken;

impl OuterStep for Broken {
    fn step(&mut self, _: u64, _: Hash32, _: &[(NodeId, Hash32)]) -> Result<StepOutcome, String> {
        Err("disk full".into())
    }
}

fn id(i: u8) -> NodeId {
    NodeId([i; 32])
}

fn spec(min_nodes: usize) -> RunSpec {
    RunSpec {
        run_id: "t".into(),
        min_nodes,
        rounds: 4,
        inner_steps: 2,
        round_deadline_ms: 1_000,
        heartbeat_timeout_ms: 5_000,
        ..RunSpec::default()
    }
}

fn fresh(min_nodes: usize) -> HubState {
    HubState::new(
        spec(min_nodes),
        1000,
        1_000,
        Hash32::of(b"theta0"),
        Hash32::of(b"ckpt0"),
    )
}

fn body(hub: &HubState, node: NodeId, blob: &[u8]) -> CommitBody {
    let view = hub.view(&node);
    CommitBody {
        run_id: "t".into(),
        round: view.round().expect("a round is open"),
        commit: Commit {
            blob_hash: Hash32::of(blob),
            tokens: 2 * hub.spec().tokens_per_batch(),
            loss_micro: 1,
            theta_hash: hub.theta(),
            state_hash: Hash32::of(b"state"),
        },
        provider: PeerAddr("p".into()),
    }
}

fn code(r: Result<tessera_hub::engine::Applied, tessera_hub::engine::HubError>) -> ErrorCode {
    r.expect_err("refused").code
}

#[test]
fn commits_are_checked_and_refusals_change_nothing() {
    let mut hub = fresh(2);
    let out = &mut HashStep;
    hub.apply(HubInput::Join { node: id(1) }, 0, out).unwrap();
    hub.apply(HubInput::Join { node: id(2) }, 0, out).unwrap();
    assert_eq!(hub.view(&id(1)).round(), Some(0));
    let good = body(&hub, id(1), b"u1");
    let before = format!("{:?}", hub.coordinator());

    let mut wrong_run = good.clone();
    wrong_run.run_id = "other".into();
    let mut wrong_round = good.clone();
    wrong_round.round = 5;
    let mut stale = good.clone();
    stale.commit.theta_hash = Hash32::of(b"old theta");
    let mut greedy = good.clone();
    greedy.commit.tokens += 1;
    for (b, node, expect) in [
        (wrong_run, id(1), ErrorCode::WrongRun),
        (wrong_round, id(1), ErrorCode::WrongRound),
        (stale, id(1), ErrorCode::StaleTheta),
        (greedy, id(1), ErrorCode::TooManyTokens),
        (good.clone(), id(9), ErrorCode::NotAssigned),
    ] {
        assert_eq!(
            code(hub.apply(HubInput::Commit { node, body: b }, 10, out)),
            expect
        );
        assert_eq!(
            format!("{:?}", hub.coordinator()),
            before,
            "a refused commit changed the state"
        );
    }
    let applied = hub
        .apply(
            HubInput::Commit {
                node: id(1),
                body: good.clone(),
            },
            10,
            out,
        )
        .unwrap();
    assert_eq!(applied.change.facts.len(), 1, "a commit persists one fact");
    assert!(applied.change.snapshot.is_none());
    assert_eq!(
        code(hub.apply(
            HubInput::Commit {
                node: id(1),
                body: good
            },
            11,
            out
        )),
        ErrorCode::AlreadyCommitted
    );
    // Another member's exact copy of the first commit is refused: an update is
    // credited to its first committer.
    assert_eq!(
        code(hub.apply(
            HubInput::Commit {
                node: id(2),
                body: body(&hub, id(2), b"u1"),
            },
            11,
            out
        )),
        ErrorCode::Duplicate
    );
    // The second commit closes the round: a snapshot, a record, a payout to request.
    let b2 = body(&hub, id(2), b"u2");
    let applied = hub
        .apply(
            HubInput::Commit {
                node: id(2),
                body: b2,
            },
            12,
            out,
        )
        .unwrap();
    assert!(applied.change.snapshot.is_some());
    assert_eq!(applied.change.rounds.len(), 1);
    let rec = &applied.change.rounds[0];
    assert_eq!(rec.accepted.len(), 2);
    assert_eq!(rec.theta_before, Hash32::of(b"theta0"));
    assert_eq!(
        hub.theta(),
        rec.theta_after,
        "round 1 starts from round 0's θ"
    );
    assert!(applied
        .effects
        .iter()
        .any(|e| matches!(e, tessera_hub::engine::Effect::Pay(r) if r.round == 0)));
    // A stale free rider: the same update sent again in the next round is refused.
    assert_eq!(
        code(hub.apply(
            HubInput::Commit {
                node: id(1),
                body: body(&hub, id(1), b"u2"),
            },
            13,
            out
        )),
        ErrorCode::Duplicate
    );
}

/// Story: heartbeats and θ reports from keys that were not members were once stored
/// and counted, so 5,000 fake nodes appeared in the summary and 50 fresh keys raised
/// the divergence count. Only members' heartbeats and reports count now.
#[test]
fn outsiders_cannot_add_stats_or_divergence() {
    let mut hub = fresh(1);
    let out = &mut HashStep;
    let stats = Some(NodeStats::default());
    assert_eq!(
        code(hub.apply(HubInput::Heartbeat { node: id(7), stats }, 0, out)),
        ErrorCode::NotMember
    );
    assert!(hub.stats().is_empty());
    hub.apply(HubInput::Join { node: id(1) }, 0, out).unwrap();
    // Hardening #12: a member's heartbeat once rewrote the whole coordinator in an
    // fsynced transaction; it now persists nothing.
    let beat = hub
        .apply(
            HubInput::Heartbeat {
                node: id(1),
                stats: Some(NodeStats::default()),
            },
            0,
            out,
        )
        .unwrap();
    assert!(beat.change.is_empty(), "{:?}", beat.change);
    let b = body(&hub, id(1), b"u");
    hub.apply(
        HubInput::Commit {
            node: id(1),
            body: b,
        },
        1,
        out,
    )
    .unwrap();
    let report = ThetaReport {
        run_id: "t".into(),
        round: 0,
        hash: Hash32::of(b"wrong"),
    };
    assert_eq!(
        code(hub.apply(
            HubInput::Theta {
                node: id(8),
                report: report.clone()
            },
            2,
            out
        )),
        ErrorCode::NotMember
    );
    assert_eq!(hub.divergent(), 0);
    let applied = hub
        .apply(
            HubInput::Theta {
                node: id(1),
                report,
            },
            2,
            out,
        )
        .unwrap();
    assert_eq!(applied.agrees, Some(false));
    assert_eq!(hub.divergent(), 1);
    assert_eq!(applied.change.divergent, Some(1), "the count is persisted");
}

/// Runs a scripted run through a host on `store`, reopening a second host from the
/// same store after every input (a crash at that point) and comparing what a node
/// would see; then fails a write and checks the engine fell back to the store.
fn crash_model<S: HubStore + Clone>(store: S, reopen: impl Fn() -> S) {
    let identity = "run t".to_string();
    let mut host = Host::open(fresh(3), identity.clone(), store, 0).unwrap();
    let out = &mut HashStep;
    let nodes: Vec<NodeId> = (1..=4).map(id).collect();
    let mut now = 0;
    let mut closed = 0;
    for step in 0..200u64 {
        now += 50;
        let node = nodes[(step % 4) as usize];
        let input = match step % 7 {
            0 | 1 => HubInput::Join { node },
            2 => HubInput::Heartbeat { node, stats: None },
            3 if step % 21 == 3 => HubInput::Leave { node },
            4 | 5 => match host.state.view(&node).round() {
                Some(_) if host.state.view(&node).assignment.is_some() => HubInput::Commit {
                    node,
                    body: body(&host.state, node, &step.to_le_bytes()),
                },
                _ => HubInput::Tick,
            },
            _ => HubInput::Tick,
        };
        let _ = host.input(input, now, out);
        closed = closed.max(host.state.coordinator().closed_rounds);
        let again = Host::open(fresh(3), identity.clone(), reopen(), now).unwrap();
        for n in &nodes {
            assert_eq!(
                again.state.view(n),
                host.state.view(n),
                "step {step}: a restart changed the view"
            );
        }
        assert_eq!(again.state.rounds(), host.state.rounds());
        let (mut a, mut b) = (
            again.state.coordinator().clone(),
            host.state.coordinator().clone(),
        );
        a.refresh_members(0);
        b.refresh_members(0);
        assert_eq!(a, b, "step {step}: the restored coordinator differs");
        if host.state.is_finished() {
            break;
        }
    }
    assert!(
        closed >= 2,
        "the script should close rounds, closed {closed}"
    );
    // Another run's settings are refused.
    assert!(Host::open(fresh(3), "another".into(), reopen(), now).is_err());
}

#[test]
fn sqlite_and_memory_stores_keep_the_same_crash_model() {
    let memory = MemoryHubStore::new();
    let handle = memory.clone();
    crash_model(memory, move || handle.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let p = path.clone();
    crash_model(SqliteStoreHandle(path), move || {
        SqliteStoreHandle(p.clone())
    });
}

/// A SQLite store opened afresh for every operation, so each reopen reads only what
/// was committed to the file.
#[derive(Clone)]
struct SqliteStoreHandle(std::path::PathBuf);

impl HubStore for SqliteStoreHandle {
    fn load(
        &mut self,
    ) -> Result<Option<(String, tessera_hub::engine::Durable)>, tessera_hub::store::StoreError>
    {
        SqliteHubStore::open(&self.0)?.load()
    }
    fn create(
        &mut self,
        identity: &str,
        change: &tessera_hub::engine::Change,
    ) -> Result<(), tessera_hub::store::StoreError> {
        SqliteHubStore::open(&self.0)?.create(identity, change)
    }
    fn write(
        &mut self,
        change: &tessera_hub::engine::Change,
    ) -> Result<(), tessera_hub::store::StoreError> {
        SqliteHubStore::open(&self.0)?.write(change)
    }
}

#[test]
fn a_failed_write_or_outer_step_leaves_the_engine_as_the_store_has_it() {
    let store = MemoryHubStore::new();
    let mut host = Host::open(fresh(1), "r".into(), store.clone(), 0).unwrap();
    host.input(HubInput::Join { node: id(1) }, 0, &mut HashStep)
        .unwrap();
    let b = body(&host.state, id(1), b"u");
    // The write of the commit fails: the engine is rebuilt and the commit never happened.
    store.fail_next_writes(1);
    let e = host
        .input(
            HubInput::Commit {
                node: id(1),
                body: b.clone(),
            },
            1,
            &mut HashStep,
        )
        .err()
        .unwrap()
        .unwrap();
    assert_eq!(e.code, ErrorCode::Internal);
    assert_eq!(host.recoveries, 1);
    assert!(!host.state.view(&id(1)).committed);
    // The outer step fails at the round's close: the round stays open.
    let e = host
        .input(
            HubInput::Commit {
                node: id(1),
                body: b.clone(),
            },
            2,
            &mut Broken,
        )
        .err()
        .unwrap()
        .unwrap();
    assert_eq!(e.code, ErrorCode::Internal);
    assert_eq!(host.state.coordinator().closed_rounds, 0);
    assert!(!host.state.view(&id(1)).committed);
    // And with both working, the commit closes the round.
    host.input(
        HubInput::Commit {
            node: id(1),
            body: b,
        },
        3,
        &mut HashStep,
    )
    .unwrap();
    assert_eq!(host.state.coordinator().closed_rounds, 1);
}

/// A validator stand-in: node 3's updates are refused for their norm and audited, node
/// 2's are accepted and audited, everyone else's accepted at full score.
struct Judging;

impl OuterStep for Judging {
    fn step(
        &mut self,
        round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        HashStep.step(round, from, accepted)
    }

    fn judge(
        &mut self,
        _round: u64,
        _from: Hash32,
        commits: &[tessera_hub::engine::Judging],
        _previous: &[(NodeId, Hash32)],
    ) -> Result<Vec<tessera_protocol::wire::Verdict>, String> {
        Ok(commits
            .iter()
            .map(|c| {
                let refused = c.node == id(3);
                tessera_protocol::wire::Verdict {
                    node: c.node,
                    accepted: !refused,
                    score_ppm: if refused { 0 } else { 1_000_000 },
                    flags: if refused {
                        vec!["norm_low 0.010".into()]
                    } else {
                        Vec::new()
                    },
                    norm_ratio_ppm: 1_000_000,
                    gain_heldout_micro: 0,
                    own_margin_micro: 0,
                    audited: c.node == id(2) || refused,
                    tokens: c.commit.tokens,
                    blob_hash: c.commit.blob_hash,
                    state_hash: c.commit.state_hash,
                    batches: c.batches.clone(),
                }
            })
            .collect())
    }
}

fn paid_nodes(req: &tessera_ledger::Request) -> Vec<String> {
    match &req.op {
        tessera_ledger::Operation::Payout { work, .. } => {
            work.iter().map(|w| w.contributor.clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// Story (#9): pay went out as each round closed, to every commit that decoded. Now a
/// round's pay waits in escrow until its audit window has passed and its audits are
/// decided; a refused update whose replay matches is paid in full; a node that fails
/// an audit is ejected, forfeits everything unreleased and is slashed once.
#[test]
fn pay_waits_in_escrow_for_audits_and_a_failed_audit_forfeits_it() {
    let mut hub = fresh(3).with_verify(tessera_verify::VerifyConfig {
        escrow_rounds: 1,
        ..tessera_verify::VerifyConfig::default()
    });
    let mut outer = Judging;
    for n in 1..=3 {
        hub.apply(HubInput::Join { node: id(n) }, 0, &mut outer)
            .unwrap();
    }
    let round = |hub: &mut HubState, outer: &mut Judging, r: u8, now: u64| {
        for n in 1..=3u8 {
            if hub.coordinator().members.contains_key(&id(n)) {
                let b = body(hub, id(n), &[r, n]);
                hub.apply(
                    HubInput::Commit {
                        node: id(n),
                        body: b,
                    },
                    now,
                    outer,
                )
                .unwrap();
            }
        }
    };
    round(&mut hub, &mut outer, 0, 10);
    let rec = hub.round_record(0).unwrap();
    assert_eq!(rec.refused, vec![id(3)], "{rec:?}");
    assert!(rec.accepted.iter().all(|(n, _)| *n != id(3)));
    assert_eq!(hub.pending_audits().len(), 2);
    // The node must reveal: its view says which round.
    assert_eq!(hub.view(&id(2)).audit, Some(0));
    // Nothing is paid while the window is open or an audit of the round is pending.
    assert!(hub.payouts(|_| true).is_empty());
    round(&mut hub, &mut outer, 1, 20);
    round(&mut hub, &mut outer, 2, 30);
    assert!(
        hub.payouts(|_| true).is_empty(),
        "round 0's audits are still open"
    );
    // Node 3's refused update replays exactly: it is paid for round 0 after all.
    hub.apply(
        HubInput::Audited {
            node: id(3),
            round: 0,
            passed: true,
            detail: "replay matches".into(),
        },
        40,
        &mut outer,
    )
    .unwrap();
    // Node 2 fails its audit of round 0: ejected, slashed, its escrow forfeited.
    let applied = hub
        .apply(
            HubInput::Audited {
                node: id(2),
                round: 0,
                passed: false,
                detail: "replay differs".into(),
            },
            41,
            &mut outer,
        )
        .unwrap();
    assert!(applied
        .effects
        .iter()
        .any(|e| matches!(e, tessera_hub::engine::Effect::Slash { node, .. } if *node == id(2))));
    assert!(hub.coordinator().ejected.contains(&id(2)));
    assert_eq!(
        hub.apply(HubInput::Join { node: id(2) }, 42, &mut outer)
            .err()
            .map(|e| e.code),
        Some(ErrorCode::Ejected)
    );
    // Round 0 waits while an audit that could still eject one of its nodes is open
    // within its window (node 3's of round 1).
    assert!(hub.payouts(|_| true).iter().all(|r| !r.id.ends_with(":0")));
    hub.apply(
        HubInput::Audited {
            node: id(3),
            round: 1,
            passed: true,
            detail: "replay matches".into(),
        },
        43,
        &mut outer,
    )
    .unwrap();
    // Round 0 pays nodes 1 and 3 (cleared), not 2; later rounds whose audits are still
    // open wait.
    let payouts = hub.payouts(|_| true);
    let round0 = payouts
        .iter()
        .find(|r| r.id.ends_with(":0"))
        .expect("round 0 left escrow");
    let mut who = paid_nodes(round0);
    who.sort();
    assert_eq!(who, vec![id(1).to_hex(), id(3).to_hex()]);
    assert!(payouts
        .iter()
        .all(|r| !paid_nodes(r).contains(&id(2).to_hex())));
    // A pending audit past its deadline fails by itself (the node never revealed).
    let deadline = hub
        .pending_audits()
        .values()
        .map(|a| a.deadline_ms)
        .min()
        .unwrap();
    let applied = hub.apply(HubInput::Tick, deadline, &mut outer).unwrap();
    assert!(
        applied
            .effects
            .iter()
            .any(|e| matches!(e, tessera_hub::engine::Effect::Slash { .. })),
        "{:?}",
        applied.effects
    );
}

/// Statistics are kept for members only: an ejected node's went on showing in
/// `/summary` (and so on the dashboard) as if it were a member, and a restarted hub,
/// which keeps members' statistics only, then disagreed with the one before it.
#[test]
fn an_ejected_node_takes_its_statistics_with_it() {
    let mut hub = fresh(1);
    let out = &mut HashStep;
    for n in [1, 2] {
        hub.apply(HubInput::Join { node: id(n) }, 0, out).unwrap();
        let stats = Some(NodeStats::default());
        hub.apply(HubInput::Heartbeat { node: id(n), stats }, 0, out)
            .unwrap();
    }
    assert_eq!(hub.stats().len(), 2);
    hub.apply(
        HubInput::Eject {
            node: id(2),
            reason: "resent another member's update".into(),
        },
        1,
        out,
    )
    .unwrap();
    assert_eq!(hub.stats().keys().collect::<Vec<_>>(), vec![&id(1)]);
    assert!(hub.summary().nodes.keys().all(|n| *n == id(1)));
}

/// Slashing goes through the ledger once per ejected node, however often the hub pays
/// (after a restart, every ejected node is slashed again by the same request id).
#[test]
fn an_ejected_node_is_slashed_exactly_once() {
    use tessera_ledger::{Ledger, MemoryStore, Operation, Request, Signer};
    let mut ledger =
        Ledger::open(MemoryStore::new(tessera_ledger::LedgerConfig::default())).unwrap();
    let submit = |ledger: &mut Ledger<MemoryStore>, id: &str, op: Operation| {
        ledger
            .submit(
                &Request {
                    id: id.into(),
                    signer: Signer::Organiser,
                    op,
                },
                0,
            )
            .unwrap();
    };
    submit(
        &mut ledger,
        "sale",
        Operation::Sale {
            buyer: id(2).to_hex(),
            tokens: tessera_ledger::Amount(10 * tessera_ledger::BASE_UNITS_PER_TOKEN),
            treasury_tokens: tessera_ledger::Amount(100 * tessera_ledger::BASE_UNITS_PER_TOKEN),
            proceeds: "test".into(),
        },
    );
    submit(
        &mut ledger,
        "fund",
        Operation::Fund {
            run: "t".into(),
            model: "m".into(),
            amount: tessera_ledger::Amount(100 * tessera_ledger::BASE_UNITS_PER_TOKEN),
            reward_per_round: tessera_ledger::Amount(tessera_ledger::BASE_UNITS_PER_TOKEN),
        },
    );
    submit(
        &mut ledger,
        "stake",
        Operation::Stake {
            run: "t".into(),
            contributor: id(2).to_hex(),
            amount: tessera_ledger::Amount(5 * tessera_ledger::BASE_UNITS_PER_TOKEN),
        },
    );
    let mut hub = fresh(1);
    let mut outer = Judging;
    hub.apply(HubInput::Join { node: id(2) }, 0, &mut outer)
        .unwrap();
    hub.apply(
        HubInput::Eject {
            node: id(2),
            reason: "resent another member's update".into(),
        },
        1,
        &mut outer,
    )
    .unwrap();
    let first = tessera_hub::engine::pay_rounds(&mut ledger, &hub, 2);
    assert!(first.iter().any(|l| l.starts_with("slashed")), "{first:?}");
    let stake = tessera_ledger::Account::Stake {
        run: "t".into(),
        contributor: id(2).to_hex(),
    };
    assert_eq!(ledger.state().balance(&stake).unwrap_or(0), 0);
    let again = tessera_hub::engine::pay_rounds(&mut ledger, &hub, 3);
    assert!(!again.iter().any(|l| l.contains("slash")), "{again:?}");
}

/// Story (#9): audits settle after a run's last round, and a failed one after the end
/// was refused as `finished`, leaving the cheater unejected and its audit half-recorded
/// in memory. It ejects (and slashes) after the end too, and a refused input changes
/// nothing.
/// Two nodes run all 4 rounds, round r's commits at 10 + r ms; returns the finished hub
/// with the audits its closes opened.
fn finished_run(outer: &mut Judging) -> HubState {
    let mut hub = fresh(2);
    for n in 1..=2 {
        hub.apply(HubInput::Join { node: id(n) }, 0, outer).unwrap();
    }
    for r in 0..4u8 {
        for n in 1..=2u8 {
            if hub.coordinator().members.contains_key(&id(n)) && hub.view(&id(n)).round().is_some()
            {
                let b = body(&hub, id(n), &[r, n]);
                hub.apply(
                    HubInput::Commit {
                        node: id(n),
                        body: b,
                    },
                    10 + u64::from(r),
                    outer,
                )
                .unwrap();
            }
        }
    }
    assert!(hub.is_finished());
    hub
}

#[test]
fn an_unrevealed_audit_fails_only_after_the_reveal_window() {
    let mut outer = Judging;
    let mut hub = finished_run(&mut outer);
    let close_ms_max = 20;
    assert!(!hub.pending_audits().is_empty(), "some update is audited");
    let spec = spec(2);
    let window = tessera_hub::engine::reveal_window_ms(&spec);
    assert_eq!(
        window,
        (2 + u64::from(spec.missed_rounds_max)) * spec.round_deadline_ms,
        "longer than the run lets a member be late"
    );
    // Silent for longer than two round deadlines, as behind a dead relay: still open.
    let silent = 10 + 2 * spec.round_deadline_ms + 1;
    hub.apply(HubInput::Tick, silent, &mut outer).unwrap();
    assert!(hub.coordinator().ejected.is_empty());
    hub.apply(HubInput::Tick, 10 + window - 1, &mut outer)
        .unwrap();
    assert!(hub.coordinator().ejected.is_empty());
    // Past the window, an audit nobody answered fails.
    hub.apply(HubInput::Tick, close_ms_max + window, &mut outer)
        .unwrap();
    assert_eq!(hub.coordinator().ejected.len(), 1);
}

#[test]
fn an_audit_that_fails_after_the_run_ended_still_ejects() {
    let mut outer = Judging;
    let mut hub = finished_run(&mut outer);
    let (round, node) = *hub
        .pending_audits()
        .keys()
        .find(|(_, n)| *n == id(2))
        .expect("node 2 is audited");
    let before = hub.audits().len();
    let applied = hub
        .apply(
            HubInput::Audited {
                node,
                round,
                passed: false,
                detail: "replay differs".into(),
            },
            100,
            &mut outer,
        )
        .unwrap();
    assert!(hub.coordinator().ejected.contains(&id(2)));
    assert_eq!(hub.audits().len(), before + 1);
    assert!(applied
        .effects
        .iter()
        .any(|e| matches!(e, tessera_hub::engine::Effect::Slash { .. })));
    assert!(hub.pending_audits().keys().all(|(_, n)| *n != id(2)));
}

#[test]
fn a_wrong_aggregated_shard_ejects_its_aggregator_and_a_right_one_changes_nothing() {
    let spec = RunSpec {
        aggregation: tessera_protocol::AggregationMode::Sharded,
        min_nodes: 4,
        ..spec(4)
    };
    // 3 chunks of parameters: 4 members at 2 per shard make 2 shards.
    let mut hub = HubState::new(spec, 3 * 4096, 1_000, Hash32::of(b"t0"), Hash32::of(b"c0"));
    let out = &mut ShardStep;
    for i in 1..=4 {
        hub.apply(HubInput::Join { node: id(i) }, 0, out).unwrap();
    }
    for i in 1..=4 {
        let b = body(&hub, id(i), &[i]);
        hub.apply(
            HubInput::Commit {
                node: id(i),
                body: b,
            },
            10,
            out,
        )
        .unwrap();
    }
    let rec = hub.round_record(0).expect("round 0 closed");
    assert_eq!(rec.shards.len(), 2, "{rec:?}");
    let mut drawn = Vec::new();
    for (s, shard) in rec.shards.iter().enumerate() {
        assert_eq!(shard.aggregators.len(), 2);
        assert_eq!(shard.hash, Hash32::of(format!("shard 0 {s}").as_bytes()));
        drawn.extend(shard.aggregators.iter().copied());
    }
    drawn.sort();
    drawn.dedup();
    assert_eq!(drawn.len(), 4, "every member aggregates one shard: {rec:?}");

    let report = |shard: u32, hash: Hash32| tessera_protocol::wire::AggregateReport {
        run_id: "t".into(),
        round: 0,
        shard,
        hash,
    };
    let (a, b) = (rec.shards[0].aggregators[0], rec.shards[0].aggregators[1]);
    let other = rec.shards[1].aggregators[0];
    let right = rec.shards[0].hash;
    let before = format!("{:?}", hub.coordinator());
    for (node, r, expect) in [
        (other, report(0, right), ErrorCode::BadRequest),
        (a, report(2, right), ErrorCode::NotFound),
        (
            a,
            tessera_protocol::wire::AggregateReport {
                round: 7,
                ..report(0, right)
            },
            ErrorCode::NotFound,
        ),
        (
            a,
            tessera_protocol::wire::AggregateReport {
                run_id: "x".into(),
                ..report(0, right)
            },
            ErrorCode::WrongRun,
        ),
    ] {
        assert_eq!(
            code(hub.apply(HubInput::Aggregated { node, report: r }, 20, out)),
            expect
        );
        assert_eq!(
            format!("{:?}", hub.coordinator()),
            before,
            "a refused report changed nothing"
        );
    }
    let ok = hub
        .apply(
            HubInput::Aggregated {
                node: a,
                report: report(0, right),
            },
            20,
            out,
        )
        .unwrap();
    assert_eq!(ok.agrees, Some(true));
    assert!(ok.change.is_empty() && ok.effects.is_empty(), "{ok:?}");
    assert_eq!(format!("{:?}", hub.coordinator()), before);

    let wrong = hub
        .apply(
            HubInput::Aggregated {
                node: b,
                report: report(0, Hash32::of(b"lie")),
            },
            20,
            out,
        )
        .unwrap();
    assert_eq!(wrong.agrees, Some(false));
    assert!(
        wrong
            .effects
            .iter()
            .any(|e| matches!(e, tessera_hub::engine::Effect::Slash { node, .. } if *node == b)),
        "{wrong:?}"
    );
    assert!(
        !hub.coordinator().members.contains_key(&b),
        "the liar is no longer a member"
    );
    assert!(hub.coordinator().members.contains_key(&a));
    // It can't report again, nor rejoin.
    assert_eq!(
        code(hub.apply(
            HubInput::Aggregated {
                node: b,
                report: report(0, right)
            },
            30,
            out
        )),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(hub.apply(HubInput::Join { node: b }, 30, out)),
        ErrorCode::Ejected
    );
}

/// Records the checkpoint each round was judged from.
#[derive(Default)]
struct JudgedFrom(Vec<(u64, Hash32)>);

impl OuterStep for JudgedFrom {
    fn step(
        &mut self,
        r: u64,
        from: Hash32,
        acc: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        HashStep.step(r, from, acc)
    }

    fn judge(
        &mut self,
        round: u64,
        from: Hash32,
        _commits: &[tessera_hub::engine::Judging],
        _previous: &[(NodeId, Hash32)],
    ) -> Result<Vec<tessera_protocol::wire::Verdict>, String> {
        self.0.push((round, from));
        Ok(Vec::new())
    }
}

/// Under `overlap` round k trains from θ of round k - 1: a commit from that θ is
/// accepted, one from the latest θ refused as stale, the validator judges the round
/// from the checkpoint it trained from, and each member sees the next round's batches
/// (which become its assignment) while a round is open.
#[test]
fn overlapped_rounds_train_from_the_round_before() {
    let mut hub = HubState::new(
        RunSpec {
            overlap: true,
            ..spec(2)
        },
        1000,
        1_000,
        Hash32::of(b"theta0"),
        Hash32::of(b"ckpt0"),
    );
    let out = &mut JudgedFrom::default();
    for n in [1, 2] {
        hub.apply(HubInput::Join { node: id(n) }, 0, out).unwrap();
    }
    let theta0 = hub.theta();
    let next = hub.view(&id(1)).next_assignment.expect("drawn ahead");
    for (n, blob) in [(1, b"a0"), (2, b"b0")] {
        let b = body(&hub, id(n), blob);
        hub.apply(
            HubInput::Commit {
                node: id(n),
                body: b,
            },
            10,
            out,
        )
        .unwrap();
    }
    assert_eq!(hub.view(&id(1)).round(), Some(1));
    assert_eq!(
        hub.view(&id(1)).assignment,
        Some(next),
        "drawn ahead, then assigned"
    );
    let theta1 = hub.theta();
    assert_ne!(theta1, theta0);
    // Round 1 trains from θ₀, not from θ after round 0.
    let latest = body(&hub, id(1), b"a1");
    assert_eq!(latest.commit.theta_hash, theta1);
    assert_eq!(
        code(hub.apply(
            HubInput::Commit {
                node: id(1),
                body: latest
            },
            20,
            out
        )),
        ErrorCode::StaleTheta
    );
    for (n, blob) in [(1, b"a1"), (2, b"b1")] {
        let mut b = body(&hub, id(n), blob);
        b.commit.theta_hash = theta0;
        hub.apply(
            HubInput::Commit {
                node: id(n),
                body: b,
            },
            20,
            out,
        )
        .unwrap();
    }
    assert_eq!(hub.view(&id(1)).round(), Some(2));
    let ckpt1 = hub.round_record(0).unwrap().checkpoint;
    // Round 2 trains from θ after round 0.
    for (n, blob) in [(1, b"a2"), (2, b"b2")] {
        let mut b = body(&hub, id(n), blob);
        b.commit.theta_hash = theta1;
        hub.apply(
            HubInput::Commit {
                node: id(n),
                body: b,
            },
            30,
            out,
        )
        .unwrap();
    }
    assert_eq!(
        out.0,
        vec![
            (0, Hash32::of(b"ckpt0")),
            (1, Hash32::of(b"ckpt0")),
            (2, ckpt1)
        ]
    );
}
