//! The simulated world: an event queue on virtual time, the hub (engine, store, outer
//! step, ledger) and the nodes (engines plus their simulated machines and links).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::Instant;

use tessera_hub::engine::{Effect, HubInput, HubState};
use tessera_hub::host::Host;
use tessera_hub::store::MemoryHubStore;
use tessera_ledger::{Amount, Ledger, LedgerConfig, MemoryStore, Operation, Request, Signer};
use tessera_node::engine::{Action, NodeState, Outcome};
use tessera_protocol::wire::{Commit, CommitBody, ErrorCode, PeerAddr, RoundRecord, ThetaReport};
use tessera_protocol::{Hash32, NodeId, RunSpec};

use tessera_outer::shard;

use crate::check::Checker;
use crate::outer::{initial_state, synthetic_blob, synthetic_update, SimOuter};
use crate::{Aggregation, Report, RoundFigures, SimOptions};

/// A node's request times out after this long without an answer.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Heartbeat interval of a simulated node (a third of the default timeout).
const HEARTBEAT_MS: u64 = 5_000;
/// How often a simulated node polls while waiting (a real node polls every 100 ms;
/// the round's timing is dominated by training and transfers, not the poll).
const POLL_MS: u64 = 1_000;
/// Inner-step time of a node of speed 1.
const STEP_MS: f64 = 1_000.0;
/// The hub's tick.
const TICK_MS: u64 = 250;
/// Tokens each simulated contributor is paid per round, in base units.
const REWARD_PER_ROUND: u128 = 1_000_000_007;

/// SplitMix64: the one generator every random draw comes from.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A request a node sends the hub.
#[derive(Debug, Clone)]
enum Req {
    Join,
    Leave,
    Heartbeat,
    Poll,
    Round(u64),
    Checkpoint(Hash32),
    Commit(CommitBody),
    Theta(ThetaReport),
}

impl Req {
    fn tag(&self) -> u8 {
        match self {
            Req::Join => 1,
            Req::Leave => 2,
            Req::Heartbeat => 3,
            Req::Poll => 4,
            Req::Round(_) => 5,
            Req::Checkpoint(_) => 6,
            Req::Commit(_) => 7,
            Req::Theta(_) => 8,
        }
    }
}

