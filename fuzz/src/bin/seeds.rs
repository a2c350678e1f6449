//! Writes the seed corpus of every fuzz target (`fuzz/corpus/TARGET/seed-*`), small
//! valid inputs made by Tessera's own encoders, then runs every file of every corpus
//! (seeds and the crash inputs kept as regressions) through its target's check.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --bin seeds            # write, then check
//! cargo run --manifest-path fuzz/Cargo.toml --bin seeds -- --check # only check
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use tessera_data_format::{encode_shard, hash_hex, Manifest, ShardEntry, SourceEntry};
use tessera_fuzz::ledger::{setup_requests, RequestBody, CONTRIBUTOR, MODEL, RUN};
use tessera_fuzz::{auth, TARGETS};
use tessera_ledger::amount::Amount;
use tessera_ledger::state::Operation;
use tessera_ledger::Work;
use tessera_model_config::Preset;
use tessera_outer::shard::ShardInputs;
use tessera_outer::{encode, Aggregator, Codec, CodecKind, OuterState};
use tessera_protocol::auth::{sign_reply, sign_request, verify_request};
use tessera_protocol::wire::{
    Ack, AggregateReport, Commit, CommitBody, ErrorBody, ErrorCode, FinalEval, NodeStats,
    PathTraffic, PeerAddr, Phase, RelayInfo, RoundRecord, RunInfo, ShardRecord, StateView, Summary,
    ThetaReply, ThetaReport, PROTOCOL_VERSION,
};
use tessera_protocol::{Hash32, Identity, NodeId, RunSpec};

/// Named inputs of one target.
type Files = Vec<(String, Vec<u8>)>;

/// Small seeded values, the size of one round's pseudo-gradient entries.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            // SplitMix64.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect()
}

fn blob(codec: Codec, n: usize, seed: u64) -> Vec<u8> {
    encode(codec, &noise(n, seed), &mut vec![0.0; n], 1.0)
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("seed serialises")
}

fn updates() -> Vec<(&'static str, Files)> {
    let run = tessera_fuzz::outer::run_codec;
    let set = |codecs: &[(Codec, usize)]| {
        codecs
            .iter()
            .enumerate()
            .map(|(i, &(codec, n))| {
                (
                    format!("{}-n{n}", codec.name().replace('/', "_")),
                    blob(codec, n, i as u64 + 1),
                )
            })
            .collect::<Vec<_>>()
    };
    vec![
        (
            "update_none",
            set(&[(Codec::None, 1), (Codec::None, 17), (Codec::None, 100)]),
        ),
        (
            "update_int8",
            set(&[
                (run(CodecKind::Int8), 300),
                (Codec::Int8 { chunk: 64 }, 200),
                (Codec::Int8 { chunk: 7 }, 50),
            ]),
        ),
        (
            "update_topk",
            set(&[
                (run(CodecKind::TopK), 500),
                (
                    Codec::TopK {
                        chunk: 64,
                        k: 8,
                        bits: 4,
                    },
                    200,
                ),
                (
                    Codec::TopK {
                        chunk: 5,
                        k: 5,
                        bits: 2,
                    },
                    23,
                ),
                (
                    Codec::TopK {
                        chunk: 100,
                        k: 3,
                        bits: 8,
                    },
                    250,
                ),
                (
                    Codec::TopK {
                        chunk: 4096,
                        k: 40,
                        bits: 1,
                    },
                    300,
                ),
            ]),
        ),
        (
            "update_lowrank",
            set(&[
                (run(CodecKind::LowRank), 600),
                (
                    Codec::LowRank {
                        rows: 4,
                        cols: 8,
                        rank: 2,
                    },
                    100,
                ),
                (
                    Codec::LowRank {
                        rows: 16,
                        cols: 16,
                        rank: 3,
                    },
                    300,
                ),
            ]),
        ),
    ]
}

