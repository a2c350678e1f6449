//! The run's settings: one [`RunSpec`] with the defaults Tessera ships. The hub's
//! `run.toml`, `tessera demo`, `tessera experiment diloco` and the simulator all start
//! from [`RunSpec::default`], so the settings that were measured best are the settings
//! a run gets when its organiser writes nothing (docs/results.md, "DiLoCo against its
//! DDP equivalent").
//!
//! Every default here is a measured choice; change one only with a new measurement.

use serde::{Deserialize, Serialize};
use tessera_outer::{Aggregator, Codec, CodecKind};

use crate::limits::{BATCH_SIZE_MAX, INNER_STEPS_MAX, MEMBERS_MAX, ROUNDS_MAX};

/// Everything that defines a run's training and its protocol timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Names the run in every signed body and in the ledger (`pool:RUN_ID`).
    pub run_id: String,
    /// A model preset from `tessera model list`.
    pub preset: String,
    /// Rounds to train; the run finishes after this many.
    pub rounds: u64,
    /// Training starts when this many nodes have joined.
    pub min_nodes: usize,
    /// Most members at once (at most `limits::MEMBERS_MAX`).
    pub max_nodes: usize,
    /// H: inner steps (batches) each member trains per round.
    pub inner_steps: u64,
    /// Sequences per inner step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Inner AdamW peak learning rate (warm-up, then cosine decay to 10%).
    pub lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    /// Outer learning rate for dense codecs (`none`, `int8`, `lowrank`).
    #[serde(deserialize_with = "f32_in_range")]
    pub outer_lr: f32,
    /// Outer learning rate for sparse codecs (`topk`): a sparse update moves θ only where
    /// it has values and the rest waits in the error-feedback residual; a larger outer
    /// step makes up for that lag (measured: 2.5 best, past it overshoots).
    #[serde(deserialize_with = "f32_in_range")]
    pub sparse_outer_lr: f32,
    /// Nesterov momentum of the outer step (0: plain averaging, measured best for runs
    /// of tens of rounds).
    #[serde(deserialize_with = "f32_in_range")]
    pub outer_momentum: f32,
    /// How much unsent error-feedback residual carries into the next round (1 = all).
    #[serde(deserialize_with = "f32_in_range")]
    pub ef_decay: f32,
    /// `none`, `int8`, `topk` or `lowrank`.
    pub codec: CodecKind,
    /// Values kept per 4096-element chunk by `topk`.
    pub topk: u32,
    /// Bits per value kept by `topk` (a sign and 2^(bits−1) magnitudes).
    pub topk_bits: u8,
    /// Rank of each 1024 × 256 block's update under `lowrank`.
    pub rank: u32,
    /// `clipped_mean` (each update clipped to the round's median norm, then averaged),
    /// `mean`, `median`, `trimmed_mean` or `norm_clip` (clipped to twice the median).
    #[serde(with = "aggregator_name")]
    pub aggregator: Aggregator,
    /// A round closes when every member committed or at this deadline.
    pub round_deadline_ms: u64,
    /// A member silent for this long is dropped.
    pub heartbeat_timeout_ms: u64,
    /// A member that misses this many rounds in a row is dropped.
    pub missed_rounds_max: u32,
    /// Seeds θ₀, the data order and the member shuffle.
    pub seed: u64,
    /// New members the hub admits per minute (0: no limit); more joins are told to
    /// retry, so a node ejected for cheating can't come straight back under a stream
    /// of fresh keys.
    pub joins_per_minute: u32,
    /// Whole tokens a node must have staked on this run (`stake:RUN:NODE` in the hub's
    /// ledger) to join it; a node caught cheating loses them. A hub without a ledger
    /// pays nobody and requires no stake.
    pub min_stake: u64,
    /// `off`, `optional` or `required`: whether members must prove by a hardware quote
    /// that they run an allow-listed build in a TEE. A run on a sealed data set is
    /// `required` (the hub sets it when its data is sealed).
    pub tee: TeeMode,
    /// A private run's key server (the data owner's `tessera keys serve`), where an
    /// attested member gets the sealed data set's keys. Empty for a public run.
    pub key_server: String,
    /// How the accepted updates reach every member: `all-to-all` (each member fetches
    /// every accepted update, O(members) per member) or `sharded` (each shard of the
    /// update is combined by `aggregators_per_shard` members drawn after the round
    /// closes, and each member fetches the aggregated shards, O(1) per member;
    /// `tessera_outer::shard`).
    pub aggregation: AggregationMode,
    /// Aggregators per shard under `sharded` (2..=8): their shards must agree with the
    /// hub's, so a wrong one is caught.
    pub aggregators_per_shard: u32,
    /// Under `sharded` with `topk`: an aggregated shard keeps this many times `topk`
    /// values per chunk (at most the whole chunk). It combines the pieces of every
    /// accepted update, whose kept positions barely overlap, so at one update's density
    /// most of the aggregate would wait in the senders' residuals for later rounds; a
    /// member then fetches this many updates' worth per round, whatever the number of
    /// members.
    pub shard_topk_multiple: u32,
    /// Overlap communication with compute: round `r`'s batches are drawn when round
    /// `r - 1` opens, and members train them from θ of round `r - 1` while round
    /// `r - 1`'s updates are judged and exchanged (the one-step-delayed outer update of
    /// `tessera experiment diloco --overlap`, whose cost docs/results.md measures). Off
    /// by default: at the run defaults it costs more bpb than the 3% budget.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub overlap: bool,
}

