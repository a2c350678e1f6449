//! The outer loop of DiLoCo-style training: pseudo-gradient codecs with error
//! feedback, robust aggregators, and the Nesterov outer step.
//!
//! Everything here is plain Rust over `f32` slices, not libtorch: the outer step must
//! be bit-identical on every honest node, so it runs on the CPU in a fixed order with
//! no fused multiply-adds and no threads. The hash of θ after each step is what nodes
//! compare.

use serde::{Deserialize, Serialize};

/// Most elements one encoded update may carry (2^34: a 16B-parameter shard), checked
/// before any allocation when decoding untrusted bytes.
pub const UPDATE_ELEMENTS_MAX: u64 = 1 << 34;
/// Largest chunk a chunked codec may use (indices within a chunk are 16-bit).
pub const CHUNK_MAX: u32 = 1 << 16;
const MAGIC: [u8; 4] = *b"TSU1";
const HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 4;

/// How a pseudo-gradient is compressed for the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "snake_case")]
pub enum Codec {
    /// Raw little-endian f32.
    None,
    /// Per-chunk absmax scale (f32) and one signed byte per element.
    Int8 { chunk: u32 },
    /// Per chunk, the `k` largest magnitudes: 16-bit indices and 2-bit values (sign and
    /// one of two magnitudes, each the mean of its half of the kept values).
    TopK { chunk: u32, k: u32 },
}

impl Codec {
    fn id(&self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Int8 { .. } => 1,
            Codec::TopK { .. } => 2,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Int8 { chunk } => format!("int8/{chunk}"),
            Codec::TopK { chunk, k } => format!("topk{k}/{chunk}-2bit"),
        }
    }

    /// Encoded size in bytes of `n` elements.
    pub fn encoded_bytes(&self, n: usize) -> usize {
        let chunks = |c: u32| n.div_ceil(c as usize);
        HEADER_BYTES
            + match *self {
                Codec::None => 4 * n,
                Codec::Int8 { chunk } => 4 * chunks(chunk) + n,
                Codec::TopK { chunk, k } => {
                    let full = n / chunk as usize;
                    let tail = n % chunk as usize;
                    let kept = |len: usize| (k as usize).min(len);
                    let per = |len: usize| 8 + 2 * kept(len) + kept(len).div_ceil(4);
                    full * per(chunk as usize) + if tail > 0 { per(tail) } else { 0 }
                }
            }
    }
}

/// Why bytes are not a valid encoded update.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("update blob is {len} bytes, shorter than its {HEADER_BYTES}-byte header")]
    Short { len: usize },
    #[error("update blob has bad magic bytes")]
    Magic,
    #[error("update blob uses unknown codec {0}")]
    UnknownCodec(u8),
    #[error("update blob claims {n} elements, expected {expected}")]
    Elements { n: u64, expected: u64 },
    #[error(
        "update blob has chunk {chunk} / k {k}; chunk must be 1..={CHUNK_MAX} and k 1..=chunk"
    )]
    Params { chunk: u32, k: u32 },
    #[error("update blob is {len} bytes, its header implies {expected}")]
    Length { len: usize, expected: usize },
    #[error("update blob has a non-finite scale in chunk {chunk}")]
    Scale { chunk: usize },
    #[error("update blob has index {index} out of order or outside chunk {chunk}")]
    Index { chunk: usize, index: u32 },
}

