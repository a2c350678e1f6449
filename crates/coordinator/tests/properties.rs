//! Seeded random runs of the coordinator: joins, leaves, crashes (silence), late and
//! early commits, bogus inputs. After every input the invariants hold: refused inputs
//! change nothing; every batch handed out is, at all times, exactly one of accepted,
//! assigned now, or waiting in the returned pool (so over an epoch each batch is
//! trained and accepted once); accepted work matches assignments; and replaying the
//! same inputs reproduces the same state.

use std::collections::{BTreeMap, BTreeSet};

use tessera_coordinator::{
    Commit, CoordError, Coordinator, Event, Hash32, Input, Judge, Judged, NodeId, Phase, RunConfig,
};

fn id(name: &str) -> NodeId {
    NodeId(*blake3::hash(name.as_bytes()).as_bytes())
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn config(seed: u64) -> RunConfig {
    RunConfig {
        run_id: "run".into(),
        min_nodes: 2,
        max_nodes: 6,
        round_deadline_ms: 1_000,
        heartbeat_timeout_ms: 3_000,
        missed_rounds_max: 3,
        batches_per_node: 3,
        batches_per_epoch: 1_000_000,
        rounds_total: 400,
        seed,
        overlap: false,
    }
}

fn commit(tokens: u64) -> Commit {
    Commit {
        blob_hash: Hash32::of(format!("h{tokens}").as_bytes()),
        tokens,
        loss_micro: 1,
        theta_hash: Hash32::of(b"t"),
        state_hash: Hash32::of(b"s"),
    }
}

/// A deterministic stand-in for the hub's validator: refuses commits whose token
/// count is a multiple of 7, and ejects those that are a multiple of 31 as well.
struct ByTokens;

impl Judge for ByTokens {
    fn judge(&mut self, _round: u64, commits: &[(NodeId, &Commit, &[u64])]) -> Judged {
        let mut judged = Judged::default();
        for (node, c, _) in commits {
            if c.tokens % 7 == 0 {
                judged.refused.insert(*node);
                if c.tokens % 31 == 0 {
                    judged.ejected.insert(*node);
                }
            }
        }
        judged
    }
}

fn random_input(rng: &mut Lcg, c: &Coordinator) -> Input {
    let node = id(&format!("n{}", rng.below(8)));
    match rng.below(10) {
        0 if rng.below(40) == 0 => Input::Eject { node },
        0 => Input::Join { node },
        1 if rng.below(4) == 0 => Input::Leave { node },
        2 | 3 => Input::Heartbeat { node },
        4..=7 => {
            let round = c.round().unwrap_or(0) + u64::from(rng.below(10) == 0);
            Input::Commit {
                node,
                round,
                commit: commit(rng.below(3 * 128 + 20)),
            }
        }
        _ => Input::Tick,
    }
}

fn run_seed(seed: u64, overlap: bool) -> (Coordinator, Vec<(Input, u64)>, usize) {
    let mut rng = Lcg(seed);
    let mut c = Coordinator::new(
        RunConfig {
            overlap,
            ..config(seed)
        },
        128,
    );
    let mut drawn_ahead = 0;
    let mut accepted: BTreeSet<u64> = BTreeSet::new();
    let mut inputs = Vec::new();
    let mut rounds_closed = 0;
    let mut now = 0u64;
    for _ in 0..4_000 {
        now += rng.below(200);
        let input = random_input(&mut rng, &c);
        let before = c.clone();
        inputs.push((input.clone(), now));
        let assigned_before = c.assignment.clone();
        let ahead_before = c.next_assignment.clone();
        let result = c.apply_judged(input, now, &mut ByTokens);
        c.check_invariants()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        match result {
            Err(CoordError::Finished) => break,
            Err(_) => assert_eq!(c, before, "a refused input changed the state"),
            Ok(events) => {
                for e in &events {
                    // Under overlap a round's members train what was drawn for them
                    // when the round before opened.
                    if let Event::RoundStarted { .. } = e {
                        for (node, batches) in &ahead_before {
                            if let Some(now) = c.assignment.get(node) {
                                assert_eq!(now, batches, "seed {seed}: {node} drawn ahead");
                                drawn_ahead += 1;
                            }
                        }
                        if overlap && c.round().is_some_and(|r| r + 1 < 400) {
                            assert_eq!(
                                c.next_assignment.len(),
                                c.members.len(),
                                "every member gets the next round's batches"
                            );
                        }
                    }
                }
                for e in events {
                    if let Event::RoundClosed {
                        work,
                        accepted: acc,
                        refused,
                        ..
                    } = e
                    {
                        rounds_closed += 1;
                        for n in &refused {
                            assert!(!acc.contains_key(n), "{n} refused and accepted");
                            assert!(!work.iter().any(|w| w.node == *n), "{n} refused and paid");
                        }
                        for w in &work {
                            assert_eq!(
                                Some(&w.batches),
                                assigned_before.get(&w.node),
                                "work differs from assignment"
                            );
                            assert!(acc.contains_key(&w.node));
                            for b in &w.batches {
                                assert!(accepted.insert(*b), "batch {b} accepted twice");
                            }
                        }
                    }
                }
            }
        }
        // Conservation: accepted ∪ assigned ∪ returned = 0..cursor, disjointly.
        let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
        for b in accepted
            .iter()
            .chain(c.assignment.values().flatten())
            .chain(c.next_assignment.values().flatten())
            .chain(c.returned.iter())
        {
            *seen.entry(*b).or_default() += 1;
        }
        assert!(seen.values().all(|&n| n == 1), "a batch is in two places");
        assert_eq!(seen.len() as u64, c.cursor, "a batch was lost");
        assert!(c.members.len() <= 6);
        assert!(c.members.keys().all(|n| !c.ejected.contains(n)));
    }
    assert_eq!(overlap, drawn_ahead > 0, "seed {seed}: batches drawn ahead");
    (c, inputs, rounds_closed)
}

#[test]
fn random_runs_keep_every_invariant() {
    random_runs(false);
}

/// The same under the run setting `overlap`: the next round's batches, drawn when a
/// round opens, are accounted for like any other (handed out once, returned when
/// their member leaves) and become that round's assignment.
#[test]
fn random_overlapped_runs_keep_every_invariant() {
    random_runs(true);
}

fn random_runs(overlap: bool) {
    let mut total_rounds = 0;
    for seed in 0..40 {
        let (c, inputs, rounds) = run_seed(seed, overlap);
        total_rounds += rounds;
        // Replaying the same inputs gives the same state.
        let mut again = Coordinator::new(
            RunConfig {
                overlap,
                ..config(seed)
            },
            128,
        );
        for (input, now) in inputs {
            let _ = again.apply_judged(input, now, &mut ByTokens);
        }
        assert_eq!(again, c, "seed {seed} does not replay");
    }
    assert!(
        total_rounds > 1000,
        "the runs should close many rounds, closed {total_rounds}"
    );
}

#[test]
fn a_crashed_member_is_dropped_and_its_batches_are_reassigned() {
    let mut cfg = config(1);
    cfg.min_nodes = 3;
    let mut c = Coordinator::new(cfg, 128);
    for n in ["a", "b", "c"] {
        c.apply(Input::Join { node: id(n) }, 0).unwrap();
    }
    assert_eq!(c.round(), Some(0));
    let b_batches = c.assignment[&id("b")].clone();
    c.apply(
        Input::Commit {
            node: id("a"),
            round: 0,
            commit: commit(384),
        },
        100,
    )
    .unwrap();
    c.apply(
        Input::Commit {
            node: id("c"),
            round: 0,
            commit: commit(384),
        },
        100,
    )
    .unwrap();
    // b crashed: the round closes at its deadline, b is late and its batches return.
    let events = c.apply(Input::Tick, 1_000).unwrap();
    let closed = events.iter().find_map(|e| match e {
        Event::RoundClosed { late, accepted, .. } => Some((late.clone(), accepted.len())),
        _ => None,
    });
    assert_eq!(closed, Some((vec![id("b")], 2)));
    assert_eq!(c.round(), Some(1), "training continues");
    let reassigned: Vec<u64> = c
        .assignment
        .values()
        .flatten()
        .copied()
        .filter(|x| b_batches.contains(x))
        .collect();
    assert_eq!(
        reassigned.len(),
        b_batches.len(),
        "b's batches are assigned again first"
    );
    // Silence past the heartbeat timeout drops b.
    c.apply(Input::Heartbeat { node: id("a") }, 2_500).unwrap();
    c.apply(Input::Heartbeat { node: id("c") }, 2_500).unwrap();
    let events = c.apply(Input::Tick, 3_100).unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::MemberDropped { node, .. } if *node == id("b"))));
    // A newcomer joins mid-round and takes part from the next round.
    c.apply(Input::Join { node: id("d") }, 3_200).unwrap();
    assert!(c.members[&id("d")].waiting && !c.assignment.contains_key(&id("d")));
    assert!(matches!(c.phase, Phase::Training { .. }));
}

