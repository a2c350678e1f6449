//! The run's invariants, checked cheaply after every event and fully at each round's
//! close and at the end. A violation is recorded with what broke; the simulation stops
//! at the first one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tessera_hub::engine::HubState;
use tessera_ledger::{Account, Ledger, MemoryStore};
use tessera_outer::OuterState;
use tessera_protocol::wire::RoundRecord;
use tessera_protocol::{Hash32, RunSpec};

use crate::outer::synthetic_update;

/// What the checker knows independently of the engines.
pub struct Checker {
    violations: Vec<String>,
    spec: RunSpec,
    /// θ recomputed from the rounds' work records alone.
    expected: OuterState,
    checkpoint0: Hash32,
    /// Every batch index accepted so far.
    accepted: BTreeSet<u64>,
    next_round: u64,
    rounds_with_work: BTreeSet<u64>,
    batches_per_epoch: u64,
}

impl Checker {
    pub fn new(spec: &RunSpec, initial: OuterState, batches_per_epoch: u64) -> Checker {
        Checker {
            violations: Vec::new(),
            spec: spec.clone(),
            checkpoint0: Hash32::of(&initial.to_bytes()),
            expected: initial,
            accepted: BTreeSet::new(),
            next_round: 0,
            rounds_with_work: BTreeSet::new(),
            batches_per_epoch,
        }
    }

    pub fn checkpoint0(&self) -> Hash32 {
        self.checkpoint0
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    pub fn fail(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    /// O(1) checks after every event.
    pub fn cheap(&mut self, hub: Option<&HubState>) {
        let Some(hub) = hub else { return };
        let c = hub.coordinator();
        if c.members.len() > c.config.max_nodes {
            self.fail(format!(
                "{} members exceed the run's {}",
                c.members.len(),
                c.config.max_nodes
            ));
        }
        if c.pending() > c.assignment.len() {
            self.fail("more members pending than assigned".into());
        }
        if hub.divergent() > 0 {
            self.fail(format!("{} divergent θ reports", hub.divergent()));
        }
    }

    /// Full checks when a round closes (after its payout was attempted).
    pub fn round_closed(
        &mut self,
        rec: &Arc<RoundRecord>,
        hub: &HubState,
        ledger: &Ledger<MemoryStore>,
        blob_batches: &BTreeMap<Hash32, Vec<u64>>,
    ) {
        if rec.round != self.next_round {
            self.fail(format!(
                "round {} closed, expected round {}",
                rec.round, self.next_round
            ));
        }
        self.next_round = rec.round + 1;
        if let Err(e) = hub.coordinator().check_invariants() {
            self.fail(format!("round {}: coordinator: {e}", rec.round));
        }
        let tokens_per_batch = self.spec.tokens_per_batch();
        let mut updates = Vec::with_capacity(rec.accepted.len());
        let work: BTreeMap<_, _> = rec.work.iter().cloned().collect();
        for (node, blob) in &rec.accepted {
            let Some(batches) = blob_batches.get(blob) else {
                self.fail(format!(
                    "round {}: accepted blob {blob} was never trained",
                    rec.round
                ));
                continue;
            };
            for b in batches {
                if !self.accepted.insert(*b) {
                    self.fail(format!(
                        "round {}: batch {b} (index {} of its epoch) accepted twice",
                        rec.round,
                        b % self.batches_per_epoch
                    ));
                }
            }
            let claimed = work.get(node).copied().unwrap_or(0);
            if claimed != batches.len() as u64 * tokens_per_batch {
                self.fail(format!(
                    "round {}: {} is credited {claimed} tokens for {} batches",
                    rec.round,
                    node.short(12),
                    batches.len()
                ));
            }
            updates.push(synthetic_update(rec.round, batches));
        }
        self.expected.apply_decoded(self.spec.aggregator, &updates);
        let expected = Hash32(self.expected.digest());
        if expected != rec.theta_after {
            self.fail(format!(
                "round {}: θ {} differs from the step recomputed from its work, {}",
                rec.round,
                rec.theta_after.short(12),
                expected.short(12)
            ));
        }
        if !rec.work.is_empty() {
            self.rounds_with_work.insert(rec.round);
            self.check_payout(rec, ledger);
        }
        // Conservation of tokens and supply (it panics, as in the ledger itself).
        ledger.state().assert_invariants();
    }

    /// The round's payout: exactly the round's reward, split in proportion to tokens
    /// (each share within one base unit of its exact value).
    fn check_payout(&mut self, rec: &RoundRecord, ledger: &Ledger<MemoryStore>) {
        let id = format!("payout:{}:{}", self.spec.run_id, rec.round);
        let Some(receipt) = ledger.state().receipt(&id) else {
            self.fail(format!("round {} was not paid", rec.round));
            return;
        };
        let reward = ledger
            .state()
            .run(&self.spec.run_id)
            .map_or(0, |r| r.reward_per_round);
        let total_tokens: u128 = rec.work.iter().map(|(_, t)| u128::from(*t)).sum();
        let paid: BTreeMap<String, u128> = receipt
            .transfers
            .iter()
            .filter_map(|t| match &t.credit {
                Account::Contributor(c) => Some((c.clone(), t.amount.0)),
                _ => None,
            })
            .collect();
        if paid.values().sum::<u128>() != reward {
            self.fail(format!(
                "round {} paid {} of its reward {reward}",
                rec.round,
                paid.values().sum::<u128>()
            ));
        }
        for (node, tokens) in &rec.work {
            let got = paid.get(&node.to_hex()).copied().unwrap_or(0);
            let exact = reward * u128::from(*tokens);
            let floor = exact / total_tokens.max(1);
            if got < floor || got > floor + 1 {
                self.fail(format!(
                    "round {}: {} paid {got}, its share of {tokens} tokens is {floor}",
                    rec.round,
                    node.short(12)
                ));
            }
        }
    }

    /// Checks at the end of the run.
    pub fn run_finished(&mut self, hub: &HubState, ledger: &Ledger<MemoryStore>) {
        if self.next_round != self.spec.rounds {
            self.fail(format!(
                "{} rounds closed of {}",
                self.next_round, self.spec.rounds
            ));
        }
        let paid: BTreeSet<u64> = ledger
            .state()
            .run(&self.spec.run_id)
            .map(|r| r.paid.keys().copied().collect())
            .unwrap_or_default();
        if paid != self.rounds_with_work {
            self.fail(format!(
                "paid rounds {:?} differ from rounds with accepted work {:?}",
                paid.len(),
                self.rounds_with_work.len()
            ));
        }
        ledger.state().assert_invariants();
        // Conservation: every batch handed out is accepted or back in the pool.
        let c = hub.coordinator();
        let mut seen = self.accepted.clone();
        for b in c.returned.iter().chain(c.assignment.values().flatten()) {
            if !seen.insert(*b) {
                self.fail(format!("batch {b} is both accepted and waiting"));
            }
        }
        if seen.len() as u64 != c.cursor || seen.last().is_some_and(|l| *l >= c.cursor) {
            self.fail(format!(
                "{} batches accounted for, {} handed out",
                seen.len(),
                c.cursor
            ));
        }
    }
}