/// Encodes `delta + residual` and leaves in `residual` what the encoding dropped (error
/// feedback), so compression error is sent in later rounds instead of lost.
pub fn encode(codec: Codec, delta: &[f32], residual: &mut [f32]) -> Vec<u8> {
    assert_eq!(
        delta.len(),
        residual.len(),
        "residual must match the update"
    );
    for (r, d) in residual.iter_mut().zip(delta) {
        *r += d;
    }
    let n = delta.len();
    let mut out = Vec::with_capacity(codec.encoded_bytes(n));
    out.extend_from_slice(&MAGIC);
    out.push(codec.id());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    let (chunk, k) = match codec {
        Codec::None => (0, 0),
        Codec::Int8 { chunk } => (chunk, 0),
        Codec::TopK { chunk, k } => (chunk, k),
    };
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&k.to_le_bytes());
    match codec {
        Codec::None => {
            for v in residual.iter_mut() {
                out.extend_from_slice(&v.to_le_bytes());
                *v = 0.0;
            }
        }
        Codec::Int8 { chunk } => {
            for c in residual.chunks_mut(chunk as usize) {
                let max = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
                out.extend_from_slice(&scale.to_le_bytes());
                for v in c.iter_mut() {
                    let q = if scale > 0.0 {
                        (*v / scale).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    out.push(q as i8 as u8);
                    *v -= q * scale;
                }
            }
        }
        Codec::TopK { chunk, k } => {
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
                let mut mags: Vec<f32> = idx.iter().map(|&i| c[i as usize].abs()).collect();
                mags.sort_by(f32::total_cmp);
                let half = kept / 2;
                let mean = |s: &[f32]| {
                    if s.is_empty() {
                        0.0
                    } else {
                        s.iter().sum::<f32>() / s.len() as f32
                    }
                };
                let (lo, hi) = (mean(&mags[..half]), mean(&mags[half..]));
                let cut = if half > 0 { mags[half] } else { 0.0 };
                out.extend_from_slice(&lo.to_le_bytes());
                out.extend_from_slice(&hi.to_le_bytes());
                for &i in &idx {
                    out.extend_from_slice(&(i as u16).to_le_bytes());
                }
                let mut packed = vec![0u8; kept.div_ceil(4)];
                for (j, &i) in idx.iter().enumerate() {
                    let v = c[i as usize];
                    let big = v.abs() >= cut && half > 0 || half == 0;
                    let code = (u8::from(v < 0.0) << 1) | u8::from(big);
                    packed[j / 4] |= code << (2 * (j % 4));
                    let sent = if big { hi } else { lo } * if v < 0.0 { -1.0 } else { 1.0 };
                    c[i as usize] = v - sent;
                }
                out.extend_from_slice(&packed);
            }
        }
    }
    debug_assert_eq!(out.len(), codec.encoded_bytes(n));
    out
}

/// Decodes an update of `expected` elements, validating every length, index and scale
/// before allocating or trusting it.
pub fn decode(bytes: &[u8], expected: u64) -> Result<Vec<f32>, CodecError> {
    if bytes.len() < HEADER_BYTES {
        return Err(CodecError::Short { len: bytes.len() });
    }
    if bytes[..4] != MAGIC {
        return Err(CodecError::Magic);
    }
    let n = u64::from_le_bytes(bytes[5..13].try_into().expect("8 bytes"));
    if n != expected || n > UPDATE_ELEMENTS_MAX {
        return Err(CodecError::Elements { n, expected });
    }
    let chunk = u32::from_le_bytes(bytes[13..17].try_into().expect("4 bytes"));
    let k = u32::from_le_bytes(bytes[17..21].try_into().expect("4 bytes"));
    let codec = match bytes[4] {
        0 => Codec::None,
        1 if (1..=CHUNK_MAX).contains(&chunk) => Codec::Int8 { chunk },
        2 if (1..=CHUNK_MAX).contains(&chunk) && (1..=chunk).contains(&k) => {
            Codec::TopK { chunk, k }
        }
        1 | 2 => return Err(CodecError::Params { chunk, k }),
        other => return Err(CodecError::UnknownCodec(other)),
    };
    let n = n as usize;
    let expected_len = codec.encoded_bytes(n);
    if bytes.len() != expected_len {
        return Err(CodecError::Length {
            len: bytes.len(),
            expected: expected_len,
        });
    }
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let mut out = vec![0f32; n];
    let mut o = HEADER_BYTES;
    match codec {
        Codec::None => {
            for (i, v) in out.iter_mut().enumerate() {
                *v = f32_at(o + 4 * i);
            }
        }
        Codec::Int8 { chunk } => {
            for (ci, c) in out.chunks_mut(chunk as usize).enumerate() {
                let scale = f32_at(o);
                if !scale.is_finite() {
                    return Err(CodecError::Scale { chunk: ci });
                }
                o += 4;
                for v in c.iter_mut() {
                    *v = bytes[o] as i8 as f32 * scale;
                    o += 1;
                }
            }
        }
        Codec::TopK { chunk, k } => {
            for (ci, c) in out.chunks_mut(chunk as usize).enumerate() {
                let kept = (k as usize).min(c.len());
                let (lo, hi) = (f32_at(o), f32_at(o + 4));
                if !lo.is_finite() || !hi.is_finite() {
                    return Err(CodecError::Scale { chunk: ci });
                }
                o += 8;
                let idx_at =
                    |j: usize| u16::from_le_bytes([bytes[o + 2 * j], bytes[o + 2 * j + 1]]) as u32;
                let codes = o + 2 * kept;
                let mut prev: Option<u32> = None;
                for j in 0..kept {
                    let i = idx_at(j);
                    if i as usize >= c.len() || prev.is_some_and(|p| i <= p) {
                        return Err(CodecError::Index {
                            chunk: ci,
                            index: i,
                        });
                    }
                    prev = Some(i);
                    let code = (bytes[codes + j / 4] >> (2 * (j % 4))) & 3;
                    let mag = if code & 1 == 1 { hi } else { lo };
                    c[i as usize] = if code & 2 == 2 { -mag } else { mag };
                }
                o = codes + kept.div_ceil(4);
            }
        }
    }
    Ok(out)
}

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

