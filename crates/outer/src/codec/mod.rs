//! Pseudo-gradient codecs with error feedback: the wire form of one node's update.
//!
//! An encoded update is a fixed header (magic, codec id, element count, and three
//! codec parameters) followed by the codec's payload. [`encode`] writes the header and
//! hands the payload to the codec's module; [`decode`] checks the header and the total
//! length against what the header implies before allocating anything, then hands the
//! payload over. Each codec lives in its own file: `none`, `int8`, `topk`, `lowrank`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::UnknownName;

mod int8;
mod lowrank;
mod none;
mod topk;

/// Most elements one encoded update may carry (2^34: a 16B-parameter shard), checked
/// before any allocation when decoding untrusted bytes.
pub const UPDATE_ELEMENTS_MAX: u64 = 1 << 34;
/// Largest chunk a chunked codec may use.
pub const CHUNK_MAX: u32 = 1 << 16;
/// Most bits a top-k value may use (sign plus up to 7 magnitude bits).
pub const VALUE_BITS_MAX: u8 = 8;
/// Most rank a low-rank update may have.
pub const RANK_MAX: u8 = 64;
/// Most rows a low-rank block may have (the header's `k` field for that codec).
const LOW_RANK_ROWS_MAX: u32 = 1 << 20;
const MAGIC: [u8; 4] = *b"TSU2";
/// Magic, codec id, element count (u64), chunk (u32), k (u32), bits (u8).
const HEADER_BYTES: usize = 4 + 1 + 8 + 4 + 4 + 1;
/// The chunk, and the low-rank block shape, that names on a command line select.
const CHUNK_DEFAULT: u32 = 4096;
const LOW_RANK_ROWS_DEFAULT: u32 = 1024;
const LOW_RANK_COLS_DEFAULT: u32 = 256;

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

/// Which codec, without its parameters: what a run file or command line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    None,
    Int8,
    TopK,
    LowRank,
}

impl CodecKind {
    const ALL: [CodecKind; 4] = [
        CodecKind::None,
        CodecKind::Int8,
        CodecKind::TopK,
        CodecKind::LowRank,
    ];

    /// The name `FromStr` accepts and `Display` writes.
    pub fn name(self) -> &'static str {
        match self {
            CodecKind::None => "none",
            CodecKind::Int8 => "int8",
            CodecKind::TopK => "topk",
            CodecKind::LowRank => "lowrank",
        }
    }

    /// Whether the codec sends only some elements each round (the rest wait in the
    /// error-feedback residual).
    pub fn is_sparse(self) -> bool {
        matches!(self, CodecKind::TopK)
    }

    /// The codec with the parameters a run names: `int8` and `topk` use chunks of
    /// 4096, `topk` keeps `topk_k` per chunk with `topk_bits` per value, and `lowrank`
    /// sends 1024 × 256 blocks at rank `rank`. Parameters another codec uses are
    /// ignored.
    pub fn codec(self, topk_k: u32, topk_bits: u8, rank: u32) -> Result<Codec, String> {
        match self {
            CodecKind::None => Ok(Codec::None),
            CodecKind::Int8 => Ok(Codec::Int8 {
                chunk: CHUNK_DEFAULT,
            }),
            CodecKind::TopK if !(1..=CHUNK_DEFAULT).contains(&topk_k) => Err(format!(
                "topk must keep 1..={CHUNK_DEFAULT} per chunk, got {topk_k}"
            )),
            CodecKind::TopK if !(1..=VALUE_BITS_MAX).contains(&topk_bits) => Err(format!(
                "topk value bits must be 1..={VALUE_BITS_MAX}, got {topk_bits}"
            )),
            CodecKind::TopK => Ok(Codec::TopK {
                chunk: CHUNK_DEFAULT,
                k: topk_k,
                bits: topk_bits,
            }),
            CodecKind::LowRank if !(1..=u32::from(RANK_MAX)).contains(&rank) => {
                Err(format!("lowrank rank must be 1..={RANK_MAX}, got {rank}"))
            }
            CodecKind::LowRank => Ok(Codec::LowRank {
                rows: LOW_RANK_ROWS_DEFAULT,
                cols: LOW_RANK_COLS_DEFAULT,
                rank: rank as u8,
            }),
        }
    }
}

