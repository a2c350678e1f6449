//! Separating what an update did for the data its node trained on from how good it
//! is in general: the fit of a round's cross scores ([`cross_evidence`]).

use crate::median_or_nan as median;

/// The validator's scoring of a round: the gain of every update on sequences of its
/// own assignment and on those of the next few nodes in commit order (cyclically; the
/// trainer's `validate::scored_sets`). The loss at θ on every set is computed once and
/// shared.
///
/// Read the gains `D[s][u]` of update `u` on set `s` as `m + α_s + β_u`, plus an own-data
/// effect where `s = u`: `α_s`, how much set `s` gains from any update; `β_u`, how good
/// update `u` is. The gain on data the node was not assigned is `m + β_u`, its mean
/// gain on the other sets once their `α` is taken off, comparable across updates
/// although each was scored on other sets; what the update would gain on its own set
/// had it not trained on it is `m + α_u + β_u`, and the own-data margin is `D[u][u]` less
/// that. Both differences cancel what a single comparison of own against random data
/// cannot (how easy a set is to improve, how good an update is generally) and leave the
/// effect of having trained on the set: in the first full run, where own and random
/// data were compared directly on 2 sequences each, that effect was about one standard
/// deviation of the noise.
///
/// The effects are fitted by alternating means (least squares on the cells scored),
/// leaving out of the set effects the updates whose median gain is an outlier of the
/// round (beyond 3 spreads), because the updates scored on a set may include crafted
/// ones. With a plain median of the raw gains on each set instead, a sign-flipped update
/// dragged its sets' `α` by the size of an honest gain, which spread every update's
/// gain elsewhere so much that noise and sign flips were no longer outliers.
///
/// Returns, per update: the gain elsewhere, the gain on its own set, and the expected
/// gain there.
pub fn cross_evidence(gains: &[Vec<(usize, f64)>]) -> Vec<(f64, f64, f64)> {
    let m = gains.len();
    let off_diagonal = |u: usize| gains[u].iter().filter(move |(s, _)| *s != u);
    let first: Vec<f64> = (0..m)
        .map(|u| median(&mut off_diagonal(u).map(|(_, g)| *g).collect::<Vec<_>>()))
        .collect();
    let finite: Vec<f64> = first.iter().copied().filter(|x| x.is_finite()).collect();
    let center = median(&mut finite.clone());
    let spread = 1.4826
        * median(
            &mut finite
                .iter()
                .map(|x| (x - center).abs())
                .collect::<Vec<_>>(),
        );
    let inlier: Vec<bool> = first
        .iter()
        .map(|f| f.is_finite() && (f - center).abs() <= 3.0 * spread)
        .collect();
    let mut alpha = vec![0.0; m];
    let mut beta = vec![0.0; m];
    for _ in 0..50 {
        for (u, b) in beta.iter_mut().enumerate() {
            let (sum, count) =
                off_diagonal(u).fold((0.0, 0usize), |(a, c), &(s, g)| (a + g - alpha[s], c + 1));
            *b = if count > 0 { sum / count as f64 } else { 0.0 };
        }
        let mut sums = vec![(0.0, 0usize); m];
        for u in (0..m).filter(|&u| inlier[u]) {
            for &(s, g) in off_diagonal(u) {
                sums[s].0 += g - beta[u];
                sums[s].1 += 1;
            }
        }
        let fitted: Vec<Option<f64>> = sums
            .iter()
            .map(|&(a, c)| (c > 0).then(|| a / c as f64))
            .collect();
        let known: Vec<f64> = fitted.iter().flatten().copied().collect();
        let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
        // A set no inlier update was scored on has no effect to fit.
        alpha = fitted.iter().map(|a| a.map_or(0.0, |a| a - mean)).collect();
    }
    (0..m)
        .map(|u| {
            let own = gains[u]
                .iter()
                .find(|(s, _)| *s == u)
                .map_or(f64::NAN, |(_, g)| *g);
            let elsewhere = if off_diagonal(u).next().is_some() {
                beta[u]
            } else {
                own
            };
            (elsewhere, own, elsewhere + alpha[u])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gains built as `m + α_s + β_u` plus an own-data effect, each update scored on its
    /// own set and the next 4, with update 6 sign-flipped (its gains negated): the fit
    /// recovers every honest update's gain elsewhere and own-data margin exactly, and
    /// the flipped one stays an outlier instead of spreading the others.
    #[test]
    fn cross_evidence_separates_set_update_and_own_effects() {
        let m = 8;
        let alpha = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, -0.03, 0.005];
        let beta = [0.001, -0.002, 0.0, 0.003, -0.001, 0.002, 0.0, -0.003];
        let own = 0.01;
        let gains: Vec<Vec<(usize, f64)>> = (0..m)
            .map(|u| {
                (0..=4)
                    .map(|k| {
                        let s = (u + k) % m;
                        let g = 0.05 + alpha[s] + beta[u] + if s == u { own } else { 0.0 };
                        (s, if u == 6 { -g } else { g })
                    })
                    .collect()
            })
            .collect();
        let ev = cross_evidence(&gains);
        for u in (0..m).filter(|&u| u != 6) {
            let (elsewhere, g_own, expected) = ev[u];
            // Up to the constant the medians leave (the same for every update).
            let c = ev[0].0 - (0.05 + beta[0]);
            assert!(
                (elsewhere - (0.05 + beta[u]) - c).abs() < 1e-9,
                "{u}: {ev:?}"
            );
            assert!((g_own - expected - own).abs() < 1e-9, "{u}: {ev:?}");
        }
        assert!(ev[6].0 < -0.04, "{:?}", ev[6]);
    }
}
