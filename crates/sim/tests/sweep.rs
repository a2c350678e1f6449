//! The simulator as the main test of the distributed parts: a sweep of seeded runs with
//! every fault enabled, determinism of the trace, and proof that the checker catches a
//! deliberately broken engine.

use tessera_sim::{run, Fault, SimOptions};

fn faulty(nodes: usize, rounds: u64, seed: u64) -> SimOptions {
    let mut o = SimOptions::new(nodes, rounds, seed);
    o.churn = 0.3;
    o.loss = 0.05;
    o.stragglers = 0.2;
    o.faults = true;
    o
}

#[test]
fn a_sweep_of_seeds_with_every_fault_holds_every_invariant() {
    let mut restarts = 0;
    let mut late = 0;
    let mut dropped = 0;
    for seed in 0..300 {
        let opts = faulty(16, 8, seed);
        let r = run(&opts);
        assert!(
            r.invariants_ok,
            "seed {seed}: {:?}\nreplay: {}",
            r.violations, r.replay
        );
        assert_eq!(r.rounds.len(), 8, "seed {seed}: replay: {}", r.replay);
        restarts += r.hub_restarts;
        late += r.rounds.iter().map(|f| f.late).sum::<u64>();
        dropped += r.rounds.iter().map(|f| f.dropped).sum::<u64>();
    }
    // The faults really happened across the sweep.
    assert!(restarts > 10, "hub restarts: {restarts}");
    assert!(late > 0 && dropped > 0, "late {late}, dropped {dropped}");
}

#[test]
fn the_same_seed_replays_bit_for_bit_and_another_seed_differs() {
    let a = run(&faulty(50, 5, 7));
    let b = run(&faulty(50, 5, 7));
    let c = run(&faulty(50, 5, 8));
    assert!(
        a.invariants_ok && c.invariants_ok,
        "{:?} {:?}",
        a.violations,
        c.violations
    );
    assert_eq!(a.trace_hash, b.trace_hash);
    let strip = |r: &tessera_sim::Report| {
        r.rounds
            .iter()
            .map(|f| (f.round_ms, f.members, f.accepted, f.bytes_per_node_mean))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&a), strip(&b));
    assert_ne!(a.trace_hash, c.trace_hash);
}

/// A coordinator that hands one batch to two members is caught by the sweep: the
/// checker sees the batch accepted twice (and the coordinator's own invariant check
/// sees it assigned twice). The sim links the engines the binary runs, so changing an
/// engine's behaviour changes the trace hash.
#[test]
fn a_batch_assigned_twice_is_caught_within_the_sweep() {
    let mut caught = None;
    for seed in 0..50 {
        let mut opts = faulty(10, 6, seed);
        opts.faults = false;
        let clean = run(&opts);
        assert!(clean.invariants_ok, "seed {seed}: {:?}", clean.violations);
        opts.inject = Some(Fault::AssignTwice { from_round: 1 });
        let broken = run(&opts);
        assert_ne!(broken.trace_hash, clean.trace_hash, "seed {seed}");
        if !broken.invariants_ok {
            caught = Some((seed, broken));
            break;
        }
    }
    let (seed, r) = caught.expect("the checker never caught the double assignment");
    let text = r.violations.join("; ");
    assert!(
        text.contains("accepted twice") || text.contains("assigned twice"),
        "seed {seed}: {text}"
    );
    assert!(r.replay.contains(&format!("--seed {seed}")), "{}", r.replay);
    eprintln!("caught at seed {seed}: {text}");
}

#[test]
fn a_thousand_nodes_with_churn_hold_every_invariant() {
    let mut opts = SimOptions::new(1000, 4, 3);
    opts.churn = 0.3;
    opts.stragglers = 0.1;
    opts.loss = 0.01;
    let r = run(&opts);
    assert!(r.invariants_ok, "{:?}", r.violations);
    // Round 0 starts with the first half of the nodes; the rest join for round 1.
    assert!(
        r.rounds[1..].iter().all(|f| f.accepted > 800),
        "{:?}",
        r.rounds
    );
    // All-to-all: a node receives about one update per other accepted node.
    let f = &r.rounds[1];
    assert!(
        f.bytes_per_node_mean > (f.accepted - 1) * r.update_bytes / 2,
        "{f:?}"
    );
}