#[derive(Debug, Clone)]
enum Ev {
    /// The outcome of a node's action arrives; `checkpoint` is the θ it now holds.
    Wake {
        node: usize,
        gen: u32,
        outcome: Outcome,
        checkpoint: Option<Hash32>,
    },
    /// A node's training finished; it commits.
    Trained {
        node: usize,
        gen: u32,
        round: u64,
        blob: Hash32,
        tokens: u64,
        theta: Hash32,
    },
    /// A request reaches the hub.
    Recv {
        node: usize,
        gen: u32,
        req: Req,
        sent_ms: u64,
        duplicate: bool,
    },
    /// The hub holds a commit's blob.
    Fetched {
        node: usize,
        gen: u32,
        body: CommitBody,
        sent_ms: u64,
        hub_epoch: u64,
    },
    Heartbeat {
        node: usize,
        gen: u32,
    },
    Tick,
    HubCrash,
    HubRestart,
    Depart {
        leave: bool,
    },
    Arrive,
    /// An aggregator's wrong shard has been compared with the hub's: it is ejected.
    Caught {
        node: usize,
        round: u64,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A simulated machine running a node engine.
struct SimNode {
    id: NodeId,
    engine: NodeState,
    alive: bool,
    /// Bumped when the node crashes, so its in-flight events are dropped.
    gen: u32,
    /// The checkpoint (θ and velocity) the node holds.
    checkpoint: Hash32,
    latency_ms: u64,
    /// Link bandwidth, bytes per millisecond, each way.
    bytes_per_ms: f64,
    /// Inner-step time multiplier (stragglers are slower).
    speed: f64,
    partitioned_until: u64,
    /// The hub said it is no longer a member (seen by the next action).
    evicted: bool,
    /// Per round: (sent, received) bytes, and whether it fetched the round's updates.
    bytes: Vec<(u64, u64)>,
    fetched: Vec<bool>,
    /// Publishes a wrong shard whenever it aggregates one.
    liar: bool,
}

/// A closed round's sharded aggregation, as the data plane moves it.
struct ShardRound {
    /// Encoded size of each shard's aggregated shard (`RunSpec::shard_codec`).
    shard_bytes: Vec<u64>,
    /// The aggregators (node indices) whose published shard is the hub's, per shard;
    /// nodes fetch from them, and from the hub where there are none.
    honest: Vec<Vec<usize>>,
    /// Aggregated bytes each node aggregated itself (it fetches the rest).
    own: BTreeMap<usize, u64>,
    /// When every shard can be fetched.
    ready_at: u64,
    recomputed: u64,
    caught: u64,
}

pub(crate) struct World {
    opts: SimOptions,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    host: Option<Host<MemoryHubStore>>,
    /// Bumped at every hub crash, so work in flight at the old hub is lost.
    hub_epoch: u64,
    fresh: HubState,
    identity: String,
    store: MemoryHubStore,
    outer: SimOuter,
    nodes: Vec<SimNode>,
    ledger: Ledger<MemoryStore>,
    trace: blake3::Hasher,
    check: Checker,
    spec: RunSpec,
    update_bytes: u64,
    checkpoint_bytes: u64,
    /// Per round: start time, members dropped while open, hub CPU time.
    round_start: BTreeMap<u64, u64>,
    dropped: BTreeMap<u64, u64>,
    hub_cpu: BTreeMap<u64, f64>,
    figures: Vec<RoundFigures>,
    fetchers: Vec<u64>,
    /// The batches behind each synthetic blob.
    blob_batches: BTreeMap<Hash32, Vec<u64>>,
    events: u64,
    hub_restarts: u64,
    finished_at: Option<u64>,
    churn_left: u64,
    last_round_seen: Option<u64>,
    params: usize,
    by_id: BTreeMap<NodeId, usize>,
    shard_rounds: BTreeMap<u64, ShardRound>,
    liars_ejected: u64,
}

fn node_id(seed: u64, index: usize) -> NodeId {
    let mut h = blake3::Hasher::new();
    h.update(b"tessera sim node");
    h.update(&seed.to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    NodeId(*h.finalize().as_bytes())
}

/// Runs a simulation to its end and reports.
pub fn run(opts: &SimOptions) -> Report {
    let started = Instant::now();
    let mut w = World::new(opts.clone());
    w.main_loop();
    w.report(started.elapsed().as_millis() as u64)
}

impl World {
    fn new(opts: SimOptions) -> World {
        let mut rng = Rng(opts.seed ^ 0x7e55_e7a5_0000_0001);
        let spec = RunSpec {
            run_id: "sim".into(),
            preset: opts.preset.clone(),
            rounds: opts.rounds,
            min_nodes: (opts.nodes / 2).max(1),
            max_nodes: (opts.nodes * 2).min(tessera_protocol::limits::MEMBERS_MAX),
            // Thousands of simulated nodes join within seconds.
            joins_per_minute: 0,
            ..RunSpec::default()
        };
        let model = tessera_model_config::Preset::by_name(&spec.preset)
            .expect("the preset is checked by the caller")
            .config();
        let params = model.params_total();
        let update_bytes = spec
            .codec()
            .expect("default codec")
            .max_encoded_bytes(params as usize) as u64;
        let checkpoint_bytes = 8 + 8 * params;
        let state0 = initial_state(spec.effective_outer_lr(), spec.outer_momentum);
        let (outer, theta0, checkpoint0) = SimOuter::new(spec.aggregator, state0.clone());
        // Enough batches per epoch for a few epochs over the run.
        let batches_per_epoch = (opts.nodes as u64 * spec.inner_steps * opts.rounds / 3).max(1);
        // Simulated nodes are honest and nothing is audited, so pay leaves escrow as its
        // round closes (the checker checks each round's payout then).
        let fresh = HubState::new(spec.clone(), params, batches_per_epoch, theta0, checkpoint0)
            .with_verify(tessera_verify::VerifyConfig {
                escrow_rounds: 0,
                ..tessera_verify::VerifyConfig::default()
            });
        let identity = format!("sim:{}", opts.seed);
        let store = MemoryHubStore::new();
        let mut host = Host::open(fresh.clone(), identity.clone(), store.clone(), 0)
            .expect("a new memory store opens");
        if let Some(f) = opts.inject {
            host.state.inject_fault(f);
        }
        let mut ledger =
            Ledger::open(MemoryStore::new(LedgerConfig::default())).expect("a memory ledger opens");
        let big = Amount(1_000_000_000 * tessera_ledger::BASE_UNITS_PER_TOKEN);
        for (id, op) in [
            (
                "sale",
                Operation::Sale {
                    buyer: "funder".into(),
                    tokens: big,
                    treasury_tokens: big,
                    proceeds: "simulation".into(),
                },
            ),
            (
                "fund",
                Operation::Fund {
                    run: spec.run_id.clone(),
                    model: "sim-model".into(),
                    amount: big,
                    reward_per_round: Amount(REWARD_PER_ROUND),
                },
            ),
        ] {
            ledger
                .submit(
                    &Request {
                        id: id.into(),
                        signer: Signer::Organiser,
                        op,
                    },
                    0,
                )
                .expect("the simulation's ledger is funded");
        }
        let check = Checker::new(&spec, state0, batches_per_epoch);
        let churn_left = (opts.churn * opts.nodes as f64).round() as u64;
        let mut w = World {
            rng: Rng(rng.next()),
            opts,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            host: Some(host),
            hub_epoch: 0,
            fresh,
            identity,
            store,
            outer,
            nodes: Vec::new(),
            ledger,
            trace: blake3::Hasher::new(),
            check,
            spec,
            update_bytes,
            checkpoint_bytes,
            round_start: BTreeMap::new(),
            dropped: BTreeMap::new(),
            hub_cpu: BTreeMap::new(),
            figures: Vec::new(),
            fetchers: Vec::new(),
            blob_batches: BTreeMap::new(),
            events: 0,
            hub_restarts: 0,
            finished_at: None,
            churn_left,
            last_round_seen: None,
            params: params as usize,
            by_id: BTreeMap::new(),
            shard_rounds: BTreeMap::new(),
            liars_ejected: 0,
        };
        w.fetchers = vec![0; w.opts.rounds as usize];
        for _ in 0..w.opts.nodes {
            let at = w.rng.below(2_000);
            w.add_node(at);
        }
        w.schedule(0, Ev::Tick);
        w
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn trace(&mut self, parts: &[u64]) {
        for p in parts {
            self.trace.update(&p.to_le_bytes());
        }
    }

    fn add_node(&mut self, start_at: u64) {
        let index = self.nodes.len();
        let straggler = self.rng.chance(self.opts.stragglers);
        let speed = if straggler {
            self.rng.range(4.0, 12.0)
        } else {
            self.rng.range(0.8, 1.25)
        };
        // Log-uniform 20 Mbit/s to 1 Gbit/s; 125 bytes per ms per Mbit/s.
        let mbps = (self.rng.range(20f64.ln(), 1000f64.ln())).exp();
        // Drawn only when there are liars, so other runs replay as before.
        let liar = self.rng.chance(self.opts.liars);
        let node = SimNode {
            id: node_id(self.opts.seed, index),
            engine: NodeState::new(POLL_MS, 1_000),
            alive: true,
            gen: 0,
            checkpoint: self.check.checkpoint0(),
            latency_ms: 5 + self.rng.below(145),
            bytes_per_ms: mbps * 125.0,
            speed,
            partitioned_until: 0,
            evicted: false,
            bytes: vec![(0, 0); self.opts.rounds as usize],
            fetched: vec![false; self.opts.rounds as usize],
            liar,
        };
        self.by_id.insert(node.id, index);
        self.nodes.push(node);
        self.schedule(
            start_at,
            Ev::Wake {
                node: index,
                gen: 0,
                outcome: Outcome::Started { round: 0 },
                checkpoint: None,
            },
        );
        let hb = start_at + self.rng.below(HEARTBEAT_MS);
        self.schedule(
            hb,
            Ev::Heartbeat {
                node: index,
                gen: 0,
            },
        );
    }

    fn main_loop(&mut self) {
        // Past this the run has stalled: every round could have hit its deadline twice.
        let limit = self.opts.rounds * (2 * self.spec.round_deadline_ms + 60_000) + 600_000;
        while let Some(Reverse(s)) = self.queue.pop() {
            self.now = s.at;
            self.events += 1;
            self.event(s.ev);
            if !self.check.ok() {
                return;
            }
            if let Some(done) = self.finished_at {
                // Nodes take the last outer step and stop; checked now and then, as it
                // is a scan of every node.
                let all_done = self.events.is_multiple_of(4096)
                    && self.nodes.iter().all(|n| !n.alive || n.engine.is_done());
                if all_done || self.now > done + 120_000 {
                    break;
                }
            }
            if self.now > limit {
                self.check
                    .fail(format!("the run stalled: not finished at {} ms", self.now));
                return;
            }
        }
        self.finish_checks();
    }

    fn round_now(&self) -> u64 {
        self.host
            .as_ref()
            .map_or(0, |h| h.state.coordinator().closed_rounds)
            .min(self.opts.rounds.saturating_sub(1))
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Wake {
                node,
                gen,
                outcome,
                checkpoint,
            } => {
                if !self.live(node, gen) {
                    return;
                }
                if let Some(c) = checkpoint {
                    self.nodes[node].checkpoint = c;
                }
                if std::mem::take(&mut self.nodes[node].evicted) {
                    self.nodes[node].engine.evicted();
                }
                let action = self.nodes[node].engine.next(outcome);
                self.act(node, action);
            }
            Ev::Trained {
                node,
                gen,
                round,
                blob,
                tokens,
                theta,
            } => {
                if !self.live(node, gen) {
                    return;
                }
                let body = CommitBody {
                    run_id: self.spec.run_id.clone(),
                    round,
                    commit: Commit {
                        blob_hash: blob,
                        tokens,
                        loss_micro: 1_000_000,
                        theta_hash: theta,
                        state_hash: Hash32::of(&(node as u64).to_le_bytes()),
                    },
                    provider: PeerAddr(format!("sim:{node}")),
                };
                let r = round as usize;
                if r < self.nodes[node].bytes.len() {
                    self.nodes[node].bytes[r].0 += self.update_bytes;
                }
                self.request(node, Req::Commit(body));
            }
            Ev::Recv {
                node,
                gen,
                req,
                sent_ms,
                duplicate,
            } => self.recv(node, gen, req, sent_ms, duplicate),
            Ev::Fetched {
                node,
                gen,
                body,
                sent_ms,
                hub_epoch,
            } => {
                if hub_epoch != self.hub_epoch || self.host.is_none() {
                    self.fail_later(node, gen, sent_ms);
                    return;
                }
                let id = self.nodes[node].id;
                let round = body.round;
                let outcome = match self.hub_input(HubInput::Commit { node: id, body }) {
                    Ok(_) => Outcome::Committed { round },
                    Err(code) => Outcome::Refused { code },
                };
                self.reply(node, gen, sent_ms, outcome, None, 0, false);
            }
            Ev::Heartbeat { node, gen } => {
                if !self.live(node, gen) || self.nodes[node].engine.is_done() {
                    return;
                }
                self.request(node, Req::Heartbeat);
                self.schedule(self.now + HEARTBEAT_MS, Ev::Heartbeat { node, gen });
            }
            Ev::Tick => {
                if self.host.is_some() {
                    let _ = self.hub_input(HubInput::Tick);
                }
                if self.finished_at.is_none() {
                    self.schedule(self.now + TICK_MS, Ev::Tick);
                }
            }
            Ev::HubCrash => {
                if self.host.take().is_some() {
                    self.hub_epoch += 1;
                    self.trace(&[0xdead, self.now]);
                    let down = 2_000 + self.rng.below(8_000);
                    self.schedule(self.now + down, Ev::HubRestart);
                }
            }
            Ev::HubRestart => {
                match Host::open(
                    self.fresh.clone(),
                    self.identity.clone(),
                    self.store.clone(),
                    self.now,
                ) {
                    Ok(h) => {
                        // As the hub process does on start: pay any round a crash left
                        // unpaid (none here: payouts follow their round's write at once).
                        let _ =
                            tessera_hub::engine::pay_rounds(&mut self.ledger, &h.state, self.now);
                        self.host = Some(h);
                        self.hub_restarts += 1;
                        self.trace(&[0x5ea7, self.now]);
                    }
                    Err(e) => self.check.fail(format!("the hub did not restart: {e}")),
                }
            }
            Ev::Depart { leave } => {
                let alive: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].alive && !self.nodes[i].engine.is_done())
                    .collect();
                if alive.is_empty() {
                    return;
                }
                let i = alive[self.rng.below(alive.len() as u64) as usize];
                self.trace(&[0xde9a, i as u64, u64::from(leave)]);
                if leave {
                    // A leave is sent, then the process exits.
                    self.request(i, Req::Leave);
                }
                let n = &mut self.nodes[i];
                n.alive = false;
                n.gen += 1;
            }
            Ev::Arrive => {
                let at = self.now;
                self.add_node(at);
            }
            Ev::Caught { node, round } => {
                if self.host.is_some() {
                    let reason = format!("published a wrong aggregated shard of round {round}");
                    let id = self.nodes[node].id;
                    if self.hub_input(HubInput::Eject { node: id, reason }).is_ok() {
                        self.liars_ejected += 1;
                    }
                }
            }
        }
        self.check.cheap(self.host.as_ref().map(|h| &h.state));
    }

    fn live(&self, node: usize, gen: u32) -> bool {
        let n = &self.nodes[node];
        n.alive && n.gen == gen
    }

    fn act(&mut self, node: usize, action: Action) {
        let tag = match &action {
            Action::Join => 1,
            Action::Poll => 2,
            Action::Wait { .. } => 3,
            Action::Step { .. } => 4,
            Action::LoadCheckpoint { .. } => 5,
            Action::Train { .. } => 6,
            Action::Report { .. } => 7,
            Action::Done => 8,
            // The simulated run's spec never sets `overlap` (the engine of a run
            // without it never asks for these).
            Action::TrainAhead { .. } | Action::Commit { .. } => {
                unreachable!("the simulator runs without overlap")
            }
        };
        self.trace(&[self.now, node as u64, tag]);
        let gen = self.nodes[node].gen;
        match action {
            Action::Done | Action::TrainAhead { .. } | Action::Commit { .. } => {}
            Action::Join => self.request(node, Req::Join),
            Action::Poll => self.request(node, Req::Poll),
            Action::Wait { ms } => self.schedule(
                self.now + ms,
                Ev::Wake {
                    node,
                    gen,
                    outcome: Outcome::Waited,
                    checkpoint: None,
                },
            ),
            Action::Step { round } => self.request(node, Req::Round(round)),
            Action::LoadCheckpoint { hash } => self.request(node, Req::Checkpoint(hash)),
            Action::Report { round, theta } => self.request(
                node,
                Req::Theta(ThetaReport {
                    run_id: self.spec.run_id.clone(),
                    round,
                    hash: theta,
                }),
            ),
            Action::Train { round, batches } => {
                let update = synthetic_update(round, &batches);
                let blob = self.outer.publish(synthetic_blob(&update));
                self.blob_batches.insert(blob, batches.clone());
                let theta = self
                    .outer
                    .state(&self.nodes[node].checkpoint)
                    .map(|s| Hash32(s.digest()))
                    .unwrap_or_default();
                let ms = (batches.len() as f64 * STEP_MS * self.nodes[node].speed) as u64;
                self.schedule(
                    self.now + ms.max(1),
                    Ev::Trained {
                        node,
                        gen,
                        round,
                        blob,
                        tokens: batches.len() as u64 * self.spec.tokens_per_batch(),
                        theta,
                    },
                );
            }
        }
    }

    fn partitioned(&self, node: usize) -> bool {
        self.nodes[node].partitioned_until > self.now
    }

    /// Sends a request: lost (the node times out), or delivered after the link's
    /// latency (and, with faults, sometimes delayed or duplicated).
    fn request(&mut self, node: usize, req: Req) {
        let gen = self.nodes[node].gen;
        let heartbeat = matches!(req, Req::Heartbeat | Req::Leave);
        if self.partitioned(node) || self.rng.chance(self.opts.loss) {
            if !heartbeat {
                self.fail_later(node, gen, self.now);
            }
            return;
        }
        let mut latency = self.nodes[node].latency_ms;
        if self.opts.faults && self.rng.chance(0.01) {
            latency += self.rng.below(3_000);
        }
        let duplicate = self.opts.faults && self.rng.chance(0.005);
        if duplicate {
            let later = self.now + latency + self.rng.below(500);
            self.schedule(
                later,
                Ev::Recv {
                    node,
                    gen,
                    req: req.clone(),
                    sent_ms: self.now,
                    duplicate: true,
                },
            );
        }
        self.schedule(
            self.now + latency,
            Ev::Recv {
                node,
                gen,
                req,
                sent_ms: self.now,
                duplicate: false,
            },
        );
    }

    fn fail_later(&mut self, node: usize, gen: u32, sent_ms: u64) {
        self.schedule(
            sent_ms + REQUEST_TIMEOUT_MS,
            Ev::Wake {
                node,
                gen,
                outcome: Outcome::Failed,
                checkpoint: None,
            },
        );
    }

    /// Sends a reply back: lost (the node times out) or delivered after `extra_ms`
    /// (a transfer) plus the link's latency.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        node: usize,
        gen: u32,
        sent_ms: u64,
        outcome: Outcome,
        checkpoint: Option<Hash32>,
        extra_ms: u64,
        duplicate: bool,
    ) {
        if duplicate {
            return;
        }
        if self.partitioned(node) || self.rng.chance(self.opts.loss) {
            self.fail_later(node, gen, sent_ms);
            return;
        }
        let at = self.now + extra_ms + self.nodes[node].latency_ms;
        self.schedule(
            at,
            Ev::Wake {
                node,
                gen,
                outcome,
                checkpoint,
            },
        );
    }