impl fmt::Display for CodecKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CodecKind {
    type Err = UnknownName;

    fn from_str(name: &str) -> Result<CodecKind, UnknownName> {
        CodecKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| UnknownName {
                what: "codec",
                name: name.to_string(),
                expected: "none, int8, topk or lowrank",
            })
    }
}

impl Codec {
    fn id(&self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Int8 { .. } => 1,
            Codec::TopK { .. } => 2,
            Codec::LowRank { .. } => 3,
        }
    }

    /// Which codec this is, without its parameters.
    pub fn kind(&self) -> CodecKind {
        match self {
            Codec::None => CodecKind::None,
            Codec::Int8 { .. } => CodecKind::Int8,
            Codec::TopK { .. } => CodecKind::TopK,
            Codec::LowRank { .. } => CodecKind::LowRank,
        }
    }

    /// The codec a run file or command line names: `none`, `int8`, `topk` (keeping
    /// `k` per chunk, `bits` per value) or `lowrank` (rank `k`); see
    /// [`CodecKind::codec`].
    pub fn parse(name: &str, k: u32, bits: u8) -> Result<Codec, String> {
        let kind: CodecKind = name.parse().map_err(|e: UnknownName| e.to_string())?;
        kind.codec(k, bits, k)
    }

    /// A short description with the parameters, for logs and reports.
    pub fn name(&self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Int8 { chunk } => format!("int8/{chunk}"),
            Codec::TopK { chunk, k, bits } => format!("topk{k}/{chunk}-{bits}bit"),
            Codec::LowRank { rows, cols, rank } => format!("lowrank{rank}/{rows}x{cols}-int8"),
        }
    }

    /// The most bytes an encoding of `n` elements can take (exact for every codec but
    /// top-k, whose index coding varies a little with where the kept values lie).
    pub fn max_encoded_bytes(&self, n: usize) -> usize {
        HEADER_BYTES
            + match *self {
                Codec::None => none::payload_bytes(n),
                Codec::Int8 { chunk } => int8::payload_bytes(n, chunk),
                Codec::TopK { chunk, k, bits } => topk::max_payload_bytes(n, chunk, k, bits),
                Codec::LowRank { rows, cols, rank } => lowrank::payload_bytes(n, rows, cols, rank),
            }
    }
}

/// Why bytes are not a valid encoded update.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// Not even a whole header.
    #[error("update blob is {len} bytes, shorter than its {HEADER_BYTES}-byte header")]
    Short { len: usize },
    /// Not an update blob (or a format from another version).
    #[error("update blob has bad magic bytes")]
    Magic,
    /// A codec id this version does not know.
    #[error("update blob uses unknown codec {0}")]
    UnknownCodec(u8),
    /// The element count differs from the one expected, or exceeds
    /// [`UPDATE_ELEMENTS_MAX`].
    #[error("update blob claims {n} elements, expected {expected}")]
    Elements { n: u64, expected: u64 },
    /// The header's codec parameters are out of range.
    #[error(
        "update blob has chunk {chunk} / k {k} / bits {bits}; chunk must be 1..={CHUNK_MAX}, \
         k 1..=chunk and bits 1..={VALUE_BITS_MAX}"
    )]
    Params { chunk: u32, k: u32, bits: u8 },
    /// The blob's length is not what its header implies.
    #[error("update blob is {len} bytes, its header implies {expected}")]
    Length { len: usize, expected: usize },
    /// A scale is NaN, infinite or (where it must not be) negative.
    #[error("update blob has a non-finite or negative scale in chunk {chunk}")]
    Scale { chunk: usize },
    /// The header names another codec (or other parameters) than the run's.
    #[error("update blob is encoded as {got}, the run uses {run}")]
    WrongCodec { got: String, run: String },
    /// A top-k position is outside its chunk, or the bit stream ends early.
    #[error("update blob has a position outside chunk {chunk} or runs out of bits there")]
    Index { chunk: usize },
    /// A decoded value is NaN or infinite: sent raw (`none`, a low-rank tail) or the
    /// overflow of a product (an `int8` code times its scale, a low-rank `P Qᵀ`).
    #[error("update blob decodes to a non-finite value at element {index}")]
    NotFinite { index: usize },
    /// A slice that is not whole chunks of a chunked codec's update.
    #[error("cannot take elements {start}..{end} of a {codec} update of {n} elements: {why}")]
    Slice {
        codec: String,
        start: usize,
        end: usize,
        n: u64,
        why: &'static str,
    },
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
    write_header(codec, n, &mut out);
    match codec {
        Codec::None => none::encode(residual, &mut out),
        Codec::Int8 { chunk } => int8::encode(residual, chunk, &mut out),
        Codec::TopK { chunk, k, bits } => topk::encode(residual, chunk, k, bits, &mut out),
        Codec::LowRank { rows, cols, rank } => {
            lowrank::encode(residual, rows, cols, rank, &mut out)
        }
    }
    debug_assert!(out.len() <= codec.max_encoded_bytes(n));
    out
}

