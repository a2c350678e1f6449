//! A deterministic simulator of a whole run: the real hub engine (behind the same
//! [`tessera_hub::host::Host`] the hub process uses, with the in-memory store), the real
//! node engines, coordinator and ledger, thousands of simulated nodes, virtual time and
//! seeded faults. What is simulated is only what is outside the engines: the network
//! (per-node latency and bandwidth, loss, duplication, delay, partitions), compute
//! (per-node speed, stragglers), churn (crashes, leaves, joins), hub crashes and
//! restarts through the store, failed store writes, and training itself, which is
//! replaced by a small synthetic update with a known expected aggregate (see
//! [`outer`]).
//!
//! The data plane is simulated at flow level: a transfer costs its latency plus its
//! bytes over the node's bandwidth, and bytes are counted at the real codec's size for
//! the run's preset; no blob of that size is ever built.
//!
//! The same seed gives the same run, bit for bit: every random draw comes from one
//! seeded generator in event order, no hash map is iterated, and measured times (the
//! hub's CPU time per round) are reported but never enter the trace hash. A failing seed
//! prints the command that replays it.
//!
//! The checker ([`check`]) runs cheap checks after every event and the full invariants
//! at every round close: every batch accepted at most once and every handed-out batch
//! accounted for, rounds closed in order without gaps, θ after each round equal to the
//! step recomputed from the round's work alone, every closed round paid exactly once and
//! in proportion to accepted tokens, members' θ reports agreeing, the coordinator's and
//! the ledger's own invariants.

pub mod check;
pub mod outer;
mod world;

use serde::Serialize;

pub use tessera_coordinator::Fault;
pub use world::run;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Nodes at the start (churn replaces some of them over the run).
    pub nodes: usize,
    pub rounds: u64,
    pub seed: u64,
    /// Fraction of the starting nodes that crash or leave during the run (as many new
    /// nodes join), spread over its rounds.
    pub churn: f64,
    /// Probability that a message (request or reply) is lost.
    pub loss: f64,
    /// Fraction of nodes that compute 4-12x slower than the rest.
    pub stragglers: f64,
    /// Duplicated and delayed messages, partitions, hub crashes with restarts, and
    /// failed store writes.
    pub faults: bool,
    /// The model preset whose update and checkpoint sizes the data plane moves.
    pub preset: String,
    /// A deliberately broken coordinator (to show the checker catches it).
    pub inject: Option<Fault>,
    /// How a round's accepted updates reach every node.
    pub aggregation: Aggregation,
    /// Fraction of the nodes that publish a wrong shard whenever they aggregate one
    /// (all of them the same wrong shard: they collude). Only with sharded aggregation.
    pub liars: f64,
}

/// How a round's accepted updates reach every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Every node fetches every accepted update: O(N) per node.
    AllToAll,
    /// `tessera_outer::shard`: each shard of the update is combined by `redundancy`
    /// aggregators and every node fetches the aggregated shards: O(1) per node.
    Sharded { redundancy: usize },
}

impl std::str::FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Aggregation, String> {
        match s {
            "all-to-all" => Ok(Aggregation::AllToAll),
            "sharded" => Ok(Aggregation::Sharded { redundancy: 2 }),
            _ => Err(format!(
                "unknown aggregation `{s}`; expected all-to-all or sharded"
            )),
        }
    }
}

impl SimOptions {
    pub fn new(nodes: usize, rounds: u64, seed: u64) -> SimOptions {
        SimOptions {
            nodes,
            rounds,
            seed,
            churn: 0.0,
            loss: 0.0,
            stragglers: 0.0,
            faults: false,
            preset: "micro".into(),
            inject: None,
            aggregation: Aggregation::AllToAll,
            liars: 0.0,
        }
    }

    /// The command line that replays this run.
    pub fn command(&self) -> String {
        let mut c = format!(
            "tessera sim --nodes {} --rounds {} --seed {}",
            self.nodes, self.rounds, self.seed
        );
        if self.churn > 0.0 {
            c += &format!(" --churn {}", self.churn);
        }
        if self.loss > 0.0 {
            c += &format!(" --loss {}", self.loss);
        }
        if self.stragglers > 0.0 {
            c += &format!(" --stragglers {}", self.stragglers);
        }
        if self.faults {
            c += " --faults";
        }
        if self.preset != "micro" {
            c += &format!(" --preset {}", self.preset);
        }
        if let Aggregation::Sharded { redundancy } = self.aggregation {
            c += &format!(" --aggregation sharded --redundancy {redundancy}");
        }
        if self.liars > 0.0 {
            c += &format!(" --liars {}", self.liars);
        }
        c
    }
}

/// One closed round's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundFigures {
    pub round: u64,
    /// Virtual time from the round's start to its close.
    pub round_ms: u64,
    /// Members when the round closed.
    pub members: u64,
    pub accepted: u64,
    pub late: u64,
    /// Members dropped while the round was open.
    pub dropped: u64,
    /// Data-plane bytes (sent + received) per node that took part in the round.
    pub bytes_per_node_mean: u64,
    pub bytes_per_node_p99: u64,
    pub bytes_per_node_max: u64,
    /// Measured CPU time the hub engine spent on the round's inputs (not in the hash).
    pub hub_cpu_ms: f64,
    /// Sharded aggregation: the round's shards, those recomputed because their
    /// aggregators disagreed with the hub or were missing, and the aggregators caught
    /// publishing a wrong shard (zero for all-to-all).
    pub shards: u64,
    pub shards_recomputed: u64,
    pub aggregators_caught: u64,
}

/// What a simulated run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub trace_hash: String,
    pub invariants_ok: bool,
    /// What broke (empty when `invariants_ok`).
    pub violations: Vec<String>,
    pub nodes: usize,
    pub seed: u64,
    pub rounds: Vec<RoundFigures>,
    /// Virtual time the run took.
    pub virtual_ms: u64,
    pub events: u64,
    pub hub_restarts: u64,
    /// Engine rebuilds after a failed store write.
    pub store_recoveries: u64,
    /// Outer steps actually computed (the rest came from the shared cache).
    pub outer_steps_computed: u64,
    pub aggregation: Aggregation,
    /// Nodes that published a wrong shard, and how many of them were ejected for it.
    pub liars: u64,
    pub liars_ejected: u64,
    /// The update and checkpoint sizes moved, bytes.
    pub update_bytes: u64,
    pub checkpoint_bytes: u64,
    /// Measured wall time of the simulation (not in the hash).
    pub wall_ms: u64,
    /// The command that replays this run.
    pub replay: String,
}