    /// Applies an input to the hub engine through its host, measuring its CPU time,
    /// and carries out what it asks.
    fn hub_input(&mut self, input: HubInput) -> Result<Option<bool>, ErrorCode> {
        if self.opts.faults && !matches!(input, HubInput::Tick) && self.rng.chance(0.0005) {
            self.store.fail_next_writes(1);
        }
        let kind = match &input {
            HubInput::Join { .. } => 1,
            HubInput::Leave { .. } => 2,
            HubInput::Heartbeat { .. } => 3,
            HubInput::Commit { .. } => 4,
            HubInput::Theta { .. } => 5,
            HubInput::Tick => 6,
            HubInput::FinalEval { .. } => 7,
            HubInput::Revealed { .. } => 8,
            HubInput::Audited { .. } => 9,
            HubInput::Eject { .. } => 10,
            HubInput::Disputed { .. } => 11,
            HubInput::TrailReceived { .. } => 12,
            HubInput::Aggregated { .. } => 13,
        };
        let round = self.round_now();
        let host = self.host.as_mut().expect("called only while the hub is up");
        let t = Instant::now();
        let result = host.input(input, self.now, &mut self.outer);
        let cpu = t.elapsed().as_secs_f64() * 1e3;
        *self.hub_cpu.entry(round).or_default() += cpu;
        let applied = match result {
            Ok(a) => a,
            Err(Ok(e)) => {
                self.trace(&[self.now, 0xe, kind, e.code as u64]);
                return Err(e.code);
            }
            Err(Err(e)) => {
                self.check
                    .fail(format!("the hub could not rebuild its engine: {e}"));
                return Err(ErrorCode::Internal);
            }
        };
        self.trace(&[self.now, 0xa, kind]);
        let mut closed: Vec<Arc<RoundRecord>> = applied.change.rounds.clone();
        for e in &applied.effects {
            match e {
                Effect::Dropped { node, .. } => {
                    self.trace(&[0xd0, u64::from_le_bytes(node.0[..8].try_into().expect("8"))]);
                    *self.dropped.entry(round).or_default() += 1;
                }
                Effect::Pay(_) => {
                    let host = self.host.as_ref().expect("up");
                    let _ =
                        tessera_hub::engine::pay_rounds(&mut self.ledger, &host.state, self.now);
                }
                Effect::Finish { .. } => {
                    self.finished_at.get_or_insert(self.now);
                }
                Effect::Release(_) | Effect::Log(_) | Effect::Slash { .. } => {}
            }
        }
        let host = self.host.as_ref().expect("up");
        // The start of a new round.
        let current = host.state.coordinator().round();
        if current != self.last_round_seen {
            if let Some(r) = current {
                self.round_start.insert(r, self.now);
                self.on_round_start();
            }
            self.last_round_seen = current;
        }
        for rec in closed.drain(..) {
            if let Aggregation::Sharded { redundancy } = self.opts.aggregation {
                self.shard_round(&rec, redundancy);
            }
            self.trace(&[0xc1, rec.round, rec.accepted.len() as u64]);
            self.trace.update(rec.theta_after.as_bytes());
            let host = self.host.as_ref().expect("up");
            self.check
                .round_closed(&rec, &host.state, &self.ledger, &self.blob_batches);
            let start = self.round_start.get(&rec.round).copied().unwrap_or(0);
            self.figures.push(RoundFigures {
                round: rec.round,
                round_ms: self.now.saturating_sub(start),
                members: host.state.coordinator().members.len() as u64,
                accepted: rec.accepted.len() as u64,
                late: rec.late.len() as u64,
                dropped: self.dropped.get(&rec.round).copied().unwrap_or(0),
                bytes_per_node_mean: 0,
                bytes_per_node_p99: 0,
                bytes_per_node_max: 0,
                hub_cpu_ms: 0.0,
                shards: 0,
                shards_recomputed: 0,
                aggregators_caught: 0,
            });
        }
        Ok(applied.agrees)
    }

