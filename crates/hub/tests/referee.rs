//! The refereed replay that stands between a differing audit and a slash: an honest
//! node whose arithmetic differs from the validator's (other hardware) drifts across a
//! round by more than the audit tolerance, yet each of its steps follows from the one
//! before, so it passes; a node that skipped steps, or whose update does not follow
//! from its last step, fails, with the step named.

use std::path::{Path, PathBuf};

use tch::Device;
use tessera_hub::validator::{referee, replay, Referee, Replay};
use tessera_model::Preset;
use tessera_protocol::RunSpec;
use tessera_train::data::{prepare, PrepareOptions, Windows};
use tessera_train::worker::{initial_state, StepState, Worker};
use tessera_train::Dataset;
use tessera_verify::VerifyConfig;

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

/// Adds seeded noise of `relative` × the step's own change to θ: arithmetic that
/// differs a little at every step, as another machine's would.
fn drift(step: &mut StepState, before: &[f32], relative: f32, seed: u64) {
    let mut x = seed;
    for (t, b) in step.theta.iter_mut().zip(before) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        *t += relative * 2.0 * r * (*t - b);
    }
}

#[test]
fn a_differing_replay_is_refereed_step_by_step_before_anything_is_slashed() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = data(dir.path());
    let data = std::sync::Arc::new(Dataset::open(&data_dir).unwrap());
    let spec = RunSpec {
        run_id: "referee".into(),
        preset: "nano".into(),
        rounds: 4,
        inner_steps: 4,
        batch_size: 2,
        seq_len: 32,
        warmup_steps: 1,
        seed: 3,
        ..RunSpec::default()
    };
    let model = Preset::by_name("nano")
        .unwrap()
        .config_for_vocab(data.manifest.vocab_size);
    let windows = Windows::new(&data.train, spec.seq_len);
    let outer = initial_state(&spec, &model);
    let batches = vec![0u64, 1, 2, 3];
    let mut node = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let before = node.private_state();
    let honest = node
        .trail(&outer, &before, &data, &windows, &batches)
        .unwrap();
    let cfg = VerifyConfig::default();

    // The node's own steps, each drifting by 5e-4 of its change (under the 1e-3
    // tolerance), each taken from the drifted state before it: other hardware.
    let mut other = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let mut trail: Vec<StepState> = Vec::new();
    let mut from = StepState {
        adam_step: before.adam_step,
        adam_m: before.adam_m.clone(),
        adam_v: before.adam_v.clone(),
        theta: outer.theta.clone(),
    };
    for (h, &b) in batches.iter().enumerate() {
        let mut s = other
            .step_from(outer.round, h, &from, b, &data, &windows)
            .unwrap();
        drift(&mut s, &from.theta, 5e-4, h as u64 + 1);
        trail.push(s.clone());
        from = s;
    }
    let submitted = other.encode_from(&outer.theta, trail.last().unwrap(), &before.residual);
    let job = |submitted: Vec<u8>| Replay {
        spec: spec.clone(),
        model: model.clone(),
        data: data.clone(),
        checkpoint: outer.to_bytes(),
        submitted,
        state: before.clone(),
        batches: batches.clone(),
        cfg: cfg.clone(),
    };
    // The whole-round replay differs beyond the tolerance…
    let differs = replay(job(submitted.clone())).unwrap_err();
    assert!(differs.contains("replay differs"), "{differs}");
    // …but every step follows from the node's own state before it: not slashed.
    let passed = referee(Referee {
        replay: job(submitted.clone()),
        trail: trail.clone(),
    })
    .unwrap();
    assert!(passed.contains("refereed replay passed"), "{passed}");

    // A lazy node: its update is from 2 of the 4 steps; an honest trail does not lead
    // to it, and a trail that stops after step 2 and repeats it is caught at step 3.
    let lazy_update = node.encode_from(&outer.theta, &honest[1], &before.residual);
    let e = referee(Referee {
        replay: job(lazy_update.clone()),
        trail: honest.clone(),
    })
    .unwrap_err();
    assert!(
        e.contains("does not follow from the node's last step"),
        "{e}"
    );
    let mut stalled = honest.clone();
    stalled[2] = honest[1].clone();
    stalled[3] = honest[1].clone();
    let e = referee(Referee {
        replay: job(lazy_update),
        trail: stalled,
    })
    .unwrap_err();
    assert!(e.contains("inner step 3 of 4"), "{e}");
    // A trail of the wrong length names both lengths.
    let e = referee(Referee {
        replay: job(submitted),
        trail: honest[..3].to_vec(),
    })
    .unwrap_err();
    assert!(e.contains("3 steps, the round 4"), "{e}");
}
