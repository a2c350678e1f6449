//! Copy detection between the updates of one round.
//!
//! Commit before reveal: a node commits its update's hash before any update of the
//! round can be fetched, so a copier needs the update in advance (a colluder), or
//! commits later than the original. Two updates are compared when the positions they
//! keep overlap by at least [`VerifyConfig::copy_overlap_min`] (cheap: a merge of two
//! sorted supports), and are copies when their cosine similarity is at least
//! [`VerifyConfig::copy_cosine_min`]. Of a copied pair, the one committed first is
//! credited and the later one is the copier. An exact copy has overlap and cosine 1; a
//! copy with small noise added keeps nearly the same top-k positions and a cosine near
//! 1; independent honest updates of the same θ share some structure but far less.

use tessera_protocol::NodeId;

use crate::VerifyConfig;

/// One committed update, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub node: NodeId,
    /// The commit's place in the round's commit order (lower committed first).
    pub order: u64,
    pub update: &'a [f32],
}

/// A later update found to copy an earlier one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopyFinding {
    pub copier: NodeId,
    pub original: NodeId,
    /// |A ∩ B| / min(|A|, |B|) of the nonzero positions.
    pub overlap: f64,
    pub cosine: f64,
}

fn support(update: &[f32]) -> Vec<u32> {
    update
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0.0)
        .map(|(i, _)| i as u32)
        .collect()
}

fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let smaller = a.len().min(b.len());
    if smaller == 0 {
        0.0
    } else {
        both as f64 / smaller as f64
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

/// Every copied pair of the round, the later committer as the copier. A node is named
/// copier at most once (with the earliest original it matches). Empty updates copy
/// nothing (they are refused for their norm).
pub fn find_copies(candidates: &[Candidate<'_>], cfg: &VerifyConfig) -> Vec<CopyFinding> {
    let mut ordered: Vec<&Candidate<'_>> = candidates.iter().collect();
    ordered.sort_by_key(|c| (c.order, c.node));
    let supports: Vec<Vec<u32>> = ordered.iter().map(|c| support(c.update)).collect();
    let mut found = Vec::new();
    for later in 1..ordered.len() {
        for earlier in 0..later {
            let o = overlap(&supports[earlier], &supports[later]);
            if o < cfg.copy_overlap_min {
                continue;
            }
            let c = cosine(ordered[earlier].update, ordered[later].update);
            if c >= cfg.copy_cosine_min {
                found.push(CopyFinding {
                    copier: ordered[later].node,
                    original: ordered[earlier].node,
                    overlap: o,
                    cosine: c,
                });
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    /// A sparse update keeping `k` of `n` positions, chosen by `seed`.
    fn sparse(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let noise = crate::testing::noise(n, seed);
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| noise[b].abs().total_cmp(&noise[a].abs()));
        let mut u = vec![0f32; n];
        for &i in &idx[..k] {
            u[i] = noise[i];
        }
        u
    }

    #[test]
    fn exact_and_noisy_copies_are_found_and_the_first_committer_kept() {
        let n = 8192;
        let original = sparse(n, 90, 1);
        let honest = sparse(n, 90, 2);
        let exact = original.clone();
        // A copy with small noise on its kept values.
        let noisy: Vec<f32> = original
            .iter()
            .zip(crate::testing::noise(n, 3))
            .map(|(&v, e)| if v != 0.0 { v + 0.05 * e } else { 0.0 })
            .collect();
        let cands = [
            Candidate {
                node: id(4),
                order: 3,
                update: &exact,
            },
            Candidate {
                node: id(1),
                order: 0,
                update: &original,
            },
            Candidate {
                node: id(2),
                order: 1,
                update: &honest,
            },
            Candidate {
                node: id(3),
                order: 2,
                update: &noisy,
            },
        ];
        let found = find_copies(&cands, &VerifyConfig::default());
        let pairs: Vec<(NodeId, NodeId)> = found.iter().map(|f| (f.copier, f.original)).collect();
        assert_eq!(pairs, vec![(id(3), id(1)), (id(4), id(1))]);
        assert_eq!(found[1].overlap, 1.0);
        assert!(found[1].cosine > 0.999_999);
    }

    #[test]
    fn independent_and_empty_updates_are_not_copies() {
        let n = 8192;
        let a = sparse(n, 90, 5);
        let b = sparse(n, 90, 6);
        let zero = vec![0f32; n];
        let cands = [
            Candidate {
                node: id(1),
                order: 0,
                update: &a,
            },
            Candidate {
                node: id(2),
                order: 1,
                update: &b,
            },
            Candidate {
                node: id(3),
                order: 2,
                update: &zero,
            },
            Candidate {
                node: id(4),
                order: 3,
                update: &zero,
            },
        ];
        assert!(find_copies(&cands, &VerifyConfig::default()).is_empty());
    }

    /// Same positions, unrelated values (an attacker keeping an honest support but
    /// writing its own values) is not a copy: the cosine decides.
    #[test]
    fn the_same_support_with_other_values_is_not_a_copy() {
        let n = 4096;
        let a = sparse(n, 64, 7);
        let other = crate::testing::noise(n, 8);
        let b: Vec<f32> = a
            .iter()
            .zip(&other)
            .map(|(&v, &o)| if v != 0.0 { o } else { 0.0 })
            .collect();
        let cands = [
            Candidate {
                node: id(1),
                order: 0,
                update: &a,
            },
            Candidate {
                node: id(2),
                order: 1,
                update: &b,
            },
        ];
        assert!(find_copies(&cands, &VerifyConfig::default()).is_empty());
    }
}

/// What [`copies_in_round`] found: this round's copies (copier → original) and the
/// updates that repeat one of last round's (stale).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundCopies {
    pub copy_of: std::collections::BTreeMap<NodeId, NodeId>,
    pub stale: std::collections::BTreeSet<NodeId>,
}

/// The id a last-round update takes among the candidates, so that a node repeating its
/// own earlier update is found too (it never equals a node's own id).
fn previous_id(node: &NodeId) -> NodeId {
    NodeId(blake3::derive_key(
        "tessera previous-round copy candidate",
        node.as_bytes(),
    ))
}

/// Copies among a round's commits (`committed`, in commit order; the first committer is
/// credited) and of last round's accepted updates (`previous`: a stale update).
pub fn copies_in_round(
    previous: &[(NodeId, &[f32])],
    committed: &[(NodeId, &[f32])],
    cfg: &VerifyConfig,
) -> RoundCopies {
    let mut candidates: Vec<Candidate> = previous
        .iter()
        .enumerate()
        .map(|(k, (n, u))| Candidate {
            node: previous_id(n),
            order: k as u64,
            update: u,
        })
        .collect();
    let base = candidates.len() as u64;
    candidates.extend(committed.iter().enumerate().map(|(k, (n, u))| Candidate {
        node: *n,
        order: base + k as u64,
        update: u,
    }));
    let old: std::collections::BTreeSet<NodeId> =
        previous.iter().map(|(n, _)| previous_id(n)).collect();
    let mut found = RoundCopies::default();
    for f in find_copies(&candidates, cfg) {
        if old.contains(&f.copier) {
            continue;
        }
        if old.contains(&f.original) {
            found.stale.insert(f.copier);
        } else {
            found.copy_of.insert(f.copier, f.original);
        }
    }
    found
}