/// Aggregates `updates` (in a fixed, agreed order) into one.
pub fn aggregate(agg: Aggregator, updates: &[Vec<f32>]) -> Vec<f32> {
    assert!(!updates.is_empty(), "aggregate of no updates");
    let n = updates[0].len();
    assert!(
        updates.iter().all(|u| u.len() == n),
        "updates differ in length"
    );
    let m = updates.len();
    let mean_of = |us: &[Vec<f32>]| {
        let mut out = vec![0f32; n];
        for u in us {
            for (o, v) in out.iter_mut().zip(u) {
                *o += v;
            }
        }
        let inv = 1.0 / us.len() as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        out
    };
    match agg {
        Aggregator::Mean => mean_of(updates),
        Aggregator::TrimmedMean { .. } | Aggregator::Median if m == 1 => updates[0].clone(),
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
        Aggregator::NormClip { factor } => {
            let norms: Vec<f32> = updates
                .iter()
                .map(|u| u.iter().map(|v| v * v).sum::<f32>().sqrt())
                .collect();
            let mut sorted = norms.clone();
            sorted.sort_by(f32::total_cmp);
            let limit = factor * sorted[m / 2];
            let clipped: Vec<Vec<f32>> = updates
                .iter()
                .zip(&norms)
                .map(|(u, &norm)| {
                    let s = if norm > limit && norm > 0.0 {
                        limit / norm
                    } else {
                        1.0
                    };
                    u.iter().map(|v| v * s).collect()
                })
                .collect();
            mean_of(&clipped)
        }
    }
}

/// SGD with Nesterov momentum on θ, as `torch.optim.SGD(nesterov=True)`:
/// `v ← μv + g; θ ← θ − lr (g + μv)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nesterov {
    pub lr: f32,
    pub momentum: f32,
    pub velocity: Vec<f32>,
}

impl Nesterov {
    pub fn new(n: usize, lr: f32, momentum: f32) -> Nesterov {
        Nesterov {
            lr,
            momentum,
            velocity: vec![0.0; n],
        }
    }

    pub fn step(&mut self, theta: &mut [f32], pseudo_gradient: &[f32]) {
        assert_eq!(theta.len(), pseudo_gradient.len());
        for ((t, v), g) in theta
            .iter_mut()
            .zip(self.velocity.iter_mut())
            .zip(pseudo_gradient)
        {
            *v = self.momentum * *v + g;
            *t -= self.lr * (g + self.momentum * *v);
        }
    }
}

