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
            // The orbit of `s` first; when it holds fewer than `r` members (S divides
            // n and r > n / S), the rest in shuffled order.
            let mut picked: Vec<usize> = Vec::with_capacity(r);
            let orbit = (0..members).map(|k| perm[(s + k * shards) % members]);
            for m in orbit.chain(perm.iter().copied()) {
                if picked.len() == r {
                    break;
                }
                if !picked.contains(&m) {
                    picked.push(m);
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

/// What a shard's aggregators combine: for each accepted update, in the round's order,
/// the hash of its piece of the shard and the scale the whole update is combined with
/// ([`crate::update_scales`]; norms need whole updates, which only the hub holds).
/// Published by the hub as a blob whose hash the round's record names.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardInputs {
    pub round: u64,
    pub shard: u32,
    pub pieces: Vec<([u8; 32], f32)>,
}

const INPUTS_MAGIC: [u8; 4] = *b"TSI1";
const INPUTS_HEADER: usize = 4 + 8 + 4 + 4;

impl ShardInputs {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INPUTS_HEADER + 36 * self.pieces.len());
        out.extend_from_slice(&INPUTS_MAGIC);
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for (hash, scale) in &self.pieces {
            out.extend_from_slice(hash);
            out.extend_from_slice(&scale.to_le_bytes());
        }
        out
    }

    /// Parses the inputs of shard `shard` of round `round`, of exactly `members`
    /// pieces; every scale must be finite and within (0, 1].
    pub fn from_bytes(
        bytes: &[u8],
        round: u64,
        shard: u32,
        members: usize,
    ) -> Result<ShardInputs, String> {
        let expected = members
            .checked_mul(36)
            .and_then(|b| b.checked_add(INPUTS_HEADER));
        if Some(bytes.len()) != expected {
            return Err(format!(
                "shard inputs are {} bytes; {members} pieces take {}",
                bytes.len(),
                expected.map_or("more than memory".into(), |e| e.to_string())
            ));
        }
        if bytes[..4] != INPUTS_MAGIC {
            return Err("shard inputs have bad magic bytes".into());
        }
        let got_round = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
        let got_shard = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let n = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
        if (got_round, got_shard, n) != (round, shard, members) {
            return Err(format!(
                "shard inputs are for round {got_round} shard {got_shard} ({n} pieces), \
                 expected round {round} shard {shard} ({members})"
            ));
        }
        let pieces = bytes[INPUTS_HEADER..]
            .chunks_exact(36)
            .map(|c| {
                let scale = f32::from_le_bytes(c[32..].try_into().expect("4 bytes"));
                if !(scale > 0.0 && scale <= 1.0) {
                    return Err(format!("shard input scale {scale} is not within (0, 1]"));
                }
                Ok((c[..32].try_into().expect("32 bytes"), scale))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ShardInputs {
            round,
            shard,
            pieces,
        })
    }
}

/// One shard's aggregate, as its aggregators and the hub publish it: the decoded pieces
/// combined with their scales ([`crate::combine`], element by element, so equal to that
/// shard of the whole aggregate), then encoded with the run's codec from a zero
/// residual. Deterministic: every honest aggregator publishes the same bytes.
pub fn aggregate_shard(
    codec: crate::Codec,
    aggregator: crate::Aggregator,
    pieces: &[&[f32]],
    scales: &[f32],
) -> Vec<u8> {
    let combined = crate::combine(aggregator, pieces, scales);
    crate::encode(codec, &combined, &mut vec![0.0; combined.len()], 1.0)
}

/// A round's sharded aggregation from the whole decoded updates, as the party holding
/// them (the hub; an independent validator checking it) computes it: the scales, each
/// shard of `layout` as its aggregators must publish it (the shard codec's encoding of
/// that shard of the combined update, equal to [`aggregate_shard`] over the pieces),
/// and the decoded shards end to end: the aggregate every member applies.
pub struct WholeAggregate {
    pub scales: Vec<f32>,
    pub shards: Vec<Vec<u8>>,
    pub applied: Vec<f32>,
}

pub fn aggregate_whole(
    shard_codec: crate::Codec,
    aggregator: crate::Aggregator,
    updates: &[&[f32]],
    layout: &ShardLayout,
) -> Result<WholeAggregate, crate::CodecError> {
    let scales = crate::update_scales(aggregator, updates);
    let combined = crate::combine(aggregator, updates, &scales);
    let mut shards = Vec::with_capacity(layout.count());
    let mut applied = Vec::with_capacity(combined.len());
    for s in 0..layout.count() {
        let r = layout.range(s);
        let blob = crate::encode(
            shard_codec,
            &combined[r.clone()],
            &mut vec![0.0; r.len()],
            1.0,
        );
        applied.extend(crate::decode_for(shard_codec, &blob, r.len() as u64)?);
        shards.push(blob);
    }
    Ok(WholeAggregate {
        scales,
        shards,
        applied,
    })
}

