//! How exactly a replay audit reproduces an honest update, by thread count.
//!
//! ```text
//! cargo run --release --example replay_threads -- DATA_DIR [PRESET] [ROUNDS]
//! ```
//!
//! A node trains `ROUNDS` rounds of the run defaults (`RunSpec::default`, H = 5, top-k)
//! with 2 threads, committing to its private state before each; a validator then
//! replays each round from that state with 1 thread and with 2. Printed per round and
//! thread count: whether the blobs are byte-identical, and the relative L2 error of the
//! decoded replay against the decoded submission, ‖r − s‖ / ‖s‖, plus the same for the
//! dense local delta before the codec (θ − θᵢ), which shows how much of the error the
//! top-k selection amplifies.

use std::path::PathBuf;

use tch::Device;
use tessera_model::Preset;
use tessera_outer::decode;
use tessera_protocol::RunSpec;
use tessera_train::data::Windows;
use tessera_train::diloco::flatten;
use tessera_train::worker::{initial_state, Worker};
use tessera_train::Dataset;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n.max(f64::MIN_POSITIVE)).sqrt()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(
        args.next()
            .expect("usage: replay_threads DATA_DIR [PRESET] [ROUNDS]"),
    );
    let preset = args.next().unwrap_or_else(|| "micro".into());
    let rounds: u64 = args
        .next()
        .map_or(3, |r| r.parse().expect("ROUNDS is a number"));
    let data = Dataset::open(&data_dir).expect("a prepared data set");
    let model = Preset::by_name(&preset)
        .expect("a preset name")
        .config_for_vocab(data.manifest.vocab_size);
    let d = RunSpec::default();
    let spec = RunSpec {
        run_id: "replay-threads".into(),
        preset: preset.clone(),
        // `nano`'s context is shorter than the default sequence.
        seq_len: d.seq_len.min(model.max_position_embeddings),
        ..d
    };
    let windows = Windows::new(&data.train, spec.seq_len);
    let h = spec.inner_steps;
    let mut node = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let mut validator = Worker::new(spec.clone(), &model, Device::Cpu).unwrap();
    let mut state = initial_state(&spec, &model);
    let n = state.theta.len() as u64;
    println!(
        "preset {preset}, {n} parameters, codec {}, H = {h}",
        node.codec().name()
    );
    println!(
        "round  node threads  replay threads  blob identical  rel L2 decoded  rel L2 dense delta"
    );
    // Per replay thread count: identical blobs, rounds, largest decoded and dense error.
    let mut summary = [(0u64, 0u64, 0f64, 0f64); 2];
    for round in 0..rounds {
        let batches: Vec<u64> = (round * h..(round + 1) * h).collect();
        let before = node.private_state();
        tch::set_num_threads(2);
        let work = node.train_round(&state, &data, &windows, &batches);
        let dense = dense_delta(&node, &state);
        let submitted = decode(&work.blob, n).unwrap();
        for threads in [1, 2] {
            tch::set_num_threads(threads);
            let replayed = validator
                .replay(&state, &before, &data, &windows, &batches)
                .unwrap();
            let replayed_dense = dense_delta(&validator, &state);
            let r = decode(&replayed, n).unwrap();
            let (decoded_err, dense_err) =
                (rel_l2(&r, &submitted), rel_l2(&replayed_dense, &dense));
            let sum = &mut summary[threads as usize - 1];
            sum.0 += u64::from(replayed == work.blob);
            sum.1 += 1;
            sum.2 = sum.2.max(decoded_err);
            sum.3 = sum.3.max(dense_err);
            println!(
                "{round:>5}  {:>12}  {threads:>14}  {:>14}  {:>14.3e}  {:>18.3e}",
                2,
                replayed == work.blob,
                decoded_err,
                dense_err,
            );
        }
        tch::set_num_threads(2);
        state
            .apply(node.codec(), spec.aggregator, &[work.blob])
            .unwrap();
    }
    for (i, (same, count, decoded_max, dense_max)) in summary.iter().enumerate() {
        println!(
            "replay on {} thread(s): {same}/{count} blobs identical, rel L2 decoded max \
             {decoded_max:.3e}, dense max {dense_max:.3e}",
            i + 1
        );
    }
}

/// θ − θᵢ of the worker's replica after its round, before the codec.
fn dense_delta(worker: &Worker, state: &tessera_train::worker::OuterState) -> Vec<f32> {
    let local = flatten(worker.trained_model());
    state.theta.iter().zip(&local).map(|(t, l)| t - l).collect()
}
