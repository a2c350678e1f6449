//! Replay audits: a validator that restores the private state a node committed to and
//! recomputes its round must get the node's blob back, byte for byte, on the same
//! machine and thread count; any other state or batches give another blob.

use std::path::{Path, PathBuf};

use tch::Device;
use tessera_model::{LlamaConfig, Preset};
use tessera_protocol::RunSpec;
use tessera_train::data::{prepare, PrepareOptions, Windows};
use tessera_train::worker::{initial_state, Worker};
use tessera_train::Dataset;

fn data(dir: &Path) -> PathBuf {
    let input = dir.join("c.txt");
    std::fs::write(
        &input,
        "It was the best of times, it was the worst of times,\nit was the age of wisdom, \
         it was the age of foolishness.\n"
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

fn setup(dir: &Path) -> (RunSpec, LlamaConfig, Dataset, Windows) {
    let data = Dataset::open(&data(dir)).unwrap();
    let spec = RunSpec {
        run_id: "replay".into(),
        preset: "nano".into(),
        rounds: 4,
        inner_steps: 3,
        batch_size: 2,
        seq_len: 32,
        warmup_steps: 2,
        seed: 5,
        ..RunSpec::default()
    };
    let model = Preset::by_name("nano")
        .unwrap()
        .config_for_vocab(data.manifest.vocab_size);
    let windows = Windows::new(&data.train, spec.seq_len);
    (spec, model, data, windows)
}

#[test]
fn replay_from_the_committed_state_reproduces_the_blob_exactly() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let (spec, model, data, windows) = setup(dir.path());
    let mut node = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let mut state = initial_state(&spec, &model);
    let codec = node.codec();
    let n = state.theta.len() as u64;

    // Round 0 leaves moments, a step count and a residual behind; round 1 depends on
    // them, which is what makes the replay of round 1 a test of the state.
    let first = node.train_round(&state, &data, &windows, &[0, 1, 2]);
    state.apply(codec, spec.aggregator, &[first.blob]).unwrap();
    let before = node.private_state();
    assert_eq!(before.adam_step, 3);
    assert!(before.residual.iter().any(|r| *r != 0.0));
    assert_eq!(node.state_digest(), before.digest());
    let work = node.train_round(&state, &data, &windows, &[3, 4, 5]);
    assert_ne!(
        node.state_digest(),
        before.digest(),
        "a round changes the state"
    );

    let mut validator = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let replayed = validator
        .replay(&state, &before, &data, &windows, &[3, 4, 5])
        .unwrap();
    assert_eq!(replayed, work.blob, "replay must be byte-identical");
    assert_eq!(validator.state_digest(), node.state_digest());

    // What an audit catches: fewer steps (lazy), other batches (wrong data), or a
    // state other than the one committed (its digest differs too).
    let lazy = validator
        .replay(&state, &before, &data, &windows, &[3, 4])
        .unwrap();
    assert_ne!(lazy, work.blob);
    let elsewhere = validator
        .replay(&state, &before, &data, &windows, &[6, 7, 8])
        .unwrap();
    assert_ne!(elsewhere, work.blob);
    let mut forged = before.clone();
    forged.residual.iter_mut().for_each(|r| *r = 0.0);
    assert_ne!(forged.digest(), before.digest());
    let from_forged = validator
        .replay(&state, &forged, &data, &windows, &[3, 4, 5])
        .unwrap();
    assert_ne!(from_forged, work.blob);
    let decoded = tessera_outer::decode(&from_forged, n).unwrap();
    assert!(decoded.iter().all(|v| v.is_finite()));
}

#[test]
fn a_state_of_another_size_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, model, _, _) = setup(dir.path());
    let mut w = Worker::new(spec, &model, Device::Cpu).unwrap();
    let digest = w.state_digest();
    let mut short = w.private_state();
    short.adam_v.pop();
    let e = w.restore(&short).unwrap_err();
    assert_eq!(e.v + 1, e.params);
    assert!(e.to_string().contains("the model has"), "{e}");
    assert_eq!(w.state_digest(), digest);
}

#[test]
fn the_digest_covers_every_part_of_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, model, _, _) = setup(dir.path());
    let w = Worker::new(spec, &model, Device::Cpu).unwrap();
    let s = w.private_state();
    let d = s.digest();
    let mut t = s.clone();
    t.adam_step += 1;
    assert_ne!(t.digest(), d);
    for part in 0..3 {
        let mut t = s.clone();
        let v = match part {
            0 => &mut t.adam_m,
            1 => &mut t.adam_v,
            _ => &mut t.residual,
        };
        let mid = v.len() / 2;
        v[mid] = 1e-30;
        assert_ne!(t.digest(), d, "part {part}");
    }
    // The parts are length-prefixed: moving an element from one part to the next is
    // another state with another digest.
    let mut t = s.clone();
    let moved = t.adam_m.pop().unwrap();
    t.adam_v.insert(0, moved);
    assert_ne!(t.digest(), d);
}
