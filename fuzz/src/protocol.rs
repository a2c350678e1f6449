//! Control-plane bytes from `tessera-protocol`: every wire body, the run's settings,
//! and ids and keys in hex. (Signed-request headers are in `auth`.)

use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_protocol::auth::Audience;
use tessera_protocol::wire::{
    protocol_of, Ack, AggregateReply, AggregateReport, Commit, CommitBody, ErrorBody, FinalEval,
    NodeStats, PeerAddr, Phase, RoundRecord, RunInfo, ShardRecord, StateView, Summary, ThetaReply,
    ThetaReport,
};
use tessera_protocol::{identity, Hash32, NodeId, RunSpec};

/// Decodes `data` as `T` the way the hub and nodes do (`serde_json::from_slice`), and
/// checks that an accepted body re-encodes to JSON that decodes again: to the same
/// value when `exact` (bodies without floats; serde_json parses floats to within one
/// unit in the last place unless its `float_roundtrip` feature is on, which Tessera
/// does not use).
fn body<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    data: &[u8],
    exact: bool,
) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&value).expect("a decoded body serialises");
    let again: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "{} re-encodes to JSON it refuses: {e}: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&json)
        )
    });
    if exact {
        assert_eq!(again, value, "{}", String::from_utf8_lossy(&json));
    }
    Some(value)
}

/// Every body of `protocol::wire`, each tried on the same bytes.
pub fn wire_bodies(data: &[u8]) {
    body::<CommitBody>(data, true);
    body::<Commit>(data, true);
    body::<StateView>(data, true);
    body::<RoundRecord>(data, true);
    body::<ThetaReport>(data, true);
    body::<ThetaReply>(data, true);
    body::<AggregateReport>(data, true);
    body::<AggregateReply>(data, true);
    body::<ShardRecord>(data, true);
    body::<Ack>(data, true);
    body::<ErrorBody>(data, true);
    body::<Phase>(data, true);
    body::<PeerAddr>(data, true);
    body::<NodeStats>(data, false);
    body::<FinalEval>(data, false);
    body::<Summary>(data, false);
    body::<Audience>(data, true);
    // A node reads the protocol version alone first.
    let _ = protocol_of(data);
    if let Some(info) = body::<RunInfo>(data, false) {
        // A node validates the hub's settings before it uses them.
        spec_in_use(&info.spec);
        let _ = info.model.validate();
    }
    if let Some(view) = body::<StateView>(data, true) {
        let _ = view.round();
    }
    if let Some(addr) = body::<PeerAddr>(data, true) {
        // Logs cut long addresses at a character boundary.
        let _ = addr.to_string();
    }
}

/// What a node and the hub compute from settings that passed `validate`.
fn spec_in_use(spec: &RunSpec) {
    if spec.validate().is_err() {
        return;
    }
    let codec = spec.codec().expect("a valid spec has a codec");
    assert_eq!(codec.kind(), spec.codec);
    let lr = spec.effective_outer_lr();
    assert!(lr.is_finite() && lr > 0.0);
    let _ = spec.tokens_per_batch();
    let _ = spec.total_steps();
}

/// `RunSpec` as JSON (inside `RunInfo` a node receives it from the hub), then
/// `validate` and what the run computes from valid settings.
pub fn run_spec(data: &[u8]) {
    if let Some(spec) = body::<RunSpec>(data, false) {
        spec_in_use(&spec);
    }
}

/// Ids, hashes and keys in hex: one text form each.
pub fn ids(data: &[u8]) {
    let Some(text) = crate::text(data) else {
        return;
    };
    if let Ok(id) = NodeId::from_hex(text) {
        assert_eq!(id.to_hex(), text, "a node id has another spelling");
    }
    if let Ok(h) = Hash32::from_hex(text) {
        assert_eq!(h.to_hex(), text, "a hash has another spelling");
    }
    if let Ok(key) = identity::parse_public(text) {
        assert_eq!(key, text, "a public key has another spelling");
    }
    // As JSON strings too (ids inside bodies).
    if let Ok(id) = serde_json::from_slice::<NodeId>(data) {
        let json = serde_json::to_vec(&id).expect("an id serialises");
        assert_eq!(serde_json::from_slice::<NodeId>(&json).ok(), Some(id));
    }
    // Codec and aggregator names in run files.
    if let Ok(kind) = text.parse::<tessera_outer::CodecKind>() {
        assert_eq!(kind.name(), text);
    }
    if let Ok(agg) = text.parse::<tessera_outer::Aggregator>() {
        assert_eq!(agg.name(), text);
    }
    // A signature check over hex from the wire: a key and a signature, split at the
    // first newline, over a fixed message.
    if let Some((key, sig)) = text.split_once('\n') {
        let _ = identity::verify(key, b"tessera fuzz", sig);
    }
}
