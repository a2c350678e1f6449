//! What a run of one preset would take on contributors' machines: layout, memory,
//! traffic, time and cost (`tessera plan`).
//!
//! Pure arithmetic over the preset's exact shape and a set of stated assumptions
//! ([`Assumptions`]), every one of which is an input with a default and is printed
//! with the plan. The model of a run:
//!
//! - A contributor's **machine** has `gpus_per_machine` GPUs on a fast local
//!   interconnect; its GPUs shard one pipeline stage's training state among them.
//! - A **replica** is `stages` machines in a pipeline: the smallest number whose
//!   GPUs hold the training state (weights, gradients, optimizer) plus the activations
//!   of the layers each stage holds, within `memory_headroom` of each GPU's memory.
//!   Stage boundaries cross the internet: each token's activation goes forward and its
//!   gradient comes back, `hidden_size` bf16 values each way, divided by an activation
//!   codec's ratio when one is used.
//! - Replicas train DiLoCo-style: `inner_steps` steps of `replica_batch_tokens` each,
//!   then exchange pseudo-gradients, each machine its stage's share, at
//!   `update_bytes_per_param` (the codec's size). Sharded aggregation, as the network
//!   runs it, sends each machine's update to the hub and its pieces to `redundancy`
//!   aggregators per shard, and serves the machine's own aggregated shard (denser:
//!   `shard_bytes_per_param`) to its share of the members, which also fetch every
//!   aggregated shard: the busier direction carries (1 + `redundancy`) updates and one
//!   aggregated update. All-to-all fetches every other replica's update. With overlap (one-step-delayed outer update) a
//!   round takes the longer of compute and exchange.
//! - A replica's throughput is the lesser of its compute (GPUs × peak × MFU ÷ FLOPs
//!   per token) and, with stages, what one stage-boundary link carries.

use serde::Serialize;

use crate::LlamaConfig;

/// A GPU kind: memory and dense bf16 peak, and a rental price to cost a run with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub memory_bytes: u64,
    /// Dense bf16 tensor FLOP/s, from the vendor's data sheet (no sparsity).
    pub peak_flops: f64,
    pub price_per_hour_usd: f64,
}

/// GPU kinds the planner knows. Prices are assumptions (typical on-demand cloud
/// rates in 2026), overridable with `--price-per-gpu-hour`.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "h100",
        memory_bytes: 80_000_000_000,
        peak_flops: 989e12,
        price_per_hour_usd: 2.50,
    },
    Gpu {
        name: "h200",
        memory_bytes: 141_000_000_000,
        peak_flops: 989e12,
        price_per_hour_usd: 3.50,
    },
    Gpu {
        name: "b200",
        memory_bytes: 180_000_000_000,
        peak_flops: 2250e12,
        price_per_hour_usd: 5.00,
    },
    Gpu {
        name: "a100",
        memory_bytes: 80_000_000_000,
        peak_flops: 312e12,
        price_per_hour_usd: 1.50,
    },
    Gpu {
        name: "mi300x",
        memory_bytes: 192_000_000_000,
        peak_flops: 1307e12,
        price_per_hour_usd: 2.50,
    },
    Gpu {
        name: "rtx4090",
        memory_bytes: 24_000_000_000,
        peak_flops: 165e12,
        price_per_hour_usd: 0.40,
    },
];

impl Gpu {
    pub fn by_name(name: &str) -> Result<Gpu, String> {
        GPUS.iter()
            .copied()
            .find(|g| g.name == name)
            .ok_or_else(|| {
                format!(
                    "unknown GPU kind `{}` (known: {})",
                    name.escape_debug(),
                    GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
                )
            })
    }
}

