//! Judging a round's updates from what a validator measured of each.
//!
//! Hard refusals (the update is left out of the aggregate and earns nothing unless a
//! replay clears it): a copy of an earlier commit, a stale update (trained from another
//! θ than the round's), a norm far above the round's median (a scaled update) or far
//! below it (an empty one), and an update whose gain on data it was not assigned is an
//! outlier below the round's (noise, a flipped sign). Everything else is accepted and
//! earns its tokens.
//!
//! Every comparison is robust and relative to the round: the median and the spread
//! (1.4826 × the median absolute deviation, a standard deviation for normal data) of
//! the round's updates, the spread taken again without the outliers. The spread of the
//! gains is at least `gain_spread_floor` × the median gain, so a round where honest
//! gains happen to agree very closely does not refuse an ordinary one. A fixed fraction of the median would not do: late in a run
//! updates shrink and a 2-sequence gain is noise around a median near zero, so such a
//! rule refuses honest updates for noise; early on the median is large and the same
//! fraction lets an update that does nothing through.
//!
//! How much an accepted update is suspected decides which is replayed
//! ([`crate::audit_picks`]); measurements this small are noisy, so they aim the audits
//! instead of cutting honest pay. Suspicion adds three things: the node's own-data
//! margin (its update fits the batches it was assigned no better than other data)
//! accumulated over its rounds since its last passed audit in [`History`], so the
//! evidence grows with every round a wrong-data node keeps up; how far its norm lies
//! from the round's median beyond what honest updates show (a lazy node's update is
//! shorter); and how far its gain lies below the round's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_protocol::NodeId;

use crate::{median, VerifyConfig};

/// What a validator measured of one committed update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    pub node: NodeId,
    /// The tokens the node's assignment holds.
    pub tokens: u64,
    /// The decoded update's L2 norm.
    pub norm: f64,
    /// Loss before minus after applying the update alone (positive helps), on data the
    /// node was not assigned: held-out sequences, or other nodes' assigned sequences.
    pub gain_heldout: f64,
    /// The same on sequences of the node's own assignment…
    pub gain_own: f64,
    /// …and what it would be there if the node had not trained on them (the gain on
    /// random training data, or an estimate of it from other updates on the same
    /// sequences). `gain_own − gain_random` is the own-data margin.
    pub gain_random: f64,
    /// Trained from another θ than the round's.
    pub stale: bool,
    /// Copies this earlier commit ([`crate::find_copies`]).
    pub copy_of: Option<NodeId>,
}

/// Why an update was refused (or, for [`Flag::AuditFailed`], its node forfeited).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "flag", rename_all = "snake_case")]
pub enum Flag {
    Copy {
        of: NodeId,
    },
    Stale,
    NormHigh {
        ratio: f64,
    },
    NormLow {
        ratio: f64,
    },
    /// The gain, in spreads from the round's median (negative: below it).
    Harmful {
        gain: f64,
        spreads: f64,
    },
    AuditFailed {
        rel_err: f64,
    },
}

impl Flag {
    /// A refusal on a measurement (norm, gain) rather than a proof (copy, stale, failed
    /// audit): a replay that matches clears it, since the work is then the node's own.
    pub fn is_measured(&self) -> bool {
        matches!(
            self,
            Flag::NormHigh { .. } | Flag::NormLow { .. } | Flag::Harmful { .. }
        )
    }
}

/// The verdict on one update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judgement {
    pub node: NodeId,
    /// Part of the aggregate and paid.
    pub accepted: bool,
    /// The pay weight, 0 to 1: a node earns tokens × score.
    pub score: f64,
    pub flags: Vec<Flag>,
    /// How strongly the update is suspected (higher is audited first; an update refused
    /// on a measurement is audited before any accepted one).
    pub suspicion: f64,
    /// This round's own-data margin in spreads from the round's median; [`crate::settle`]
    /// adds it to the node's [`History`].
    pub own_spreads: f64,
}

/// What a validator carries from round to round: each node's own-data evidence since
/// its last passed audit, and the audits the rate has paid for but not yet spent. Plain
/// data (serde), so a hub keeps it with its round state; [`crate::settle`] updates it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    pub(crate) nodes: BTreeMap<NodeId, NodeRecord>,
    /// Audits earned (`audit_rate` × updates judged) and not yet spent, below 1 after
    /// every round.
    pub(crate) audit_credit: f64,
}

/// One node's accumulated own-data evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The sum of its rounds' own-data margins, each in spreads from its round's median.
    pub own_spreads_sum: f64,
    /// Rounds summed.
    pub rounds: u64,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// The node's evidence since its last passed audit.
    pub fn record(&self, node: &NodeId) -> NodeRecord {
        self.nodes.get(node).copied().unwrap_or_default()
    }

    /// Audits earned and not yet spent.
    pub fn audit_credit(&self) -> f64 {
        self.audit_credit
    }
}

