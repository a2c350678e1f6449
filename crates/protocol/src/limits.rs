//! Every limit of the protocol in one place, with why it is what it is.

/// Largest HTTP request body the hub accepts: a payout of 1,000 contributors is
/// about 90 KiB of JSON, so 1 MiB leaves room without letting a client make the hub
/// buffer large bodies.
pub const HTTP_BODY_BYTES_MAX: usize = 1 << 20;

/// How far a signed request's timestamp may be from the server's clock. Requests
/// older than this are refused, which bounds how long a captured request can be
/// replayed (writes are idempotent by request id in any case).
pub const SIGNED_REQUEST_SKEW_MS: u64 = 5 * 60 * 1000;

/// Largest control-plane message a hub accepts (joins, heartbeats, commits, θ
/// reports: all well under 4 KiB). Checked while the body streams in, before it is
/// buffered whole. Update blobs travel on the data plane, bounded by the run's codec.
pub const CONTROL_BODY_BYTES_MAX: usize = 64 << 10;

/// Most signatures a hub remembers to refuse replays within the skew window (about
/// 100 bytes each, so 100 MiB at most). At one request per node per second, a
/// thousand nodes fill it in about 17 minutes, longer than the 10-minute window; past
/// it the oldest are forgotten first, and requests stamped at or before a forgotten
/// one are refused (`auth::ReplayGuard`).
pub const REPLAY_CACHE_MAX: usize = 1 << 20;

/// Most remembered signatures of one signer: a node sends about two signed requests
/// a second at most (a heartbeat a second, commits and θ reports), 1,200 in the
/// 10-minute window; past its share a signer is refused, not anyone else forgotten.
pub const REPLAY_SIGNER_SHARE_MAX: u32 = 4096;

/// Largest control-plane reply a node reads from a hub. The largest is a round
/// record, which names each accepted member and its update (about 150 bytes of JSON
/// each), so [`MEMBERS_MAX`] of them fit.
pub const CONTROL_REPLY_BYTES_MAX: usize = 8 << 20;

/// Largest data-set file a node downloads from a hub (a shard, the manifest or the
/// tokenizer); shards are cut well below it.
pub const DATA_FILE_BYTES_MAX: usize = 1 << 30;

/// Longest blob-endpoint address accepted in a commit (an iroh endpoint id and a few
/// socket addresses fit in a few hundred bytes).
pub const PEER_ADDR_BYTES_MAX: usize = 4096;

/// Most relays a run advertises (a few regions' worth; each is dialled by every node).
pub const RELAYS_MAX: usize = 8;

/// Longest relay URL in a run's info.
pub const RELAY_URL_BYTES_MAX: usize = 256;

/// Largest relay certificate (PEM) a run's info carries: one self-signed certificate
/// or a short chain.
pub const RELAY_CERT_PEM_BYTES_MAX: usize = 8192;

/// Most members a run admits (a run's `max_nodes` is at most this). The hub's
/// per-input cost is logarithmic in the members and the simulator checks runs of
/// 10,000 nodes; past that the all-to-all exchange, not the hub, is the limit
/// (docs/results.md, "Simulated runs").
pub const MEMBERS_MAX: usize = 16_384;

/// Most batches one member is assigned per round (a run's `inner_steps`), which
/// bounds a state view's size.
pub const INNER_STEPS_MAX: u64 = 10_000;

/// Most rounds a run may have.
pub const ROUNDS_MAX: u64 = 1 << 32;

/// Most sequences in one inner step of one member (a run's `batch_size`): far more than
/// a node's memory holds at any preset's context, and small enough that a member's
/// tokens in a round stay well inside `u64`. (A run's `seq_len` is bounded by its
/// preset's context.)
pub const BATCH_SIZE_MAX: usize = 1 << 16;

/// Most transfers one history query returns.
pub const HISTORY_LIMIT_MAX: usize = 1000;

const _: () = assert!(
    HTTP_BODY_BYTES_MAX >= 64 * 1024,
    "a 1,000-contributor payout must fit"
);

const _: () = assert!(
    MEMBERS_MAX * 160 <= CONTROL_REPLY_BYTES_MAX,
    "a round record naming every member must fit in a reply"
);

const _: () = assert!(
    CONTROL_BODY_BYTES_MAX <= HTTP_BODY_BYTES_MAX,
    "a control message is an HTTP body"
);
const _: () = assert!(
    PEER_ADDR_BYTES_MAX * 4 <= CONTROL_BODY_BYTES_MAX,
    "a commit naming its provider fits a control message"
);
const _: () = assert!(
    REPLAY_SIGNER_SHARE_MAX as usize * 16 <= REPLAY_CACHE_MAX,
    "the cache holds at least 16 signers' full shares"
);
const _: () = assert!(
    INNER_STEPS_MAX as usize * 21 <= CONTROL_REPLY_BYTES_MAX,
    "a state view listing every assigned batch (up to 20 digits and a comma each) fits a reply"
);
const _: () = assert!(
    (BATCH_SIZE_MAX as u64 * INNER_STEPS_MAX)
        .checked_mul(u32::MAX as u64)
        .is_some(),
    "a member's tokens in a round fit u64 at any context up to 2^32 tokens"
);
const _: () = assert!(
    CONTROL_REPLY_BYTES_MAX <= DATA_FILE_BYTES_MAX,
    "data files are the largest replies"
);
