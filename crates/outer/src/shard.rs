//! Sharded aggregation: θ's parameters split into contiguous shards, each combined by a
//! few aggregator members chosen afresh every round, so that what one node sends and
//! receives does not grow with the number of nodes.
//!
//! With `n` accepted updates and redundancy `r`, a round has `S = shard_count(n, r, P)`
//! shards: about `n / r`, so that every member aggregates at most one shard, but never
//! fewer than one codec chunk ([`SHARD_ALIGN`] parameters) per shard. Each accepted node
//! sends shard `s` of its update (a `1/S` piece) to the `r` aggregators of `s`; an
//! aggregator receives `n` pieces of `P/S` parameters, about `r` updates' worth; every
//! node fetches the `S` aggregated shards, about one update's worth. Per node that is
//! O(|update|) whatever `n` is, as long as `n / r ≤ P / SHARD_ALIGN`; past that the
//! shard count is capped and an aggregator receives `n / S` pieces per shard (a second
//! level of reduction would remove that; it is not built).
//!
//! Who aggregates what is drawn by [`assign`] from a seed the round's accepted updates
//! determine ([`assignment_seed`]), so nobody knows it before the round closes. Every
//! aggregator of a shard must publish the same bytes (the outer loop is deterministic
//! f32); [`settle`] compares what they reported, and a shard whose reports disagree, are
//! missing, or are checked anyway is recomputed by the party holding the updates. A
//! report that differs from the recomputed shard is a wrong aggregation: its sender's
//! work is refused.
//!
//! Pure functions, no I/O.

use std::ops::Range;

/// Shards hold whole multiples of this many parameters (the default codec's chunk), so
/// a shard's piece of an update is encoded exactly as that part of the whole update.
pub const SHARD_ALIGN: usize = 4096;

/// Most aggregators per shard a run may ask for.
pub const REDUNDANCY_MAX: usize = 8;

/// How many shards a round of `members` accepted updates has, with `redundancy`
/// aggregators per shard, over `params` parameters: `members / redundancy`, at least 1,
/// at most one shard per [`SHARD_ALIGN`] parameters.
pub fn shard_count(members: usize, redundancy: usize, params: usize) -> usize {
    let chunks = params.div_ceil(SHARD_ALIGN).max(1);
    (members / redundancy.max(1)).clamp(1, chunks)
}

/// Contiguous shards over `params` parameters, each a whole number of
/// [`SHARD_ALIGN`]-sized chunks (the last chunk may be partial), as even as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    bounds: Vec<usize>,
}

impl ShardLayout {
    /// `shards` is clamped to `1..=` the number of chunks.
    pub fn new(params: usize, shards: usize) -> ShardLayout {
        let chunks = params.div_ceil(SHARD_ALIGN).max(1);
        let shards = shards.clamp(1, chunks);
        let (per, extra) = (chunks / shards, chunks % shards);
        let mut bounds = Vec::with_capacity(shards + 1);
        let mut chunk = 0;
        bounds.push(0);
        for s in 0..shards {
            chunk += per + usize::from(s < extra);
            bounds.push((chunk * SHARD_ALIGN).min(params));
        }
        ShardLayout { bounds }
    }

    pub fn count(&self) -> usize {
        self.bounds.len() - 1
    }

    /// The parameters of shard `s`.
    pub fn range(&self, s: usize) -> Range<usize> {
        self.bounds[s]..self.bounds[s + 1]
    }

    pub fn len(&self, s: usize) -> usize {
        self.bounds[s + 1] - self.bounds[s]
    }

    /// Whether the layout covers no parameters.
    pub fn is_empty(&self) -> bool {
        self.bounds.last() == Some(&0)
    }
}

