//! Update blobs (one target per codec) and the hub's checkpoint blob, both from
//! `tessera-outer`.
//!
//! A hub decodes every committed blob with `decode_for(run's codec, blob, θ's length)`,
//! and every node decodes the round's accepted blobs the same way. The run's codec and
//! length are trusted; the blob is not. The update targets take the run's codec from
//! the blob's own header when the header names the target's codec (so the payload
//! decoders are reached at every block and chunk shape, not only the default ones),
//! and the default codec of a run otherwise (so a blob of another codec or other
//! parameters is refused first); the length is the one the header claims when it is
//! at most a `nano` model's, else the `nano` model's.

use tessera_outer::shard::ShardInputs;
use tessera_outer::{decode, decode_for, encode, slice, Codec, CodecKind, OuterState};

/// The header: magic (4), codec id (1), elements (u64), chunk (u32), k (u32), bits (u8).
const HEADER_BYTES: usize = 22;

pub fn update_none(data: &[u8]) {
    update(CodecKind::None, data)
}

pub fn update_int8(data: &[u8]) {
    update(CodecKind::Int8, data)
}

pub fn update_topk(data: &[u8]) {
    update(CodecKind::TopK, data)
}

pub fn update_lowrank(data: &[u8]) {
    update(CodecKind::LowRank, data)
}

/// The codec a run of `kind` uses with Tessera's shipped settings (`RunSpec::default`:
/// top-k keeps 44 per chunk at 4 bits, low-rank is rank 4).
pub fn run_codec(kind: CodecKind) -> Codec {
    kind.codec(44, 4, 4).expect("shipped settings are valid")
}

/// The run's codec and element count for `blob`, as described at the top.
fn run_for(kind: CodecKind, blob: &[u8]) -> (Codec, u64) {
    let nano = crate::nano_params();
    if blob.len() < HEADER_BYTES {
        return (run_codec(kind), nano);
    }
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().expect("4 bytes"));
    let n = u64::from_le_bytes(blob[5..13].try_into().expect("8 bytes"));
    let (chunk, k, bits) = (u32_at(13), u32_at(17), blob[21]);
    let from_header = match (kind, blob[4]) {
        (CodecKind::None, 0) => Some(Codec::None),
        (CodecKind::Int8, 1) => Some(Codec::Int8 { chunk }),
        (CodecKind::TopK, 2) => Some(Codec::TopK { chunk, k, bits }),
        (CodecKind::LowRank, 3) => Some(Codec::LowRank {
            rows: k,
            cols: chunk,
            rank: bits,
        }),
        _ => None,
    };
    (
        from_header.unwrap_or_else(|| run_codec(kind)),
        if n <= nano { n } else { nano },
    )
}

/// Decodes `blob` as a run of `kind` would and checks what an accepted update promises.
pub fn update(kind: CodecKind, blob: &[u8]) {
    let (run, n) = run_for(kind, blob);
    let Ok(out) = decode_for(run, blob, n) else {
        return;
    };
    assert_eq!(out.len() as u64, n, "decoded length differs from the run's");
    // Every aggregator sums or sorts these into θ: one inf or NaN poisons the model.
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        panic!("{run:?} blob decoded to {} at element {i}", out[i]);
    }
    // The header-named decoder agrees with the run's when the codec is the run's.
    assert_eq!(decode(blob, n).as_ref(), Ok(&out));
    match run {
        Codec::None => {
            // Lossless: encoding the decoded values gives them back.
            let mut residual = vec![0f32; out.len()];
            let again = encode(run, &out, &mut residual, 1.0);
            assert_eq!(again.len(), blob.len());
            assert_eq!(decode(&again, n).as_ref(), Ok(&out));
        }
        Codec::TopK { chunk, k, .. } => {
            for (ci, c) in out.chunks(chunk as usize).enumerate() {
                let kept = c.iter().filter(|v| **v != 0.0).count();
                assert!(
                    kept <= k as usize,
                    "chunk {ci} holds {kept} values, k = {k}"
                );
            }
        }
        Codec::Int8 { .. } | Codec::LowRank { .. } => {}
    }
    // A shard's piece (sharded aggregation) decodes to exactly that part of the update.
    let chunk = match run {
        Codec::None => 1,
        Codec::Int8 { chunk } | Codec::TopK { chunk, .. } => chunk as usize,
        Codec::LowRank { .. } => return,
    };
    let chunks = out.len().div_ceil(chunk);
    for (a, b) in [(0, chunks.div_ceil(2)), (chunks / 2, chunks)] {
        let range = a * chunk..(b * chunk).min(out.len());
        if range.is_empty() {
            continue;
        }
        let piece = slice(run, blob, n, range.clone()).expect("a valid update slices");
        let part = decode_for(run, &piece, range.len() as u64).expect("a piece decodes");
        assert!(
            part.iter()
                .zip(&out[range.clone()])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{run:?}: the piece {range:?} decodes to other values"
        );
    }
}

/// `ShardInputs::from_bytes`: what a shard's aggregator reads (each accepted update's
/// piece hash and scale). The member count is taken from the length when it is a
/// whole number of entries, else from the first byte; a parsed blob re-encodes to the
/// same bytes and its scales are within (0, 1].
pub fn shard_inputs(data: &[u8]) {
    let members = if data.len() >= 20 && (data.len() - 20).is_multiple_of(36) {
        (data.len() - 20) / 36
    } else {
        data.first().map_or(0, |&b| usize::from(b))
    };
    let (round, shard) = if data.len() >= 16 {
        (
            u64::from_le_bytes(data[4..12].try_into().expect("8 bytes")),
            u32::from_le_bytes(data[12..16].try_into().expect("4 bytes")),
        )
    } else {
        (0, 0)
    };
    for m in [members, usize::MAX] {
        let Ok(inputs) = ShardInputs::from_bytes(data, round, shard, m) else {
            continue;
        };
        assert_eq!(inputs.pieces.len(), m);
        assert!(inputs.pieces.iter().all(|(_, s)| *s > 0.0 && *s <= 1.0));
        assert_eq!(inputs.to_bytes(), data, "shard inputs do not re-encode");
    }
}

/// Outer learning rate and momentum of the checkpoint target's run; they only seed the
/// optimizer object, the bytes do not carry them.
const LR: f32 = 0.7;
const MOMENTUM: f32 = 0.9;

/// `OuterState::from_bytes`: a node joining a run loads the hub's checkpoint blob
/// (round, θ, velocity) for a model whose parameter count it knows. The target takes
/// that count from the blob's length when it is a whole number of parameters (so valid
/// blobs are reached), and from the blob's first byte otherwise.
pub fn checkpoint(data: &[u8]) {
    let n_params = if data.len() >= 8 && (data.len() - 8).is_multiple_of(8) {
        (data.len() - 8) / 8
    } else {
        data.first().map_or(0, |&b| usize::from(b))
    };
    for n in [n_params, crate::nano_params() as usize, usize::MAX / 4] {
        let Ok(state) = OuterState::from_bytes(data, n, LR, MOMENTUM) else {
            continue;
        };
        assert_eq!(state.theta.len(), n);
        assert_eq!(state.outer.velocity.len(), n);
        // The format is canonical: every byte is a field, read without arithmetic.
        assert_eq!(state.to_bytes(), data, "checkpoint does not re-encode");
    }
}