    /// A closed round's sharded aggregation (`tessera_outer::shard`) on the data plane.
    /// The hub holds every accepted update (its validator scored them), so its record
    /// names the hash of every aggregated shard. The aggregators drawn for each shard
    /// fetch that shard's piece of every accepted update from its node, combine them
    /// and publish; a shard that differs from the hub's is caught when it is reported
    /// (its aggregator is ejected), and nodes fetch each shard from an aggregator that
    /// published the hub's, or from the hub where none did.
    fn shard_round(&mut self, rec: &RoundRecord, redundancy: usize) {
        let n = rec.accepted.len();
        if n == 0 {
            return;
        }
        let count = shard::shard_count(n, redundancy, self.params);
        let layout = shard::ShardLayout::new(self.params, count);
        let codec = self.spec.codec().expect("default codec");
        let piece_bytes: Vec<u64> = (0..layout.count())
            .map(|s| codec.max_encoded_bytes(layout.len(s)) as u64)
            .collect();
        let shard_codec = self.spec.shard_codec().expect("default codec");
        let shard_bytes: Vec<u64> = (0..layout.count())
            .map(|s| shard_codec.max_encoded_bytes(layout.len(s)) as u64)
            .collect();
        let seed = shard::assignment_seed(rec.round, rec.accepted.iter().map(|(_, h)| &h.0));
        let plan = shard::assign(seed, n, layout.count(), redundancy);
        let members: Vec<Option<usize>> = rec
            .accepted
            .iter()
            .map(|(id, _)| self.by_id.get(id).copied())
            .collect();
        let ri = rec.round as usize;
        let counted = ri < self.fetchers.len();
        // Every live accepted node sends its piece of shard `s` to each live aggregator
        // of `s` but itself: `pieces_out` in all, less what it aggregates itself.
        let mut pieces_out: u64 = 0;
        let mut aggregated: BTreeMap<usize, u64> = BTreeMap::new();
        let (mut honest, mut own) = (Vec::with_capacity(plan.len()), BTreeMap::new());
        let (mut ready_at, mut recomputed, mut caught) = (self.now, 0, 0);
        for (s, aggs) in plan.iter().enumerate() {
            let truth = shard_hash(seed, s, false);
            let mut reports = Vec::with_capacity(aggs.len());
            let mut finish = Vec::with_capacity(aggs.len());
            for &m in aggs {
                let Some(i) = members[m].filter(|&i| self.nodes[i].alive) else {
                    reports.push(None);
                    finish.push(u64::MAX);
                    continue;
                };
                let nd = &self.nodes[i];
                let got = (n as u64 - 1) * piece_bytes[s];
                finish.push(self.now + 2 * nd.latency_ms + (got as f64 / nd.bytes_per_ms) as u64);
                reports.push(Some(shard_hash(seed, s, nd.liar)));
                pieces_out += piece_bytes[s];
                *aggregated.entry(i).or_insert(0) += piece_bytes[s];
                if counted {
                    self.nodes[i].bytes[ri].1 += got;
                }
            }
            let settled = shard::settle(&reports, true, || truth);
            if settled.hash != truth {
                self.check.fail(format!(
                    "round {}: shard {s} settled on a wrong aggregation",
                    rec.round
                ));
            }
            recomputed += u64::from(!settled.wrong.is_empty() || !settled.missing.is_empty());
            let (mut good, mut first) = (Vec::new(), u64::MAX);
            for (k, &m) in aggs.iter().enumerate() {
                let (Some(i), Some(_)) = (members[m], reports[k]) else {
                    continue;
                };
                if settled.wrong.contains(&k) {
                    if !self.nodes[i].liar {
                        self.check.fail(format!(
                            "round {}: honest aggregator {i} refused for shard {s}",
                            rec.round
                        ));
                    }
                    caught += 1;
                    let round = rec.round;
                    self.schedule(finish[k], Ev::Caught { node: i, round });
                } else {
                    good.push(i);
                    first = first.min(finish[k]);
                    *own.entry(i).or_insert(0) += shard_bytes[s];
                }
            }
            for &m in aggs {
                if let Some(i) = members[m].filter(|&i| self.nodes[i].liar && self.nodes[i].alive) {
                    if !settled.wrong.iter().any(|&k| members[aggs[k]] == Some(i)) {
                        self.check.fail(format!(
                            "round {}: lying aggregator {i} not caught on shard {s}",
                            rec.round
                        ));
                    }
                }
            }
            // With no aggregator holding the hub's shard, the hub serves it at once.
            ready_at = ready_at.max(if good.is_empty() { self.now } else { first });
            honest.push(good);
        }
        if counted {
            for &i in members.iter().flatten() {
                if self.nodes[i].alive {
                    let local = aggregated.get(&i).copied().unwrap_or(0);
                    self.nodes[i].bytes[ri].0 += pieces_out - local;
                }
            }
        }
        self.trace(&[0x5a, rec.round, layout.count() as u64, recomputed, caught]);
        self.shard_rounds.insert(
            rec.round,
            ShardRound {
                shard_bytes,
                honest,
                own,
                ready_at,
                recomputed,
                caught,
            },
        );
    }

