//! Replay audits: which updates are recomputed, whether a recomputation matches, and
//! what the round's verdicts are once the replays are in.
//!
//! Every update refused on a measurement (its norm or its gain) is replayed, since a
//! replay turns the refusal into proof: a crafted update (noise, a flipped sign, a
//! scaled or empty one) fails it and its node is ejected, so it can't go on sending
//! junk in later rounds, where its measurements may no longer stand out; an honest
//! update that the noise of the measurement refused matches and is accepted after all.
//! Besides those, the validator replays accepted updates at `audit_rate` per update
//! judged (one per round for 8 nodes at the default 1/8), carrying in [`History`] the
//! fraction not yet spent, and the replays of refused updates as a debt that later
//! rounds pay off; so replays cost a fixed share of the training they check, however
//! many nodes a round has and however many updates are refused. An accepted update is
//! picked by suspicion if the highest is at least [`VerifyConfig::audit_suspicion_min`],
//! otherwise by a seed nobody knows before the round's commits close (the hub draws it
//! then, or it comes from the round's commits themselves), so every accepted update has
//! a chance of replay in a round where nothing stands out.

use tessera_protocol::NodeId;

use crate::{norm, Flag, History, Judgement, VerifyConfig};

/// What replaying an update found.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AuditOutcome {
    Match { rel_err: f64 },
    Mismatch { rel_err: f64 },
}

/// Replays of accepted updates the round affords: the credit carried in `history` (a
/// debt when negative) plus `audit_rate` per update judged, whole replays only.
pub fn audits_due(judged: usize, history: &History, cfg: &VerifyConfig) -> usize {
    let credit = history.audit_credit + judged as f64 * cfg.audit_rate;
    // Guard against rounding below a whole audit (0.999… of a credit).
    (credit + 1e-9).floor().max(0.0) as usize
}

fn proven(j: &Judgement) -> bool {
    j.flags.iter().any(|f| {
        matches!(
            f,
            Flag::Copy { .. } | Flag::Stale | Flag::AuditFailed { .. }
        )
    })
}

