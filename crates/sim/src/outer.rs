//! The outer step in simulation: the real `tessera_outer` code on a small synthetic θ,
//! computed once per distinct (starting checkpoint, accepted set) and shared by the hub
//! and every simulated node, so 10,000 nodes stepping the same round cost one step.
//!
//! Training is replaced by a synthetic update with a known expected aggregate: the
//! update for a batch list in a round is the sum over its batches of a fixed
//! pseudo-random vector per (round, batch index) (see [`synthetic_update`]). It depends
//! only on the round and the batches — as a real update depends on the round's θ and
//! the data, so a batch trained again in a later round gives another update, which the
//! hub's resent-update check requires — and the checker recomputes θ from the rounds'
//! work records alone and compares it with what the hub and the nodes reached.

use std::collections::HashMap;
use std::sync::Arc;

use tessera_hub::engine::{OuterStep, StepOutcome};
use tessera_outer::{encode, Aggregator, Codec, OuterState};
use tessera_protocol::wire::RoundRecord;
use tessera_protocol::{Hash32, NodeId};

/// Elements of the synthetic θ.
pub const SYNTHETIC_PARAMS: usize = 16;

/// The update a node trains from `batches` in `round`: Σ_b v(round, b), with v a fixed
/// vector of small values derived from the round and the batch index.
pub fn synthetic_update(round: u64, batches: &[u64]) -> Vec<f32> {
    let mut out = vec![0f32; SYNTHETIC_PARAMS];
    for &b in batches {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&round.to_le_bytes());
        key[8..].copy_from_slice(&b.to_le_bytes());
        let h = blake3::hash(&key);
        for (j, o) in out.iter_mut().enumerate() {
            let byte = h.as_bytes()[j % 32];
            *o += (f32::from(byte) - 127.5) * 1e-4;
        }
    }
    out
}

/// The encoded blob of an update (lossless, so the aggregate is known exactly).
pub fn synthetic_blob(update: &[f32]) -> Vec<u8> {
    let mut residual = vec![0f32; update.len()];
    encode(Codec::None, update, &mut residual, 1.0)
}

/// θ₀ of a simulated run.
pub fn initial_state(lr: f32, momentum: f32) -> OuterState {
    let theta = (0..SYNTHETIC_PARAMS).map(|i| i as f32 * 0.01).collect();
    OuterState::from_theta(theta, lr, momentum)
}

/// The shared outer step: checkpoints by hash, blobs by hash, and a memo of steps.
pub struct SimOuter {
    aggregator: Aggregator,
    states: HashMap<Hash32, OuterState>,
    blobs: HashMap<Hash32, Vec<u8>>,
    /// (from checkpoint, hash of the accepted set) → outcome.
    steps: HashMap<(Hash32, Hash32), StepOutcome>,
    /// Records already resolved: (record identity, from) → outcome. Keyed by the
    /// record's address so a node's lookup costs O(1), not O(accepted).
    by_record: HashMap<(usize, Hash32), StepOutcome>,
    /// Records kept alive so their addresses stay unique.
    records: Vec<Arc<RoundRecord>>,
    pub steps_computed: u64,
}

impl SimOuter {
    pub fn new(aggregator: Aggregator, initial: OuterState) -> (SimOuter, Hash32, Hash32) {
        let checkpoint = Hash32::of(&initial.to_bytes());
        let theta = Hash32(initial.digest());
        let mut states = HashMap::new();
        states.insert(checkpoint, initial);
        (
            SimOuter {
                aggregator,
                states,
                blobs: HashMap::new(),
                steps: HashMap::new(),
                by_record: HashMap::new(),
                records: Vec::new(),
                steps_computed: 0,
            },
            theta,
            checkpoint,
        )
    }

    /// Publishes a blob; returns its hash.
    pub fn publish(&mut self, blob: Vec<u8>) -> Hash32 {
        let h = Hash32::of(&blob);
        self.blobs.entry(h).or_insert(blob);
        h
    }

    /// The state a checkpoint holds.
    pub fn state(&self, checkpoint: &Hash32) -> Option<&OuterState> {
        self.states.get(checkpoint)
    }

    /// A node's outer step for a closed round's record, from the checkpoint it holds.
    pub fn step_record(
        &mut self,
        from: Hash32,
        rec: &Arc<RoundRecord>,
    ) -> Result<StepOutcome, String> {
        let key = (Arc::as_ptr(rec) as usize, from);
        if let Some(o) = self.by_record.get(&key) {
            return Ok(*o);
        }
        let o = self.step(rec.round, from, &rec.accepted)?;
        self.records.push(rec.clone());
        self.by_record.insert(key, o);
        Ok(o)
    }
}

impl OuterStep for SimOuter {
    fn step(
        &mut self,
        _round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        let mut h = blake3::Hasher::new();
        for (n, b) in accepted {
            h.update(n.as_bytes());
            h.update(b.as_bytes());
        }
        let key = (from, Hash32::from(h.finalize()));
        if let Some(o) = self.steps.get(&key) {
            return Ok(*o);
        }
        let mut state = self
            .states
            .get(&from)
            .ok_or_else(|| format!("no checkpoint {from}"))?
            .clone();
        let blobs = accepted
            .iter()
            .map(|(_, b)| {
                self.blobs
                    .get(b)
                    .cloned()
                    .ok_or_else(|| format!("no blob {b}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        state
            .apply(Codec::None, self.aggregator, &blobs)
            .map_err(|e| e.to_string())?;
        let outcome = StepOutcome {
            theta_after: Hash32(state.digest()),
            checkpoint: Hash32::of(&state.to_bytes()),
        };
        self.states.insert(outcome.checkpoint, state);
        self.steps.insert(key, outcome);
        self.steps_computed += 1;
        Ok(outcome)
    }
}