fn checkpoints() -> Files {
    [0usize, 3, 40]
        .into_iter()
        .map(|n| {
            let mut s = OuterState::from_theta(noise(n, 7), 0.7, 0.9);
            if n > 0 {
                s.apply_decoded(Aggregator::Mean, &[noise(n, 8)]);
            }
            (format!("n{n}"), s.to_bytes())
        })
        .collect()
}

fn spec() -> RunSpec {
    RunSpec {
        run_id: "demo-1".into(),
        ..RunSpec::default()
    }
}

fn wire() -> Files {
    let node = NodeId(*Hash32::of(b"node").as_bytes());
    let commit = Commit {
        blob_hash: Hash32::of(b"blob"),
        tokens: 5120,
        loss_micro: 4_512_000,
        theta_hash: Hash32::of(b"theta"),
        state_hash: Hash32::of(b"state"),
    };
    let provider = PeerAddr("iroh:endpoint-addr".into());
    let mut nodes = std::collections::BTreeMap::new();
    nodes.insert(
        node,
        NodeStats {
            bytes_sent: 1000,
            bytes_received: 2000,
            train_seconds: 1.5,
            wall_seconds: 2.25,
            last_loss: 4.5,
            rounds_committed: 3,
            paths: PathTraffic {
                direct_sent: 900,
                direct_received: 1800,
                relay_sent: 300,
                relay_received: 400,
                fetches_direct: 2,
                fetches_relayed: 1,
            },
        },
    );
    let nano = Preset::by_name("nano").unwrap();
    vec![
        (
            "commit_body".into(),
            json(&CommitBody {
                run_id: "demo-1".into(),
                round: 3,
                commit: commit.clone(),
                provider: provider.clone(),
            }),
        ),
        ("commit".into(), json(&commit)),
        ("node_stats".into(), json(&nodes[&node])),
        (
            "state_view".into(),
            json(&StateView {
                phase: Phase::Training { round: 2 },
                assignment: Some(vec![4, 5, 6]),
                committed: false,
                deadline_ms: 120_000,
                closed_rounds: 2,
                checkpoint: Hash32::of(b"ckpt"),
                audit: Some(1),
                dispute: None,
            }),
        ),
        (
            "round_record".into(),
            json(&RoundRecord {
                round: 1,
                accepted: vec![(node, Hash32::of(b"blob"))],
                sources: vec![provider.clone()],
                late: vec![],
                tokens: 5120,
                work: vec![(node, 5120)],
                theta_before: Hash32::of(b"a"),
                theta_after: Hash32::of(b"b"),
                checkpoint: Hash32::of(b"c"),
                refused: vec![],
                verdicts: vec![],
                shards: vec![],
            }),
        ),
        (
            "round_record_sharded".into(),
            json(&RoundRecord {
                round: 2,
                accepted: vec![(node, Hash32::of(b"blob"))],
                sources: vec![provider.clone()],
                late: vec![],
                tokens: 5120,
                work: vec![(node, 5120)],
                theta_before: Hash32::of(b"b"),
                theta_after: Hash32::of(b"d"),
                checkpoint: Hash32::of(b"e"),
                refused: vec![],
                verdicts: vec![],
                shards: vec![ShardRecord {
                    aggregators: vec![node],
                    inputs: Hash32::of(b"inputs"),
                    hash: Hash32::of(b"shard"),
                }],
            }),
        ),
        (
            "aggregate_report".into(),
            json(&AggregateReport {
                run_id: "demo-1".into(),
                round: 2,
                shard: 0,
                hash: Hash32::of(b"shard"),
            }),
        ),
        (
            "theta_report".into(),
            json(&ThetaReport {
                run_id: "demo-1".into(),
                round: 1,
                hash: Hash32::of(b"b"),
            }),
        ),
        ("theta_reply".into(), json(&ThetaReply { agrees: true })),
        ("ack".into(), json(&Ack {})),
        (
            "error_body".into(),
            json(&ErrorBody {
                code: ErrorCode::StaleTheta,
                message: "stale θ".into(),
            }),
        ),
        ("phase".into(), json(&Phase::Forming)),
        ("audience".into(), json(&auth::audience())),
        (
            "summary".into(),
            json(&Summary {
                run_id: "demo-1".into(),
                finished: true,
                rounds_closed: 4,
                members: 1,
                params: 131_392,
                theta_hash: Hash32::of(b"t"),
                divergent_reports: 0,
                nodes,
                ddp_bytes_per_node: 1 << 20,
                final_eval: Some(FinalEval {
                    loss: 4.25,
                    bpb: 2.5,
                }),
                final_checkpoint: Some("final".into()),
                read_only: None,
                verification: Default::default(),
                audits_open: 0,
            }),
        ),
        (
            "run_info".into(),
            json(&RunInfo {
                protocol: PROTOCOL_VERSION,
                spec: spec(),
                model: nano.config_for_vocab(300),
                data_manifest: Hash32::of(b"manifest"),
                data_files: vec!["manifest.json".into(), "train-00000.bin".into()],
                hub_blobs: provider,
                relays: vec![RelayInfo {
                    url: "https://203.0.113.11:3341".into(),
                    quic_port: Some(7842),
                    cert_pem: None,
                }],
            }),
        ),
    ]
}

