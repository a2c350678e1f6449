//! The DiLoCo experiment's plumbing: with one worker, outer learning rate 1 and no
//! momentum, DiLoCo is plain training and must match the baseline; byte counts follow
//! the codecs' sizes exactly; and runs are deterministic (same θ hash twice).

use std::path::Path;

use tch::Device;
use tessera_model::Preset;
use tessera_train::data::{prepare, PrepareOptions};
use tessera_train::diloco::{run, ExperimentOptions, RowSpec};
use tessera_train::outer::{Aggregator, Codec};

fn data(dir: &Path) -> std::path::PathBuf {
    let input = dir.join("c.txt");
    std::fs::write(
        &input,
        "It was the best of times, it was the worst of times,\nit was the age of wisdom.\n"
            .repeat(80),
    )
    .unwrap();
    let out = dir.join("data");
    prepare(&PrepareOptions {
        inputs: vec![input],
        out: out.clone(),
        vocab_size: 300,
        val_fraction: 0.1,
        tokenizer: None,
        shard_tokens_max: 1 << 20,
    })
    .unwrap();
    out
}

fn options(data: std::path::PathBuf, workers: usize, codecs: Vec<Codec>) -> ExperimentOptions {
    let mut model = Preset::by_name("nano").unwrap().config();
    model.vocab_size = 320;
    ExperimentOptions {
        model,
        data,
        workers,
        batch_size: 2,
        seq_len: 32,
        inner_steps: 2,
        total_steps: 6,
        lr: 3e-3,
        warmup_steps: 2,
        grad_clip: 1.0,
        aggregator: Aggregator::Mean,
        rows: codecs
            .into_iter()
            .map(|codec| RowSpec {
                label: codec.name(),
                codec,
                outer_lr: 0.7,
                outer_momentum: 0.9,
                ef_decay: 1.0,
            })
            .collect(),
        overlap: false,
        seed: 3,
        eval_tokens_max: 2048,
        baseline: true,
    }
}

#[test]
fn one_worker_with_unit_outer_step_is_plain_training() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(data(dir.path()), 1, vec![Codec::None]);
    opts.rows[0].outer_lr = 1.0;
    opts.rows[0].outer_momentum = 0.0;
    let rows = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    let (base, one) = (&rows[0], &rows[1]);
    assert!(
        (base.val_loss - one.val_loss).abs() < 1e-4,
        "baseline {} vs diloco {}",
        base.val_loss,
        one.val_loss
    );
}

#[test]
fn bytes_follow_codec_sizes_and_runs_are_deterministic() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let codecs = vec![
        Codec::None,
        Codec::Int8 { chunk: 64 },
        Codec::TopK {
            chunk: 64,
            k: 4,
            bits: 4,
        },
    ];
    let opts = options(data(dir.path()), 3, codecs.clone());
    let rows = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(rows.len(), 4);
    let n = opts.model.params_total() as usize;
    for (row, codec) in rows[1..].iter().zip(&codecs) {
        // 3 rounds; each node uploads its blob to 2 peers and downloads 2 blobs.
        let most = 3 * 2 * 2 * codec.max_encoded_bytes(n) as u64;
        if matches!(codec, Codec::TopK { .. }) {
            assert!(row.bytes_per_node <= most, "{}", row.name);
        } else {
            assert_eq!(row.bytes_per_node, most, "{}", row.name);
        }
        assert!(row.val_bpb.is_finite());
    }
    assert!(
        rows[3].bytes_per_node < rows[2].bytes_per_node
            && rows[2].bytes_per_node < rows[1].bytes_per_node
    );
    let again = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    for (a, b) in rows.iter().zip(&again) {
        assert_eq!(
            a.theta_hash, b.theta_hash,
            "{} is not deterministic",
            a.name
        );
    }
}

/// The one-step-delayed outer update: with a single round it is the plain run (the
/// one aggregate is applied when it arrives, after the last inner step); over several
/// rounds it sends as many blobs (the same bytes for a fixed-size codec), lands
/// elsewhere, and repeats to the θ hash.
#[test]
fn overlap_delays_each_outer_step_by_one_round() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let topk = Codec::TopK {
        chunk: 64,
        k: 4,
        bits: 4,
    };
    let mut opts = options(data(dir.path()), 2, vec![Codec::None, topk]);
    opts.baseline = false;
    opts.inner_steps = opts.total_steps;
    let plain = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    opts.overlap = true;
    let late = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    for (p, l) in plain.iter().zip(&late) {
        assert_eq!(p.rounds, 1);
        assert_eq!(p.theta_hash, l.theta_hash, "one round: {}", l.name);
    }

    opts.inner_steps = 2;
    opts.overlap = false;
    let plain = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    opts.overlap = true;
    let late = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    let again = run(&opts, Device::Cpu, &mut |_| {}).unwrap();
    for ((p, l), a) in plain.iter().zip(&late).zip(&again) {
        assert_eq!(p.rounds, 3);
        assert!(l.name.ends_with(" overlap"), "{}", l.name);
        if l.name.contains(" none ") {
            assert_eq!(p.bytes_per_node, l.bytes_per_node, "{}", l.name);
        }
        assert_ne!(p.theta_hash, l.theta_hash, "{} ignored the delay", l.name);
        assert_eq!(
            l.theta_hash, a.theta_hash,
            "{} is not deterministic",
            l.name
        );
    }
}
