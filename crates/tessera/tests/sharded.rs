//! Sharded aggregation with real processes on loopback: eight nodes train `nano` with
//! `aggregation = "sharded"` (each shard combined by two members, every member fetching
//! the aggregated shards instead of every update) and end where the same run with
//! all-to-all exchange ends, within 1% bpb; a node that publishes wrong shards is caught
//! by the hub and ejected while the run goes on, and the hub, killed and restarted
//! mid-run, makes the last round's pieces and shards again.

use std::path::Path;
use std::time::Duration;

mod common;
use common::{get, node_args, prepare, run_file, s, spawn, spawn_validator, wait_for, Procs};

const NODES: usize = 8;

/// Part of the bundled corpus, prepared in `d/data`: varied enough text that bpb
/// differences mean something.
fn data(d: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tinyshakespeare.txt"),
    )
    .unwrap();
    prepare(d, &text[..200_000])
}

/// Runs `nano` to its end with `NODES` nodes (the last one with `last_extra`
/// arguments) under `aggregation`, training while at least `min_nodes` are members;
/// returns the hub's final summary.
fn run(
    d: &Path,
    data: &Path,
    aggregation: &str,
    min_nodes: usize,
    last_extra: &[&str],
    validator: bool,
    restart_hub_after: Option<u64>,
) -> serde_json::Value {
    std::fs::create_dir_all(d).unwrap();
    let (url, config) = run_file(
        d,
        data,
        &format!(
            "run_id = \"sharded\"\ntopk = 256\nmin_nodes = {min_nodes}\nmax_nodes = {NODES}\n\
             rounds = 6\ninner_steps = 2\nround_deadline_ms = 30000\nheartbeat_timeout_ms = 20000\n\
             joins_per_minute = 0\nseed = 5\naggregation = \"{aggregation}\"\n"
        ),
    );
    let mut procs = Procs(Vec::new());
    procs
        .0
        .push(spawn(&["hub", "--config", s(&config)], &d.join("hub.log")));
    wait_for(d, "the hub", Duration::from_secs(30), || {
        get(&format!("{url}/run")).is_some()
    });
    // An independent validator follows the run: it recomputes every aggregated shard
    // from the accepted updates and checks it against the record.
    let mut checker = validator.then(|| spawn_validator(d, &url));
    let cache = d.join("cache");
    for i in 0..NODES {
        let key = d.join(format!("n{i}.key"));
        let mut args = node_args(&url, &key, &cache);
        if i == NODES - 1 {
            args.extend_from_slice(last_extra);
        }
        procs.0.push(spawn(&args, &d.join(format!("n{i}.log"))));
    }
    if let Some(k) = restart_hub_after {
        // SIGKILL the hub once `k` rounds closed and a member was ejected (the liar, so
        // its catch does not depend on the restart's timing) and start it again: it
        // makes the last round's pieces and shards again.
        wait_for(
            d,
            "rounds to close and the liar's ejection",
            Duration::from_secs(300),
            || {
                get(&format!("{url}/summary")).is_some_and(|s| {
                    s["rounds_closed"].as_u64() >= Some(k)
                        && s["verification"]
                            .as_object()
                            .is_some_and(|v| v.values().any(|n| n["ejected"] == true))
                })
            },
        );
        procs.0[0].kill().unwrap();
        procs.0[0].wait().unwrap();
        procs.0[0] = spawn(&["hub", "--config", s(&config)], &d.join("hub2.log"));
    }
    let mut summary = serde_json::Value::Null;
    wait_for(d, "the run to finish", Duration::from_secs(400), || {
        summary = get(&format!("{url}/summary")).unwrap_or_default();
        summary["final_eval"]["bpb"].is_f64()
    });
    if let Some(v) = checker.as_mut() {
        wait_for(d, "the validator", Duration::from_secs(120), || {
            v.try_wait().unwrap().is_some()
        });
        let text = log(d, "validator");
        assert!(
            v.wait().unwrap().success()
                && text.contains("6 round(s) agree with the hub's verdicts, 0 differ"),
            "the validator checked every round:\n{text}"
        );
    }
    summary
}

fn log(d: &Path, name: &str) -> String {
    std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default()
}

#[test]
fn sharded_aggregation_ends_where_all_to_all_does_and_catches_a_wrong_shard() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = data(root);

    let all = run(
        &root.join("all"),
        &data,
        "all-to-all",
        NODES,
        &[],
        false,
        None,
    );
    let d = root.join("sharded");
    let sharded = run(&d, &data, "sharded", NODES, &[], true, None);
    for (name, sum) in [("all-to-all", &all), ("sharded", &sharded)] {
        assert_eq!(sum["rounds_closed"], 6, "{name}: {sum}");
        assert_eq!(
            sum["divergent_reports"], 0,
            "{name}: every θ report agreed: {sum}"
        );
    }
    // Every node aggregated a shard each round and every shard agreed with the hub's.
    for i in 0..NODES {
        let text = log(&d, &format!("n{i}"));
        let agreed = text.matches("agrees with the hub").count();
        assert!(agreed >= 5, "n{i} aggregated {agreed} shards:\n{text}");
        assert!(!text.contains("REFUSED"), "n{i}:\n{text}");
        assert!(
            !text.contains("differs from the hub's"),
            "n{i}: θ differed:\n{text}"
        );
    }
    let hub = log(&d, "hub");
    assert!(!hub.contains("caught"), "{hub}");
    let (a, b) = (
        all["final_eval"]["bpb"].as_f64().unwrap(),
        sharded["final_eval"]["bpb"].as_f64().unwrap(),
    );
    println!(
        "final bpb: all-to-all {a:.4}, sharded {b:.4} ({:+.2}%)",
        100.0 * (b - a) / a
    );
    assert!((b - a).abs() / a <= 0.01, "all-to-all {a}, sharded {b}");
    // Sharded members fetched aggregated shards, not every update: less traffic.
    let received = |sum: &serde_json::Value| -> u64 {
        sum["nodes"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n["bytes_received"].as_u64().unwrap())
            .sum()
    };
    println!(
        "bytes received by nodes: all-to-all {}, sharded {}",
        received(&all),
        received(&sharded)
    );

    // A node publishing wrong shards is caught at its first report and ejected; its
    // shard is the hub's for everyone else, and the run finishes.
    let d = root.join("liar");
    let liar = run(
        &d,
        &data,
        "sharded",
        NODES - 1,
        &["--wrong-shards"],
        false,
        Some(2),
    );
    assert_eq!(liar["rounds_closed"], 6, "{liar}");
    assert_eq!(liar["divergent_reports"], 0, "{liar}");
    let text = log(&d, &format!("n{}", NODES - 1));
    assert!(
        text.contains("REFUSED by the hub"),
        "the liar was told:\n{text}"
    );
    let hub = log(&d, "hub");
    assert!(
        hub.contains("caught") && hub.contains("published aggregated shard"),
        "the hub ejected the liar:\n{hub}"
    );
    let hub2 = log(&d, "hub2");
    assert!(
        hub2.contains("resumed run"),
        "the hub restarted mid-run:\n{hub2}"
    );
    let ejected = liar["verification"]
        .as_object()
        .unwrap()
        .values()
        .filter(|v| v["ejected"] == true)
        .count();
    assert_eq!(ejected, 1, "{liar}");
    for i in 0..NODES - 1 {
        let text = log(&d, &format!("n{i}"));
        assert!(
            !text.contains("differs from the hub's"),
            "n{i}: θ differed:\n{text}"
        );
    }
}