/// Everything the plan assumes besides the preset and the GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assumptions {
    /// Contributor machines taking part.
    pub nodes: u64,
    pub gpus_per_machine: u64,
    /// Each machine's internet link, each way.
    pub link_mbps: f64,
    /// Training tokens; `None`: `tokens_per_param` × parameters.
    pub tokens: Option<u64>,
    pub tokens_per_param: f64,
    /// Model FLOP utilization of the inner steps (pipeline bubbles included).
    pub mfu: f64,
    /// Training state per parameter, as trained: bf16 weights, bf16 gradients, f32
    /// AdamW moments.
    pub weight_bytes_per_param: u64,
    pub grad_bytes_per_param: u64,
    pub optimizer_bytes_per_param: u64,
    /// DiLoCo's outer state per parameter (f32 global θ, velocity, error feedback).
    pub outer_bytes_per_param: u64,
    /// A pseudo-gradient's encoded size per parameter (the codec's).
    pub update_bytes_per_param: f64,
    /// An aggregated shard's encoded size per parameter under sharded aggregation (the
    /// run's shard codec: top-k at `shard_topk_multiple` × the update's density).
    pub shard_bytes_per_param: f64,
    /// How much an activation codec shrinks stage-boundary traffic (1: none).
    pub activation_codec_ratio: f64,
    pub seq_len: u64,
    /// Sequences per micro-batch on a stage (activation memory scales with it).
    pub micro_batch_seqs: u64,
    /// Fraction of a GPU's memory the plan may fill.
    pub memory_headroom: f64,
    pub inner_steps: u64,
    pub replica_batch_tokens: u64,
    /// Aggregators per shard in sharded aggregation.
    pub redundancy: u64,
    pub price_per_gpu_hour_usd: Option<f64>,
}

impl Default for Assumptions {
    fn default() -> Assumptions {
        Assumptions {
            nodes: 1000,
            gpus_per_machine: 8,
            link_mbps: 1000.0,
            tokens: None,
            tokens_per_param: 20.0,
            mfu: 0.4,
            weight_bytes_per_param: 2,
            grad_bytes_per_param: 2,
            optimizer_bytes_per_param: 8,
            outer_bytes_per_param: 12,
            update_bytes_per_param: 0.05,
            shard_bytes_per_param: 0.2,
            activation_codec_ratio: 1.0,
            seq_len: 4096,
            micro_batch_seqs: 1,
            memory_headroom: 0.9,
            inner_steps: 100,
            replica_batch_tokens: 1 << 20,
            redundancy: 2,
            price_per_gpu_hour_usd: None,
        }
    }
}

/// Activation bytes a stage keeps per layer-width of one token: with activation
/// checkpointing, each layer's bf16 input (2 bytes per value) for every layer held,
/// plus one layer's working set while it is recomputed, about 16 width-sized tensors.
pub const RECOMPUTE_WORKING_TENSORS: u64 = 16;

/// A preset's plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub params: u64,
    /// Weights, gradients and optimizer state of one replica as trained.
    pub training_state_bytes: u64,
    pub weights_bytes: u64,
    pub grads_bytes: u64,
    pub optimizer_bytes: u64,
    /// DiLoCo's outer state for one replica, held beside the training state.
    pub outer_state_bytes: u64,
    pub fits_one_machine: bool,
    pub stages: u64,
    pub layers_per_stage: u64,
    pub gpus_per_replica: u64,
    pub replicas: u64,
    pub activation_bytes_per_gpu: u64,
    pub memory_per_gpu_bytes: u64,
    /// Stage-boundary traffic per token, each way, without and with the codec.
    pub activation_bytes_per_token: f64,
    pub activation_bytes_per_token_coded: f64,
    pub tokens_per_s_replica_compute: f64,
    /// What one stage-boundary link carries (infinite with one stage).
    pub tokens_per_s_replica_link: f64,
    pub tokens_per_s_replica: f64,
    pub tokens_per_s_total: f64,
    pub update_bytes_per_machine: f64,
    pub sharded_bytes_per_machine_round: f64,
    pub all_to_all_bytes_per_machine_round: f64,
    pub inner_seconds_per_round: f64,
    pub exchange_seconds_per_round: f64,
    /// With overlap: the longer of the two.
    pub round_seconds: f64,
    pub rounds: u64,
    pub tokens: u64,
    pub days: f64,
    pub gpu_hours: f64,
    pub cost_usd: f64,
    /// What bounds the time: `compute`, `activation link` or `DiLoCo exchange`.
    pub limited_by: &'static str,
}