    /// At each round start: churn, and (with faults) partitions and hub crashes.
    fn on_round_start(&mut self) {
        let rounds_left = self
            .opts
            .rounds
            .saturating_sub(self.last_round_seen.map_or(0, |r| r + 1))
            .max(1);
        let departures = self.churn_left.div_ceil(rounds_left);
        self.churn_left -= departures;
        let window = 60_000;
        for _ in 0..departures {
            let leave = self.rng.chance(0.5);
            let at = self.now + self.rng.below(window);
            self.schedule(at, Ev::Depart { leave });
            let at = self.now + self.rng.below(window);
            self.schedule(at, Ev::Arrive);
        }
        if self.opts.faults {
            if self.rng.chance(0.3) {
                let k = (self.nodes.len() / 50).max(1);
                let until = self.now + 20_000 + self.rng.below(20_000);
                for _ in 0..k {
                    let i = self.rng.below(self.nodes.len() as u64) as usize;
                    self.nodes[i].partitioned_until = until;
                }
            }
            if self.rng.chance(0.15) {
                let at = self.now + self.rng.below(60_000);
                self.schedule(at, Ev::HubCrash);
            }
        }
    }

    fn recv(&mut self, node: usize, gen: u32, req: Req, sent_ms: u64, duplicate: bool) {
        let tag = req.tag();
        self.trace(&[self.now, 0x7, node as u64, u64::from(tag)]);
        if self.host.is_none() {
            if !duplicate && !matches!(req, Req::Heartbeat | Req::Leave) {
                self.fail_later(node, gen, sent_ms);
            }
            return;
        }
        let id = self.nodes[node].id;
        let mut checkpoint = None;
        let mut extra = 0;
        let outcome = match req {
            Req::Join => match self.hub_input(HubInput::Join { node: id }) {
                Ok(_) => Outcome::Joined,
                Err(code) => Outcome::Refused { code },
            },
            Req::Leave => {
                let _ = self.hub_input(HubInput::Leave { node: id });
                return;
            }
            Req::Heartbeat => {
                if let Err(ErrorCode::NotMember) = self.hub_input(HubInput::Heartbeat {
                    node: id,
                    stats: None,
                }) {
                    if self.live(node, gen) && !duplicate {
                        self.nodes[node].evicted = true;
                    }
                }
                return;
            }
            Req::Poll => {
                let host = self.host.as_ref().expect("up");
                Outcome::View(host.state.view(&id))
            }
            Req::Round(r) => {
                let rec = self.host.as_ref().expect("up").state.round_record(r);
                match rec {
                    None => Outcome::Refused {
                        code: ErrorCode::NotFound,
                    },
                    Some(rec) => {
                        let from = self.nodes[node].checkpoint;
                        match self.outer.step_record(from, &rec) {
                            Ok(o) => {
                                // Accepted lists are in node-id order: a lookup, not a scan per node.
                                let (bytes, wait) = match self.shard_rounds.get(&r) {
                                    // The aggregated shards, less those it made itself,
                                    // once they are published.
                                    Some(sr) => (
                                        sr.shard_bytes.iter().sum::<u64>()
                                            - sr.own.get(&node).copied().unwrap_or(0),
                                        sr.ready_at.saturating_sub(self.now),
                                    ),
                                    None => {
                                        let own = rec
                                            .accepted
                                            .binary_search_by_key(&id, |(n, _)| *n)
                                            .is_ok();
                                        let fetched = rec.accepted.len() as u64 - u64::from(own);
                                        (fetched * self.update_bytes, 0)
                                    }
                                };
                                extra =
                                    wait + (bytes as f64 / self.nodes[node].bytes_per_ms) as u64;
                                let ri = r as usize;
                                if ri < self.fetchers.len() && !duplicate {
                                    self.nodes[node].bytes[ri].1 += bytes;
                                    if !self.nodes[node].fetched[ri] {
                                        self.nodes[node].fetched[ri] = true;
                                        self.fetchers[ri] += 1;
                                    }
                                }
                                checkpoint = Some(o.checkpoint);
                                Outcome::Stepped {
                                    round: r,
                                    theta: o.theta_after,
                                    expected: rec.theta_after,
                                }
                            }
                            Err(e) => {
                                self.check.fail(format!("node outer step failed: {e}"));
                                Outcome::Failed
                            }
                        }
                    }
                }
            }
            Req::Checkpoint(hash) => {
                let host = self.host.as_ref().expect("up");
                // The hub serves its current checkpoint; older ones are released.
                match (hash == host.state.checkpoint(), self.outer.state(&hash)) {
                    (true, Some(s)) => {
                        let round = s.round;
                        extra =
                            (self.checkpoint_bytes as f64 / self.nodes[node].bytes_per_ms) as u64;
                        let ri =
                            (self.round_now() as usize).min(self.fetchers.len().saturating_sub(1));
                        if !self.fetchers.is_empty() && !duplicate {
                            self.nodes[node].bytes[ri].1 += self.checkpoint_bytes;
                        }
                        checkpoint = Some(hash);
                        Outcome::Loaded { round }
                    }
                    _ => Outcome::Failed,
                }
            }
            Req::Commit(body) => {
                let host = self.host.as_ref().expect("up");
                match host.state.check_commit(&id, &body) {
                    Err(e) => Outcome::Refused { code: e.code },
                    Ok(()) => {
                        if duplicate {
                            return;
                        }
                        // The hub fetches the blob from the node: its upload.
                        let n = &self.nodes[node];
                        let ms =
                            n.latency_ms * 2 + (self.update_bytes as f64 / n.bytes_per_ms) as u64;
                        let hub_epoch = self.hub_epoch;
                        self.schedule(
                            self.now + ms,
                            Ev::Fetched {
                                node,
                                gen,
                                body,
                                sent_ms,
                                hub_epoch,
                            },
                        );
                        return;
                    }
                }
            }
            Req::Theta(report) => match self.hub_input(HubInput::Theta { node: id, report }) {
                Ok(agrees) => {
                    if agrees == Some(false) {
                        self.check
                            .fail(format!("node {node} reported a divergent θ"));
                    }
                    Outcome::Reported
                }
                Err(code) => Outcome::Refused { code },
            },
        };
        self.reply(node, gen, sent_ms, outcome, checkpoint, extra, duplicate);
    }

