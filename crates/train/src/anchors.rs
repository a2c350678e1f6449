//! The formats a DiLoCo row can name: Tessera's codecs, and two formats published by
//! other decentralized trainers (the anchors), expressed with Tessera's codecs so they
//! run on the same work and the comparison is of formats, not of code bases.
//!
//! - `sparseloco` — SparseLoCo (Sarfi, Thérien, Lidin & Belilovsky, "Communication
//!   Efficient LLM Pre-training with SparseLoCo", 2025; Templar): per chunk of 4,096
//!   elements, the top 64 magnitudes (1.56% density, inside the paper's 1–3%), values
//!   at 2 bits, error feedback with decay β = 0.95 in place of outer momentum, and a
//!   plain averaged outer step with α = 1. Runs as Tessera's `topk` codec with those
//!   parameters. What differs from their code: their chunks of a weight matrix are
//!   64 × 64 tiles where Tessera's are 4,096 consecutive elements of the flat θ; their
//!   2-bit values come from a statistical quantizer (uniform bins over a few standard
//!   deviations of the kept values, each bin sent as the mean of its members), Tessera's
//!   are a sign and one of two magnitudes per chunk; their positions take 12 bits (or
//!   their own entropy coder), Tessera's are Rice-coded gaps (about 7.5 bits). Bytes are
//!   counted as Tessera encodes the format.
//! - `intellect-int8` — INTELLECT-1's pseudo-gradient format (Prime Intellect, the
//!   `prime` trainer): one byte per element, no error feedback. Runs as Tessera's `int8`
//!   codec (an absmax scale per 4,096 elements) with error feedback off. What differs:
//!   theirs quantizes each all-reduce chunk (a tensor cut into 2·M pieces) into 256
//!   uniform bins over ±3 standard deviations (root mean square, no centring) and sends
//!   a 256-entry table of bin means with it, values past the range clamped into the end
//!   bins, and their ring all-reduce re-quantizes partial sums at every hop; the bytes
//!   per element are the same within 0.1%. Its outer step here is Tessera's dense one
//!   (the run's `outer_lr` and momentum), not INTELLECT-1's Nesterov 0.9 at lr 0.7 over
//!   H = 100, which this experiment measured worse at every horizon it ran.

use std::fmt;
use std::str::FromStr;

use crate::diloco::RowSpec;
use crate::outer::{Codec, CodecKind};

/// Chunk of the SparseLoCo anchor (elements).
pub const SPARSELOCO_CHUNK: u32 = 4096;
/// Kept per chunk by the SparseLoCo anchor: 64 of 4,096, 1.56%.
pub const SPARSELOCO_K: u32 = 64;
/// Bits per kept value of the SparseLoCo anchor.
pub const SPARSELOCO_BITS: u8 = 2;
/// SparseLoCo's error-feedback decay β.
pub const SPARSELOCO_EF_DECAY: f32 = 0.95;
/// SparseLoCo's outer step α (no outer momentum).
pub const SPARSELOCO_OUTER_LR: f32 = 1.0;
/// Chunk of the INTELLECT-1 int8 anchor's scales in Tessera's `int8` codec.
pub const INTELLECT_CHUNK: u32 = 4096;

/// What a row of the experiment names: one of Tessera's codecs or an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Tessera(CodecKind),
    SparseLoco,
    IntellectInt8,
}

/// The settings a Tessera codec's row takes from the run (anchors fix their own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunCodecSettings {
    pub topk: u32,
    pub topk_bits: u8,
    pub rank: u32,
    /// Outer learning rate for dense codecs.
    pub outer_lr: f32,
    /// Outer learning rate for sparse codecs.
    pub sparse_outer_lr: f32,
    pub outer_momentum: f32,
    pub ef_decay: f32,
}

impl Format {
    const NAMES: &'static str = "none, int8, topk, lowrank, sparseloco or intellect-int8";

