//! An interrupted and resumed run must follow the same loss trajectory as one that
//! ran straight through: that is what makes checkpoints trustworthy and lets a
//! verifier re-execute a node's steps.

use std::ops::ControlFlow;
use std::path::Path;

use tch::Device;
use tessera_model::Preset;
use tessera_train::data::{prepare, PrepareOptions};
use tessera_train::trainer::{train, Budget, Event, TrainOptions};

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text = "To be, or not to be, that is the question:\n\
        Whether 'tis nobler in the mind to suffer\n\
        The slings and arrows of outrageous fortune,\n";
    let input = dir.join("corpus.txt");
    std::fs::write(&input, text.repeat(60)).unwrap();
    let data = dir.join("data");
    prepare(&PrepareOptions {
        inputs: vec![input],
        out: data.clone(),
        vocab_size: 400,
        val_fraction: 0.1,
        tokenizer: None,
        shard_tokens_max: 1 << 20,
    })
    .unwrap();
    data
}

fn options(data: &Path, out: &Path) -> TrainOptions {
    TrainOptions {
        model: Preset::by_name("nano").unwrap().config(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        budget: Budget::Steps(20),
        seed: 11,
        batch_size: 4,
        seq_len: 32,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup_steps: 5,
        grad_clip: 1.0,
        adamw: Default::default(),
        eval_every: 10,
        eval_tokens_max: 4096,
        checkpoint_every: 4,
        log_every: 1,
    }
}

fn losses(out: &Path, stop_at: Option<u64>) -> (Vec<f64>, Option<u64>) {
    let opts = options(&out.parent().unwrap().join("data"), out);
    let mut seen = Vec::new();
    let mut resumed = None;
    train(&opts, Device::Cpu, &mut |e| match e {
        Event::Started { resumed_from, .. } => {
            resumed = *resumed_from;
            ControlFlow::Continue(())
        }
        Event::Step { step, loss, .. } => {
            seen.push(*loss);
            if Some(*step) == stop_at {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        _ => ControlFlow::Continue(()),
    })
    .unwrap();
    (seen, resumed)
}

#[test]
fn interrupted_run_resumes_on_the_same_loss_trajectory() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let (straight, _) = losses(&dir.path().join("straight"), None);
    assert_eq!(straight.len(), 20);
    assert!(
        straight[19] < straight[0],
        "training should lower the loss: {straight:?}"
    );

    // Stop after step 10; the newest checkpoint is step 8, so steps 9-10 are lost
    // and redone, exactly as after a crash.
    let out = dir.path().join("interrupted");
    let (first, resumed) = losses(&out, Some(10));
    assert_eq!((first.len(), resumed), (10, None));
    let (second, resumed) = losses(&out, None);
    assert_eq!(resumed, Some(8));
    assert_eq!(second.len(), 12);
    assert_eq!(&first[..8], &straight[..8]);
    assert_eq!(&second[..], &straight[8..], "resumed trajectory differs");
}

#[test]
fn a_run_directory_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("run");
    let mut opts = options(&data, &out);
    opts.budget = Budget::Steps(4);
    train(&opts, Device::Cpu, &mut |_| ControlFlow::Continue(())).unwrap();
    opts.seed = 12;
    let err = train(&opts, Device::Cpu, &mut |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
}
