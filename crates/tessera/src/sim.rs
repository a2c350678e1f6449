//! `tessera sim`: a deterministic simulated run (see `tessera_sim`), or a sweep of seeds.

use anyhow::{bail, Result};
use clap::Args;
use tessera_sim::{run, Report, SimOptions};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Nodes at the start.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A sweep instead of one run: seeds `A..B` (B excluded); prints one line per
    /// failing seed with the command that replays it.
    #[arg(long)]
    seeds: Option<String>,
    /// Fraction of the nodes that crash or leave during the run (as many join).
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Fraction of nodes that compute 4-12x slower.
    #[arg(long, default_value_t = 0.0)]
    stragglers: f64,
    /// Also duplicated and delayed messages, partitions, hub crashes and failed store
    /// writes.
    #[arg(long)]
    faults: bool,
    /// The model preset whose update and checkpoint sizes the data plane moves.
    #[arg(long, default_value = "micro")]
    preset: String,
    /// How accepted updates reach every node: `all-to-all` (every node fetches every
    /// update) or `sharded` (aggregators per shard; traffic per node independent of N).
    #[arg(long, default_value = "all-to-all")]
    aggregation: tessera_sim::Aggregation,
    /// Aggregators per shard under `--aggregation sharded`.
    #[arg(long, default_value_t = 2)]
    redundancy: usize,
    /// Fraction of the nodes that publish a wrong shard whenever they aggregate one
    /// (colluding: the same wrong shard). Needs `--aggregation sharded`.
    #[arg(long, default_value_t = 0.0)]
    liars: f64,
    #[arg(long)]
    json: bool,
}

fn fraction(name: &str, v: f64) -> Result<f64> {
    if !(0.0..=1.0).contains(&v) {
        bail!("--{name} must be within 0..=1, got {v}");
    }
    Ok(v)
}

fn parse_range(text: &str) -> Result<std::ops::Range<u64>> {
    let parsed = text
        .split_once("..")
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    match parsed {
        Some((a, b)) if a < b => Ok(a..b),
        _ => bail!("--seeds takes a range `A..B` with A < B, got `{text}`"),
    }
}

pub fn run_cli(args: SimArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > tessera_protocol::limits::MEMBERS_MAX {
        bail!(
            "--nodes must be 1..={} (the most members a run admits)",
            tessera_protocol::limits::MEMBERS_MAX
        );
    }
    if args.rounds == 0 {
        bail!("--rounds must be positive");
    }
    tessera_model::Preset::by_name(&args.preset)?;
    let mut opts = SimOptions::new(args.nodes, args.rounds, args.seed);
    opts.churn = fraction("churn", args.churn)?;
    opts.loss = fraction("loss", args.loss)?;
    opts.stragglers = fraction("stragglers", args.stragglers)?;
    opts.faults = args.faults;
    opts.preset = args.preset.clone();
    opts.liars = fraction("liars", args.liars)?;
    opts.aggregation = match args.aggregation {
        tessera_sim::Aggregation::AllToAll => {
            if opts.liars > 0.0 {
                bail!("--liars needs --aggregation sharded (only aggregators can lie)");
            }
            tessera_sim::Aggregation::AllToAll
        }
        tessera_sim::Aggregation::Sharded { .. } => {
            let max = tessera_outer::shard::REDUNDANCY_MAX;
            if !(2..=max).contains(&args.redundancy) {
                bail!("--redundancy must be 2..={max} (a shard needs two aggregators to compare)");
            }
            tessera_sim::Aggregation::Sharded {
                redundancy: args.redundancy,
            }
        }
    };
    if let Some(range) = &args.seeds {
        let range = parse_range(range)?;
        let (mut failed, total) = (0u64, range.end - range.start);
        for seed in range {
            opts.seed = seed;
            let r = run(&opts);
            if !r.invariants_ok {
                failed += 1;
                println!("seed {seed} FAILED: {}", r.violations.join("; "));
                println!("  replay: {}", r.replay);
            }
        }
        println!("{} of {total} seeds held every invariant", total - failed);
        if failed > 0 {
            bail!("{failed} seed(s) failed");
        }
        return Ok(());
    }
    let report = run(&opts);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    if !report.invariants_ok {
        bail!("invariants broken; replay with: {}", report.replay);
    }
    Ok(())
}

fn print(r: &Report) {
    let sharded = r.aggregation != tessera_sim::Aggregation::AllToAll;
    print!(
        "{:>5} {:>9} {:>7} {:>8} {:>5} {:>7} {:>12} {:>12} {:>12} {:>9}",
        "round",
        "time",
        "members",
        "accepted",
        "late",
        "dropped",
        "bytes/node",
        "p99",
        "max",
        "hub cpu"
    );
    if sharded {
        print!(" {:>6} {:>10} {:>6}", "shards", "recomputed", "caught");
    }
    println!();
    for f in &r.rounds {
        print!(
            "{:>5} {:>8.1}s {:>7} {:>8} {:>5} {:>7} {:>12} {:>12} {:>12} {:>7.1}ms",
            f.round,
            f.round_ms as f64 / 1e3,
            f.members,
            f.accepted,
            f.late,
            f.dropped,
            crate::human_bytes(f.bytes_per_node_mean),
            crate::human_bytes(f.bytes_per_node_p99),
            crate::human_bytes(f.bytes_per_node_max),
            f.hub_cpu_ms
        );
        if sharded {
            print!(
                " {:>6} {:>10} {:>6}",
                f.shards, f.shards_recomputed, f.aggregators_caught
            );
        }
        println!();
    }
    if sharded {
        println!(
            "sharded aggregation: {} lying nodes, {} ejected for a wrong shard",
            r.liars, r.liars_ejected
        );
    }
    println!(
        "{} nodes, seed {}: {} events over {:.0} s of virtual time in {:.1} s; {} hub restarts, {} store recoveries",
        r.nodes,
        r.seed,
        r.events,
        r.virtual_ms as f64 / 1e3,
        r.wall_ms as f64 / 1e3,
        r.hub_restarts,
        r.store_recoveries
    );
    println!("trace hash {}", r.trace_hash);
    if r.invariants_ok {
        println!("every invariant held");
    } else {
        for v in &r.violations {
            println!("VIOLATION: {v}");
        }
        println!("replay: {}", r.replay);
    }
}