fn write_header(codec: Codec, n: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(codec.id());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    // Low-rank keeps its block shape in the chunked codecs' fields: cols as the
    // chunk, rows as k, rank as bits.
    let (chunk, k, bits) = match codec {
        Codec::None => (0, 0, 0),
        Codec::Int8 { chunk } => (chunk, 0, 0),
        Codec::TopK { chunk, k, bits } => (chunk, k, bits),
        Codec::LowRank { rows, cols, rank } => (cols, rows, rank),
    };
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&k.to_le_bytes());
    out.push(bits);
}

/// Elements `range` of a valid update of `expected` elements in the run's codec `run`,
/// as an update of `range.len()` elements in the same codec: the same codes re-framed,
/// nothing re-quantized, so `decode(slice) == decode(whole)[range]` bit for bit. This
/// is how one shard's piece of an update is cut for sharded aggregation. `range` must
/// start on a chunk boundary and end on one or at the update's end; `lowrank` updates
/// cannot be sliced (a block mixes its rows). The whole update is checked first, as
/// [`decode_for`] checks it.
pub fn slice(
    run: Codec,
    bytes: &[u8],
    expected: u64,
    range: std::ops::Range<usize>,
) -> Result<Vec<u8>, CodecError> {
    decode_for(run, bytes, expected)?;
    let n = expected as usize;
    let refuse = |why| CodecError::Slice {
        codec: run.name(),
        start: range.start,
        end: range.end,
        n: expected,
        why,
    };
    if range.start >= range.end || range.end > n {
        return Err(refuse("the range is empty or past the end"));
    }
    let chunk = match run {
        Codec::None => 1,
        Codec::Int8 { chunk } | Codec::TopK { chunk, .. } => chunk as usize,
        Codec::LowRank { .. } => return Err(refuse("low-rank blocks cannot be sliced")),
    };
    if !range.start.is_multiple_of(chunk) || (!range.end.is_multiple_of(chunk) && range.end != n) {
        return Err(refuse("the range does not fall on chunk boundaries"));
    }
    let payload = &bytes[HEADER_BYTES..];
    let mut out = Vec::with_capacity(run.max_encoded_bytes(range.len()));
    write_header(run, range.len(), &mut out);
    match run {
        Codec::None => out.extend_from_slice(&payload[4 * range.start..4 * range.end]),
        Codec::Int8 { chunk } => {
            // Chunk `c` starts at byte c·(4 + chunk): every chunk before it is whole.
            let per = 4 + chunk as usize;
            let first = range.start / chunk as usize;
            let chunks = range.len().div_ceil(chunk as usize);
            let from = first * per;
            out.extend_from_slice(&payload[from..from + 4 * chunks + range.len()]);
        }
        Codec::TopK { chunk, k, bits } => {
            topk::slice(payload, n, range, chunk, k, bits, &mut out);
        }
        Codec::LowRank { .. } => unreachable!("refused above"),
    }
    Ok(out)
}

/// Decodes an update of `expected` elements that must be encoded with the run's codec
/// `run` (kind and every parameter), checked before anything else is computed or
/// allocated. This is the decoder for untrusted blobs.
///
/// Story: a hub once decoded whatever codec a blob's header named. An 18 KB low-rank
/// blob in a top-k run overflowed to inf/NaN and the final model was NaN, and a 22-byte
/// low-rank header with 1 × 1 blocks made the size check itself allocate ~24 bytes per
/// parameter.
pub fn decode_for(run: Codec, bytes: &[u8], expected: u64) -> Result<Vec<f32>, CodecError> {
    decode_checked(Some(run), bytes, expected)
}

