//! `tessera plan`: what a run of a preset would take (`tessera_model_config::plan`).

use anyhow::{bail, Result};
use clap::Args;
use tessera_model::config::plan::{plan, Assumptions, Gpu, Plan};
use tessera_model::config::{Preset, PRESETS};

#[derive(Args)]
pub struct PlanArgs {
    /// A preset (`tessera model list`), or `series` for every preset from 500m up.
    #[arg(long, default_value = "series")]
    preset: String,
    /// Contributor machines taking part.
    #[arg(long, default_value_t = 1000)]
    nodes: u64,
    /// GPU kind: h100, h200, b200, a100, mi300x, rtx4090.
    #[arg(long, default_value = "h100")]
    gpu: String,
    #[arg(long, default_value_t = 8)]
    gpus_per_machine: u64,
    /// Each machine's internet link, megabits per second each way.
    #[arg(long, default_value_t = 1000.0)]
    link_mbps: f64,
    /// Training tokens (default: --tokens-per-param × parameters).
    #[arg(long)]
    tokens: Option<u64>,
    #[arg(long, default_value_t = 20.0)]
    tokens_per_param: f64,
    /// Model FLOP utilization of the inner steps.
    #[arg(long, default_value_t = 0.4)]
    mfu: f64,
    /// Override the GPU's dense bf16 peak, FLOP/s.
    #[arg(long)]
    peak_flops: Option<f64>,
    /// Override the GPU's rental price.
    #[arg(long)]
    price_per_gpu_hour: Option<f64>,
    #[arg(long, default_value_t = 2)]
    weight_bytes: u64,
    #[arg(long, default_value_t = 2)]
    grad_bytes: u64,
    #[arg(long, default_value_t = 8)]
    optimizer_bytes: u64,
    #[arg(long, default_value_t = 12)]
    outer_bytes: u64,
    /// A pseudo-gradient's size per parameter (default: the run's default codec, its
    /// size bound from `Codec::max_encoded_bytes`).
    #[arg(long)]
    update_bytes_per_param: Option<f64>,
    /// An aggregated shard's size per parameter under sharded aggregation (default: the
    /// run's default shard codec's size bound, `RunSpec::shard_codec`).
    #[arg(long)]
    shard_bytes_per_param: Option<f64>,
    /// How much an activation codec shrinks stage-boundary traffic (1: none).
    #[arg(long, default_value_t = 1.0)]
    activation_codec_ratio: f64,
    #[arg(long, default_value_t = 4096)]
    seq_len: u64,
    #[arg(long, default_value_t = 1)]
    micro_batch_seqs: u64,
    #[arg(long, default_value_t = 0.9)]
    memory_headroom: f64,
    #[arg(long, default_value_t = 100)]
    inner_steps: u64,
    #[arg(long, default_value_t = 1 << 20)]
    replica_batch_tokens: u64,
    /// Aggregators per shard (sharded aggregation).
    #[arg(long, default_value_t = 2)]
    redundancy: u64,
    #[arg(long)]
    json: bool,
}

/// Bytes per parameter of the run's default codec (or, with `shard`, of its default
/// aggregated-shard codec) for `params` parameters.
fn default_bytes_per_param(params: u64, shard: bool) -> Result<f64> {
    let spec = tessera_protocol::RunSpec::default();
    let codec = if shard {
        spec.shard_codec()
    } else {
        spec.codec()
    }
    .map_err(anyhow::Error::msg)?;
    let n = usize::try_from(params)?;
    Ok(codec.max_encoded_bytes(n) as f64 / params as f64)
}