#[test]
fn bad_commits_are_refused() {
    let mut c = Coordinator::new(config(2), 128);
    c.apply(Input::Join { node: id("a") }, 0).unwrap();
    c.apply(Input::Join { node: id("b") }, 0).unwrap();
    let err = c
        .apply(
            Input::Commit {
                node: id("a"),
                round: 5,
                commit: commit(1),
            },
            1,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CoordError::WrongRound {
            got: 5,
            current: Some(0)
        }
    );
    let err = c
        .apply(
            Input::Commit {
                node: id("a"),
                round: 0,
                commit: commit(10_000),
            },
            1,
        )
        .unwrap_err();
    assert_eq!(
        err,
        CoordError::TooManyTokens {
            claimed: 10_000,
            max: 384
        }
    );
    let err = c
        .apply(
            Input::Commit {
                node: id("z"),
                round: 0,
                commit: commit(1),
            },
            1,
        )
        .unwrap_err();
    assert!(matches!(err, CoordError::NotAssigned { .. }));
    c.apply(
        Input::Commit {
            node: id("a"),
            round: 0,
            commit: commit(1),
        },
        1,
    )
    .unwrap();
    let err = c
        .apply(
            Input::Commit {
                node: id("a"),
                round: 0,
                commit: commit(1),
            },
            2,
        )
        .unwrap_err();
    assert!(matches!(err, CoordError::AlreadyCommitted { .. }));
}

