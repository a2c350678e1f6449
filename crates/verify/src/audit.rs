//! Replay audits: which accepted updates are recomputed, and whether a recomputation
//! matches.
//!
//! The picks use a seed nobody knows before the round's commits close (the hub draws
//! it then, or it comes from the round's commits themselves), so a node can't know
//! whether its update will be replayed when it commits. The most suspicious updates
//! are replayed first ([`crate::Judgement::suspicion`]), then a few more at random, so
//! every accepted update has a chance of replay each round and a lazy or wrong-data
//! node that skews its measurements is replayed sooner.

use tessera_protocol::NodeId;

use crate::{norm, Judgement, VerifyConfig};

/// What replaying an update found.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AuditOutcome {
    Match { rel_err: f64 },
    Mismatch { rel_err: f64 },
}

/// The accepted updates to replay this round: the [`VerifyConfig::audits_targeted`]
/// most suspicious, then [`VerifyConfig::audits_random`] of the rest, ordered by a
/// hash of `seed` and the node id.
pub fn audit_picks(seed: [u8; 32], judged: &[Judgement], cfg: &VerifyConfig) -> Vec<NodeId> {
    let mut accepted: Vec<&Judgement> = judged.iter().filter(|j| j.accepted).collect();
    accepted.sort_by(|a, b| {
        b.suspicion
            .total_cmp(&a.suspicion)
            .then(a.node.cmp(&b.node))
    });
    let mut picks: Vec<NodeId> = accepted
        .iter()
        .take(cfg.audits_targeted)
        .map(|j| j.node)
        .collect();
    let mut rest: Vec<(blake3::Hash, NodeId)> = accepted
        .iter()
        .skip(cfg.audits_targeted)
        .map(|j| {
            let mut h = blake3::Hasher::new();
            h.update(b"tessera audit pick v1");
            h.update(&seed);
            h.update(j.node.as_bytes());
            (h.finalize(), j.node)
        })
        .collect();
    rest.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    picks.extend(rest.iter().take(cfg.audits_random).map(|(_, n)| *n));
    picks
}

/// Compares a submitted update with its replay: the relative L2 difference
/// ‖submitted − replayed‖ / ‖replayed‖ against [`VerifyConfig::audit_tolerance`].
pub fn audit_compare(submitted: &[f32], replayed: &[f32], cfg: &VerifyConfig) -> AuditOutcome {
    if submitted.len() != replayed.len() {
        return AuditOutcome::Mismatch {
            rel_err: f64::INFINITY,
        };
    }
    let diff: Vec<f32> = submitted.iter().zip(replayed).map(|(a, b)| a - b).collect();
    let base = norm(replayed);
    let d = norm(&diff);
    let rel_err = if base > 0.0 {
        d / base
    } else if d == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    if rel_err <= cfg.audit_tolerance {
        AuditOutcome::Match { rel_err }
    } else {
        AuditOutcome::Mismatch { rel_err }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(i: u8, suspicion: f64, accepted: bool) -> Judgement {
        Judgement {
            node: NodeId([i; 32]),
            accepted,
            score: if accepted { 1.0 } else { 0.0 },
            flags: Vec::new(),
            suspicion,
        }
    }

    #[test]
    fn the_most_suspicious_is_picked_then_the_seed_decides() {
        let judged = vec![
            j(1, 0.1, true),
            j(2, 5.0, true),
            j(3, 9.0, false),
            j(4, -1.0, true),
            j(5, 0.0, true),
        ];
        let cfg = VerifyConfig::default();
        let a = audit_picks([1; 32], &judged, &cfg);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], NodeId([2; 32]), "the refused one is never audited");
        // Another seed may pick another second node; the same seed the same one.
        assert_eq!(a, audit_picks([1; 32], &judged, &cfg));
        let seconds: std::collections::BTreeSet<NodeId> = (0..32u8)
            .map(|s| audit_picks([s; 32], &judged, &cfg)[1])
            .collect();
        assert!(seconds.len() >= 2, "the seed never changes the random pick");
        assert!(!seconds.contains(&NodeId([2; 32])));
    }

    #[test]
    fn a_replay_matches_within_the_tolerance_only() {
        let cfg = VerifyConfig::default();
        let replayed = crate::testing::noise(1000, 1);
        assert_eq!(
            audit_compare(&replayed, &replayed, &cfg),
            AuditOutcome::Match { rel_err: 0.0 }
        );
        let lazy: Vec<f32> = replayed.iter().map(|v| v * 0.5).collect();
        assert!(
            matches!(audit_compare(&lazy, &replayed, &cfg), AuditOutcome::Mismatch { rel_err } if (rel_err - 0.5).abs() < 1e-6)
        );
        let tiny: Vec<f32> = replayed.iter().map(|v| v * (1.0 + 1e-5)).collect();
        assert!(matches!(
            audit_compare(&tiny, &replayed, &cfg),
            AuditOutcome::Match { .. }
        ));
        assert!(matches!(
            audit_compare(&replayed[..10], &replayed, &cfg),
            AuditOutcome::Mismatch { .. }
        ));
    }
}
