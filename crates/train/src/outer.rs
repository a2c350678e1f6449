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
/// Largest chunk a chunked codec may use.
pub const CHUNK_MAX: u32 = 1 << 16;
/// Most bits a top-k value may use (sign plus up to 7 magnitude bits).
pub const VALUE_BITS_MAX: u8 = 8;
const MAGIC: [u8; 4] = *b"TSU2";
const HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 4 + 1;

/// How a pseudo-gradient is compressed for the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "snake_case")]
pub enum Codec {
    /// Raw little-endian f32.
    None,
    /// Per-chunk absmax scale (f32) and one signed byte per element.
    Int8 { chunk: u32 },
    /// Per chunk, the `k` largest magnitudes. Their positions are sent as Rice-coded
    /// gaps (about log2(chunk/k) + 2 bits each) and their values as `bits` bits: a sign
    /// and one of 2^(bits−1) magnitudes spaced geometrically between the smallest and
    /// the largest kept magnitude of the chunk (two f32 per chunk).
    TopK { chunk: u32, k: u32, bits: u8 },
    /// The update cut into `rows × cols` blocks (row-major, so a block is whole rows of
    /// the weight matrices when `cols` is the hidden size), each sent as a rank-`rank`
    /// product `P Qᵀ` found by power iteration, with int8 entries and one f32 scale
    /// per column of P and Q. Every element moves every round, unlike top-k. A tail
    /// shorter than a block is sent as fewer rows; the last partial row as raw f32.
    LowRank { rows: u32, cols: u32, rank: u8 },
}

/// Most rank a low-rank update may have.
pub const RANK_MAX: u8 = 64;

impl Codec {
    fn id(&self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Int8 { .. } => 1,
            Codec::TopK { .. } => 2,
            Codec::LowRank { .. } => 3,
        }
    }

    /// The codec a run file or command line names: `none`, `int8` (chunk 4096) or
    /// `topk` (chunk 4096, `k` kept per chunk, `bits` per value).
    pub fn parse(name: &str, k: u32, bits: u8) -> Result<Codec, String> {
        const CHUNK: u32 = 4096;
        match name {
            "none" => Ok(Codec::None),
            "int8" => Ok(Codec::Int8 { chunk: CHUNK }),
            "topk" if !(1..=CHUNK).contains(&k) => {
                Err(format!("topk must keep 1..={CHUNK} per chunk, got {k}"))
            }
            "topk" if !(1..=VALUE_BITS_MAX).contains(&bits) => Err(format!(
                "topk value bits must be 1..={VALUE_BITS_MAX}, got {bits}"
            )),
            "topk" => Ok(Codec::TopK {
                chunk: CHUNK,
                k,
                bits,
            }),
            "lowrank" if !(1..=RANK_MAX as u32).contains(&k) => {
                Err(format!("lowrank rank must be 1..={RANK_MAX}, got {k}"))
            }
            "lowrank" => Ok(Codec::LowRank {
                rows: 1024,
                cols: 256,
                rank: k as u8,
            }),
            other => Err(format!(
                "unknown codec `{other}`; expected none, int8 or topk"
            )),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Int8 { chunk } => format!("int8/{chunk}"),
            Codec::TopK { chunk, k, bits } => format!("topk{k}/{chunk}-{bits}bit"),
            Codec::LowRank { rows, cols, rank } => format!("lowrank{rank}/{rows}x{cols}-int8"),
        }
    }

    /// The most bytes an encoding of `n` elements can take (exact for `none` and
    /// `int8`; top-k's index coding varies a little with where the kept values lie).
    pub fn max_encoded_bytes(&self, n: usize) -> usize {
        let chunks = |c: u32| n.div_ceil(c as usize);
        HEADER_BYTES
            + match *self {
                Codec::None => 4 * n,
                Codec::Int8 { chunk } => 4 * chunks(chunk) + n,
                Codec::TopK { chunk, k, bits } => {
                    let full = n / chunk as usize;
                    let tail = n % chunk as usize;
                    let bits_of = |len: usize| {
                        let kept = (k as usize).min(len);
                        let r = rice_parameter(len, kept) as usize;
                        // Gaps sum to less than `len`: at most len >> r unary ones in all.
                        kept * (1 + r + bits as usize) + (len >> r)
                    };
                    let total =
                        full * bits_of(chunk as usize) + if tail > 0 { bits_of(tail) } else { 0 };
                    8 * chunks(chunk) + total.div_ceil(8)
                }
                Codec::LowRank { rows, cols, rank } => {
                    low_rank_blocks(n, rows as usize, cols as usize)
                        .iter()
                        .map(|b| b.encoded_bytes(rank as usize))
                        .sum()
                }
            }
    }
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
    let mut rng = crate::rng::SplitMix64::new(0x7e55_e7a1);
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