/// Plans `model` on `gpu` under `a`. Refused: assumptions out of range, or a model
/// that no number of this machine holds (one layer larger than a machine), or fewer
/// nodes than one replica needs.
pub fn plan(model: &LlamaConfig, gpu: Gpu, a: &Assumptions) -> Result<Plan, String> {
    check(a)?;
    let params = model.params_total();
    let weights_bytes = params * a.weight_bytes_per_param;
    let grads_bytes = params * a.grad_bytes_per_param;
    let optimizer_bytes = params * a.optimizer_bytes_per_param;
    let training_state_bytes = weights_bytes + grads_bytes + optimizer_bytes;
    let layers = model.num_hidden_layers as u64;
    let width = model.hidden_size as u64;
    let usable_per_machine =
        gpu.memory_bytes as f64 * a.memory_headroom * a.gpus_per_machine as f64;
    let activations = |layers_held: u64| {
        a.micro_batch_seqs * a.seq_len * width * 2 * (layers_held + RECOMPUTE_WORKING_TENSORS)
    };
    let machine_bytes =
        |stages: u64| training_state_bytes.div_ceil(stages) + activations(layers.div_ceil(stages));
    let stages = (1..=layers)
        .find(|&s| machine_bytes(s) as f64 <= usable_per_machine)
        .ok_or_else(|| {
            format!(
                "one layer of this model does not fit a machine of {} {} GPUs",
                a.gpus_per_machine, gpu.name
            )
        })?;
    let layers_per_stage = layers.div_ceil(stages);
    if a.nodes < stages {
        return Err(format!(
            "a replica needs {stages} machines in a pipeline; {} nodes can't hold one",
            a.nodes
        ));
    }
    let replicas = a.nodes / stages;
    let gpus_per_replica = stages * a.gpus_per_machine;
    let activation_bytes_per_gpu = activations(layers_per_stage).div_ceil(a.gpus_per_machine);
    let memory_per_gpu_bytes = machine_bytes(stages).div_ceil(a.gpus_per_machine);

    let link_bytes_per_s = a.link_mbps * 1e6 / 8.0;
    let activation_bytes_per_token = (width * 2) as f64;
    let activation_bytes_per_token_coded = activation_bytes_per_token / a.activation_codec_ratio;
    let flops_per_token = model.flops_per_token(a.seq_len as usize) as f64;
    let tokens_per_s_replica_compute =
        gpus_per_replica as f64 * gpu.peak_flops * a.mfu / flops_per_token;
    let tokens_per_s_replica_link = if stages == 1 {
        f64::INFINITY
    } else {
        link_bytes_per_s / activation_bytes_per_token_coded
    };
    let tokens_per_s_replica = tokens_per_s_replica_compute.min(tokens_per_s_replica_link);
    let tokens_per_s_total = tokens_per_s_replica * replicas as f64;

    let update_bytes_per_machine = params as f64 / stages as f64 * a.update_bytes_per_param;
    // Sharded (each machine aggregating one shard): sent, the update to the hub, its
    // pieces to `redundancy` aggregators per shard and its aggregated shard to its share
    // of the members; received, `redundancy` updates' worth of pieces and the aggregated
    // shards. The sent direction is the busier.
    let shard_bytes_per_machine = params as f64 / stages as f64 * a.shard_bytes_per_param;
    let sharded_bytes_per_machine_round =
        (a.redundancy + 1) as f64 * update_bytes_per_machine + shard_bytes_per_machine;
    let all_to_all_bytes_per_machine_round =
        replicas.saturating_sub(1) as f64 * update_bytes_per_machine;

    let inner_seconds_per_round =
        (a.inner_steps * a.replica_batch_tokens) as f64 / tokens_per_s_replica;
    let exchange_seconds_per_round = sharded_bytes_per_machine_round / link_bytes_per_s;
    let round_seconds = inner_seconds_per_round.max(exchange_seconds_per_round);
    let tokens = a
        .tokens
        .unwrap_or((params as f64 * a.tokens_per_param).round() as u64);
    let tokens_per_round = replicas
        .saturating_mul(a.inner_steps)
        .saturating_mul(a.replica_batch_tokens);
    let rounds = tokens.div_ceil(tokens_per_round);
    let seconds = rounds as f64 * round_seconds;
    let gpu_hours = (replicas * gpus_per_replica) as f64 * seconds / 3600.0;
    let price = a.price_per_gpu_hour_usd.unwrap_or(gpu.price_per_hour_usd);
    let limited_by = if exchange_seconds_per_round > inner_seconds_per_round {
        "DiLoCo exchange"
    } else if tokens_per_s_replica_link < tokens_per_s_replica_compute {
        "activation link"
    } else {
        "compute"
    };
    Ok(Plan {
        params,
        training_state_bytes,
        weights_bytes,
        grads_bytes,
        optimizer_bytes,
        outer_state_bytes: params * a.outer_bytes_per_param,
        fits_one_machine: stages == 1,
        stages,
        layers_per_stage,
        gpus_per_replica,
        replicas,
        activation_bytes_per_gpu,
        memory_per_gpu_bytes,
        activation_bytes_per_token,
        activation_bytes_per_token_coded,
        tokens_per_s_replica_compute,
        tokens_per_s_replica_link,
        tokens_per_s_replica,
        tokens_per_s_total,
        update_bytes_per_machine,
        sharded_bytes_per_machine_round,
        all_to_all_bytes_per_machine_round,
        inner_seconds_per_round,
        exchange_seconds_per_round,
        round_seconds,
        rounds,
        tokens,
        days: seconds / 86_400.0,
        gpu_hours,
        cost_usd: gpu_hours * price,
        limited_by,
    })
}