/// Decodes an update of `expected` elements with the codec its header names, validating
/// every length, index and scale before allocating or trusting it, and every decoded
/// value after (it must be finite). For blobs of untrusted origin use [`decode_for`].
pub fn decode(bytes: &[u8], expected: u64) -> Result<Vec<f32>, CodecError> {
    decode_checked(None, bytes, expected)
}

fn decode_checked(run: Option<Codec>, bytes: &[u8], expected: u64) -> Result<Vec<f32>, CodecError> {
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
        3 if chunk_ok && (1..=LOW_RANK_ROWS_MAX).contains(&k) && (1..=RANK_MAX).contains(&bits) => {
            Codec::LowRank {
                rows: k,
                cols: chunk,
                rank: bits,
            }
        }
        1..=3 => return Err(CodecError::Params { chunk, k, bits }),
        other => return Err(CodecError::UnknownCodec(other)),
    };
    if let Some(run) = run {
        if codec != run {
            return Err(CodecError::WrongCodec {
                got: codec.name(),
                run: run.name(),
            });
        }
    }
    let n = n as usize;
    let max_len = codec.max_encoded_bytes(n);
    let exact = !matches!(codec, Codec::TopK { .. });
    if bytes.len() > max_len || exact && bytes.len() != max_len {
        return Err(CodecError::Length {
            len: bytes.len(),
            expected: max_len,
        });
    }
    let mut out = vec![0f32; n];
    let payload = &bytes[HEADER_BYTES..];
    match codec {
        Codec::None => none::decode(payload, &mut out),
        Codec::Int8 { chunk } => int8::decode(payload, &mut out, chunk)?,
        Codec::TopK { chunk, k, bits } => topk::decode(payload, &mut out, chunk, k, bits)?,
        Codec::LowRank { rows, cols, rank } => {
            lowrank::decode(payload, &mut out, rows, cols, rank)?
        }
    }
    // Checking every scale is not enough: raw values may be NaN and finite scales can
    // overflow in a product. One non-finite value would make θ NaN.
    if let Some(index) = out.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NotFinite { index });
    }
    Ok(out)
}

