//! The `topk` codec: per chunk, the `k` largest magnitudes, their positions as
//! Rice-coded gaps and their values as a sign and one of `2^(bits−1)` geometrically
//! spaced magnitudes.
//!
//! Payload: two f32 per chunk (the smallest level and the ratio between levels), then
//! one bit stream for all chunks: for each kept element its gap, sign and level.

use super::{f32_at, CodecError, HEADER_BYTES};
use crate::bits::{BitReader, BitWriter};

/// The most payload bytes `n` elements can take: the scales, plus the stream when
/// every gap takes its longest unary code.
pub(super) fn max_payload_bytes(n: usize, chunk: u32, k: u32, bits: u8) -> usize {
    let full = n / chunk as usize;
    let tail = n % chunk as usize;
    let bits_of = |len: usize| {
        let kept = (k as usize).min(len);
        let r = rice_parameter(len, kept) as usize;
        // Gaps sum to less than `len`: at most len >> r unary ones in all.
        kept * (1 + r + bits as usize) + (len >> r)
    };
    let total = full * bits_of(chunk as usize) + if tail > 0 { bits_of(tail) } else { 0 };
    8 * n.div_ceil(chunk as usize) + total.div_ceil(8)
}

/// The Rice parameter for gaps between `kept` sorted positions in `len`: about
/// log2 of the mean gap, a function of the sizes only so both sides agree.
fn rice_parameter(len: usize, kept: usize) -> u32 {
    (len / kept.max(1)).max(1).ilog2()
}

/// The magnitudes a top-k chunk's values may take: `levels` values from `lo`, each
/// `ratio` times the one before. Plain multiplications in a fixed order, so every
/// node computes the same floats.
fn magnitude_levels(lo: f32, ratio: f32, levels: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(levels);
    let mut m = lo;
    for _ in 0..levels {
        out.push(m);
        m *= ratio;
    }
    out
}

pub(super) fn encode(residual: &mut [f32], chunk: u32, k: u32, bits: u8, out: &mut Vec<u8>) {
    let levels = 1usize << (bits - 1);
    let mut stream = BitWriter::new();
    for c in residual.chunks_mut(chunk as usize) {
        let kept = (k as usize).min(c.len());
        let mut order: Vec<u32> = (0..c.len() as u32).collect();
        // Largest magnitude first; ties to the lower index, for determinism.
        order.sort_by(|&a, &b| {
            c[b as usize]
                .abs()
                .total_cmp(&c[a as usize].abs())
                .then(a.cmp(&b))
        });
        let mut idx: Vec<u32> = order[..kept].to_vec();
        idx.sort_unstable();
        let mags: Vec<f32> = idx.iter().map(|&i| c[i as usize].abs()).collect();
        let hi = mags.iter().copied().fold(0f32, f32::max);
        let lo = mags.iter().copied().filter(|&m| m > 0.0).fold(hi, f32::min);
        let (lo, ratio) = if levels == 1 {
            (mags.iter().sum::<f32>() / kept as f32, 1.0)
        } else if lo > 0.0 {
            (lo, (hi / lo).powf(1.0 / (levels - 1) as f32).max(1.0))
        } else {
            (0.0, 1.0)
        };
        out.extend_from_slice(&lo.to_le_bytes());
        out.extend_from_slice(&ratio.to_le_bytes());
        let table = magnitude_levels(lo, ratio, levels);
        let r = rice_parameter(c.len(), kept);
        let mut next = 0u32;
        for &i in &idx {
            stream.rice(u64::from(i - next), r);
            next = i + 1;
            let v = c[i as usize];
            let m = v.abs();
            // The nearest level (the table ascends).
            let q = table
                .iter()
                .enumerate()
                .min_by(|a, b| (a.1 - m).abs().total_cmp(&(b.1 - m).abs()))
                .map_or(0, |(q, _)| q);
            stream.put(u64::from(v < 0.0), 1);
            stream.put(q as u64, u32::from(bits) - 1);
            let sent = if v < 0.0 { -table[q] } else { table[q] };
            c[i as usize] = v - sent;
        }
    }
    out.extend_from_slice(&stream.finish());
}

/// Chunks `range` (whole chunks; see `super::slice`) of a valid payload for `n`
/// elements, appended to `out` as the payload of a `range.len()`-element update: their
/// scales, and their codes read from the stream and written again unchanged.
pub(super) fn slice(
    payload: &[u8],
    n: usize,
    range: std::ops::Range<usize>,
    chunk: u32,
    k: u32,
    bits: u8,
    out: &mut Vec<u8>,
) {
    let chunk = chunk as usize;
    let (first, last) = (range.start / chunk, range.end.div_ceil(chunk));
    let scales = 8 * n.div_ceil(chunk);
    out.extend_from_slice(&payload[8 * first..8 * last]);
    let mut stream = BitReader::new(&payload[scales..]);
    let mut writer = BitWriter::new();
    for ci in 0..last {
        let len = chunk.min(n - ci * chunk);
        let kept = (k as usize).min(len);
        let r = rice_parameter(len, kept);
        let max_q = (len >> r) as u64;
        for _ in 0..kept {
            let gap = stream.rice(r, max_q).expect("validated by decode");
            let sign = stream.bit().expect("validated by decode");
            let q = stream
                .take(u32::from(bits) - 1)
                .expect("validated by decode");
            if ci >= first {
                writer.rice(gap, r);
                writer.put(sign, 1);
                writer.put(q, u32::from(bits) - 1);
            }
        }
    }
    out.extend_from_slice(&writer.finish());
}

