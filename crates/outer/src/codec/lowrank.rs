//! The `lowrank` codec: the update cut into `rows × cols` blocks, each sent as a
//! rank-`rank` product `P Qᵀ` with int8 factor entries and one f32 scale per factor
//! column; a tail too short for a whole row goes as raw f32.
//!
//! The factors come from two power iterations from a fixed seeded start, in a fixed
//! order with no fused multiply-adds, so every node computes the same floats.

use super::{f32_at, CodecError};
use crate::rng::SplitMix64;

/// Seed of the power iteration's start vectors; part of the wire format in effect,
/// since changing it changes every low-rank encoding.
const POWER_ITERATION_SEED: u64 = 0x7e55_e7a1;

/// Payload bytes for `n` elements (exact).
pub(super) fn payload_bytes(n: usize, rows: u32, cols: u32, rank: u8) -> usize {
    low_rank_blocks(n, rows as usize, cols as usize)
        .iter()
        .map(|b| b.encoded_bytes(rank as usize))
        .sum()
}

/// One block of a low-rank encoding: `rows × cols` elements from `start`, or (the
/// tail) `cols == 0` meaning `rows` raw f32 values.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    rows: usize,
    cols: usize,
}

impl Block {
    fn encoded_bytes(&self, rank: usize) -> usize {
        if self.cols == 0 {
            4 * self.rows
        } else {
            let r = rank.min(self.rows).min(self.cols);
            8 * r + r * (self.rows + self.cols)
        }
    }
}

/// How `n` elements are cut into blocks: full `rows × cols` blocks, a block of the
/// remaining whole rows, then the remaining elements raw.
fn low_rank_blocks(n: usize, rows: usize, cols: usize) -> Vec<Block> {
    let mut out = Vec::new();
    let mut start = 0;
    while n - start >= rows * cols {
        out.push(Block { start, rows, cols });
        start += rows * cols;
    }
    let tail_rows = (n - start) / cols;
    if tail_rows > 0 {
        out.push(Block {
            start,
            rows: tail_rows,
            cols,
        });
        start += tail_rows * cols;
    }
    if start < n {
        out.push(Block {
            start,
            rows: n - start,
            cols: 0,
        });
    }
    out
}

/// Symmetric int8 quantization of `v` with one scale; returns (scale, codes).
fn quantize_i8(v: &[f32]) -> (f32, Vec<i8>) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
    let codes = v
        .iter()
        .map(|x| {
            if scale > 0.0 {
                (x / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        })
        .collect();
    (scale, codes)
}

/// `out[i][j] = Σ_c p[c][i] · q[c][j]` for column-major factors, in a fixed order (no
/// fused multiply-add, no threads) so every node computes the same floats.
fn low_rank_product(p: &[Vec<f32>], q: &[Vec<f32>], out: &mut [f32], rows: usize, cols: usize) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for (pc, qc) in p.iter().zip(q) {
        for i in 0..rows {
            let a = pc[i];
            let row = &mut out[i * cols..(i + 1) * cols];
            for (o, b) in row.iter_mut().zip(qc) {
                *o += a * b;
            }
        }
    }
}

/// Rank-`r` approximation of the `rows × cols` matrix `m` by two power iterations
/// from a fixed start: P (orthonormal columns) and Q = Mᵀ P, column-major.
fn power_iteration(
    m: &[f32],
    rows: usize,
    cols: usize,
    r: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = SplitMix64::new(POWER_ITERATION_SEED);
    let mut q: Vec<Vec<f32>> = (0..r)
        .map(|_| (0..cols).map(|_| rng.next_f64() as f32 - 0.5).collect())
        .collect();
    let mut p = vec![vec![0f32; rows]; r];
    for _ in 0..2 {
        // P = M Q, then orthonormalise P's columns (modified Gram-Schmidt).
        for (pc, qc) in p.iter_mut().zip(&q) {
            for (i, pv) in pc.iter_mut().enumerate() {
                let row = &m[i * cols..(i + 1) * cols];
                *pv = row.iter().zip(qc).map(|(a, b)| a * b).sum();
            }
        }
        for c in 0..r {
            for d in 0..c {
                let dot: f32 = p[c].iter().zip(&p[d]).map(|(a, b)| a * b).sum();
                let (head, tail) = p.split_at_mut(c);
                for (x, y) in tail[0].iter_mut().zip(&head[d]) {
                    *x -= dot * y;
                }
            }
            let norm = p[c].iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                p[c].iter_mut().for_each(|x| *x /= norm);
            }
        }
        // Q = Mᵀ P.
        for (qc, pc) in q.iter_mut().zip(&p) {
            qc.iter_mut().for_each(|x| *x = 0.0);
            for (i, &pv) in pc.iter().enumerate() {
                let row = &m[i * cols..(i + 1) * cols];
                for (qv, a) in qc.iter_mut().zip(row) {
                    *qv += a * pv;
                }
            }
        }
    }
    (p, q)
}

