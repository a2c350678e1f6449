//! The validator's judgement of a round's updates, as pure functions: which updates
//! are copies of another ([`find_copies`]), which are refused and what each accepted
//! one earns ([`judge`]), which are replayed ([`audit_picks`], [`audit_compare`]), the
//! round's final verdicts once the replays are in ([`settle`]), and the escrow that
//! holds pay until audits could have caught the work ([`Escrow`]). What a validator
//! carries from round to round — each node's own-data evidence and the audits it has
//! paid for — is plain data, [`History`], passed in and out explicitly.
//!
//! The key design choice is that everything here works on what the protocol gives a
//! validator — decoded updates in commit order, measured losses, replayed updates,
//! a seed drawn after commits close — and never on who is known to be adversarial, so
//! one [`VerifyConfig`] serves honest runs and every attack alike. Measuring losses and
//! replaying training need the model; that lives with the trainer, which hands the
//! figures in as [`Evidence`]. Nothing here does I/O, reads a clock or draws randomness
//! of its own.
//!
//! What each check catches is written on the check; the threat model as a whole is in
//! docs/threat-model.md.

mod audit;
mod copies;
mod cross;
mod escrow;
mod judge;

pub use audit::{audit_compare, audit_picks, audits_due, settle, AuditOutcome};
pub use copies::{copies_in_round, find_copies, Candidate, CopyFinding, RoundCopies};
pub use cross::cross_evidence;
pub use escrow::{Escrow, EscrowError};
pub use judge::{judge, Evidence, Flag, History, Judgement, NodeRecord};

use serde::{Deserialize, Serialize};
use tessera_outer::Aggregator;

/// The one validator configuration: the same settings for honest runs and every
/// attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Two updates whose kept positions overlap at least this much
    /// (|A ∩ B| / min(|A|, |B|)) are compared as possible copies.
    pub copy_overlap_min: f64,
    /// …and are copies when their cosine similarity is at least this.
    pub copy_cosine_min: f64,
    /// An update whose norm is above this many times the round's median is refused
    /// (a scaled update; the aggregate clips to the median norm in any case).
    pub norm_ratio_max: f64,
    /// An update whose norm is below this fraction of the round's median is refused
    /// (a free rider's empty update).
    pub norm_ratio_min: f64,
    /// An update whose gain on data it was not assigned lies more than this many
    /// spreads (1.4826 × the median absolute deviation) below the round's median is
    /// refused (noise, a flipped sign).
    pub harm_spreads_max: f64,
    /// The spread of the gains is at least this fraction of the round's median gain.
    /// With only 6-8 updates a round the median absolute deviation is sometimes a
    /// tenth of its usual size by chance, and honest gains then lie 10-35 spreads out;
    /// with this floor the lowest of 778 honest gains measured lay 4 spreads below.
    pub gain_spread_floor: f64,
    /// The smallest spread of the round's log norms (ln(norm / median)) that suspicion
    /// measures a norm against: honest updates of one round have norms within about 1%
    /// of each other, and a spread of near nothing would make any of them stand out.
    pub norm_spread_floor: f64,
    /// A norm or gain adds to an accepted update's suspicion only beyond this many
    /// spreads from the round's median, so the noise of honest measurements does not
    /// drown the own-data evidence.
    pub suspicion_spreads_min: f64,
    /// Updates replayed per update judged; the fraction not yet spent carries over in
    /// [`History`], as does the debt of replaying every update refused on a
    /// measurement. 1/8 is one replay per round of 8 nodes: replays then cost 12.5% of
    /// the training they check.
    pub audit_rate: f64,
    /// The most suspicious accepted update is replayed when its suspicion is at least
    /// this; below it, one drawn by the round's seed.
    pub audit_suspicion_min: f64,
    /// Largest relative L2 difference between a submitted and a replayed update that
    /// still counts as the same work.
    pub audit_tolerance: f64,
    /// Rounds a round's pay waits in escrow before it is released: longer than it takes
    /// the audits to find a node that does not do its work.
    pub escrow_rounds: u64,
}

impl Default for VerifyConfig {
    fn default() -> VerifyConfig {
        VerifyConfig {
            copy_overlap_min: 0.5,
            copy_cosine_min: 0.9,
            norm_ratio_max: 3.0,
            norm_ratio_min: 0.2,
            harm_spreads_max: 6.0,
            gain_spread_floor: 0.1,
            norm_spread_floor: 0.02,
            suspicion_spreads_min: 3.0,
            audit_rate: 0.125,
            audit_suspicion_min: 2.0,
            audit_tolerance: 1e-3,
            escrow_rounds: 8,
        }
    }
}

/// The robust aggregate of accepted updates: each clipped to the median norm of the
/// set, then averaged (`Aggregator::NormClip` with factor 1). A coordinate-wise median
/// is no choice for sparse updates: where supports differ, most coordinates hold a
/// value in fewer than half the updates and the median there is zero
/// (`a_median_of_sparse_updates_is_mostly_zero`).
pub fn clipped_mean(updates: &[&[f32]]) -> Vec<f32> {
    let owned: Vec<Vec<f32>> = updates.iter().map(|u| u.to_vec()).collect();
    tessera_outer::aggregate::aggregate(Aggregator::NormClip { factor: 1.0 }, &owned)
}

/// The L2 norm, summed in f64.
pub fn norm(update: &[f32]) -> f64 {
    update
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// The median of `values`, NaN for none (for fits where an empty set must not pass for
/// a zero).
pub(crate) fn median_or_nan(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        median(values)
    }
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
pub(crate) mod testing {
    /// Seeded values in (-0.01, 0.01) (SplitMix64), about a pseudo-gradient's size.
    pub fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.02
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sparse updates with different supports (as top-k gives): the coordinate-wise
    /// median is zero almost everywhere, so a median aggregate throws the round's work
    /// away; the clipped mean keeps it.
    #[test]
    fn a_median_of_sparse_updates_is_mostly_zero() {
        let n = 4096;
        let updates: Vec<Vec<f32>> = (0..8)
            .map(|i| {
                let mut u = vec![0f32; n];
                // Each keeps 1% of coordinates; supports overlap a little.
                for j in 0..41 {
                    u[(i * 37 + j * 97) % n] = 1.0;
                }
                u
            })
            .collect();
        let median = tessera_outer::aggregate::aggregate(Aggregator::Median, &updates);
        let kept = median.iter().filter(|v| **v != 0.0).count();
        let refs: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
        let clipped = clipped_mean(&refs);
        let kept_clipped = clipped.iter().filter(|v| **v != 0.0).count();
        assert!(
            kept * 10 < kept_clipped,
            "median kept {kept}, clipped mean {kept_clipped}"
        );
        assert!(norm(&median) < 0.1 * norm(&clipped));
    }

    #[test]
    fn clipped_mean_bounds_a_scaled_update() {
        let honest = vec![1f32; 16];
        let scaled = vec![100f32; 16];
        let agg = clipped_mean(&[&honest, &honest, &scaled]);
        // Clipped to the median norm, the scaled update counts as one honest update.
        assert!(agg.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{agg:?}");
    }

    #[test]
    fn the_config_has_one_text_form() {
        let c = VerifyConfig::default();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VerifyConfig>(&json).unwrap(), c);
        assert!(serde_json::from_str::<VerifyConfig>(r#"{"colour": 1}"#).is_err());
    }
}