/// A refused commit is not accepted or paid, its batches go back to the pool and its
/// member misses the round; an ejected member is removed and refused for good.
#[test]
fn a_judged_round_leaves_refused_commits_out_and_ejects_for_good() {
    let mut cfg = config(3);
    cfg.min_nodes = 3;
    let mut c = Coordinator::new(cfg, 128);
    for n in ["a", "b", "c"] {
        c.apply(Input::Join { node: id(n) }, 0).unwrap();
    }
    let b_batches = c.assignment[&id("b")].clone();
    let c_batches = c.assignment[&id("c")].clone();
    // b commits 7 tokens (refused), c 31 × 7 = 217 (refused and ejected), a 384.
    for (n, tokens) in [("c", 217), ("a", 384), ("b", 7)] {
        c.apply_judged(
            Input::Commit {
                node: id(n),
                round: 0,
                commit: commit(tokens),
            },
            10,
            &mut ByTokens,
        )
        .unwrap();
    }
    let mut judge_saw = Vec::new();
    struct Record<'a>(&'a mut Vec<NodeId>);
    impl Judge for Record<'_> {
        fn judge(&mut self, round: u64, commits: &[(NodeId, &Commit, &[u64])]) -> Judged {
            self.0.extend(commits.iter().map(|(n, _, _)| *n));
            ByTokens.judge(round, commits)
        }
    }
    // The round closed with the last commit (ByTokens); check what it decided.
    assert_eq!(c.closed_rounds, 1);
    assert!(c.ejected.contains(&id("c")) && !c.members.contains_key(&id("c")));
    assert_eq!(c.members[&id("b")].missed_rounds, 1);
    // Refused batches are handed out first again (two members take 6 of the 6).
    let again: Vec<u64> = c
        .assignment
        .values()
        .flatten()
        .chain(&c.returned)
        .copied()
        .collect();
    for batch in b_batches.iter().chain(&c_batches) {
        assert!(again.contains(batch), "refused batch {batch} is lost");
    }
    assert!(c
        .assignment
        .values()
        .flatten()
        .all(|b| b_batches.contains(b) || c_batches.contains(b)));
    assert_eq!(
        c.apply(Input::Join { node: id("c") }, 20),
        Err(CoordError::Ejected { node: id("c") })
    );
    // The judge sees commits in the order they arrived.
    let mut d = Coordinator::new(config(4), 128);
    for n in ["a", "b"] {
        d.apply(Input::Join { node: id(n) }, 0).unwrap();
    }
    for n in ["b", "a"] {
        d.apply_judged(
            Input::Commit {
                node: id(n),
                round: 0,
                commit: commit(1),
            },
            10,
            &mut Record(&mut judge_saw),
        )
        .unwrap();
    }
    assert_eq!(judge_saw, vec![id("b"), id("a")]);
}