/// blake3 of θ's little-endian f32 bytes: what nodes compare after every outer step.
pub fn theta_hash(theta: &[f32]) -> String {
    let mut h = blake3::Hasher::new();
    for chunk in theta.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| (r.next_f64() as f32 - 0.5) * 0.02).collect()
    }

    const CODECS: [Codec; 4] = [
        Codec::None,
        Codec::Int8 { chunk: 64 },
        Codec::TopK { chunk: 64, k: 8 },
        Codec::TopK { chunk: 5, k: 5 },
    ];

    #[test]
    fn codecs_round_trip_with_error_feedback_conserving_the_signal() {
        for codec in CODECS {
            for n in [1usize, 63, 64, 65, 1000] {
                let d = noise(n, n as u64);
                let mut residual = vec![0f32; n];
                let blob = encode(codec, &d, &mut residual);
                assert_eq!(blob.len(), codec.encoded_bytes(n), "{codec:?} n={n}");
                let decoded = decode(&blob, n as u64).unwrap();
                // What was sent plus what was kept back equals the input.
                for i in 0..n {
                    assert!(
                        (decoded[i] + residual[i] - d[i]).abs() < 1e-6,
                        "{codec:?} n={n} i={i}"
                    );
                }
                if codec == Codec::None {
                    assert_eq!(decoded, d);
                }
            }
        }
    }

    #[test]
    fn error_feedback_delivers_a_constant_signal_over_rounds() {
        // Sending the same small delta repeatedly through top-k must, summed over
        // rounds, approach the true sum: nothing is lost for good.
        let d = noise(256, 9);
        let mut residual = vec![0f32; 256];
        let mut sent = vec![0f32; 256];
        let rounds = 200;
        for _ in 0..rounds {
            let blob = encode(Codec::TopK { chunk: 64, k: 4 }, &d, &mut residual);
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
    fn malformed_blobs_are_refused() {
        let d = noise(100, 1);
        let good = encode(Codec::TopK { chunk: 50, k: 4 }, &d, &mut vec![0.0; 100]);
        assert!(matches!(
            decode(&good[..10], 100),
            Err(CodecError::Short { .. })
        ));
        assert!(matches!(
            decode(&good, 99),
            Err(CodecError::Elements { .. })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 1], 100),
            Err(CodecError::Length { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, 100), Err(CodecError::Magic));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, 100), Err(CodecError::UnknownCodec(9)));
        // Indices out of order: swap the first two.
        let mut bad = good.clone();
        let o = HEADER_BYTES + 8;
        bad.swap(o, o + 2);
        bad.swap(o + 1, o + 3);
        assert!(matches!(decode(&bad, 100), Err(CodecError::Index { .. })));
        // A huge claimed element count is refused before allocating.
        let mut bad = good.clone();
        bad[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad, u64::MAX),
            Err(CodecError::Elements { .. })
        ));
        let mut bad = encode(Codec::Int8 { chunk: 50 }, &d, &mut vec![0.0; 100]);
        bad[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(decode(&bad, 100), Err(CodecError::Scale { .. })));
    }

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
    fn nesterov_matches_the_torch_formula_and_hash_is_stable() {
        let mut theta = vec![1.0f32, -2.0];
        let mut opt = Nesterov::new(2, 0.7, 0.9);
        opt.step(&mut theta, &[0.1, 0.2]);
        // v = g; θ = θ - lr (g + μ g) = θ - 0.7 * 1.9 g
        assert!((theta[0] - (1.0 - 0.7 * 1.9 * 0.1)).abs() < 1e-7);
        opt.step(&mut theta, &[0.1, 0.2]);
        // v = 0.9·0.1 + 0.1 = 0.19; θ -= 0.7 (0.1 + 0.9·0.19)
        assert!((theta[0] - (1.0 - 0.133 - 0.7 * (0.1 + 0.171))).abs() < 1e-6);
        assert_eq!(theta_hash(&theta), theta_hash(&theta.clone()));
        assert_ne!(
            theta_hash(&theta),
            theta_hash(&[theta[0], f32::from_bits(theta[1].to_bits() + 1)])
        );
    }
}