/// How the accepted updates reach every member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationMode {
    #[default]
    AllToAll,
    Sharded,
}

/// Whether a run's members attest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeMode {
    #[default]
    Off,
    Optional,
    Required,
}

impl Default for RunSpec {
    fn default() -> RunSpec {
        RunSpec {
            run_id: String::new(),
            preset: "micro".into(),
            // 200 inner steps at H = 5: the length the defaults were measured at.
            rounds: 40,
            min_nodes: 2,
            max_nodes: 64,
            inner_steps: 5,
            batch_size: 8,
            seq_len: 128,
            lr: 3e-3,
            warmup_steps: 25,
            grad_clip: 1.0,
            outer_lr: 1.0,
            sparse_outer_lr: 2.5,
            outer_momentum: 0.0,
            ef_decay: 0.95,
            codec: CodecKind::TopK,
            topk: 44,
            topk_bits: 4,
            rank: 4,
            // The validator's clipped mean (measured: docs/results.md, DiLoCo).
            aggregator: Aggregator::NormClip { factor: 1.0 },
            round_deadline_ms: 120_000,
            heartbeat_timeout_ms: 15_000,
            missed_rounds_max: 3,
            seed: 0,
            joins_per_minute: 120,
            min_stake: 1,
            tee: TeeMode::Off,
            key_server: String::new(),
            aggregation: AggregationMode::AllToAll,
            aggregators_per_shard: 2,
            shard_topk_multiple: 4,
            overlap: false,
        }
    }
}

/// A setting outside what Tessera can run; names the setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("run setting `{setting}`: {problem}")]
pub struct SpecError {
    pub setting: &'static str,
    pub problem: String,
}

fn bad(setting: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError {
        setting,
        problem: problem.into(),
    }
}