fn run_specs() -> Files {
    let mut out = vec![("default".to_string(), json(&spec()))];
    for (codec, agg) in [
        (CodecKind::None, "median"),
        (CodecKind::Int8, "trimmed_mean"),
        (CodecKind::LowRank, "norm_clip"),
    ] {
        let s = RunSpec {
            codec,
            aggregator: agg.parse().unwrap(),
            ..spec()
        };
        out.push((format!("{codec}-{agg}"), json(&s)));
    }
    out
}

fn ids() -> Files {
    let id = Identity::from_secret([3; 32]);
    let sig = id.sign(b"tessera fuzz");
    vec![
        ("node_id".into(), id.public_hex().into_bytes()),
        ("hash".into(), Hash32::of(b"x").to_hex().into_bytes()),
        (
            "node_id_json".into(),
            format!("\"{}\"", id.public_hex()).into_bytes(),
        ),
        ("codec".into(), b"topk".to_vec()),
        ("aggregator".into(), b"trimmed_mean".to_vec()),
        (
            "key_and_signature".into(),
            format!("{}\n{sig}", id.public_hex()).into_bytes(),
        ),
    ]
}

fn signed() -> Files {
    let client = Identity::from_secret([5; 32]);
    let audience = auth::audience();
    let mut out = Vec::new();
    for (name, method, path, body) in [
        ("commit", "POST", "/commit", &br#"{"run_id":"demo-1"}"#[..]),
        ("join", "POST", "/node/join", &b""[..]),
        ("ledger", "POST", "/ledger/requests", &br#"{"id":"x"}"#[..]),
        ("state", "GET", "/state?node=ab", &b""[..]),
    ] {
        let headers = sign_request(&client, &audience, method, path, auth::NOW_MS - 1000, body);
        let lookup = |n: &str| headers.iter().find(|h| h.0 == n).map(|h| h.1.clone());
        assert!(verify_request(lookup, &audience, method, path, body, auth::NOW_MS).is_ok());
        let [(_, key), (_, time), (_, session), (_, sig)] = headers;
        out.push((
            format!("request-{name}"),
            auth::join(&[&key, &time, &session, &sig, method, path], body),
        ));
        let nonce = "0123456789abcdef0123456789abcdef";
        let reply = br#"{"agrees":true}"#;
        let [(_, key), (_, scope), (_, session), (_, sig)] = sign_reply(
            &auth::server(),
            &audience,
            method,
            path,
            Some(nonce),
            200,
            reply,
        );
        out.push((
            format!("reply-{name}"),
            auth::join(
                &[&key, &scope, &session, &sig, method, path, nonce, "200"],
                reply,
            ),
        ));
    }
    out
}

fn ledger_requests() -> Files {
    let tokens = |n: u128| Amount(n * tessera_ledger::BASE_UNITS_PER_TOKEN);
    let mut ops: Vec<(String, Operation)> = setup_requests()
        .into_iter()
        .map(|r| (r.id.replace("setup-", ""), r.op))
        .collect();
    ops.extend([
        (
            "release".to_string(),
            Operation::Release {
                run: RUN.into(),
                contributor: CONTRIBUTOR.into(),
            },
        ),
        (
            "slash".to_string(),
            Operation::Slash {
                run: RUN.into(),
                contributor: CONTRIBUTOR.into(),
                fraction_ppm: 250_000,
                reason: "bad update in round 0".into(),
            },
        ),
        (
            "revenue".to_string(),
            Operation::Revenue {
                model: MODEL.into(),
                payer: CONTRIBUTOR.into(),
                amount: tokens(5),
                reinvest_ppm: 100_000,
            },
        ),
        (
            "close_epoch".to_string(),
            Operation::CloseEpoch { epoch: 1 },
        ),
        (
            "payout_round_1".to_string(),
            Operation::Payout {
                run: RUN.into(),
                round: 1,
                work: vec![
                    Work {
                        contributor: CONTRIBUTOR.into(),
                        tokens: 700,
                        score_ppm: 900_000,
                    },
                    Work {
                        contributor: "bob".into(),
                        tokens: 300,
                        score_ppm: 1_000_000,
                    },
                ],
            },
        ),
    ]);
    let mut out: Files = ops
        .into_iter()
        .map(|(name, op)| {
            let body = RequestBody {
                id: format!("req-{name}"),
                op,
            };
            (name, json(&body))
        })
        .collect();
    out.push(("account".into(), b"stake:run-1:alice".to_vec()));
    out.push(("tokens".into(), b"12.5".to_vec()));
    out
}

fn manifests() -> Files {
    let shard = encode_shard(&[1, 2, 3], 2);
    let m = Manifest {
        format_version: 1,
        tokenizer_blake3: hash_hex(b"{}"),
        vocab_size: 300,
        end_of_text_id: 256,
        token_bytes: 2,
        train_text_bytes: 4000,
        val_text_bytes: 400,
        sources: vec![SourceEntry {
            path: "data/tinyshakespeare.txt".into(),
            bytes: 4400,
            blake3: hash_hex(b"text"),
        }],
        train: vec![ShardEntry {
            file: "train-00000.bin".into(),
            tokens: 3,
            blake3: hash_hex(&shard),
        }],
        val: vec![],
    };
    // `prepare` writes it pretty-printed.
    vec![(
        "manifest".into(),
        serde_json::to_vec_pretty(&m).expect("serialises"),
    )]
}

fn shards() -> Files {
    vec![
        ("u16".into(), encode_shard(&[0, 1, 256, 2047, 5, 6], 2)),
        ("u32".into(), encode_shard(&[2047, 0, 17], 4)),
        ("empty".into(), encode_shard(&[], 2)),
    ]
}

fn sealed_manifests() -> Files {
    let m = tessera_fuzz::seal::item_manifest(32 + 2 * 3, b"").expect("a sealed manifest");
    vec![("manifest".into(), m.to_json().into_bytes())]
}

/// Shards sealed as item 1 under `seal::KEY`: empty, small, and one past a chunk.
fn sealed_items() -> Files {
    [("empty", 0u32), ("small", 6), ("two-chunks", 33_000)]
        .into_iter()
        .map(|(name, n)| {
            let tokens: Vec<u32> = (0..n).map(|i| i * 7 % 2048).collect();
            let plaintext = encode_shard(&tokens, 2);
            let m = tessera_fuzz::seal::item_manifest(plaintext.len() as u64, b"")
                .expect("a sealed manifest");
            let sealed = tessera_seal::seal_item(
                &m,
                1,
                &tessera_fuzz::seal::KEY,
                [1, 2, 3, 4, 5, 6, 7],
                &plaintext,
            );
            (name.to_string(), sealed)
        })
        .collect()
}

fn safetensors_files() -> Files {
    let f32s: Vec<u8> = noise(64, 3).iter().flat_map(|v| v.to_le_bytes()).collect();
    let bf16s: Vec<u8> = noise(32, 4)
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let file = |tensors: Vec<(&str, TensorView)>| {
        safetensors::serialize(tensors, Some(metadata.clone())).expect("serialises")
    };
    vec![
        (
            "f32".into(),
            file(vec![
                (
                    "model.norm.weight",
                    TensorView::new(Dtype::F32, vec![64], &f32s).unwrap(),
                ),
                (
                    "model.layers.0.self_attn.q_proj.weight",
                    TensorView::new(Dtype::F32, vec![8, 8], &f32s).unwrap(),
                ),
            ]),
        ),
        (
            "bf16".into(),
            file(vec![(
                "exp_avg.model.embed_tokens.weight",
                TensorView::new(Dtype::BF16, vec![4, 8], &bf16s).unwrap(),
            )]),
        ),
    ]
}

fn shard_inputs() -> Files {
    [0usize, 1, 3]
        .into_iter()
        .map(|m| {
            let inputs = ShardInputs {
                round: 4,
                shard: 1,
                pieces: (0..m)
                    .map(|i| (*Hash32::of(&[i as u8]).as_bytes(), 1.0 / (i + 1) as f32))
                    .collect(),
            };
            (format!("members-{m}"), inputs.to_bytes())
        })
        .collect()
}

fn configs() -> Files {
    ["nano", "micro"]
        .into_iter()
        .map(|name| {
            let c = Preset::by_name(name).unwrap().config();
            (
                name.to_string(),
                serde_json::to_vec_pretty(&c.to_hf_json()).unwrap(),
            )
        })
        .collect()
}

/// The entries of `all` whose names start with `prefix`.
fn split(all: Files, prefix: &str) -> Files {
    all.into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .collect()
}

fn seeds() -> Vec<(&'static str, Files)> {
    let mut all = updates();
    all.extend([
        ("outer_checkpoint", checkpoints()),
        ("shard_inputs", shard_inputs()),
        ("wire_bodies", wire()),
        ("run_spec", run_specs()),
        ("ids", ids()),
        ("signed_request", split(signed(), "request-")),
        ("signed_reply", split(signed(), "reply-")),
        ("ledger_request", ledger_requests()),
        ("data_manifest", manifests()),
        ("data_shard", shards()),
        ("sealed_manifest", sealed_manifests()),
        ("sealed_item", sealed_items()),
        ("safetensors", safetensors_files()),
        ("model_config", configs()),
    ]);
    all
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn main() {
    let check_only = std::env::args().any(|a| a == "--check");
    let root = corpus_dir();
    if !check_only {
        for (target, files) in seeds() {
            assert!(TARGETS.iter().any(|(t, _)| *t == target), "{target}");
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("corpus directory");
            for (name, bytes) in files {
                std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed written");
            }
        }
    }
    for (target, check) in TARGETS {
        let dir = root.join(target);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.map(|e| e.expect("entry").path()).collect(),
            Err(_) => panic!("{target} has no corpus in {}", dir.display()),
        };
        files.sort();
        assert!(!files.is_empty(), "{target} has an empty corpus");
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).expect("metadata").len())
            .sum();
        for f in &files {
            check(&std::fs::read(f).expect("corpus file"));
        }
        println!("{target:18} {:3} files {bytes:7} bytes: ok", files.len());
    }
}
