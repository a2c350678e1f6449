//! The outer state of a run: θ, the outer optimizer's velocity and the round. It is
//! what a joining node needs to continue, and what a checkpoint blob holds.
//!
//! Checkpoint bytes: the round (u64), then θ, then the velocity (f32 each), all
//! little-endian, with no header: the run fixes the parameter count, lr and momentum.

use crate::{aggregate, decode_for, theta_hash, Aggregator, Codec, CodecError, Nesterov};

/// θ with the outer optimizer's velocity: what a joiner needs to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterState {
    pub round: u64,
    pub theta: Vec<f32>,
    pub outer: Nesterov,
}

impl OuterState {
    /// Round 0 at `theta`, with zero velocity.
    pub fn from_theta(theta: Vec<f32>, lr: f32, momentum: f32) -> OuterState {
        let outer = Nesterov::new(theta.len(), lr, momentum);
        OuterState {
            round: 0,
            theta,
            outer,
        }
    }

    pub fn hash(&self) -> String {
        theta_hash(&self.theta)
    }

    /// The hash of θ as bytes (see [`crate::theta_digest`]).
    pub fn digest(&self) -> [u8; 32] {
        crate::theta_digest(&self.theta)
    }

    /// Decodes the accepted updates (in node-id order; each must use the run's `codec`),
    /// aggregates them, and takes the outer step; the state moves to the next round. A round with no updates only
    /// advances the round. A blob that does not decode leaves the state unchanged.
    pub fn apply(
        &mut self,
        codec: Codec,
        aggregator: Aggregator,
        blobs: &[Vec<u8>],
    ) -> Result<(), CodecError> {
        let n = self.theta.len() as u64;
        let updates = blobs
            .iter()
            .map(|b| decode_for(codec, b, n))
            .collect::<Result<Vec<_>, _>>()?;
        self.apply_decoded(aggregator, &updates);
        Ok(())
    }

    /// [`OuterState::apply`] for updates already decoded.
    ///
    /// Panics when an update's length differs from θ's: decoding against θ's length
    /// rules that out, so it would be a bug.
    pub fn apply_decoded(&mut self, aggregator: Aggregator, updates: &[Vec<f32>]) {
        if !updates.is_empty() {
            let g = aggregate(aggregator, updates);
            self.outer.step(&mut self.theta, &g);
        }
        self.round += 1;
    }

    /// The outer step with an aggregate already combined (sharded aggregation: the
    /// decoded aggregated shards, concatenated). Panics when its length differs from
    /// θ's: callers decode every shard against its length first.
    pub fn apply_aggregate(&mut self, aggregate: &[f32]) {
        assert_eq!(aggregate.len(), self.theta.len(), "aggregate length");
        self.outer.step(&mut self.theta, aggregate);
        self.round += 1;
    }