impl RunSpec {
    /// Checks every setting and how they relate.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.run_id.is_empty()
            || self.run_id.len() > 64
            || !self
                .run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || self.run_id.starts_with('.')
        {
            return Err(bad(
                "run_id",
                format!(
                    "`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-`, `_`, `.`, not starting with `.`",
                    self.run_id.escape_debug()
                ),
            ));
        }
        for (setting, value) in [
            ("rounds", self.rounds),
            ("inner_steps", self.inner_steps),
            ("min_nodes", self.min_nodes as u64),
            ("batch_size", self.batch_size as u64),
            ("seq_len", self.seq_len as u64),
            ("round_deadline_ms", self.round_deadline_ms),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms),
            ("missed_rounds_max", u64::from(self.missed_rounds_max)),
        ] {
            if value == 0 {
                return Err(bad(setting, "must be positive"));
            }
        }
        // The ledger holds at most 10^18 tokens in all.
        if self.tee == TeeMode::Required && self.key_server.is_empty() {
            return Err(bad(
                "key_server",
                "a run with `tee = \"required\"` names the key server that releases its data keys",
            ));
        }
        let web = ["http://", "https://"]
            .iter()
            .any(|p| self.key_server.starts_with(p));
        if !self.key_server.is_empty() && !web {
            return Err(bad(
                "key_server",
                format!("`{}` is not an http:// or https:// URL", self.key_server),
            ));
        }
        if self.min_stake > 1_000_000_000_000_000_000 {
            return Err(bad(
                "min_stake",
                format!("{} tokens is more than can exist", self.min_stake),
            ));
        }
        if self.inner_steps > INNER_STEPS_MAX {
            return Err(bad(
                "inner_steps",
                format!(
                    "{} exceeds the limit of {INNER_STEPS_MAX}",
                    self.inner_steps
                ),
            ));
        }
        if self.batch_size > BATCH_SIZE_MAX {
            return Err(bad(
                "batch_size",
                format!("{} exceeds the limit of {BATCH_SIZE_MAX}", self.batch_size),
            ));
        }
        if self.rounds > ROUNDS_MAX {
            return Err(bad(
                "rounds",
                format!("{} exceeds the limit of {ROUNDS_MAX}", self.rounds),
            ));
        }
        if self.max_nodes > MEMBERS_MAX {
            return Err(bad(
                "max_nodes",
                format!("{} exceeds the limit of {MEMBERS_MAX}", self.max_nodes),
            ));
        }
        if self.min_nodes > self.max_nodes {
            return Err(bad(
                "min_nodes",
                format!("{} exceeds max_nodes {}", self.min_nodes, self.max_nodes),
            ));
        }
        if !(0.0..=1.0).contains(&self.ef_decay) {
            return Err(bad(
                "ef_decay",
                format!("must be within 0..=1, got {}", self.ef_decay),
            ));
        }
        for (setting, v) in [
            ("outer_lr", self.outer_lr),
            ("sparse_outer_lr", self.sparse_outer_lr),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(setting, format!("must be positive, got {v}")));
            }
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(bad(
                "outer_momentum",
                format!("must be within 0..1, got {}", self.outer_momentum),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("lr", format!("must be positive, got {}", self.lr)));
        }
        self.codec().map_err(|e| {
            bad(
                if self.codec == CodecKind::LowRank {
                    "rank"
                } else {
                    "topk"
                },
                e,
            )
        })?;
        let max = tessera_outer::shard::REDUNDANCY_MAX as u32;
        if !(2..=max).contains(&self.aggregators_per_shard) {
            return Err(bad(
                "aggregators_per_shard",
                format!(
                    "must be 2..={max} (a shard needs two aggregators to compare), got {}",
                    self.aggregators_per_shard
                ),
            ));
        }
        if !(1..=64).contains(&self.shard_topk_multiple) {
            return Err(bad(
                "shard_topk_multiple",
                format!("must be 1..=64, got {}", self.shard_topk_multiple),
            ));
        }
        if self.aggregation == AggregationMode::Sharded && self.codec == CodecKind::LowRank {
            return Err(bad(
                "aggregation",
                "`sharded` needs a chunked codec (none, int8 or topk): a low-rank block \
                 mixes parameters across shards",
            ));
        }
        if self.overlap && self.aggregation == AggregationMode::Sharded {
            return Err(bad(
                "overlap",
                "`overlap` runs with `aggregation = \"all-to-all\"` only: a sharded \
                 round's aggregators would still be combining while they train the next",
            ));
        }
        let preset = tessera_model_config::Preset::by_name(&self.preset)
            .map_err(|e| bad("preset", e.to_string()))?;
        // The data set changes only the vocabulary, never the context.
        let context = preset.config().max_position_embeddings;
        if self.seq_len > context {
            return Err(bad(
                "seq_len",
                format!(
                    "{} exceeds the context of preset `{}`, {context} tokens",
                    self.seq_len, self.preset
                ),
            ));
        }
        Ok(())
    }

    /// The codec with its parameters.
    pub fn codec(&self) -> Result<Codec, String> {
        self.codec.codec(self.topk, self.topk_bits, self.rank)
    }

    /// The codec of an aggregated shard under sharded aggregation: the run's codec, with
    /// `shard_topk_multiple` × `topk` values per chunk for `topk`.
    pub fn shard_codec(&self) -> Result<Codec, String> {
        match self.codec()? {
            Codec::TopK { chunk, k, bits } => Ok(Codec::TopK {
                chunk,
                k: k.saturating_mul(self.shard_topk_multiple).min(chunk),
                bits,
            }),
            other => Ok(other),
        }
    }

    /// The outer learning rate the run's codec uses.
    pub fn effective_outer_lr(&self) -> f32 {
        if self.codec.is_sparse() {
            self.sparse_outer_lr
        } else {
            self.outer_lr
        }
    }

    /// Tokens one batch holds.
    pub fn tokens_per_batch(&self) -> u64 {
        (self.batch_size * self.seq_len) as u64
    }

    /// Inner steps in the whole run (the learning-rate schedule's length).
    pub fn total_steps(&self) -> u64 {
        self.rounds * self.inner_steps
    }
}

