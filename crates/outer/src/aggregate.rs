//! Combining the accepted updates of a round into one pseudo-gradient.
//!
//! Every aggregator reads the updates in the order given (the caller agrees on it, by
//! node id) and sums in a fixed order, so every node gets the same floats. The robust
//! ones bound what a minority of bad updates can do to θ.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::UnknownName;

/// How updates from several nodes are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "aggregator", rename_all = "snake_case")]
pub enum Aggregator {
    Mean,
    /// Per coordinate, drop the `trim` largest and `trim` smallest values, then average.
    TrimmedMean {
        trim: usize,
    },
    /// Coordinate-wise median (the mean of the middle two for an even count).
    Median,
    /// Scale each update to at most `factor` × the median update norm, then average.
    NormClip {
        factor: f32,
    },
}

impl Aggregator {
    /// The name a run file uses for this aggregator. Parameters are not part of the
    /// name: any `TrimmedMean` is `trimmed_mean`, although only `trim: 1` parses back;
    /// `NormClip` at factor 1 is `clipped_mean`, at any other factor `norm_clip`.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregator::Mean => "mean",
            Aggregator::Median => "median",
            Aggregator::TrimmedMean { .. } => "trimmed_mean",
            Aggregator::NormClip { factor } if *factor == 1.0 => "clipped_mean",
            Aggregator::NormClip { .. } => "norm_clip",
        }
    }
}

/// A run file's aggregator name, with the parameters runs have always used:
/// `trimmed_mean` drops one value at each end, `norm_clip` clips at twice the median
/// norm, `clipped_mean` at the median norm (what the validator aggregates accepted
/// updates with: `tessera_verify::clipped_mean`).
impl FromStr for Aggregator {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<Aggregator, UnknownName> {
        Ok(match name {
            "mean" => Aggregator::Mean,
            "median" => Aggregator::Median,
            "trimmed_mean" => Aggregator::TrimmedMean { trim: 1 },
            "norm_clip" => Aggregator::NormClip { factor: 2.0 },
            "clipped_mean" => Aggregator::NormClip { factor: 1.0 },
            other => {
                return Err(UnknownName {
                    what: "aggregator",
                    name: other.to_string(),
                    expected: "mean, median, trimmed_mean, norm_clip or clipped_mean",
                })
            }
        })
    }
}

/// Aggregates `updates` (in a fixed, agreed order) into one: [`combine`] with the
/// [`update_scales`] of the whole updates.
///
/// Panics when `updates` is empty or the updates differ in length: callers decode
/// every update against the same expected length first.
pub fn aggregate(agg: Aggregator, updates: &[Vec<f32>]) -> Vec<f32> {
    let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
    combine(agg, &refs, &update_scales(agg, &refs))
}

/// What each whole update is multiplied by before it is combined: 1, except under
/// `NormClip`, where an update longer than `factor` × the round's median norm is scaled
/// down to it. Norms need whole updates; a shard's aggregator is given these.
pub fn update_scales(agg: Aggregator, updates: &[&[f32]]) -> Vec<f32> {
    let m = updates.len();
    match agg {
        Aggregator::NormClip { factor } if m > 0 => {
            let norms: Vec<f32> = updates
                .iter()
                .map(|u| u.iter().map(|v| v * v).sum::<f32>().sqrt())
                .collect();
            let mut sorted = norms.clone();
            sorted.sort_by(f32::total_cmp);
            let limit = factor * sorted[m / 2];
            norms
                .iter()
                .map(|&norm| {
                    if norm > limit && norm > 0.0 {
                        limit / norm
                    } else {
                        1.0
                    }
                })
                .collect()
        }
        _ => vec![1.0; m],
    }
}