pub(super) fn encode(residual: &mut [f32], rows: u32, cols: u32, rank: u8, out: &mut Vec<u8>) {
    for b in low_rank_blocks(residual.len(), rows as usize, cols as usize) {
        let block = &mut residual[b.start..b.start + b.rows * b.cols.max(1)];
        if b.cols == 0 {
            for v in block.iter_mut() {
                out.extend_from_slice(&v.to_le_bytes());
                *v = 0.0;
            }
            continue;
        }
        let r = (rank as usize).min(b.rows).min(b.cols);
        let (p, q) = power_iteration(block, b.rows, b.cols, r);
        let mut sent_p = Vec::with_capacity(r);
        let mut sent_q = Vec::with_capacity(r);
        for (factors, sent) in [(&p, &mut sent_p), (&q, &mut sent_q)] {
            for col in factors.iter() {
                let (scale, codes) = quantize_i8(col);
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(codes.iter().map(|&c| c as u8));
                sent.push(
                    codes
                        .iter()
                        .map(|&c| c as f32 * scale)
                        .collect::<Vec<f32>>(),
                );
            }
        }
        // Error feedback: keep what the quantized product did not carry.
        let mut approx = vec![0f32; block.len()];
        low_rank_product(&sent_p, &sent_q, &mut approx, b.rows, b.cols);
        for (v, a) in block.iter_mut().zip(&approx) {
            *v -= a;
        }
    }
}

/// `payload` has exactly [`payload_bytes`] bytes; `decode` checked that.
pub(super) fn decode(
    payload: &[u8],
    out: &mut [f32],
    rows: u32,
    cols: u32,
    rank: u8,
) -> Result<(), CodecError> {
    let mut o = 0;
    for (bi, b) in low_rank_blocks(out.len(), rows as usize, cols as usize)
        .into_iter()
        .enumerate()
    {
        let block = &mut out[b.start..b.start + b.rows * b.cols.max(1)];
        if b.cols == 0 {
            for v in block.iter_mut() {
                *v = f32_at(payload, o);
                o += 4;
            }
            continue;
        }
        let r = (rank as usize).min(b.rows).min(b.cols);
        let mut factor = |len: usize| -> Result<Vec<Vec<f32>>, CodecError> {
            (0..r)
                .map(|_| {
                    let scale = f32_at(payload, o);
                    if !scale.is_finite() || scale < 0.0 {
                        return Err(CodecError::Scale { chunk: bi });
                    }
                    o += 4;
                    let col = payload[o..o + len]
                        .iter()
                        .map(|&c| c as i8 as f32 * scale)
                        .collect();
                    o += len;
                    Ok(col)
                })
                .collect()
        };
        let p = factor(b.rows)?;
        let q = factor(b.cols)?;
        low_rank_product(&p, &q, block, b.rows, b.cols);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode, Codec, CodecError, HEADER_BYTES};
    use super::*;
    use crate::testing::noise;

    #[test]
    fn blocks_cover_every_element_once_in_order() {
        for (n, rows, cols) in [(0, 4, 8), (31, 4, 8), (32, 4, 8), (100, 4, 8), (7, 2, 16)] {
            let mut next = 0;
            for b in low_rank_blocks(n, rows, cols) {
                assert_eq!(b.start, next, "n={n}");
                assert!(b.cols == 0 || b.rows <= rows);
                next += b.rows * b.cols.max(1);
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn a_negative_factor_scale_is_refused() {
        let codec = Codec::LowRank {
            rows: 4,
            cols: 8,
            rank: 2,
        };
        let mut blob = encode(codec, &noise(40, 5), &mut [0.0; 40], 1.0);
        assert!(decode(&blob, 40).is_ok());
        blob[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(-1f32).to_le_bytes());
        assert_eq!(decode(&blob, 40), Err(CodecError::Scale { chunk: 0 }));
    }
}