/// An `f32` setting, refusing a number beyond `f32`'s range (serde's own `f32` reads an
/// `f64` and casts it, turning such a number into infinity).
fn f32_in_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let wide = f64::deserialize(d)?;
    let narrow = wide as f32;
    if narrow.is_finite() {
        Ok(narrow)
    } else {
        Err(serde::de::Error::custom(format!(
            "{wide} is out of range for f32"
        )))
    }
}

mod aggregator_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tessera_outer::Aggregator;

    pub fn serialize<S: Serializer>(a: &Aggregator, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Aggregator, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_measured_best() {
        let s = RunSpec {
            run_id: "r".into(),
            ..RunSpec::default()
        };
        s.validate().unwrap();
        assert_eq!(s.inner_steps, 5);
        assert_eq!(s.effective_outer_lr(), 2.5);
        assert_eq!(s.outer_momentum, 0.0);
        assert_eq!(s.ef_decay, 0.95);
        assert_eq!(s.codec().unwrap(), Codec::parse("topk", 44, 4).unwrap());
    }

    #[test]
    fn bad_settings_name_themselves() {
        let base = RunSpec {
            run_id: "r".into(),
            ..RunSpec::default()
        };
        let cases: Vec<(&str, RunSpec)> = vec![
            (
                "run_id",
                RunSpec {
                    run_id: "../x".into(),
                    ..base.clone()
                },
            ),
            (
                "inner_steps",
                RunSpec {
                    inner_steps: 0,
                    ..base.clone()
                },
            ),
            (
                "max_nodes",
                RunSpec {
                    max_nodes: MEMBERS_MAX + 1,
                    ..base.clone()
                },
            ),
            (
                "min_nodes",
                RunSpec {
                    min_nodes: 100,
                    max_nodes: 10,
                    ..base.clone()
                },
            ),
            (
                "ef_decay",
                RunSpec {
                    ef_decay: 1.5,
                    ..base.clone()
                },
            ),
            (
                "sparse_outer_lr",
                RunSpec {
                    sparse_outer_lr: f32::NAN,
                    ..base.clone()
                },
            ),
            (
                "topk",
                RunSpec {
                    topk: 0,
                    ..base.clone()
                },
            ),
            (
                "preset",
                RunSpec {
                    preset: "huge".into(),
                    ..base.clone()
                },
            ),
            (
                "aggregators_per_shard",
                RunSpec {
                    aggregators_per_shard: 1,
                    ..base.clone()
                },
            ),
            (
                "aggregators_per_shard",
                RunSpec {
                    aggregators_per_shard: 9,
                    ..base.clone()
                },
            ),
            (
                "shard_topk_multiple",
                RunSpec {
                    shard_topk_multiple: 0,
                    ..base.clone()
                },
            ),
            (
                "aggregation",
                RunSpec {
                    aggregation: AggregationMode::Sharded,
                    codec: CodecKind::LowRank,
                    ..base.clone()
                },
            ),
            (
                "overlap",
                RunSpec {
                    aggregation: AggregationMode::Sharded,
                    overlap: true,
                    ..base.clone()
                },
            ),
        ];
        for (setting, spec) in cases {
            let e = spec.validate().unwrap_err();
            assert_eq!(e.setting, setting, "{e}");
        }
    }

    /// Story: `validate` accepted a `batch_size` and `seq_len` whose product overflows
    /// `tokens_per_batch` (a panic in a debug build, a wrapped token budget for the
    /// coordinator in release); the `run_spec` fuzz target, which computes it for every
    /// valid spec, failed on a hand-made input while it was written. Nothing tied
    /// `seq_len` to the model either: the hub refused a sequence longer than the
    /// preset's context at start-up, but a node validating a hostile hub's settings
    /// accepted it and its model asserted on the first batch. `batch_size` is now at
    /// most `limits::BATCH_SIZE_MAX` and `seq_len` at most the preset's context.
    #[test]
    fn batch_and_sequence_sizes_are_bounded() {
        let base = RunSpec {
            run_id: "r".into(),
            ..RunSpec::default()
        };
        let huge = RunSpec {
            batch_size: 1 << 62,
            seq_len: 8,
            ..base.clone()
        };
        assert_eq!(huge.validate().unwrap_err().setting, "batch_size");
        let long = RunSpec {
            seq_len: 129,
            ..base.clone()
        };
        let e = long.validate().unwrap_err();
        assert_eq!(e.setting, "seq_len", "{e}");
        assert!(e.to_string().contains("128"), "{e}");
        let widest = RunSpec {
            batch_size: BATCH_SIZE_MAX,
            seq_len: 128,
            ..base
        };
        widest.validate().unwrap();
        assert_eq!(widest.tokens_per_batch(), (BATCH_SIZE_MAX * 128) as u64);
    }

    /// Story: fuzzing (`fuzz/`, target `run_spec`, after 120,000 executions) found
    /// that `"ef_decay": 1.2e96` parsed: serde reads an `f32` as an `f64` and casts it,
    /// so a number beyond `f32::MAX` became infinity where one beyond `f64::MAX` is an
    /// error. Serialised again, infinity is JSON `null`, which no longer parses, so a
    /// decoded spec did not survive its own round trip. `validate` refused the value,
    /// but under another name than the input's; the four `f32` settings now refuse a
    /// number out of `f32`'s range when they are read.
    #[test]
    fn f32_settings_out_of_range_are_refused_when_read() {
        for setting in ["outer_lr", "sparse_outer_lr", "outer_momentum", "ef_decay"] {
            let json = format!("{{\"run_id\":\"r\",\"{setting}\":1.2e96}}");
            let e = serde_json::from_str::<RunSpec>(&json).unwrap_err();
            assert!(
                e.to_string().contains("out of range for f32"),
                "{setting}: {e}"
            );
            let toml = format!("run_id = \"r\"\n{setting} = -3.5e39\n");
            assert!(toml::from_str::<RunSpec>(&toml).is_err(), "{setting}");
        }
        let s: RunSpec =
            serde_json::from_str(r#"{"run_id":"r","ef_decay":0.5,"outer_lr":2}"#).unwrap();
        assert_eq!((s.ef_decay, s.outer_lr), (0.5, 2.0));
        let back: RunSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn sharded_runs_name_their_aggregation_and_shard_codec() {
        let s: RunSpec = toml::from_str(
            "run_id = \"x\"\naggregation = \"sharded\"\naggregators_per_shard = 3\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.aggregation, AggregationMode::Sharded);
        assert_eq!(s.aggregators_per_shard, 3);
        assert_eq!(RunSpec::default().aggregation, AggregationMode::AllToAll);
        // An aggregated shard keeps 4 × 44 values per chunk; other codecs are unchanged.
        assert_eq!(
            s.shard_codec().unwrap(),
            Codec::TopK {
                chunk: 4096,
                k: 176,
                bits: 4
            }
        );
        let wide = RunSpec {
            topk: 2048,
            ..s.clone()
        };
        assert!(matches!(
            wide.shard_codec().unwrap(),
            Codec::TopK { k: 4096, .. }
        ));
        let int8 = RunSpec {
            codec: CodecKind::Int8,
            ..s
        };
        assert_eq!(int8.shard_codec(), int8.codec());
        assert!(toml::from_str::<RunSpec>("aggregation = \"gossip\"\n").is_err());
    }

    #[test]
    fn toml_names_codec_and_aggregator_as_words() {
        let s: RunSpec =
            toml::from_str("run_id = \"x\"\ncodec = \"int8\"\naggregator = \"norm_clip\"\n")
                .unwrap();
        assert_eq!(s.codec, CodecKind::Int8);
        assert_eq!(s.aggregator, Aggregator::NormClip { factor: 2.0 });
        assert!(toml::from_str::<RunSpec>("run_id = \"x\"\nbogus = 1\n").is_err());
        let back: RunSpec = toml::from_str(&toml::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
