//! Judging a round's updates from what a validator measured of each.
//!
//! Hard refusals (the update is left out of the aggregate and earns nothing):
//! a copy of an earlier commit, a stale update (trained from another θ than the
//! round's), a norm far above the round's median (a scaled update) or far below it (an
//! empty one), and an update that makes the held-out loss clearly worse (noise, a
//! flipped sign). Everything else is accepted and earns its tokens. How much an
//! accepted update is suspected — it fits the node's own assigned batches no better
//! than random ones, or helps the held-out loss little — decides which updates are
//! replayed first ([`crate::audit_picks`]): measurements this small are noisy, so they
//! aim the audits instead of cutting honest pay.

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
    /// Held-out loss before minus after applying the update alone (positive helps).
    pub gain_heldout: f64,
    /// The same on batches of the node's own assignment…
    pub gain_own: f64,
    /// …and on random batches of the training data.
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
    Copy { of: NodeId },
    Stale,
    NormHigh { ratio: f64 },
    NormLow { ratio: f64 },
    Harmful { gain: f64 },
    AuditFailed { rel_err: f64 },
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
    /// How strongly an accepted update is suspected (higher is audited first).
    pub suspicion: f64,
}

/// Judges every update of a round. The medians are over all of the round's updates,
/// so a minority of attackers can't move them far.
pub fn judge(evidence: &[Evidence], cfg: &VerifyConfig) -> Vec<Judgement> {
    let norm_median = median(&mut evidence.iter().map(|e| e.norm).collect::<Vec<_>>());
    let gain_scale = median(
        &mut evidence
            .iter()
            .map(|e| e.gain_heldout.abs())
            .collect::<Vec<_>>(),
    )
    .max(f64::MIN_POSITIVE);
    let margin = |e: &Evidence| e.gain_own - e.gain_random;
    let margin_scale = median(&mut evidence.iter().map(|e| margin(e).abs()).collect::<Vec<_>>())
        .max(f64::MIN_POSITIVE);
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
            if e.gain_heldout < -cfg.harm_ratio_max * gain_scale || !e.gain_heldout.is_finite() {
                flags.push(Flag::Harmful {
                    gain: e.gain_heldout,
                });
            }
            let accepted = flags.is_empty();
            let suspicion = if accepted {
                -margin(e) / margin_scale - e.gain_heldout / gain_scale
            } else {
                0.0
            };
            Judgement {
                node: e.node,
                accepted,
                score: if accepted { 1.0 } else { 0.0 },
                flags,
                suspicion,
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
            norm: 1.0 + 0.05 * f64::from(i % 3),
            gain_heldout: gain,
            gain_own: gain + 0.02,
            gain_random: gain,
            stale: false,
            copy_of: None,
        }
    }

    #[test]
    fn honest_updates_are_accepted_even_with_noisy_gains() {
        let round: Vec<Evidence> = (0..8)
            .map(|i| {
                honest(
                    i,
                    [0.01, 0.012, -0.002, 0.009, 0.011, 0.0, 0.013, 0.008][i as usize],
                )
            })
            .collect();
        let j = judge(&round, &VerifyConfig::default());
        assert!(j.iter().all(|j| j.accepted && j.score == 1.0), "{j:?}");
    }

    #[test]
    fn each_hard_refusal_names_its_reason() {
        let mut round: Vec<Evidence> = (0..8).map(|i| honest(i, 0.01)).collect();
        round[0].norm = 100.0; // scale:100
        round[1].norm = 0.0; // zero
        round[2].gain_heldout = -0.01; // sign flip
        round[3].copy_of = Some(NodeId([7; 32]));
        round[4].stale = true;
        let j = judge(&round, &VerifyConfig::default());
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

    /// An update that fits its own batches no better than random ones, and helps
    /// little, is accepted but audited first.
    #[test]
    fn suspicion_ranks_the_update_that_does_not_fit_its_own_data_first() {
        let mut round: Vec<Evidence> = (0..8).map(|i| honest(i, 0.01)).collect();
        round[6].gain_own = round[6].gain_random; // wrong data
        round[6].gain_heldout = 0.004;
        let j = judge(&round, &VerifyConfig::default());
        assert!(j[6].accepted);
        let most = j
            .iter()
            .max_by(|a, b| a.suspicion.total_cmp(&b.suspicion))
            .unwrap();
        assert_eq!(most.node, NodeId([6; 32]));
    }
}