/// Where the re-compression residual lives: with the contributors. The aggregated
/// shard keeps only what the codec keeps (top-k: `k` positions per chunk of the
/// combined update); at every position it dropped (zero in `applied`), a node whose
/// update was accepted puts its own sent value (`own`) back into its error-feedback
/// `residual`, to be sent again next round. Summed over the nodes this is what the
/// aggregate dropped, up to the aggregator's scales, so nothing is lost; it costs no
/// traffic and no node holds anything but its own residual.
pub fn keep_what_was_dropped(own: &[f32], applied: &[f32], residual: &mut [f32]) {
    for ((r, &o), &a) in residual.iter_mut().zip(own).zip(applied) {
        if a == 0.0 && o != 0.0 {
            *r += o;
        }
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
    fn shard_inputs_round_trip_and_refuse_anything_else() {
        let inputs = ShardInputs {
            round: 7,
            shard: 2,
            pieces: vec![([1; 32], 1.0), ([2; 32], 0.25)],
        };
        let bytes = inputs.to_bytes();
        assert_eq!(ShardInputs::from_bytes(&bytes, 7, 2, 2), Ok(inputs.clone()));
        assert!(
            ShardInputs::from_bytes(&bytes, 8, 2, 2).is_err(),
            "another round"
        );
        assert!(
            ShardInputs::from_bytes(&bytes, 7, 3, 2).is_err(),
            "another shard"
        );
        assert!(
            ShardInputs::from_bytes(&bytes, 7, 2, 3).is_err(),
            "another count"
        );
        assert!(ShardInputs::from_bytes(&bytes[..bytes.len() - 1], 7, 2, 2).is_err());
        for bad in [0.0f32, -1.0, 1.5, f32::NAN] {
            let mut b = bytes.clone();
            let at = b.len() - 4;
            b[at..].copy_from_slice(&bad.to_le_bytes());
            assert!(ShardInputs::from_bytes(&b, 7, 2, 2).is_err(), "scale {bad}");
        }
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(ShardInputs::from_bytes(&b, 7, 2, 2).is_err(), "magic");
        assert!(ShardInputs::from_bytes(&bytes, 7, 2, usize::MAX).is_err());
    }

    #[test]
    fn shards_aggregated_apart_decode_to_the_whole_aggregates_shards() {
        use crate::{decode, encode, slice, update_scales, Aggregator, Codec};
        let n = 5 * SHARD_ALIGN + 100;
        let codec = Codec::TopK {
            chunk: 4096,
            k: 44,
            bits: 4,
        };
        let blobs: Vec<Vec<u8>> = (0..4u32)
            .map(|k| {
                let d: Vec<f32> = (0..n as u32)
                    .map(|i| (((i * 2654435761u32) ^ (k * 40503)) % 1000) as f32 * 1e-3 - 0.5)
                    .collect();
                encode(codec, &d, &mut vec![0.0; n], 1.0)
            })
            .collect();
        let whole: Vec<Vec<f32>> = blobs.iter().map(|b| decode(b, n as u64).unwrap()).collect();
        let refs: Vec<&[f32]> = whole.iter().map(Vec::as_slice).collect();
        let agg = Aggregator::NormClip { factor: 1.0 };
        let scales = update_scales(agg, &refs);
        let all = crate::combine(agg, &refs, &scales);
        let layout = ShardLayout::new(n, 3);
        let whole_agg = aggregate_whole(codec, agg, &refs, &layout).unwrap();
        assert_eq!(whole_agg.scales, scales);
        let mut applied = Vec::new();
        for s in 0..layout.count() {
            let r = layout.range(s);
            let pieces: Vec<Vec<f32>> = blobs
                .iter()
                .map(|b| {
                    let p = slice(codec, b, n as u64, r.clone()).unwrap();
                    decode(&p, r.len() as u64).unwrap()
                })
                .collect();
            let prefs: Vec<&[f32]> = pieces.iter().map(Vec::as_slice).collect();
            let a = aggregate_shard(codec, agg, &prefs, &scales);
            let direct = encode(codec, &all[r.clone()], &mut vec![0.0; r.len()], 1.0);
            assert_eq!(
                a, direct,
                "shard {s}: the same bytes as encoding the whole aggregate's shard"
            );
            assert_eq!(a, whole_agg.shards[s], "shard {s}: what the hub publishes");
            applied.extend(decode(&a, r.len() as u64).unwrap());
        }
        assert_eq!(applied, whole_agg.applied);
    }

    #[test]
    fn what_the_aggregate_dropped_goes_back_to_its_senders() {
        let own = [0.5, -0.25, 0.0, 2.0];
        let applied = [0.4, 0.0, 0.0, 0.0];
        let mut residual = [0.1, 0.1, 0.1, 0.1];
        keep_what_was_dropped(&own, &applied, &mut residual);
        assert_eq!(residual, [0.1, -0.15, 0.1, 2.1]);
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