    /// `round`, θ and velocity as little-endian bytes (a checkpoint blob).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.theta.len());
        out.extend_from_slice(&self.round.to_le_bytes());
        for v in self.theta.iter().chain(&self.outer.velocity) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads a checkpoint blob of a run with `n_params` parameters, checking its
    /// length before allocating.
    pub fn from_bytes(
        bytes: &[u8],
        n_params: usize,
        lr: f32,
        momentum: f32,
    ) -> Result<OuterState, String> {
        let expected = n_params.checked_mul(8).and_then(|b| b.checked_add(8));
        if expected != Some(bytes.len()) {
            return Err(match expected {
                Some(expected) => format!(
                    "checkpoint is {} bytes; the run's model needs {expected}",
                    bytes.len()
                ),
                None => format!(
                    "checkpoint is {} bytes; a model of {n_params} parameters cannot be \
                     held in memory",
                    bytes.len()
                ),
            });
        }
        let round = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let floats: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let (theta, velocity) = floats.split_at(n_params);
        let mut outer = Nesterov::new(n_params, lr, momentum);
        outer.velocity = velocity.to_vec();
        Ok(OuterState {
            round,
            theta: theta.to_vec(),
            outer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::noise;
    use crate::{encode, Codec};

    #[test]
    fn checkpoint_bytes_round_trip_and_wrong_lengths_are_refused() {
        let mut s = OuterState::from_theta(noise(10, 1), 0.7, 0.9);
        assert_eq!(s.round, 0);
        assert_eq!(s.outer.velocity, vec![0.0; 10]);
        s.apply_decoded(Aggregator::Mean, &[noise(10, 2)]);
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 8 + 8 * 10);
        assert_eq!(OuterState::from_bytes(&bytes, 10, 0.7, 0.9), Ok(s.clone()));
        let err = OuterState::from_bytes(&bytes, 11, 0.7, 0.9).unwrap_err();
        assert_eq!(err, "checkpoint is 88 bytes; the run's model needs 96");
        assert!(OuterState::from_bytes(&bytes[..87], 10, 0.7, 0.9).is_err());
        // A parameter count whose byte size overflows is refused, not allocated.
        assert!(OuterState::from_bytes(&bytes, usize::MAX / 4, 0.7, 0.9).is_err());
    }

    #[test]
    fn apply_decodes_aggregates_steps_and_advances_the_round() {
        let n = 100;
        let theta = noise(n, 3);
        let mut s = OuterState::from_theta(theta.clone(), 0.7, 0.9);
        let codec = Codec::Int8 { chunk: 32 };
        s.apply(codec, Aggregator::Median, &[]).unwrap();
        assert_eq!((s.round, &s.theta), (1, &theta));

        let blobs: Vec<Vec<u8>> = (0..3)
            .map(|i| encode(codec, &noise(n, 10 + i), &mut vec![0.0; n], 1.0))
            .collect();
        let mut by_hand = s.clone();
        let updates: Vec<Vec<f32>> = blobs
            .iter()
            .map(|b| crate::decode(b, n as u64).unwrap())
            .collect();
        by_hand
            .outer
            .step(&mut by_hand.theta, &aggregate(Aggregator::Median, &updates));
        by_hand.round += 1;
        s.apply(codec, Aggregator::Median, &blobs).unwrap();
        assert_eq!(s, by_hand);

        // One bad blob refuses the whole round and changes nothing.
        let before = s.clone();
        let mut bad = blobs.clone();
        bad[1].truncate(10);
        assert!(matches!(
            s.apply(codec, Aggregator::Median, &bad),
            Err(CodecError::Short { len: 10 })
        ));
        assert_eq!(s, before);
        // So does a blob of another codec than the run's.
        let other = encode(Codec::None, &noise(n, 5), &mut vec![0.0; n], 1.0);
        assert!(matches!(
            s.apply(codec, Aggregator::Median, &[blobs[0].clone(), other]),
            Err(CodecError::WrongCodec { .. })
        ));
        assert_eq!(s, before);
    }

    /// Three rounds of three nodes through every codec and aggregator, pinned to the
    /// θ hashes and blob hashes the code gave before it moved out of `tessera-train`.
    /// A failure here means θ hashes of runs changed: some floating-point operation
    /// moved, or the wire format did. That must never happen silently.
    #[test]
    fn the_outer_loop_is_bit_identical_to_the_pinned_runs() {
        const AGGREGATORS: [Aggregator; 4] = [
            Aggregator::Mean,
            Aggregator::Median,
            Aggregator::TrimmedMean { trim: 1 },
            Aggregator::NormClip { factor: 2.0 },
        ];
        // Per codec: the blob hash, then the θ hash under each aggregator (first 16
        // hex digits of each).
        let pinned: [(Codec, &str, [&str; 4]); 6] = [
            (
                Codec::None,
                "50167747d58cad8d",
                [
                    "00e20d5578f029ac",
                    "f12e29d032dfcd60",
                    "f12e29d032dfcd60",
                    "00e20d5578f029ac",
                ],
            ),
            (
                Codec::parse("int8", 0, 0).unwrap(),
                "9425303923eff2da",
                [
                    "000348c111262d1a",
                    "82ee78fc66f3c187",
                    "82ee78fc66f3c187",
                    "000348c111262d1a",
                ],
            ),
            (
                Codec::parse("topk", 40, 4).unwrap(),
                "7d783585a034b17b",
                [
                    "a012ab846c279a97",
                    "5e177749a62641e2",
                    "5e177749a62641e2",
                    "a012ab846c279a97",
                ],
            ),
            (
                Codec::parse("topk", 7, 1).unwrap(),
                "f72d2c7337d6da9c",
                [
                    "7283d09e93926181",
                    "05715a6571bd81fe",
                    "05715a6571bd81fe",
                    "7283d09e93926181",
                ],
            ),
            (
                Codec::parse("lowrank", 4, 0).unwrap(),
                "04ee48f9839ce751",
                [
                    "7091921cf8ca01af",
                    "3f1e0ad099deae0f",
                    "3f1e0ad099deae0f",
                    "7091921cf8ca01af",
                ],
            ),
            (
                Codec::LowRank {
                    rows: 16,
                    cols: 16,
                    rank: 3,
                },
                "86b21d812abc6d25",
                [
                    "9692eb8b56045751",
                    "bb33d981f628cfa4",
                    "bb33d981f628cfa4",
                    "9692eb8b56045751",
                ],
            ),
        ];
        // More than one 1024 × 256 low-rank block, plus a partial block and a raw tail.
        let n = 300_000usize;
        for (ci, (codec, blobs_pinned, thetas_pinned)) in pinned.iter().enumerate() {
            for (agg, theta_pinned) in AGGREGATORS.iter().zip(thetas_pinned) {
                let mut state = OuterState::from_theta(noise(n, 1000), 0.7, 0.9);
                let mut residuals = vec![vec![0f32; n]; 3];
                let mut blob_hash = blake3::Hasher::new();
                for round in 0..3u64 {
                    let blobs: Vec<Vec<u8>> = residuals
                        .iter_mut()
                        .enumerate()
                        .map(|(i, r)| {
                            let d = noise(n, 10 * round + i as u64 + 7 * ci as u64);
                            encode(*codec, &d, r, 0.9)
                        })
                        .collect();
                    for b in &blobs {
                        blob_hash.update(b);
                    }
                    state.apply(*codec, *agg, &blobs).unwrap();
                }
                assert_eq!(state.round, 3);
                let blob_hex = blob_hash.finalize().to_hex().to_string();
                assert_eq!(&blob_hex[..16], *blobs_pinned, "{codec:?} blobs");
                assert_eq!(&state.hash()[..16], *theta_pinned, "{codec:?} {agg:?} θ");
            }
        }
    }
}