/// The seed a round's aggregator assignment is drawn from: a hash of the round and of
/// its accepted updates in order, known to everyone once the round has closed and to
/// nobody before.
pub fn assignment_seed<'a>(round: u64, accepted: impl IntoIterator<Item = &'a [u8; 32]>) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tessera shard assignment v1");
    h.update(&round.to_le_bytes());
    for blob in accepted {
        h.update(blob);
    }
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The aggregators of every shard, as indices into the round's `members` (its accepted
/// nodes, in the order every party lists them): `min(redundancy, members)` distinct
/// members per shard. A seeded shuffle puts the members in a random order and shard
/// `s`'s `j`-th aggregator is member `perm[(s + j·S) mod n]`, so when `S·r ≤ n` no member
/// aggregates two shards, and otherwise loads differ by at most one.
pub fn assign(seed: u64, members: usize, shards: usize, redundancy: usize) -> Vec<Vec<usize>> {
    if members == 0 {
        return vec![Vec::new(); shards];
    }
    let mut perm: Vec<usize> = (0..members).collect();
    let mut rng = crate::rng::SplitMix64::new(seed);
    for i in (1..members).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let r = redundancy.clamp(1, members);
    (0..shards)
        .map(|s| {
            let mut picked: Vec<usize> = Vec::with_capacity(r);
            let mut k = 0;
            while picked.len() < r {
                let m = perm[(s + k * shards) % members];
                if !picked.contains(&m) {
                    picked.push(m);
                }
                k += 1;
                if k > members * 2 {
                    // Only when S divides n and r > n / S: walk the rest in order.
                    for &m in &perm {
                        if picked.len() == r {
                            break;
                        }
                        if !picked.contains(&m) {
                            picked.push(m);
                        }
                    }
                }
            }
            picked
        })
        .collect()
}

/// How one shard's aggregation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The shard's content hash every node applies.
    pub hash: [u8; 32],
    /// Whether the shard had to be (or was chosen to be) recomputed.
    pub recomputed: bool,
    /// Aggregators (indices into the reports) whose shard differs from the recomputed
    /// one: their work is refused.
    pub wrong: Vec<usize>,
    /// Aggregators that reported nothing.
    pub missing: Vec<usize>,
}