/// `payload` is at most [`max_payload_bytes`] long (`decode` checked that); it must
/// also hold every chunk's scales and end exactly where the bit stream does.
pub(super) fn decode(
    payload: &[u8],
    out: &mut [f32],
    chunk: u32,
    k: u32,
    bits: u8,
) -> Result<(), CodecError> {
    let levels = 1usize << (bits - 1);
    let chunks = out.len().div_ceil(chunk as usize);
    let scales = 8 * chunks;
    if payload.len() < scales {
        return Err(CodecError::Length {
            len: HEADER_BYTES + payload.len(),
            expected: HEADER_BYTES + scales,
        });
    }
    let mut stream = BitReader::new(&payload[scales..]);
    for (ci, c) in out.chunks_mut(chunk as usize).enumerate() {
        let kept = (k as usize).min(c.len());
        let (lo, ratio) = (f32_at(payload, 8 * ci), f32_at(payload, 8 * ci + 4));
        let table = magnitude_levels(lo, ratio, levels);
        let top = table[levels - 1];
        if !(lo >= 0.0 && ratio >= 1.0 && top.is_finite()) {
            return Err(CodecError::Scale { chunk: ci });
        }
        let r = rice_parameter(c.len(), kept);
        let max_q = (c.len() >> r) as u64;
        let mut next = 0usize;
        for _ in 0..kept {
            let gap = stream
                .rice(r, max_q)
                .map_err(|()| CodecError::Index { chunk: ci })?;
            let i = next + gap as usize;
            if i >= c.len() {
                return Err(CodecError::Index { chunk: ci });
            }
            let negative = stream.bit().ok_or(CodecError::Index { chunk: ci })? == 1;
            let q = stream
                .take(u32::from(bits) - 1)
                .ok_or(CodecError::Index { chunk: ci })? as usize;
            c[i] = if negative { -table[q] } else { table[q] };
            next = i + 1;
        }
    }
    // Exactly the bytes the stream used, no trailing garbage.
    let used = stream.bytes_used();
    if used != stream.bytes_len() {
        return Err(CodecError::Length {
            len: HEADER_BYTES + payload.len(),
            expected: HEADER_BYTES + scales + used,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode, Codec, HEADER_BYTES};
    use crate::testing::noise;

    #[test]
    fn error_feedback_delivers_a_constant_signal_over_rounds() {
        // Sending the same small delta repeatedly through top-k must, summed over
        // rounds, approach the true sum: nothing is lost for good.
        let d = noise(256, 9);
        let mut residual = vec![0f32; 256];
        let mut sent = vec![0f32; 256];
        let rounds = 200;
        for _ in 0..rounds {
            let codec = Codec::TopK {
                chunk: 64,
                k: 4,
                bits: 3,
            };
            let blob = encode(codec, &d, &mut residual, 1.0);
            for (s, v) in sent.iter_mut().zip(decode(&blob, 256).unwrap()) {
                *s += v;
            }
        }
        let err: f32 = sent
            .iter()
            .zip(&d)
            .map(|(s, v)| (s - v * rounds as f32).abs())
            .fold(0.0, f32::max);
        let scale: f32 = d
            .iter()
            .map(|v| v.abs() * rounds as f32)
            .fold(0.0, f32::max);
        assert!(err < 0.05 * scale, "error {err} vs signal {scale}");
    }

    #[test]
    fn top_k_positions_cost_about_log2_of_the_gap() {
        // 32 of 4096 kept with 4-bit values: Rice parameter 7, so about 9 bits of
        // position and 4 of value per kept element, plus 8 bytes of scales.
        let d = noise(4096, 3);
        let codec = Codec::TopK {
            chunk: 4096,
            k: 32,
            bits: 4,
        };
        let blob = encode(codec, &d, &mut vec![0.0; 4096], 1.0);
        let payload_bits = 8 * (blob.len() - HEADER_BYTES - 8);
        assert!(
            (32 * 12..=32 * 15).contains(&payload_bits),
            "{payload_bits} bits for 32 values"
        );
        let decoded = decode(&blob, 4096).unwrap();
        assert_eq!(decoded.iter().filter(|v| **v != 0.0).count(), 32);
    }
}