fn check(a: &Assumptions) -> Result<(), String> {
    let positive = [
        ("link_mbps", a.link_mbps),
        ("tokens_per_param", a.tokens_per_param),
        ("mfu", a.mfu),
        ("update_bytes_per_param", a.update_bytes_per_param),
        ("shard_bytes_per_param", a.shard_bytes_per_param),
        ("activation_codec_ratio", a.activation_codec_ratio),
        ("memory_headroom", a.memory_headroom),
    ];
    for (name, v) in positive {
        if !(v > 0.0 && v.is_finite()) {
            return Err(format!("`{name}` must be a positive number, got {v}"));
        }
    }
    if a.mfu > 1.0 || a.memory_headroom > 1.0 {
        return Err("`mfu` and `memory_headroom` are fractions of at most 1".into());
    }
    let counts = [
        ("nodes", a.nodes),
        ("gpus_per_machine", a.gpus_per_machine),
        ("seq_len", a.seq_len),
        ("micro_batch_seqs", a.micro_batch_seqs),
        ("inner_steps", a.inner_steps),
        ("replica_batch_tokens", a.replica_batch_tokens),
        ("redundancy", a.redundancy),
    ];
    for (name, v) in counts {
        if v == 0 {
            return Err(format!("`{name}` must be at least 1"));
        }
    }
    // Large enough for 1.4t on a million machines, far below overflow.
    if a.nodes > 10_000_000
        || a.gpus_per_machine > 1024
        || a.seq_len > 1 << 20
        || a.micro_batch_seqs > 1 << 16
        || a.inner_steps > 1_000_000
        || a.replica_batch_tokens > 1 << 34
        || a.redundancy > 64
    {
        return Err(
            "`nodes`, `gpus_per_machine`, `seq_len`, `micro_batch_seqs`, `inner_steps`, \
             `replica_batch_tokens` or `redundancy` is beyond any run"
                .into(),
        );
    }
    // Bytes per parameter: a few bytes each in practice; bounded so the products with
    // 1.4t's parameter count stay far from overflow.
    let per_param = [
        ("weight_bytes_per_param", a.weight_bytes_per_param),
        ("grad_bytes_per_param", a.grad_bytes_per_param),
        ("optimizer_bytes_per_param", a.optimizer_bytes_per_param),
        ("outer_bytes_per_param", a.outer_bytes_per_param),
    ];
    for (name, v) in per_param {
        if v > 64 {
            return Err(format!("`{name}` is {v}, more than 64 bytes per parameter"));
        }
    }
    for (name, v) in [
        ("update_bytes_per_param", a.update_bytes_per_param),
        ("shard_bytes_per_param", a.shard_bytes_per_param),
    ] {
        if v > 64.0 {
            return Err(format!("`{name}` is {v}, more than 64"));
        }
    }
    if let Some(p) = a.price_per_gpu_hour_usd {
        if !(p >= 0.0 && p.is_finite()) {
            return Err(format!("`price_per_gpu_hour_usd` must be ≥ 0, got {p}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preset;

    fn close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs(),
            "got {got}, want {want}"
        );
    }

    /// 8b on 100 machines of 8 H100s, every other assumption at its default, worked by
    /// hand from the Llama 3 8B shape (32 layers, width 4096, vocabulary 128,256).
    #[test]
    fn eight_b_by_hand() {
        let a = Assumptions {
            nodes: 100,
            ..Assumptions::default()
        };
        let p = plan(
            &Preset::by_name("8b").unwrap().config(),
            Gpu::by_name("h100").unwrap(),
            &a,
        )
        .unwrap();
        assert_eq!(p.params, 8_030_261_248);
        // 2 + 2 + 8 bytes per parameter.
        assert_eq!(p.training_state_bytes, 96_363_134_976);
        assert_eq!(p.outer_state_bytes, 12 * 8_030_261_248);
        // One machine holds it: 96.4 GB of state plus 4096·4096·2·(32 + 16) =
        // 1,610,612,736 bytes of activations, against 8 · 80 GB · 0.9 = 576 GB.
        assert!(p.fits_one_machine);
        assert_eq!((p.stages, p.layers_per_stage, p.replicas), (1, 32, 100));
        assert_eq!(
            p.memory_per_gpu_bytes,
            (96_363_134_976u64 + 1_610_612_736).div_ceil(8)
        );
        // FLOPs per token at 4096: 6 · (params − the 128,256 × 4096 input embedding)
        // + 12 · 32 · 4096 · 4096.
        let fpt = 6.0 * (8_030_261_248.0 - 128_256.0 * 4096.0) + 12.0 * 32.0 * 4096.0 * 4096.0;
        assert_eq!(fpt, 51_471_998_976.0);
        let tps = 8.0 * 989e12 * 0.4 / fpt;
        close(p.tokens_per_s_replica, tps);
        assert!(
            p.tokens_per_s_replica_link.is_infinite(),
            "no stage boundary"
        );
        // 20 tokens per parameter, 100 replicas × 100 steps × 2^20 tokens per round.
        assert_eq!(p.tokens, 160_605_224_960);
        assert_eq!(p.rounds, 16); // 160,605,224,960 / 10,485,760,000 = 15.3
        close(p.inner_seconds_per_round, 104_857_600.0 / tps);
        // Sharded: (1 + 2) × 0.05 + 0.2 bytes × params each round, over 125 MB/s.
        close(
            p.sharded_bytes_per_machine_round,
            (3.0 * 0.05 + 0.2) * 8_030_261_248.0,
        );
        close(
            p.exchange_seconds_per_round,
            (3.0 * 0.05 + 0.2) * 8_030_261_248.0 / 125e6,
        );
        close(
            p.all_to_all_bytes_per_machine_round,
            99.0 * 0.05 * 8_030_261_248.0,
        );
        assert_eq!(p.limited_by, "compute");
        let seconds = 16.0 * 104_857_600.0 / tps;
        close(p.days, seconds / 86_400.0);
        close(p.gpu_hours, 800.0 * seconds / 3600.0);
        close(p.cost_usd, 800.0 * seconds / 3600.0 * 2.5);
    }

    /// 1.4t on 10,000 machines of 8 H100s over 1 Gbit/s links, by hand (164 layers,
    /// width 24,576).
    #[test]
    fn one_point_four_t_by_hand() {
        let a = Assumptions {
            nodes: 10_000,
            ..Assumptions::default()
        };
        let model = Preset::by_name("1.4t").unwrap().config();
        let h100 = Gpu::by_name("h100").unwrap();
        let p = plan(&model, h100, &a).unwrap();
        let params = 1_409_558_470_656u64;
        assert_eq!(p.params, params);
        assert_eq!(p.training_state_bytes, 16_914_701_647_872);
        // 29 stages would put 583 GB of state on a machine (more than 576 GB); 30 put
        // 563,823,388,263 bytes plus activations for ⌈164/30⌉ = 6 layers:
        // 4096 · 24576 · 2 · (6 + 16) = 4,429,185,024.
        assert!(!p.fits_one_machine);
        assert_eq!((p.stages, p.layers_per_stage), (30, 6));
        assert_eq!(p.replicas, 333);
        assert_eq!(p.gpus_per_replica, 240);
        assert_eq!(
            p.memory_per_gpu_bytes,
            (563_823_388_263u64 + 4_429_185_024).div_ceil(8)
        );
        // Each boundary carries 24,576 bf16 values per token each way: 49,152 bytes,
        // so a 125 MB/s link passes 2,543 tokens/s, below the 240 GPUs' compute.
        assert_eq!(p.activation_bytes_per_token, 49_152.0);
        close(p.tokens_per_s_replica_link, 125e6 / 49_152.0);
        let fpt = 6.0 * (params as f64 - 128_256.0 * 24_576.0) + 12.0 * 164.0 * 24_576.0 * 4096.0;
        close(p.tokens_per_s_replica_compute, 240.0 * 989e12 * 0.4 / fpt);
        assert_eq!(p.limited_by, "activation link");
        assert_eq!(p.tokens, 28_191_169_413_120);
        // 333 × 100 × 2^20 = 34,917,580,800 tokens per round: 807.4 rounds.
        assert_eq!(p.rounds, 808);
        let seconds = 808.0 * 104_857_600.0 / (125e6 / 49_152.0);
        close(p.days, seconds / 86_400.0);
        close(p.gpu_hours, 333.0 * 240.0 * seconds / 3600.0);

        // An activation codec of 8x lifts the link above compute.
        let coded = plan(
            &model,
            h100,
            &Assumptions {
                activation_codec_ratio: 8.0,
                ..a.clone()
            },
        )
        .unwrap();
        assert_eq!(coded.limited_by, "compute");
        close(coded.tokens_per_s_replica, 240.0 * 989e12 * 0.4 / fpt);
    }

    #[test]
    fn impossible_plans_are_refused_by_name() {
        let model = Preset::by_name("1.4t").unwrap().config();
        let h100 = Gpu::by_name("h100").unwrap();
        let few = Assumptions {
            nodes: 10,
            ..Assumptions::default()
        };
        assert!(plan(&model, h100, &few)
            .unwrap_err()
            .contains("30 machines"));
        let one_gpu = Assumptions {
            gpus_per_machine: 1,
            nodes: 1000,
            ..Assumptions::default()
        };
        let rtx = Gpu::by_name("rtx4090").unwrap();
        assert!(plan(&model, rtx, &one_gpu)
            .unwrap_err()
            .contains("one layer"));
        for bad in [
            Assumptions {
                mfu: 0.0,
                ..Assumptions::default()
            },
            Assumptions {
                mfu: 1.5,
                ..Assumptions::default()
            },
            Assumptions {
                link_mbps: f64::NAN,
                ..Assumptions::default()
            },
            Assumptions {
                nodes: 0,
                ..Assumptions::default()
            },
            Assumptions {
                inner_steps: u64::MAX,
                ..Assumptions::default()
            },
        ] {
            assert!(plan(&model, h100, &bad).is_err(), "{bad:?}");
        }
        assert!(Gpu::by_name("tpu").unwrap_err().contains("h100"));
    }
}
