//! The checks behind Tessera's fuzz targets, one function per target, shared by the
//! targets (`fuzz_targets/`), the seed generator (`src/bin/seeds.rs`, which runs every
//! seed through its check) and anyone replaying a crash by hand.
//!
//! Every target feeds untrusted bytes to the decoder a Tessera process runs on them,
//! exactly as that process calls it, and then asserts what the decoder promises: it
//! never panics, a value it accepts is one the rest of the program can use (finite
//! updates, tensor shapes that fit `i64`, sizes whose arithmetic does not overflow),
//! and where the format is canonical the accepted value re-encodes to the same thing.
//! Only tch-free crates are linked: sanitizer builds never include libtorch.

use tessera_model_config::Preset;

pub mod auth;
pub mod data;
pub mod ledger;
pub mod model;
pub mod outer;
pub mod protocol;
pub mod seal;

/// Elements of a `nano` update (131,392): the shape the update targets decode at.
pub fn nano_params() -> u64 {
    Preset::by_name("nano")
        .expect("nano is a preset")
        .config()
        .params_total()
}

/// `data` as text, the way the HTTP handlers and file readers take JSON (a body that
/// is not UTF-8 is refused before it is parsed).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A target's check: panics on a finding.
pub type Check = fn(&[u8]);

/// Every target by name, for the seed generator and replays.
pub const TARGETS: &[(&str, Check)] = &[
    ("update_none", outer::update_none),
    ("update_int8", outer::update_int8),
    ("update_topk", outer::update_topk),
    ("update_lowrank", outer::update_lowrank),
    ("outer_checkpoint", outer::checkpoint),
    ("shard_inputs", outer::shard_inputs),
    ("wire_bodies", protocol::wire_bodies),
    ("run_spec", protocol::run_spec),
    ("ids", protocol::ids),
    ("signed_request", auth::signed_request),
    ("signed_reply", auth::signed_reply),
    ("ledger_request", ledger::request),
    ("data_manifest", data::manifest),
    ("data_shard", data::shard),
    ("sealed_manifest", seal::manifest),
    ("sealed_item", seal::item),
    ("safetensors", model::safetensors),
    ("model_config", model::config),
];
