//! `run.toml`: what a run organiser writes to start a hub.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tessera_train::outer::{Aggregator, Codec};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    pub run_id: String,
    #[serde(default = "d_preset")]
    pub preset: String,
    /// A data set prepared by `tessera data prepare`.
    pub data: PathBuf,
    #[serde(default = "d_listen")]
    pub listen: String,
    /// UDP address of the hub's blob endpoint (iroh). Loopback by default; a public
    /// run binds a reachable address, e.g. `0.0.0.0:7001`.
    #[serde(default = "d_blob_bind")]
    pub blob_bind: std::net::SocketAddr,
    /// Where the hub keeps its database, blobs and checkpoints.
    pub state_dir: PathBuf,
    #[serde(default = "d_min_nodes")]
    pub min_nodes: usize,
    #[serde(default = "d_max_nodes")]
    pub max_nodes: usize,
    pub rounds: u64,
    #[serde(default = "d_inner_steps")]
    pub inner_steps: u64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    #[serde(default = "d_deadline")]
    pub round_deadline_ms: u64,
    #[serde(default = "d_heartbeat")]
    pub heartbeat_timeout_ms: u64,
    #[serde(default = "d_missed")]
    pub missed_rounds_max: u32,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    #[serde(default = "d_outer_lr")]
    pub outer_lr: f32,
    #[serde(default = "d_momentum")]
    pub outer_momentum: f32,
    /// Error-feedback decay: how much unsent residual carries to the next round.
    #[serde(default = "d_ef_decay")]
    pub ef_decay: f32,
    /// `none`, `int8`, `topk` or `lowrank`.
    #[serde(default = "d_codec")]
    pub codec: String,
    /// Elements kept per 4096 by `topk`.
    #[serde(default = "d_topk")]
    pub topk: u32,
    /// Bits per value kept by `topk` (a sign and 2^(bits−1) magnitudes).
    #[serde(default = "d_topk_bits")]
    pub topk_bits: u8,
    /// Rank of each 1024 × 256 block's update under `lowrank`.
    #[serde(default = "d_rank")]
    pub rank: u32,
    /// `mean`, `median`, `trimmed_mean` or `norm_clip`.
    #[serde(default = "d_aggregator")]
    pub aggregator: String,
    #[serde(default)]
    pub seed: u64,
    /// A ledger (from `tessera ledger init`) whose run pool `run_id` pays every closed
    /// round; fund the run with `tessera ledger fund --run RUN_ID` first.
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// The run organiser's public key (hex): the key allowed to sell, fund and record
    /// revenue through the hub's `/ledger/` API.
    #[serde(default)]
    pub organiser: Option<String>,
}

fn d_preset() -> String {
    "micro".into()
}
fn d_listen() -> String {
    "127.0.0.1:7000".into()
}
fn d_blob_bind() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}
fn d_min_nodes() -> usize {
    2
}
fn d_max_nodes() -> usize {
    64
}
fn d_inner_steps() -> u64 {
    25
}
fn d_batch() -> usize {
    8
}
fn d_seq() -> usize {
    128
}
fn d_deadline() -> u64 {
    120_000
}
fn d_heartbeat() -> u64 {
    10_000
}
fn d_missed() -> u32 {
    3
}
fn d_lr() -> f64 {
    3e-3
}
fn d_warmup() -> u64 {
    25
}
fn d_outer_lr() -> f32 {
    0.7
}
fn d_momentum() -> f32 {
    0.9
}
fn d_codec() -> String {
    "topk".into()
}
fn d_ef_decay() -> f32 {
    1.0
}
fn d_rank() -> u32 {
    4
}
fn d_topk_bits() -> u8 {
    4
}
fn d_topk() -> u32 {
    64
}
fn d_aggregator() -> String {
    "mean".into()
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<HubConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: HubConfig =
            toml::from_str(&text).with_context(|| format!("{}: bad run config", path.display()))?;
        config.codec()?;
        config.aggregator()?;
        if config.rounds == 0 || config.inner_steps == 0 || config.min_nodes == 0 {
            bail!(
                "{}: rounds, inner_steps and min_nodes must be positive",
                path.display()
            );
        }
        if !(0.0..=1.0).contains(&config.ef_decay) {
            bail!(
                "{}: ef_decay must be within 0..=1, got {}",
                path.display(),
                config.ef_decay
            );
        }
        if config.min_nodes > config.max_nodes {
            bail!(
                "{}: min_nodes {} exceeds max_nodes {}",
                path.display(),
                config.min_nodes,
                config.max_nodes
            );
        }
        Ok(config)
    }

    pub fn codec(&self) -> Result<Codec> {
        let k = if self.codec == "lowrank" {
            self.rank
        } else {
            self.topk
        };
        Codec::parse(&self.codec, k, self.topk_bits).map_err(anyhow::Error::msg)
    }

    pub fn aggregator(&self) -> Result<Aggregator> {
        Ok(match self.aggregator.as_str() {
            "mean" => Aggregator::Mean,
            "median" => Aggregator::Median,
            "trimmed_mean" => Aggregator::TrimmedMean { trim: 1 },
            "norm_clip" => Aggregator::NormClip { factor: 2.0 },
            other => bail!(
                "unknown aggregator `{other}`; expected mean, median, trimmed_mean or norm_clip"
            ),
        })
    }
}