/// The updates to replay this round (see the module doc for the order).
pub fn audit_picks(
    seed: [u8; 32],
    judged: &[Judgement],
    history: &History,
    cfg: &VerifyConfig,
) -> Vec<NodeId> {
    let due = audits_due(judged.len(), history, cfg);
    let by_suspicion = |a: &&Judgement, b: &&Judgement| {
        b.suspicion
            .total_cmp(&a.suspicion)
            .then(a.node.cmp(&b.node))
    };
    let mut refused: Vec<&Judgement> = judged
        .iter()
        .filter(|j| !j.accepted && !proven(j) && j.flags.iter().any(Flag::is_measured))
        .collect();
    refused.sort_by(by_suspicion);
    let mut accepted: Vec<&Judgement> = judged.iter().filter(|j| j.accepted).collect();
    accepted.sort_by(by_suspicion);
    let mut picks: Vec<NodeId> = refused.iter().map(|j| j.node).collect();
    while picks.len() < due && !accepted.is_empty() {
        let top = accepted[0];
        let pick = if top.suspicion >= cfg.audit_suspicion_min {
            0
        } else {
            let mut best: Option<(blake3::Hash, usize)> = None;
            for (k, j) in accepted.iter().enumerate() {
                let mut h = blake3::Hasher::new();
                h.update(b"tessera audit pick v2");
                h.update(&seed);
                h.update(&(picks.len() as u64).to_le_bytes());
                h.update(j.node.as_bytes());
                let h = h.finalize();
                if best.is_none_or(|(b, _)| h.as_bytes() < b.as_bytes()) {
                    best = Some((h, k));
                }
            }
            best.expect("accepted is not empty").1
        };
        picks.push(accepted.remove(pick).node);
    }
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

/// Applies the round's replays to its judgements and records the round in `history`.
///
/// A mismatch refuses the update and flags [`Flag::AuditFailed`] (the caller forfeits
/// the node's escrow and ejects it). A match clears a refusal on a measurement: the
/// update is the node's own work on its own data, so it is accepted and paid in full;
/// the flags stay, saying why it was replayed. A node that passed starts its own-data
/// evidence afresh, so the next audits go to others; every other accepted update adds
/// its round to its node's evidence. Nodes refused as copies, as stale or for a failed
/// replay leave the history. The audits spent are taken from the credit, which may go
/// below zero (replays of refused updates beyond the rate) and is at most one.
pub fn settle(
    judged: &mut [Judgement],
    audits: &[(NodeId, AuditOutcome)],
    history: &mut History,
    cfg: &VerifyConfig,
) {
    let earned = history.audit_credit + judged.len() as f64 * cfg.audit_rate;
    history.audit_credit = (earned - audits.len() as f64).min(1.0);
    for j in judged.iter_mut() {
        let outcome = audits.iter().find(|(n, _)| *n == j.node).map(|(_, o)| *o);
        match outcome {
            Some(AuditOutcome::Mismatch { rel_err }) => {
                j.accepted = false;
                j.score = 0.0;
                j.flags.push(Flag::AuditFailed { rel_err });
            }
            Some(AuditOutcome::Match { .. })
                if !j.accepted && j.flags.iter().all(Flag::is_measured) =>
            {
                j.accepted = true;
                j.score = 1.0;
            }
            _ => {}
        }
        if proven(j) {
            history.nodes.remove(&j.node);
        } else if matches!(outcome, Some(AuditOutcome::Match { .. })) {
            history.nodes.insert(j.node, Default::default());
        } else if j.accepted {
            let r = history.nodes.entry(j.node).or_default();
            r.own_spreads_sum += j.own_spreads;
            r.rounds += 1;
        }
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
            flags: if accepted {
                Vec::new()
            } else {
                vec![Flag::Copy {
                    of: NodeId([0; 32]),
                }]
            },
            suspicion,
            own_spreads: 0.0,
        }
    }

    /// Eight updates at the default rate of 1/8: one audit per round.
    fn eight(suspicions: [f64; 8]) -> Vec<Judgement> {
        (0..8).map(|i| j(i as u8, suspicions[i], true)).collect()
    }

    #[test]
    fn the_most_suspicious_is_picked_when_it_stands_out() {
        let cfg = VerifyConfig::default();
        let mut judged = eight([0.1, 5.0, -1.0, 0.0, 0.3, 0.2, -0.5, 0.4]);
        judged[3] = j(3, 9.0, false); // a copy: proven, never replayed
        let a = audit_picks([1; 32], &judged, &History::new(), &cfg);
        assert_eq!(a, vec![NodeId([1; 32])]);
    }

    /// Without the seeded pick, a round where nothing stands out would always replay
    /// whichever honest node's noise was highest, and a node whose measurements all
    /// look ordinary would never be replayed.
    #[test]
    fn the_seed_decides_when_nothing_stands_out() {
        let cfg = VerifyConfig::default();
        let judged = eight([0.1, 0.5, -1.0, 0.0, 0.3, 0.2, -0.5, 0.4]);
        let picked: std::collections::BTreeSet<NodeId> = (0..64u8)
            .map(|s| audit_picks([s; 32], &judged, &History::new(), &cfg)[0])
            .collect();
        assert!(picked.len() >= 4, "{picked:?}");
        let same = audit_picks([3; 32], &judged, &History::new(), &cfg);
        assert_eq!(same, audit_picks([3; 32], &judged, &History::new(), &cfg));
    }

    /// A refused noise update early in a run stood out; later its gain would look like
    /// anyone's. It is replayed first, so it is proven and ejected while it stands out.
    #[test]
    fn an_update_refused_on_a_measurement_is_replayed_first() {
        let cfg = VerifyConfig::default();
        let mut judged = eight([0.1, 50.0, -1.0, 0.0, 0.3, 0.2, -0.5, 0.4]);
        judged[6].accepted = false;
        judged[6].score = 0.0;
        judged[6].flags = vec![Flag::Harmful {
            gain: 0.0,
            spreads: -12.0,
        }];
        let picks = audit_picks([1; 32], &judged, &History::new(), &cfg);
        assert_eq!(picks, vec![NodeId([6; 32])]);
    }

    /// Two free riders refused in one round: both are replayed although the rate pays
    /// for one, and the debt delays the next replay of an accepted update.
    #[test]
    fn every_refusal_on_a_measurement_is_replayed_and_the_rate_holds() {
        let cfg = VerifyConfig::default();
        let mut history = History::new();
        let mut judged = eight([0.0; 8]);
        for k in [2, 5] {
            judged[k].accepted = false;
            judged[k].score = 0.0;
            judged[k].flags = vec![Flag::NormLow { ratio: 0.0 }];
        }
        let picks = audit_picks([1; 32], &judged, &history, &cfg);
        assert_eq!(picks, vec![NodeId([2; 32]), NodeId([5; 32])]);
        let audits: Vec<(NodeId, AuditOutcome)> = picks
            .iter()
            .map(|n| (*n, AuditOutcome::Mismatch { rel_err: 1.0 }))
            .collect();
        settle(&mut judged, &audits, &mut history, &cfg);
        assert_eq!(history.audit_credit(), -1.0);
        // The next round's six updates earn 0.75: still in debt, no replay.
        let six: Vec<Judgement> = (0..6).map(|i| j(i, 9.0, true)).collect();
        assert!(audit_picks([1; 32], &six, &history, &cfg).is_empty());
    }

    #[test]
    fn the_rate_carries_its_fraction_over_rounds() {
        let cfg = VerifyConfig::default();
        let mut history = History::new();
        let mut spent = 0;
        for _ in 0..8 {
            // Six updates a round: 0.75 audits, so 6 audits in 8 rounds.
            let mut judged: Vec<Judgement> = (0..6).map(|i| j(i, 0.0, true)).collect();
            let picks = audit_picks([0; 32], &judged, &history, &cfg);
            let audits: Vec<(NodeId, AuditOutcome)> = picks
                .iter()
                .map(|n| (*n, AuditOutcome::Match { rel_err: 0.0 }))
                .collect();
            spent += audits.len();
            settle(&mut judged, &audits, &mut history, &cfg);
            assert!(history.audit_credit() < 1.0);
        }
        assert_eq!(spent, 6);
    }

    #[test]
    fn settle_clears_a_measured_refusal_that_replays_and_ejects_a_mismatch() {
        let cfg = VerifyConfig::default();
        let mut judged = eight([0.0; 8]);
        for k in [1, 2] {
            judged[k].accepted = false;
            judged[k].score = 0.0;
            judged[k].flags = vec![Flag::NormLow { ratio: 0.0 }];
        }
        judged[5].own_spreads = -2.0;
        let mut history = History::new();
        history.nodes.insert(
            NodeId([3; 32]),
            crate::NodeRecord {
                own_spreads_sum: -5.0,
                rounds: 3,
            },
        );
        let audits = [
            (NodeId([1; 32]), AuditOutcome::Match { rel_err: 0.0 }),
            (NodeId([2; 32]), AuditOutcome::Mismatch { rel_err: 1.0 }),
            (NodeId([3; 32]), AuditOutcome::Match { rel_err: 0.0 }),
        ];
        settle(&mut judged, &audits, &mut history, &cfg);
        assert!(judged[1].accepted && judged[1].score == 1.0);
        assert!(!judged[2].accepted);
        assert!(matches!(
            judged[2].flags.last(),
            Some(Flag::AuditFailed { .. })
        ));
        assert_eq!(history.record(&NodeId([3; 32])).rounds, 0, "passed: afresh");
        assert_eq!(history.record(&NodeId([5; 32])).own_spreads_sum, -2.0);
        assert!(!history.nodes.contains_key(&NodeId([2; 32])));
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