pub fn run(args: PlanArgs) -> Result<()> {
    let presets: Vec<&Preset> = if args.preset == "series" {
        PRESETS
            .iter()
            .filter(|p| p.nominal_params.is_some())
            .collect()
    } else {
        vec![Preset::by_name(&args.preset)?]
    };
    let mut gpu = Gpu::by_name(&args.gpu).map_err(anyhow::Error::msg)?;
    if let Some(peak) = args.peak_flops {
        if !(peak > 0.0 && peak.is_finite()) {
            bail!("--peak-flops must be positive, got {peak}");
        }
        gpu.peak_flops = peak;
    }
    let mut rows: Vec<(String, Assumptions, Plan)> = Vec::new();
    for preset in presets {
        let model = preset.config();
        let update = match args.update_bytes_per_param {
            Some(u) => u,
            None => default_bytes_per_param(model.params_total(), false)?,
        };
        let shard = match args.shard_bytes_per_param {
            Some(u) => u,
            None => default_bytes_per_param(model.params_total(), true)?,
        };
        let a = Assumptions {
            nodes: args.nodes,
            gpus_per_machine: args.gpus_per_machine,
            link_mbps: args.link_mbps,
            tokens: args.tokens,
            tokens_per_param: args.tokens_per_param,
            mfu: args.mfu,
            weight_bytes_per_param: args.weight_bytes,
            grad_bytes_per_param: args.grad_bytes,
            optimizer_bytes_per_param: args.optimizer_bytes,
            outer_bytes_per_param: args.outer_bytes,
            update_bytes_per_param: update,
            shard_bytes_per_param: shard,
            activation_codec_ratio: args.activation_codec_ratio,
            seq_len: args.seq_len,
            micro_batch_seqs: args.micro_batch_seqs,
            memory_headroom: args.memory_headroom,
            inner_steps: args.inner_steps,
            replica_batch_tokens: args.replica_batch_tokens,
            redundancy: args.redundancy,
            price_per_gpu_hour_usd: args.price_per_gpu_hour,
        };
        let p =
            plan(&model, gpu, &a).map_err(|e| anyhow::anyhow!("preset {}: {e}", preset.name))?;
        rows.push((preset.name.to_string(), a, p));
    }
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(name, a, p)| {
                serde_json::json!({"preset": name, "gpu": gpu, "assumptions": a, "plan": p})
            })
            .collect();
        let out = if out.len() == 1 {
            out.into_iter().next().expect("one row")
        } else {
            serde_json::Value::Array(out)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "{:<6} {:>17} {:>10} {:>7} {:>8} {:>9} {:>10} {:>9} {:>11} {:>9} {:>8} {:>14} {:>12}  limited by",
        "preset", "parameters", "state GiB", "stages", "replicas", "GiB/GPU", "tok/s/rep", "act MB/s",
        "upd MB/mach", "round s", "time", "GPU-hours", "cost USD"
    );
    for (name, _, p) in &rows {
        let act_mbs = if p.stages > 1 {
            p.tokens_per_s_replica * p.activation_bytes_per_token_coded / 1e6
        } else {
            0.0
        };
        println!(
            "{:<6} {:>17} {:>10.1} {:>7} {:>8} {:>9.1} {:>10.0} {:>9.1} {:>11.1} {:>9.0} {:>8} {:>14.0} {:>12.0}  {}",
            name,
            p.params,
            gib(p.training_state_bytes as f64),
            p.stages,
            p.replicas,
            gib(p.memory_per_gpu_bytes as f64),
            p.tokens_per_s_replica,
            act_mbs,
            p.update_bytes_per_machine / 1e6,
            p.round_seconds,
            if p.days >= 1.0 {
                format!("{:.1} d", p.days)
            } else {
                format!("{:.1} h", p.days * 24.0)
            },
            p.gpu_hours,
            p.cost_usd,
            p.limited_by
        );
    }
    let (_, a, _) = &rows[0];
    println!(
        "\nassumptions: {} nodes of {} × {} ({:.0} GB, {:.0} TFLOP/s bf16 dense, ${:.2}/GPU-hour), \
         {} Mbit/s links, MFU {}, {} tokens/parameter, state {}+{}+{} bytes/parameter \
         (outer {} more), update {} and aggregated shard {} (first preset) bytes/parameter, \
         activation codec {}x, \
         seq {} × {} per micro-batch, {}% of GPU memory, H = {} steps of {} tokens, \
         redundancy {}",
        a.nodes,
        a.gpus_per_machine,
        gpu.name,
        gpu.memory_bytes as f64 / 1e9,
        gpu.peak_flops / 1e12,
        a.price_per_gpu_hour_usd.unwrap_or(gpu.price_per_hour_usd),
        a.link_mbps,
        a.mfu,
        a.tokens_per_param,
        a.weight_bytes_per_param,
        a.grad_bytes_per_param,
        a.optimizer_bytes_per_param,
        a.outer_bytes_per_param,
        a.update_bytes_per_param,
        a.shard_bytes_per_param,
        a.activation_codec_ratio,
        a.seq_len,
        a.micro_batch_seqs,
        a.memory_headroom * 100.0,
        a.inner_steps,
        a.replica_batch_tokens,
        a.redundancy
    );
    Ok(())
}