/// The round's median and spread (1.4826 × the median absolute deviation) of `values`,
/// computed again over the values within 3 spreads of the first median, so that the
/// outliers a check exists to find do not widen the spread they are measured against
/// (with 2 of 8 values far off, the first spread is about 1.7 times the honest one for
/// normal data). The spread is at least `floor`, so a round whose values agree closely
/// does not turn every small difference into an outlier.
pub(crate) fn center_spread(values: &[f64], floor: f64) -> (f64, f64) {
    let raw = |v: &mut Vec<f64>| {
        let mid = median(v);
        let mut dev: Vec<f64> = v.iter().map(|x| (x - mid).abs()).collect();
        (mid, 1.4826 * median(&mut dev))
    };
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let (mid, spread) = raw(&mut v);
    let mut inliers: Vec<f64> = v
        .iter()
        .copied()
        .filter(|x| (x - mid).abs() <= 3.0 * spread)
        .collect();
    let (mid, spread) = if inliers.len() * 2 > v.len() {
        raw(&mut inliers)
    } else {
        (mid, spread)
    };
    (mid, spread.max(floor).max(f64::MIN_POSITIVE))
}

/// Judges every update of a round, with the nodes' evidence of earlier rounds. The
/// medians and spreads are over all of the round's updates, so a minority of attackers
/// can't move them far. `history` is read, not changed: [`crate::settle`] records the
/// round once its audits are in.
pub fn judge(evidence: &[Evidence], history: &History, cfg: &VerifyConfig) -> Vec<Judgement> {
    let norm_median = median(&mut evidence.iter().map(|e| e.norm).collect::<Vec<_>>());
    let log_norms: Vec<f64> = evidence
        .iter()
        .filter(|e| e.norm > 0.0 && norm_median > 0.0)
        .map(|e| (e.norm / norm_median).ln())
        .collect();
    let (_, norm_spread) = center_spread(&log_norms, cfg.norm_spread_floor);
    let gains: Vec<f64> = evidence.iter().map(|e| e.gain_heldout).collect();
    let (gain_mid, gain_spread) = center_spread(&gains, 0.0);
    let gain_spread = gain_spread.max(cfg.gain_spread_floor * gain_mid.abs());
    let margin = |e: &Evidence| e.gain_own - e.gain_random;
    let margins: Vec<f64> = evidence.iter().map(margin).collect();
    let (margin_mid, margin_spread) = center_spread(&margins, 0.0);
    evidence
        .iter()
        .map(|e| {
            let mut flags = Vec::new();
            if let Some(of) = e.copy_of {
                flags.push(Flag::Copy { of });
            }
            if e.stale {
                flags.push(Flag::Stale);
            }
            let ratio = if norm_median > 0.0 {
                e.norm / norm_median
            } else {
                1.0
            };
            if ratio > cfg.norm_ratio_max || !ratio.is_finite() {
                flags.push(Flag::NormHigh { ratio });
            } else if ratio < cfg.norm_ratio_min {
                flags.push(Flag::NormLow { ratio });
            }
            let gain_spreads = (e.gain_heldout - gain_mid) / gain_spread;
            if gain_spreads < -cfg.harm_spreads_max || !e.gain_heldout.is_finite() {
                flags.push(Flag::Harmful {
                    gain: e.gain_heldout,
                    spreads: gain_spreads,
                });
            }
            let own_spreads = if margin(e).is_finite() {
                (margin(e) - margin_mid) / margin_spread
            } else {
                0.0
            };
            let past = history.record(&e.node);
            // The accumulated margin as a z-score: a sum of n rounds' values, each of
            // spread 1 for an honest node, divided by √n.
            let own_z = (past.own_spreads_sum + own_spreads) / ((past.rounds + 1) as f64).sqrt();
            let norm_spreads = if ratio > 0.0 && ratio.is_finite() {
                ratio.ln().abs() / norm_spread
            } else {
                f64::INFINITY
            };
            let excess = |x: f64| (x - cfg.suspicion_spreads_min).max(0.0);
            let suspicion = -own_z + excess(norm_spreads) + excess(-gain_spreads);
            let accepted = flags.is_empty();
            Judgement {
                node: e.node,
                accepted,
                score: if accepted { 1.0 } else { 0.0 },
                flags,
                suspicion: if suspicion.is_finite() {
                    suspicion
                } else {
                    f64::MAX
                },
                own_spreads,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn honest(i: u8, gain: f64) -> Evidence {
        Evidence {
            node: NodeId([i; 32]),
            tokens: 1000,
            norm: 1.0 + 0.005 * f64::from(i % 3),
            gain_heldout: gain,
            gain_own: gain + 0.02 + 0.002 * f64::from(i % 4),
            gain_random: gain,
            stale: false,
            copy_of: None,
        }
    }

    const GAINS: [f64; 8] = [0.01, 0.012, 0.007, 0.009, 0.011, 0.0085, 0.013, 0.008];

    fn round() -> Vec<Evidence> {
        (0..8).map(|i| honest(i, GAINS[i as usize])).collect()
    }

    #[test]
    fn honest_updates_are_accepted_even_with_noisy_gains() {
        let j = judge(&round(), &History::new(), &VerifyConfig::default());
        assert!(j.iter().all(|j| j.accepted && j.score == 1.0), "{j:?}");
    }

    #[test]
    fn each_hard_refusal_names_its_reason() {
        let mut round = round();
        round[0].norm = 100.0; // scale:100
        round[1].norm = 0.0; // zero
        round[2].gain_heldout = -0.01; // sign flip
        round[3].copy_of = Some(NodeId([7; 32]));
        round[4].stale = true;
        let j = judge(&round, &History::new(), &VerifyConfig::default());
        assert!(
            matches!(j[0].flags[..], [Flag::NormHigh { .. }]),
            "{:?}",
            j[0]
        );
        assert!(
            matches!(j[1].flags[..], [Flag::NormLow { .. }]),
            "{:?}",
            j[1]
        );
        assert!(
            matches!(j[2].flags[..], [Flag::Harmful { .. }]),
            "{:?}",
            j[2]
        );
        assert!(matches!(j[3].flags[..], [Flag::Copy { .. }]), "{:?}", j[3]);
        assert!(matches!(j[4].flags[..], [Flag::Stale]), "{:?}", j[4]);
        assert!(j[..5].iter().all(|j| !j.accepted && j.score == 0.0));
        assert!(j[5..].iter().all(|j| j.accepted));
    }

    /// The first full run's story: an update that does nothing (noise, gain ≈ 0) early
    /// in a run, when honest gains sit well above zero and close together, passed a
    /// rule that refused only gains below −0.5 × the median. Against the round's spread
    /// it is an outlier.
    #[test]
    fn a_gain_far_below_the_rounds_spread_is_refused_even_when_positive() {
        // Honest gains of an early round: well above zero and close together.
        let early = [
            0.0140, 0.0138, 0.0131, 0.0135, 0.0142, 0.0129, 0.0137, 0.0133,
        ];
        let mut round: Vec<Evidence> = (0..8).map(|i| honest(i, early[i as usize])).collect();
        round[7].gain_heldout = 0.0005;
        let j = judge(&round, &History::new(), &VerifyConfig::default());
        assert!(
            matches!(j[7].flags[..], [Flag::Harmful { spreads, .. }] if spreads < -6.0),
            "{:?}",
            j[7]
        );
        assert!(j[..7].iter().all(|j| j.accepted));
    }

    /// The other half of that story: late in a run updates shrink, gains are noise
    /// around a median near zero, and a rule relative to the median refused honest
    /// updates whose gain was slightly negative. Relative to the spread they are
    /// ordinary.
    #[test]
    fn tiny_late_gains_around_zero_are_not_refused() {
        let late = [0.003, -0.002, 0.001, 0.004, -0.001, 0.0, 0.002, -0.003];
        let round: Vec<Evidence> = (0..8).map(|i| honest(i, late[i as usize])).collect();
        let j = judge(&round, &History::new(), &VerifyConfig::default());
        assert!(j.iter().all(|j| j.accepted), "{j:?}");
    }

    /// A lazy node trains part of its steps: its norm is inside the accepted band but
    /// far from the round's median, where honest norms cluster; that alone makes it
    /// the most suspected, though its own-data margin looks ordinary.
    #[test]
    fn a_short_update_is_suspected_first() {
        let mut round = round();
        round[5].norm = 0.6;
        let j = judge(&round, &History::new(), &VerifyConfig::default());
        assert!(j[5].accepted);
        let most = j
            .iter()
            .max_by(|a, b| a.suspicion.total_cmp(&b.suspicion))
            .unwrap();
        assert_eq!(most.node, NodeId([5; 32]));
    }

    /// A wrong-data node's margin is only a little below honest ones in any one round,
    /// within the noise; summed over its rounds it stands out. With history, a node
    /// whose margin was lowest in every earlier round is suspected above one whose
    /// margin is lowest only now.
    #[test]
    fn own_data_evidence_accumulates_over_rounds() {
        let mut round = round();
        round[2].gain_own = round[2].gain_random; // lowest margin this round
        round[6].gain_own = round[6].gain_random + 0.004;
        let fresh = judge(&round, &History::new(), &VerifyConfig::default());
        assert!(fresh[2].suspicion > fresh[6].suspicion);
        let mut history = History::new();
        history.nodes.insert(
            NodeId([6; 32]),
            NodeRecord {
                own_spreads_sum: -14.0,
                rounds: 4,
            },
        );
        let j = judge(&round, &history, &VerifyConfig::default());
        assert!(j[6].suspicion > j[2].suspicion, "{j:?}");
        assert!(j[6].accepted);
    }
}