/// The little-endian f32 at byte `o` of `bytes`; the caller has checked the length.
fn f32_at(bytes: &[u8], o: usize) -> f32 {
    f32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::noise;

    #[test]
    fn a_slice_decodes_to_exactly_that_part_of_the_whole_update() {
        let n = 4 * 4096 + 1000;
        let codecs = [
            Codec::None,
            Codec::Int8 { chunk: 4096 },
            Codec::Int8 { chunk: 1024 },
            Codec::TopK {
                chunk: 4096,
                k: 44,
                bits: 4,
            },
            Codec::TopK {
                chunk: 1024,
                k: 7,
                bits: 2,
            },
            Codec::TopK {
                chunk: 4096,
                k: 4096,
                bits: 1,
            },
        ];
        for codec in codecs {
            let blob = encode(codec, &noise(n, 3), &mut vec![0.0; n], 1.0);
            let whole = decode_for(codec, &blob, n as u64).expect("valid");
            for range in [0..4096, 4096..3 * 4096, 3 * 4096..n, 0..n, 4 * 4096..n] {
                let piece = slice(codec, &blob, n as u64, range.clone()).expect("slices");
                let part = decode_for(codec, &piece, range.len() as u64).expect("a valid update");
                let same = part
                    .iter()
                    .zip(&whole[range.clone()])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{codec:?} {range:?}: the piece decodes to the same floats"
                );
                assert!(piece.len() <= codec.max_encoded_bytes(range.len()));
            }
            // The pieces of a layout together are the whole update's codes.
            let pieces: usize = [0..8192, 8192..n]
                .into_iter()
                .map(|r| slice(codec, &blob, n as u64, r).expect("slices").len())
                .sum();
            assert!(
                pieces <= blob.len() + HEADER_BYTES + 1,
                "{codec:?}: no bytes invented"
            );
        }
    }

    #[test]
    fn slices_off_chunk_boundaries_of_other_codecs_or_of_bad_blobs_are_refused() {
        let n = 3 * 4096;
        let topk = Codec::TopK {
            chunk: 4096,
            k: 44,
            bits: 4,
        };
        let blob = encode(topk, &noise(n, 4), &mut vec![0.0; n], 1.0);
        for bad in [1..4096, 0..4095, 0..0, 4096..n + 1] {
            assert!(
                matches!(
                    slice(topk, &blob, n as u64, bad.clone()),
                    Err(CodecError::Slice { .. })
                ),
                "{bad:?}"
            );
        }
        let low = Codec::LowRank {
            rows: 1024,
            cols: 256,
            rank: 4,
        };
        let lblob = encode(low, &noise(n, 4), &mut vec![0.0; n], 1.0);
        assert!(matches!(
            slice(low, &lblob, n as u64, 0..4096),
            Err(CodecError::Slice { .. })
        ));
        // The whole blob is checked first: another codec, or a truncated blob.
        assert!(matches!(
            slice(Codec::Int8 { chunk: 4096 }, &blob, n as u64, 0..4096),
            Err(CodecError::WrongCodec { .. })
        ));
        assert!(slice(topk, &blob[..blob.len() - 1], n as u64, 0..4096).is_err());
    }

    /// Story: the hub decoded a blob with whatever codec its header named. A low-rank
    /// blob in a top-k run overflowed θ to inf/NaN, and a 22-byte low-rank header with
    /// 1 × 1 blocks made the size check allocate ~24 bytes per parameter. A blob must now
    /// use the run's codec, checked before any size is computed.
    #[test]
    fn blobs_of_another_codec_than_the_runs_are_refused_first() {
        let n = 100_000usize;
        let run = Codec::TopK {
            chunk: 4096,
            k: 44,
            bits: 4,
        };
        let low = Codec::LowRank {
            rows: 1024,
            cols: 256,
            rank: 4,
        };
        let blob = encode(low, &noise(n, 1), &mut vec![0.0; n], 1.0);
        assert!(decode(&blob, n as u64).is_ok(), "a valid low-rank blob");
        assert!(matches!(
            decode_for(run, &blob, n as u64),
            Err(CodecError::WrongCodec { .. })
        ));
        // The 22-byte header alone: low-rank, 1 × 1 blocks, rank 1.
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.push(3);
        header.extend_from_slice(&(n as u64).to_le_bytes());
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&1u32.to_le_bytes());
        header.push(1);
        assert_eq!(header.len(), HEADER_BYTES);
        assert!(matches!(
            decode_for(run, &header, n as u64),
            Err(CodecError::WrongCodec { .. })
        ));
        // Same kind, other parameters: refused too.
        let other_k = encode(
            Codec::TopK {
                chunk: 4096,
                k: 64,
                bits: 4,
            },
            &noise(n, 2),
            &mut vec![0.0; n],
            1.0,
        );
        assert!(decode_for(run, &other_k, n as u64).is_err());
        let ours = encode(run, &noise(n, 2), &mut vec![0.0; n], 1.0);
        assert_eq!(decode_for(run, &ours, n as u64), decode(&ours, n as u64));
    }

    /// Story: fuzzing (`fuzz/`, targets `update_none`, `update_int8` and
    /// `update_lowrank`, each within seconds) found blobs that passed every check and
    /// decoded to NaN or infinity. A `none` blob and a low-rank tail carry raw f32, so
    /// NaN went through as is; an `int8` scale of `f32::MAX` is finite, but 127 times it
    /// is not; and a low-rank product of large finite factors overflows. Any one such
    /// update, accepted by the hub, makes a mean-aggregated θ NaN for every node. A
    /// decoded update must now be finite everywhere, whatever the codec.
    #[test]
    fn blobs_that_decode_to_non_finite_values_are_refused() {
        let mut values = noise(40, 3);
        values[5] = f32::NAN;
        let nan = encode(Codec::None, &values, &mut [0.0; 40], 1.0);
        assert_eq!(decode(&nan, 40), Err(CodecError::NotFinite { index: 5 }));
        values[5] = f32::INFINITY;
        let inf = encode(Codec::None, &values, &mut [0.0; 40], 1.0);
        assert_eq!(
            decode_for(Codec::None, &inf, 40),
            Err(CodecError::NotFinite { index: 5 })
        );

        // int8: a finite scale whose product with a code overflows.
        let int8 = Codec::Int8 { chunk: 8 };
        let mut blob = encode(int8, &noise(40, 4), &mut [0.0; 40], 1.0);
        let chunk = HEADER_BYTES + 2 * (4 + 8);
        blob[chunk..chunk + 4].copy_from_slice(&f32::MAX.to_le_bytes());
        blob[chunk + 4..chunk + 12].fill(0);
        blob[chunk + 4 + 3] = 127;
        assert_eq!(
            decode_for(int8, &blob, 40),
            Err(CodecError::NotFinite { index: 19 })
        );

        // Low-rank, 4 × 8 blocks of rank 2 over 40 elements: one block, one row of 8
        // (a 1-row block), nothing raw. Large finite scales overflow the product.
        let low = Codec::LowRank {
            rows: 4,
            cols: 8,
            rank: 2,
        };
        let good = encode(low, &noise(40, 5), &mut [0.0; 40], 1.0);
        assert!(decode_for(low, &good, 40).is_ok());
        let mut blob = good.clone();
        for o in [HEADER_BYTES, HEADER_BYTES + 2 * (4 + 4)] {
            // The first column of P, then of Q.
            blob[o..o + 4].copy_from_slice(&1e30f32.to_le_bytes());
        }
        assert!(matches!(
            decode_for(low, &blob, 40),
            Err(CodecError::NotFinite { .. })
        ));
        // A raw tail (43 elements: three past the 1-row block) carrying NaN.
        let mut values = noise(43, 6);
        values[42] = f32::NAN;
        let blob = encode(low, &values, &mut [0.0; 43], 1.0);
        assert_eq!(
            decode_for(low, &blob, 43),
            Err(CodecError::NotFinite { index: 42 })
        );
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
    fn codec_kinds_parse_display_and_serialize_as_their_names() {
        for kind in CodecKind::ALL {
            assert_eq!(kind.name().parse::<CodecKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<CodecKind>(&json).unwrap(), kind);
            assert_eq!(kind.is_sparse(), kind == CodecKind::TopK);
            let codec = kind.codec(40, 4, 8).unwrap();
            assert_eq!(codec.kind(), kind);
        }
        let err = "TopK".parse::<CodecKind>().unwrap_err();
        assert_eq!(err.name, "TopK");
        assert_eq!(
            err.to_string(),
            "unknown codec `TopK`; expected none, int8, topk or lowrank"
        );
        assert!(serde_json::from_str::<CodecKind>("\"top_k\"").is_err());
    }

    #[test]
    fn codec_parameters_are_checked_like_codec_parse_always_did() {
        assert_eq!(
            CodecKind::TopK.codec(40, 4, 0),
            Ok(Codec::TopK {
                chunk: 4096,
                k: 40,
                bits: 4
            })
        );
        assert_eq!(
            CodecKind::LowRank.codec(0, 0, 8),
            Ok(Codec::LowRank {
                rows: 1024,
                cols: 256,
                rank: 8
            })
        );
        assert_eq!(
            CodecKind::Int8.codec(0, 0, 0),
            Ok(Codec::Int8 { chunk: 4096 })
        );
        assert!(CodecKind::TopK
            .codec(0, 4, 1)
            .unwrap_err()
            .contains("got 0"));
        assert!(CodecKind::TopK.codec(4097, 4, 1).is_err());
        assert!(CodecKind::TopK
            .codec(40, 9, 1)
            .unwrap_err()
            .contains("got 9"));
        assert!(CodecKind::LowRank.codec(1, 1, 0).is_err());
        assert!(CodecKind::LowRank
            .codec(1, 1, 65)
            .unwrap_err()
            .contains("got 65"));
        // The old entry point keeps its meaning: `k` is the rank for lowrank.
        assert_eq!(
            Codec::parse("lowrank", 4, 0),
            CodecKind::LowRank.codec(0, 0, 4)
        );
        assert_eq!(Codec::parse("topk", 40, 4), CodecKind::TopK.codec(40, 4, 0));
        assert_eq!(
            Codec::parse("zstd", 1, 1),
            Err("unknown codec `zstd`; expected none, int8, topk or lowrank".into())
        );
    }
}