fn encode_low_rank(residual: &mut [f32], rows: u32, cols: u32, rank: u8, out: &mut Vec<u8>) {
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
        let mut approx = vec![0f32; block.len()];
        low_rank_product(&sent_p, &sent_q, &mut approx, b.rows, b.cols);
        for (v, a) in block.iter_mut().zip(&approx) {
            *v -= a;
        }
    }
}

fn decode_low_rank(
    bytes: &[u8],
    out: &mut [f32],
    rows: u32,
    cols: u32,
    rank: u8,
) -> Result<(), CodecError> {
    let mut o = 0;
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    for (bi, b) in low_rank_blocks(out.len(), rows as usize, cols as usize)
        .into_iter()
        .enumerate()
    {
        let block = &mut out[b.start..b.start + b.rows * b.cols.max(1)];
        if b.cols == 0 {
            for v in block.iter_mut() {
                *v = f32_at(o);
                o += 4;
            }
            continue;
        }
        let r = (rank as usize).min(b.rows).min(b.cols);
        let mut factor = |len: usize| -> Result<Vec<Vec<f32>>, CodecError> {
            (0..r)
                .map(|_| {
                    let scale = f32_at(o);
                    if !scale.is_finite() || scale < 0.0 {
                        return Err(CodecError::Scale { chunk: bi });
                    }
                    o += 4;
                    let col = bytes[o..o + len]
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

/// Least-significant-bit-first bit packing.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    used: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 32);
        self.acc |= (value & ((1u64 << bits) - 1)) << self.used;
        self.used += bits;
        while self.used >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.used -= 8;
        }
    }

    fn rice(&mut self, value: u64, r: u32) {
        let mut q = value >> r;
        while q >= 32 {
            self.put(u64::from(u32::MAX), 32);
            q -= 32;
        }
        self.put((1u64 << q) - 1, q as u32);
        self.put(0, 1);
        self.put(value, r);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<u64> {
        let b = *self.bytes.get(self.pos / 8)?;
        let v = (b >> (self.pos % 8)) & 1;
        self.pos += 1;
        Some(u64::from(v))
    }

    fn take(&mut self, bits: u32) -> Option<u64> {
        let mut v = 0;
        for i in 0..bits {
            v |= self.bit()? << i;
        }
        Some(v)
    }

    /// A Rice-coded value whose quotient may not exceed `max_q`.
    fn rice(&mut self, r: u32, max_q: u64) -> Result<u64, ()> {
        let mut q = 0u64;
        loop {
            match self.bit() {
                Some(1) if q < max_q => q += 1,
                Some(0) => break,
                _ => return Err(()),
            }
        }
        Ok((q << r) | self.take(r).ok_or(())?)
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
        "update blob has chunk {chunk} / k {k} / bits {bits}; chunk must be 1..={CHUNK_MAX}, \
         k 1..=chunk and bits 1..={VALUE_BITS_MAX}"
    )]
    Params { chunk: u32, k: u32, bits: u8 },
    #[error("update blob is {len} bytes, its header implies {expected}")]
    Length { len: usize, expected: usize },
    #[error("update blob has a non-finite or negative scale in chunk {chunk}")]
    Scale { chunk: usize },
    #[error("update blob has a position outside chunk {chunk} or runs out of bits there")]
    Index { chunk: usize },
}

/// Encodes `delta + decay · residual` and leaves in `residual` what the encoding
/// dropped (error feedback), so compression error is sent in later rounds instead of
/// lost. A `decay` below 1 lets old, unsent progress fade: in DiLoCo each round's delta
/// already re-measures progress the shared θ has not taken yet, so an undecayed
/// residual counts it twice (and the decayed one acts as a local outer momentum).
pub fn encode(codec: Codec, delta: &[f32], residual: &mut [f32], decay: f32) -> Vec<u8> {
    assert_eq!(
        delta.len(),
        residual.len(),
        "residual must match the update"
    );
    for (r, d) in residual.iter_mut().zip(delta) {
        *r = decay * *r + d;
    }
    let n = delta.len();
    let mut out = Vec::with_capacity(codec.max_encoded_bytes(n));
    out.extend_from_slice(&MAGIC);
    out.push(codec.id());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    let (chunk, k, bits) = match codec {
        Codec::None => (0, 0, 0),
        Codec::Int8 { chunk } => (chunk, 0, 0),
        Codec::TopK { chunk, k, bits } => (chunk, k, bits),
        Codec::LowRank { rows, cols, rank } => (cols, rows, rank),
    };
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&k.to_le_bytes());
    out.push(bits);
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
        Codec::TopK { chunk, k, bits } => encode_topk(residual, chunk, k, bits, &mut out),
        Codec::LowRank { rows, cols, rank } => {
            encode_low_rank(residual, rows, cols, rank, &mut out)
        }
    }
    debug_assert!(out.len() <= codec.max_encoded_bytes(n));
    out
}