/// Combines `updates` (in a fixed, agreed order), each multiplied by its `scales`
/// entry, element by element: element `i` of the result depends only on element `i` of
/// each update, so the aggregate of a shard's pieces is that shard of the aggregate of
/// the whole updates, bit for bit (the mean, trimmed mean and median ignore `scales`,
/// which are 1 for them).
///
/// Panics when `updates` is empty, the updates differ in length, or `scales` has
/// another count.
pub fn combine(agg: Aggregator, updates: &[&[f32]], scales: &[f32]) -> Vec<f32> {
    assert!(!updates.is_empty(), "aggregate of no updates");
    assert_eq!(updates.len(), scales.len(), "one scale per update");
    let n = updates[0].len();
    assert!(
        updates.iter().all(|u| u.len() == n),
        "updates differ in length"
    );
    let m = updates.len();
    let mean_of = |scaled: bool| {
        let mut out = vec![0f32; n];
        for (u, &s) in updates.iter().zip(scales) {
            if scaled {
                for (o, v) in out.iter_mut().zip(u.iter()) {
                    *o += v * s;
                }
            } else {
                for (o, v) in out.iter_mut().zip(u.iter()) {
                    *o += v;
                }
            }
        }
        let inv = 1.0 / m as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        out
    };
    match agg {
        Aggregator::Mean => mean_of(false),
        Aggregator::TrimmedMean { .. } | Aggregator::Median if m == 1 => updates[0].to_vec(),
        Aggregator::TrimmedMean { trim } => {
            let trim = trim.min((m - 1) / 2);
            let mut col = vec![0f32; m];
            (0..n)
                .map(|i| {
                    for (c, u) in col.iter_mut().zip(updates) {
                        *c = u[i];
                    }
                    col.sort_by(f32::total_cmp);
                    let kept = &col[trim..m - trim];
                    kept.iter().sum::<f32>() / kept.len() as f32
                })
                .collect()
        }
        Aggregator::Median => {
            let mut col = vec![0f32; m];
            (0..n)
                .map(|i| {
                    for (c, u) in col.iter_mut().zip(updates) {
                        *c = u[i];
                    }
                    col.sort_by(f32::total_cmp);
                    if m % 2 == 1 {
                        col[m / 2]
                    } else {
                        0.5 * (col[m / 2 - 1] + col[m / 2])
                    }
                })
                .collect()
        }
        Aggregator::NormClip { .. } => mean_of(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregators_bound_what_a_minority_can_do() {
        let honest: Vec<Vec<f32>> = (0..4).map(|i| vec![1.0 + i as f32 * 0.01; 8]).collect();
        let mut all = honest.clone();
        all.push(vec![1000.0; 8]);
        let mean = aggregate(Aggregator::Mean, &all);
        assert!(mean[0] > 100.0);
        for agg in [
            Aggregator::Median,
            Aggregator::TrimmedMean { trim: 1 },
            Aggregator::NormClip { factor: 2.0 },
        ] {
            let a = aggregate(agg, &all);
            assert!(
                a.iter().all(|v| (0.9..=2.0 * 1.1).contains(v)),
                "{agg:?}: {a:?}"
            );
        }
        assert_eq!(
            aggregate(Aggregator::Median, &[vec![1.0], vec![3.0]]),
            vec![2.0]
        );
        assert_eq!(
            aggregate(
                Aggregator::TrimmedMean { trim: 1 },
                &[vec![1.0], vec![2.0], vec![9.0]]
            ),
            vec![2.0]
        );
    }

    #[test]
    fn a_shards_aggregate_is_that_shard_of_the_whole_aggregate_bit_for_bit() {
        let updates: Vec<Vec<f32>> = (0..5u32)
            .map(|k| {
                (0..1000u32)
                    .map(|i| ((i * 7 + k * 13) % 17) as f32 * 0.01 * (k as f32 + 0.5) - 0.05)
                    .collect()
            })
            .collect();
        for agg in [
            Aggregator::Mean,
            Aggregator::Median,
            Aggregator::TrimmedMean { trim: 1 },
            Aggregator::NormClip { factor: 1.0 },
            Aggregator::NormClip { factor: 2.0 },
        ] {
            let whole = aggregate(agg, &updates);
            let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
            let scales = update_scales(agg, &refs);
            for range in [0..300, 300..1000] {
                let pieces: Vec<&[f32]> = updates.iter().map(|u| &u[range.clone()]).collect();
                let part = combine(agg, &pieces, &scales);
                assert!(
                    part.iter()
                        .zip(&whole[range.clone()])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{agg:?} {range:?}"
                );
            }
        }
    }

    #[test]
    fn aggregator_names_round_trip_with_the_run_file_parameters() {
        for (name, agg) in [
            ("mean", Aggregator::Mean),
            ("median", Aggregator::Median),
            ("trimmed_mean", Aggregator::TrimmedMean { trim: 1 }),
            ("norm_clip", Aggregator::NormClip { factor: 2.0 }),
            ("clipped_mean", Aggregator::NormClip { factor: 1.0 }),
        ] {
            assert_eq!(name.parse::<Aggregator>(), Ok(agg));
            assert_eq!(agg.name(), name);
        }
        let err = "trimmed-mean".parse::<Aggregator>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown aggregator `trimmed-mean`; expected mean, median, trimmed_mean, norm_clip or clipped_mean"
        );
        assert_eq!(Aggregator::TrimmedMean { trim: 3 }.name(), "trimmed_mean");
    }
}