    fn finish_checks(&mut self) {
        let Some(host) = self.host.as_ref() else {
            self.check.fail("the run ended with the hub down".into());
            return;
        };
        if self.finished_at.is_none() {
            self.check.fail("the run did not finish".into());
        }
        self.check.run_finished(&host.state, &self.ledger);
    }

    fn report(mut self, wall_ms: u64) -> Report {
        // Bytes per node per round: each accepted origin serves its update to every
        // node that fetched the round (but itself), plus what each node itself did.
        let records: Vec<Arc<RoundRecord>> = self
            .host
            .as_ref()
            .map(|h| h.state.rounds().values().cloned().collect())
            .unwrap_or_default();
        let index: BTreeMap<NodeId, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id, i))
            .collect();
        for rec in &records {
            let r = rec.round as usize;
            if r >= self.fetchers.len() {
                continue;
            }
            if let Some(sr) = self.shard_rounds.get(&rec.round) {
                // Each aggregated shard is served by the aggregators whose shard is the
                // hub's, the round's fetchers spread evenly over them (the hub serves a
                // shard that has none).
                for (s, honest) in sr.honest.iter().enumerate() {
                    if honest.is_empty() {
                        continue;
                    }
                    let each = (self.fetchers[r] * sr.shard_bytes[s]).div_ceil(honest.len() as u64);
                    for &a in honest {
                        self.nodes[a].bytes[r].0 += each;
                    }
                }
                continue;
            }
            for (n, _) in &rec.accepted {
                if let Some(&i) = index.get(n) {
                    let own = u64::from(self.nodes[i].fetched[r]);
                    self.nodes[i].bytes[r].0 += self.update_bytes * (self.fetchers[r] - own);
                }
            }
        }
        for f in &mut self.figures {
            let r = f.round as usize;
            let mut per: Vec<u64> = self
                .nodes
                .iter()
                .map(|n| n.bytes.get(r).map_or(0, |(s, v)| s + v))
                .filter(|&b| b > 0)
                .collect();
            per.sort_unstable();
            if !per.is_empty() {
                f.bytes_per_node_mean = per.iter().sum::<u64>() / per.len() as u64;
                f.bytes_per_node_p99 = per[(per.len() * 99 / 100).min(per.len() - 1)];
                f.bytes_per_node_max = *per.last().expect("not empty");
            }
            f.hub_cpu_ms = self.hub_cpu.get(&f.round).copied().unwrap_or(0.0);
            if let Some(sr) = self.shard_rounds.get(&f.round) {
                f.shards = sr.shard_bytes.len() as u64;
                f.shards_recomputed = sr.recomputed;
                f.aggregators_caught = sr.caught;
            }
            for v in [
                f.round,
                f.round_ms,
                f.members,
                f.accepted,
                f.late,
                f.dropped,
                f.bytes_per_node_mean,
                f.bytes_per_node_p99,
                f.bytes_per_node_max,
                f.shards,
                f.shards_recomputed,
                f.aggregators_caught,
            ] {
                self.trace.update(&v.to_le_bytes());
            }
        }
        let violations = self.check.violations().to_vec();
        Report {
            trace_hash: self.trace.finalize().to_hex().to_string(),
            invariants_ok: violations.is_empty(),
            violations,
            nodes: self.opts.nodes,
            seed: self.opts.seed,
            rounds: self.figures,
            virtual_ms: self.now,
            events: self.events,
            hub_restarts: self.hub_restarts,
            store_recoveries: self.host.as_ref().map_or(0, |h| h.recoveries),
            outer_steps_computed: self.outer.steps_computed,
            aggregation: self.opts.aggregation,
            liars: self.nodes.iter().filter(|n| n.liar).count() as u64,
            liars_ejected: self.liars_ejected,
            update_bytes: self.update_bytes,
            checkpoint_bytes: self.checkpoint_bytes,
            wall_ms,
            replay: self.opts.command(),
        }
    }
}

/// The content hash of shard `s` as an honest aggregator publishes it, or as the
/// colluding liars all publish it.
fn shard_hash(seed: u64, s: usize, lie: bool) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(if lie {
        b"sim wrong shard"
    } else {
        b"sim true shard "
    });
    h.update(&seed.to_le_bytes());
    h.update(&(s as u64).to_le_bytes());
    *h.finalize().as_bytes()
}