fn encode_topk(residual: &mut [f32], chunk: u32, k: u32, bits: u8, out: &mut Vec<u8>) {
    let levels = 1usize << (bits - 1);
    let mut stream = BitWriter {
        out: Vec::new(),
        acc: 0,
        used: 0,
    };
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
    let bits = bytes[21];
    let chunk_ok = (1..=CHUNK_MAX).contains(&chunk);
    let codec = match bytes[4] {
        0 => Codec::None,
        1 if chunk_ok => Codec::Int8 { chunk },
        2 if chunk_ok && (1..=chunk).contains(&k) && (1..=VALUE_BITS_MAX).contains(&bits) => {
            Codec::TopK { chunk, k, bits }
        }
        3 if chunk_ok && (1..=1 << 20).contains(&k) && (1..=RANK_MAX).contains(&bits) => {
            Codec::LowRank {
                rows: k,
                cols: chunk,
                rank: bits,
            }
        }
        1..=3 => return Err(CodecError::Params { chunk, k, bits }),
        other => return Err(CodecError::UnknownCodec(other)),
    };
    let n = n as usize;
    let max_len = codec.max_encoded_bytes(n);
    let exact = !matches!(codec, Codec::TopK { .. });
    if bytes.len() > max_len || exact && bytes.len() != max_len {
        return Err(CodecError::Length {
            len: bytes.len(),
            expected: max_len,
        });
    }
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let mut out = vec![0f32; n];
    let o = HEADER_BYTES;
    match codec {
        Codec::None => {
            for (i, v) in out.iter_mut().enumerate() {
                *v = f32_at(o + 4 * i);
            }
        }
        Codec::Int8 { chunk } => {
            let mut o = o;
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
        Codec::TopK { chunk, k, bits } => decode_topk(&bytes[o..], &mut out, chunk, k, bits)?,
        Codec::LowRank { rows, cols, rank } => {
            decode_low_rank(&bytes[o..], &mut out, rows, cols, rank)?
        }
    }
    Ok(out)
}

fn decode_topk(
    bytes: &[u8],
    out: &mut [f32],
    chunk: u32,
    k: u32,
    bits: u8,
) -> Result<(), CodecError> {
    let levels = 1usize << (bits - 1);
    let chunks = out.len().div_ceil(chunk as usize);
    let scales = 8 * chunks;
    if bytes.len() < scales {
        return Err(CodecError::Length {
            len: HEADER_BYTES + bytes.len(),
            expected: HEADER_BYTES + scales,
        });
    }
    let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let mut stream = BitReader {
        bytes: &bytes[scales..],
        pos: 0,
    };
    for (ci, c) in out.chunks_mut(chunk as usize).enumerate() {
        let kept = (k as usize).min(c.len());
        let (lo, ratio) = (f32_at(8 * ci), f32_at(8 * ci + 4));
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
    let used = stream.pos.div_ceil(8);
    if used != stream.bytes.len() {
        return Err(CodecError::Length {
            len: HEADER_BYTES + bytes.len(),
            expected: HEADER_BYTES + scales + used,
        });
    }
    Ok(())
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

    const CODECS: [Codec; 8] = [
        Codec::LowRank {
            rows: 4,
            cols: 8,
            rank: 2,
        },
        Codec::LowRank {
            rows: 16,
            cols: 16,
            rank: 3,
        },
        Codec::None,
        Codec::Int8 { chunk: 64 },
        Codec::TopK {
            chunk: 64,
            k: 8,
            bits: 4,
        },
        Codec::TopK {
            chunk: 5,
            k: 5,
            bits: 2,
        },
        Codec::TopK {
            chunk: 4096,
            k: 40,
            bits: 1,
        },
        Codec::TopK {
            chunk: 100,
            k: 3,
            bits: 8,
        },
    ];

    #[test]
    fn codecs_round_trip_with_error_feedback_conserving_the_signal() {
        for codec in CODECS {
            for n in [1usize, 63, 64, 65, 1000] {
                let d = noise(n, n as u64);
                let mut residual = vec![0f32; n];
                let blob = encode(codec, &d, &mut residual, 1.0);
                assert!(blob.len() <= codec.max_encoded_bytes(n), "{codec:?} n={n}");
                if !matches!(codec, Codec::TopK { .. }) {
                    assert_eq!(blob.len(), codec.max_encoded_bytes(n), "{codec:?} n={n}");
                }
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
    fn malformed_blobs_are_refused() {
        let d = noise(100, 1);
        let topk = Codec::TopK {
            chunk: 50,
            k: 4,
            bits: 4,
        };
        let good = encode(topk, &d, &mut vec![0.0; 100], 1.0);
        assert_eq!(decode(&good, 100).unwrap().len(), 100);
        assert!(matches!(
            decode(&good[..10], 100),
            Err(CodecError::Short { .. })
        ));
        assert!(matches!(
            decode(&good, 99),
            Err(CodecError::Elements { .. })
        ));
        // Truncated: the bit stream runs out inside the last chunk.
        assert!(matches!(
            decode(&good[..good.len() - 1], 100),
            Err(CodecError::Index { .. })
        ));
        // Trailing bytes past the stream.
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode(&long, 100), Err(CodecError::Length { .. })));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, 100), Err(CodecError::Magic));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, 100), Err(CodecError::UnknownCodec(9)));
        let mut bad = good.clone();
        bad[HEADER_BYTES - 1] = 9;
        assert!(matches!(decode(&bad, 100), Err(CodecError::Params { .. })));
        // A run of one-bits: a gap that would leave the chunk.
        let mut bad = good.clone();
        let stream = HEADER_BYTES + 8 * 2;
        bad[stream..].iter_mut().for_each(|b| *b = 0xff);
        assert!(matches!(decode(&bad, 100), Err(CodecError::Index { .. })));
        // A negative or non-finite scale.
        let mut bad = good.clone();
        bad[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(-1f32).to_le_bytes());
        assert!(matches!(decode(&bad, 100), Err(CodecError::Scale { .. })));
        let mut bad = good.clone();
        bad[HEADER_BYTES + 4..HEADER_BYTES + 8].copy_from_slice(&f32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad, 100), Err(CodecError::Scale { .. })));
        // A huge claimed element count is refused before allocating.
        let mut bad = good.clone();
        bad[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad, u64::MAX),
            Err(CodecError::Elements { .. })
        ));
        let mut bad = encode(Codec::Int8 { chunk: 50 }, &d, &mut vec![0.0; 100], 1.0);
        bad[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(decode(&bad, 100), Err(CodecError::Scale { .. })));
        assert!(matches!(
            decode(&bad[..bad.len() - 1], 100),
            Err(CodecError::Length { .. })
        ));
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
