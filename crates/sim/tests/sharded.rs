//! Sharded aggregation in the simulator: per-node traffic that does not grow with the
//! number of nodes, and lying aggregators caught and ejected.

use tessera_sim::{run, Aggregation, Report, SimOptions};

fn sharded(nodes: usize, rounds: u64, seed: u64) -> SimOptions {
    let mut o = SimOptions::new(nodes, rounds, seed);
    o.aggregation = Aggregation::Sharded { redundancy: 2 };
    // Enough parameters for every node to aggregate a shard of whole codec chunks.
    o.preset = "small".into();
    o
}

/// Bytes per node in the rounds after the first (which starts with half the nodes).
fn steady_max(r: &Report) -> u64 {
    r.rounds[1..]
        .iter()
        .map(|f| f.bytes_per_node_max)
        .max()
        .expect("rounds")
}

#[test]
fn traffic_per_node_is_flat_in_n_when_sharded_and_linear_when_all_to_all() {
    let mut flat = Vec::new();
    for n in [40usize, 160] {
        let r = run(&sharded(n, 4, 3));
        assert!(
            r.invariants_ok,
            "{n}: {:?}\nreplay: {}",
            r.violations, r.replay
        );
        for f in &r.rounds[1..] {
            assert!(f.shards >= (f.accepted / 2).min(1), "{n}: {f:?}");
            assert_eq!(f.aggregators_caught, 0);
            // No hot spot: the busiest node moves little more than the 99th percentile.
            assert!(
                f.bytes_per_node_max as f64 <= 1.10 * f.bytes_per_node_p99 as f64,
                "{n}: {f:?}"
            );
        }
        flat.push(steady_max(&r));
    }
    let ratio = flat[1] as f64 / flat[0] as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "sharded max bytes per node at 40 and 160 nodes: {flat:?}"
    );

    let mut all = Vec::new();
    for n in [40usize, 160] {
        let mut o = sharded(n, 4, 3);
        o.aggregation = Aggregation::AllToAll;
        let r = run(&o);
        assert!(r.invariants_ok, "{:?}", r.violations);
        all.push(steady_max(&r));
    }
    assert!(
        all[1] as f64 > 3.0 * all[0] as f64,
        "all-to-all grows with N: {all:?}"
    );
    assert!(
        flat[1] * 10 < all[1],
        "sharded {flat:?} vs all-to-all {all:?}"
    );
}

#[test]
fn lying_aggregators_are_caught_ejected_and_their_shards_recomputed() {
    let mut o = sharded(60, 6, 11);
    o.liars = 0.25;
    o.churn = 0.2;
    let r = run(&o);
    assert!(r.invariants_ok, "{:?}\nreplay: {}", r.violations, r.replay);
    assert!(r.liars >= 5, "liars drawn: {}", r.liars);
    let caught: u64 = r.rounds.iter().map(|f| f.aggregators_caught).sum();
    let recomputed: u64 = r.rounds.iter().map(|f| f.shards_recomputed).sum();
    assert!(
        caught >= 1 && recomputed >= 1,
        "caught {caught}, recomputed {recomputed}"
    );
    // Each liar lies the first time it aggregates and is ejected for it (a liar churned
    // out or never drawn as an aggregator stays).
    assert!(r.liars_ejected >= 1 && r.liars_ejected <= r.liars, "{r:?}");
    // Ejected liars aggregate no more: later rounds catch fewer.
    let first = r.rounds[1].aggregators_caught;
    let last = r.rounds.last().expect("rounds").aggregators_caught;
    assert!(
        last <= first,
        "caught per round {:?}",
        r.rounds
            .iter()
            .map(|f| f.aggregators_caught)
            .collect::<Vec<_>>()
    );
    // Replays bit for bit.
    assert_eq!(run(&o).trace_hash, r.trace_hash);
}