/// Settles a shard from its aggregators' reported hashes (`None`: nothing reported).
/// When at least two reports arrived, all of them agree, none is missing and `check` is
/// false, their hash stands. Otherwise `recompute` gives the true hash: a report that
/// differs from it is wrong. With fewer than two reports nothing can be compared, so the
/// shard is always recomputed.
pub fn settle(
    reports: &[Option<[u8; 32]>],
    check: bool,
    recompute: impl FnOnce() -> [u8; 32],
) -> Settled {
    let missing: Vec<usize> = (0..reports.len())
        .filter(|&i| reports[i].is_none())
        .collect();
    let given: Vec<[u8; 32]> = reports.iter().flatten().copied().collect();
    let agree = given.len() >= 2 && given.iter().all(|h| *h == given[0]);
    if agree && missing.is_empty() && !check {
        return Settled {
            hash: given[0],
            recomputed: false,
            wrong: Vec::new(),
            missing,
        };
    }
    let truth = recompute();
    let wrong = (0..reports.len())
        .filter(|&i| matches!(reports[i], Some(h) if h != truth))
        .collect();
    Settled {
        hash: truth,
        recomputed: true,
        wrong,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_count_follows_members_over_redundancy_within_the_chunks() {
        assert_eq!(shard_count(100, 2, 10_000_000), 50);
        assert_eq!(shard_count(101, 2, 10_000_000), 50);
        assert_eq!(shard_count(1, 2, 10_000_000), 1);
        assert_eq!(shard_count(0, 2, 10_000_000), 1);
        // 3 chunks of 4096 at most.
        assert_eq!(shard_count(100, 2, 3 * 4096 - 5), 3);
        assert_eq!(shard_count(10_000, 2, 500_000_000), 5_000);
    }

    #[test]
    fn layouts_cover_every_parameter_once_in_whole_chunks() {
        for (params, shards) in [
            (1usize, 1usize),
            (4096, 3),
            (10_000, 2),
            (3_666_944, 50),
            (3_666_944, 5_000),
            (123_457, 7),
        ] {
            let l = ShardLayout::new(params, shards);
            assert!(l.count() >= 1 && l.count() <= shards.max(1));
            let mut next = 0;
            for s in 0..l.count() {
                let r = l.range(s);
                assert_eq!(
                    r.start, next,
                    "{params}/{shards}: shard {s} starts where the last ended"
                );
                assert!(r.end > r.start, "{params}/{shards}: shard {s} is empty");
                assert!(r.start.is_multiple_of(SHARD_ALIGN), "whole chunks");
                next = r.end;
            }
            assert_eq!(next, params, "{params}/{shards}: every parameter covered");
            // As even as possible: sizes differ by at most one chunk.
            let sizes: Vec<usize> = (0..l.count() - 1).map(|s| l.len(s)).collect();
            if let (Some(lo), Some(hi)) = (sizes.iter().min(), sizes.iter().max()) {
                assert!(hi - lo <= SHARD_ALIGN);
            }
        }
        assert_eq!(ShardLayout::new(3 * 4096, 10).count(), 3);
    }

    #[test]
    fn assignment_is_distinct_per_shard_and_spreads_the_load() {
        for (n, r) in [
            (100usize, 2usize),
            (101, 2),
            (1000, 3),
            (7, 2),
            (5, 8),
            (1, 2),
        ] {
            let s = shard_count(n, r, 500_000_000);
            let a = assign(42, n, s, r);
            assert_eq!(a.len(), s);
            let mut load = vec![0usize; n];
            for shard in &a {
                assert_eq!(shard.len(), r.min(n));
                let mut sorted = shard.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), shard.len(), "distinct aggregators per shard");
                for &m in shard {
                    load[m] += 1;
                }
            }
            let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            if s * r <= n {
                assert!(*hi <= 1, "n {n} r {r}: nobody aggregates two shards");
            }
            assert!(hi - lo <= 1 || n < r, "n {n} r {r}: loads {lo}..{hi}");
        }
    }

    #[test]
    fn assignment_depends_on_the_seed_and_nothing_else() {
        let a = assign(7, 100, 50, 2);
        assert_eq!(a, assign(7, 100, 50, 2));
        assert_ne!(a, assign(8, 100, 50, 2));
        let blobs = [[1u8; 32], [2u8; 32]];
        let s1 = assignment_seed(3, &blobs);
        assert_eq!(s1, assignment_seed(3, &blobs));
        assert_ne!(s1, assignment_seed(4, &blobs));
        assert_ne!(s1, assignment_seed(3, &[[1u8; 32], [3u8; 32]]));
    }

    #[test]
    fn settling_accepts_agreement_and_names_the_wrong_aggregator() {
        let good = [9u8; 32];
        let bad = [6u8; 32];
        let mut called = false;
        let s = settle(&[Some(good), Some(good)], false, || {
            called = true;
            good
        });
        assert!(!s.recomputed && !called && s.wrong.is_empty() && s.hash == good);

        let s = settle(&[Some(good), Some(bad)], false, || good);
        assert!(s.recomputed);
        assert_eq!(s.wrong, vec![1]);
        assert_eq!(s.hash, good);

        // Two colluding aggregators agree on a wrong shard: only a check finds them.
        let s = settle(&[Some(bad), Some(bad)], false, || good);
        assert_eq!(s.hash, bad);
        let s = settle(&[Some(bad), Some(bad)], true, || good);
        assert_eq!((s.hash, s.wrong.clone()), (good, vec![0, 1]));

        // A missing report means a recompute; a lone report is never trusted.
        let s = settle(&[Some(good), None], false, || good);
        assert!(s.recomputed && s.wrong.is_empty());
        assert_eq!(s.missing, vec![1]);
        let s = settle(&[Some(bad)], false, || good);
        assert_eq!((s.recomputed, s.wrong.clone()), (true, vec![0]));
    }
}