    /// The name `FromStr` accepts and `Display` writes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Tessera(kind) => kind.name(),
            Format::SparseLoco => "sparseloco",
            Format::IntellectInt8 => "intellect-int8",
        }
    }

    /// Whether the format is another trainer's (its settings are its own).
    pub fn is_anchor(self) -> bool {
        !matches!(self, Format::Tessera(_))
    }

    /// The row this format runs as. A Tessera codec takes its parameters and outer
    /// settings from `run` (the sparse outer learning rate for `topk`); an anchor
    /// ignores `run` and uses its published settings (see the module docs).
    pub fn row(self, run: &RunCodecSettings) -> Result<RowSpec, String> {
        Ok(match self {
            Format::Tessera(kind) => {
                let codec = kind.codec(run.topk, run.topk_bits, run.rank)?;
                RowSpec {
                    label: codec.name(),
                    codec,
                    outer_lr: if kind.is_sparse() {
                        run.sparse_outer_lr
                    } else {
                        run.outer_lr
                    },
                    outer_momentum: run.outer_momentum,
                    ef_decay: run.ef_decay,
                }
            }
            Format::SparseLoco => {
                let codec = Codec::TopK {
                    chunk: SPARSELOCO_CHUNK,
                    k: SPARSELOCO_K,
                    bits: SPARSELOCO_BITS,
                };
                RowSpec {
                    label: format!("sparseloco ({})", codec.name()),
                    codec,
                    outer_lr: SPARSELOCO_OUTER_LR,
                    outer_momentum: 0.0,
                    ef_decay: SPARSELOCO_EF_DECAY,
                }
            }
            Format::IntellectInt8 => {
                let codec = Codec::Int8 {
                    chunk: INTELLECT_CHUNK,
                };
                RowSpec {
                    label: format!("intellect-int8 ({}, no error feedback)", codec.name()),
                    codec,
                    outer_lr: run.outer_lr,
                    outer_momentum: run.outer_momentum,
                    ef_decay: 0.0,
                }
            }
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(name: &str) -> Result<Format, String> {
        match name {
            "sparseloco" => Ok(Format::SparseLoco),
            "intellect-int8" => Ok(Format::IntellectInt8),
            _ => name
                .parse::<CodecKind>()
                .map(Format::Tessera)
                .map_err(|_| format!("unknown format {name:?}; expected {}", Format::NAMES)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunCodecSettings {
        RunCodecSettings {
            topk: 44,
            topk_bits: 4,
            rank: 4,
            outer_lr: 1.0,
            sparse_outer_lr: 2.5,
            outer_momentum: 0.0,
            ef_decay: 0.95,
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for name in [
            "none",
            "int8",
            "topk",
            "lowrank",
            "sparseloco",
            "intellect-int8",
        ] {
            assert_eq!(name.parse::<Format>().unwrap().to_string(), name);
        }
        let err = "sparse-loco".parse::<Format>().unwrap_err();
        assert!(
            err.contains("sparse-loco") && err.contains("intellect-int8"),
            "{err}"
        );
    }

    #[test]
    fn anchors_keep_their_published_settings_whatever_the_run_says() {
        let a = Format::SparseLoco.row(&run()).unwrap();
        let mut other = run();
        other.topk = 8;
        other.topk_bits = 8;
        other.sparse_outer_lr = 9.0;
        other.ef_decay = 0.5;
        assert_eq!(Format::SparseLoco.row(&other).unwrap(), a);
        assert_eq!(
            a.codec,
            Codec::TopK {
                chunk: 4096,
                k: 64,
                bits: 2
            }
        );
        assert_eq!((a.outer_lr, a.outer_momentum, a.ef_decay), (1.0, 0.0, 0.95));
        // INTELLECT-1 sends int8 without error feedback, at the run's dense outer step.
        let i = Format::IntellectInt8.row(&run()).unwrap();
        assert_eq!(i.codec, Codec::Int8 { chunk: 4096 });
        assert_eq!((i.outer_lr, i.ef_decay), (1.0, 0.0));
    }

    #[test]
    fn tessera_codecs_take_the_runs_settings() {
        let t = Format::Tessera(CodecKind::TopK).row(&run()).unwrap();
        assert_eq!(
            t.codec,
            Codec::TopK {
                chunk: 4096,
                k: 44,
                bits: 4
            }
        );
        assert_eq!((t.outer_lr, t.ef_decay), (2.5, 0.95));
        let d = Format::Tessera(CodecKind::None).row(&run()).unwrap();
        assert_eq!(d.outer_lr, 1.0);
        let mut bad = run();
        bad.topk = 0;
        assert!(Format::Tessera(CodecKind::TopK).row(&bad).is_err());
    }
}
