//! Escrow: a round's pay waits until audits could have caught its work.
//!
//! A round's pay is credited when the round closes and released once `window_rounds`
//! more rounds have closed (the detection horizon: a node is audited each round with
//! some chance, and a failed audit or proven copy within the window forfeits
//! everything the node still has in escrow). Released pay is final; forfeited pay
//! never leaves the escrow and goes back to the run's pool. A forfeiting node is
//! ejected: it earns nothing more in this run. The state is plain data (serde), so a
//! hub keeps it durable and releases each round exactly once across restarts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tessera_protocol::NodeId;

/// Why a credit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EscrowError {
    #[error("node {node} was ejected; it earns nothing more in this run")]
    Ejected { node: NodeId },
    #[error("round {round} was already released; its pay can't change")]
    Released { round: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Escrow {
    window_rounds: u64,
    /// Round → node → amount held.
    held: BTreeMap<u64, BTreeMap<NodeId, u128>>,
    ejected: BTreeSet<NodeId>,
    /// Every round below this was released.
    released_before: u64,
}

impl Escrow {
    pub fn new(window_rounds: u64) -> Escrow {
        Escrow {
            window_rounds,
            ..Escrow::default()
        }
    }

    /// Holds `amount` for `node`'s work in `round`.
    pub fn credit(&mut self, round: u64, node: NodeId, amount: u128) -> Result<(), EscrowError> {
        if self.ejected.contains(&node) {
            return Err(EscrowError::Ejected { node });
        }
        if round < self.released_before {
            return Err(EscrowError::Released { round });
        }
        *self.held.entry(round).or_default().entry(node).or_insert(0) += amount;
        Ok(())
    }

    /// Takes everything `node` still has in escrow and ejects it; returns the amount.
    pub fn forfeit(&mut self, node: NodeId) -> u128 {
        self.ejected.insert(node);
        let mut taken = 0;
        for per_node in self.held.values_mut() {
            taken += per_node.remove(&node).unwrap_or(0);
        }
        self.held.retain(|_, per_node| !per_node.is_empty());
        taken
    }

    pub fn is_ejected(&self, node: &NodeId) -> bool {
        self.ejected.contains(node)
    }

    /// What `node` has in escrow now.
    pub fn held(&self, node: &NodeId) -> u128 {
        self.held.values().filter_map(|m| m.get(node)).sum()
    }

    /// With `closed_rounds` rounds closed, releases every round that has had
    /// `window_rounds` more rounds since it closed, oldest first, each exactly once.
    pub fn release(&mut self, closed_rounds: u64) -> Vec<(u64, NodeId, u128)> {
        let until = closed_rounds.saturating_sub(self.window_rounds);
        let mut out = Vec::new();
        while let Some((&round, _)) = self.held.first_key_value() {
            if round >= until {
                break;
            }
            let (round, per_node) = self.held.pop_first().expect("first exists");
            out.extend(per_node.into_iter().map(|(n, a)| (round, n, a)));
        }
        self.released_before = self.released_before.max(until);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    #[test]
    fn pay_is_released_after_the_window_exactly_once() {
        let mut e = Escrow::new(2);
        e.credit(0, n(1), 10).unwrap();
        e.credit(0, n(2), 10).unwrap();
        e.credit(1, n(1), 10).unwrap();
        assert!(e.release(1).is_empty());
        assert!(e.release(2).is_empty());
        assert_eq!(e.release(3), vec![(0, n(1), 10), (0, n(2), 10)]);
        assert!(e.release(3).is_empty(), "released twice");
        assert_eq!(
            e.credit(0, n(3), 1),
            Err(EscrowError::Released { round: 0 })
        );
        assert_eq!(e.release(4), vec![(1, n(1), 10)]);
    }

    #[test]
    fn a_forfeit_takes_what_is_held_and_ejects() {
        let mut e = Escrow::new(3);
        for r in 0..5 {
            e.credit(r, n(1), 10).unwrap();
            e.credit(r, n(2), 10).unwrap();
        }
        // Rounds 0 and 1 were released before the node was caught: that pay is final.
        assert_eq!(e.release(5).len(), 4);
        assert_eq!(e.held(&n(2)), 30);
        assert_eq!(e.forfeit(n(2)), 30);
        assert_eq!(e.held(&n(2)), 0);
        assert!(e.is_ejected(&n(2)));
        assert_eq!(
            e.credit(5, n(2), 10),
            Err(EscrowError::Ejected { node: n(2) })
        );
        let later = e.release(100);
        assert!(later.iter().all(|(_, node, _)| *node == n(1)));
        assert_eq!(later.iter().map(|(_, _, a)| a).sum::<u128>(), 30);
    }

    #[test]
    fn the_state_survives_serialisation() {
        let mut e = Escrow::new(2);
        e.credit(0, n(1), 7).unwrap();
        e.forfeit(n(9));
        let back: Escrow = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
