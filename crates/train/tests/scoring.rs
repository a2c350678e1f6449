//! The validator's scoring primitives on a real round: an honest update lowers the
//! loss, its negation raises it, an empty one changes nothing, and the scorer counts a
//! forward pass per sequence token at a third of the training FLOPs.

use std::path::Path;

use tch::Device;
use tessera_model::Preset;
use tessera_protocol::RunSpec;
use tessera_train::data::{prepare, PrepareOptions, Windows};
use tessera_train::trainer::Sampler;
use tessera_train::validate::{
    forward_flops_per_token, held_out, own_data_indicator, sequences, training_flops, Scorer,
};
use tessera_train::worker::{initial_state, Worker};
use tessera_train::Dataset;

fn data(dir: &Path) -> Dataset {
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
    Dataset::open(&out).unwrap()
}

#[test]
fn gains_follow_the_update_and_flops_are_counted() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let spec = RunSpec {
        run_id: "scoring".into(),
        preset: "nano".into(),
        inner_steps: 4,
        batch_size: 4,
        seq_len: 32,
        warmup_steps: 1,
        codec: tessera_outer::CodecKind::None,
        ..RunSpec::default()
    };
    let model = Preset::by_name("nano")
        .unwrap()
        .config_for_vocab(data.manifest.vocab_size);
    let windows = Windows::new(&data.train, spec.seq_len);
    // Score the third round's update: from θ₀ a large step in either direction lowers
    // the near-uniform loss (the tied embedding enters twice, so the step's square
    // dominates), which says nothing about the update.
    let mut state = initial_state(&spec, &model);
    let mut node = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    for round in 0..2u64 {
        let batches: Vec<u64> = (round * 4..round * 4 + 4).collect();
        let w = node.train_round(&state, &data, &windows, &batches);
        state
            .apply(node.codec(), spec.aggregator, &[w.blob])
            .unwrap();
    }
    let work = node.train_round(&state, &data, &windows, &[8, 9, 10, 11]);
    let n = state.theta.len() as u64;
    let update = tessera_outer::decode(&work.blob, n).unwrap();
    let lr = spec.effective_outer_lr();

    let val = held_out(
        &data.validation_windows(spec.seq_len, 2 * spec.seq_len),
        Device::Cpu,
    );
    assert_eq!(val.size(), [2, spec.seq_len as i64 + 1]);
    let mut sampler = Sampler::new(spec.seed);
    let own = sequences(&mut sampler, &data, &windows, &[32, 37], Device::Cpu);
    let random = sequences(&mut sampler, &data, &windows, &[1000, 1001], Device::Cpu);

    let mut scorer = Scorer::new(&model, spec.seq_len, Device::Cpu);
    let sets = [&val, &own, &random];
    let before = scorer.losses_at(&state.theta, &sets);
    let gains = scorer.gains(&state.theta, &before, &update, lr, &sets);
    assert!(gains.iter().all(|g| *g > 0.0), "{gains:?}");
    let flipped: Vec<f32> = update.iter().map(|v| -v).collect();
    assert!(scorer.gain(&state.theta, &flipped, lr, &val) < 0.0);
    let zero = vec![0f32; update.len()];
    assert_eq!(scorer.gain(&state.theta, &zero, lr, &val), 0.0);
    assert_eq!(own_data_indicator(gains[1], gains[2]), gains[1] - gains[2]);

    // 3 sets before, 3 after, then 2 passes for each of the two single-set gains; each
    // pass is 2 sequences of 32 predicted tokens.
    let passes = 3 + 3 + 2 + 2;
    let per_token = forward_flops_per_token(&model, spec.seq_len);
    assert_eq!(scorer.flops(), passes * 2 * 32 * per_token);
    assert_eq!(
        training_flops(&model, spec.seq_len, 64),
        model.flops_per_token(spec.seq_len) * 64
    );
    assert!(3 * per_token <= model.flops_per_token(spec.seq_len));
}
