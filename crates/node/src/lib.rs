//! A contributor node: the pure node engine ([`engine::NodeState`]) and the process
//! loop that carries out its actions. The node joins a run, downloads and verifies the
//! data set, trains the batches the coordinator assigns it, publishes its compressed
//! pseudo-gradient on its blob endpoint (iroh-blobs) and commits its hash, and after
//! each round fetches the accepted updates (from the nodes that made them, or from the
//! hub), takes the outer step itself and reports the hash of θ. A node that joins late
//! or falls behind loads the hub's checkpoint, so a crash costs at most the round in
//! flight. Every blob is verified against its hash while it streams. On SIGINT or
//! SIGTERM the node leaves the run before exiting.
//!
//! The hub's API is the [`HubApi`] trait ([`HttpHub`] over signed HTTP) and the data
//! plane is `tessera_blobs::BlobTransport`; this crate knows nothing of the hub's code.

pub mod engine;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use anyhow::{bail, Context, Result};
use tessera_blobs::{BlobTransport, IrohBlobs, IrohOptions, PeerAddr};
use tessera_net::http_auth::{call_blocking, ClientAuth};
use tessera_outer::shard::{aggregate_shard, ShardInputs, ShardLayout};
use tessera_outer::OuterState;
use tessera_protocol::limits::{CONTROL_REPLY_BYTES_MAX, DATA_FILE_BYTES_MAX};
use tessera_protocol::wire::{protocol_of, PROTOCOL_VERSION};
use tessera_protocol::wire::{
    Ack, AggregateReply, AggregateReport, Commit, CommitBody, ErrorBody, ErrorCode, NodeStats,
    RevealBody, RoundRecord, RunInfo, StateView, ThetaReply, ThetaReport,
};
use tessera_protocol::{Hash32, Identity, NodeId, RunSpec};
use tessera_train::adversary::{Adversary, Knowledge, Submission};
use tessera_train::data::{Dataset, Windows};
use tessera_train::worker::{initial_state, PrivateState, Worker};

use engine::{Action, NodeState, Outcome};

/// Options of `tessera node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub hub: String,
    /// The hub's key: every reply must be signed by it. Without it, the first key seen
    /// is pinned for the node's lifetime.
    pub hub_key: Option<NodeId>,
    /// A PEM certificate to trust as a root for an HTTPS hub with a self-signed
    /// certificate.
    pub hub_ca: Option<PathBuf>,
    pub identity: Identity,
    /// Where the data set is cached.
    pub cache_dir: PathBuf,
    pub device: tch::Device,
    /// Upload and download rate limit of the blob endpoint, in megabits per second.
    pub bandwidth_mbps: Option<f64>,
    /// UDP address the node's blob endpoint binds.
    pub blob_bind: SocketAddr,
    /// Cheat in this way: **a test tool** for verification
    /// (`tessera_train::adversary`); `None` in every real node.
    pub adversary: Option<Adversary>,
    /// Publish a wrong shard whenever it aggregates one: **a test tool** for sharded
    /// aggregation's checks; `false` in every real node.
    pub wrong_shards: bool,
    /// How this node attests for a private run's data keys: `configfs` (inside a TDX or
    /// SEV-SNP guest) or `test:SEED_FILE` (the test PKI). `None`: the node cannot
    /// train on sealed data.
    pub attest: Option<String>,
    /// Measure instead of joining: train this many rounds of the run's batches alone
    /// from θ₀, print the tokens per second, and exit. The denominator of a node's
    /// utilization in a run (its tokens per second there ÷ this, same machine and
    /// threads).
    pub alone_rounds: Option<u64>,
    /// Print the end report ([`NodeReport`]) as JSON on stdout.
    pub json: bool,
}

/// Context under which the blob endpoint's key is derived from the node key.
pub const BLOB_KEY_CONTEXT: &str = "tessera 2026 blob endpoint key v1";

/// How a request to the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// The hub answered with a refusal.
    #[error("{status}: {}", body.message)]
    Refused { status: u16, body: ErrorBody },
    /// No usable answer: the hub is down or restarting, or the reply did not parse.
    #[error("{0:#}")]
    Transport(anyhow::Error),
}

/// Largest `/summary` or `/api/ledger` reply a node reads (they grow with the nodes and
/// rounds of the run).
const SUMMARY_REPLY_BYTES_MAX: usize = 64 << 20;

/// What a node did in its run, printed when it stops (`tessera node --json`: as JSON
/// on stdout), from the hub's summary and ledger view and its own counters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub run_id: String,
    pub run_finished: bool,
    /// Rounds whose aggregate took this node's update, and rounds it was late for.
    pub rounds_accepted: u64,
    pub rounds_late: u64,
    /// Tokens of accepted work.
    pub tokens: u64,
    /// Commits the validator refused, its mean score (0 to 1) and its audits.
    pub refused: u64,
    pub score_mean: Option<f64>,
    pub audits_passed: u64,
    pub audits_failed: u64,
    pub ejected: bool,
    /// What the run's pool paid this node so far, in tokens (absent without a ledger
    /// or before the first payout).
    pub earned_tokens: Option<String>,
    /// Training throughput from the start of its first round's training to the end
    /// of its last.
    pub tokens_per_second: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl NodeReport {
    /// The report as one line of text.
    pub fn line(&self) -> String {
        format!(
            "{} round(s) accepted, {} late, {} tokens, {} refused, score {}, audits {} passed / {} failed{}, earned {} tokens",
            self.rounds_accepted,
            self.rounds_late,
            self.tokens,
            self.refused,
            self.score_mean.map_or("–".into(), |s| format!("{s:.3}")),
            self.audits_passed,
            self.audits_failed,
            if self.ejected { ", EJECTED" } else { "" },
            self.earned_tokens.as_deref().unwrap_or("no")
        )
    }
}

/// The hub as a node sees it.
pub trait HubApi {
    fn run_info(&self) -> Result<RunInfo, ApiFailure>;
    fn data_file(&self, name: &str) -> Result<Vec<u8>, ApiFailure>;
    fn join(&self) -> Result<(), ApiFailure>;
    fn leave(&self) -> Result<(), ApiFailure>;
    fn heartbeat(&self, stats: &NodeStats) -> Result<(), ApiFailure>;
    fn state(&self, node: &NodeId) -> Result<StateView, ApiFailure>;
    fn round(&self, round: u64) -> Result<RoundRecord, ApiFailure>;
    fn commit(&self, body: &CommitBody) -> Result<(), ApiFailure>;
    fn theta(&self, report: &ThetaReport) -> Result<ThetaReply, ApiFailure>;
    fn reveal(&self, body: &RevealBody) -> Result<(), ApiFailure>;
    fn trail(&self, body: &tessera_protocol::wire::TrailBody) -> Result<(), ApiFailure>;
    fn aggregate(&self, body: &AggregateReport) -> Result<AggregateReply, ApiFailure>;
}

/// The hub's API over signed HTTP. Every reply must carry the hub's signature (for
/// this request); a reply that doesn't is a transport failure, never acted on.
pub struct HttpHub {
    base: String,
    identity: Identity,
    http: reqwest::blocking::Client,
    auth: Arc<ClientAuth>,
}

impl HttpHub {
    /// A client of the hub at `base` that trusts replies signed by `auth`'s key.
    pub fn new(
        base: &str,
        identity: Identity,
        auth: Arc<ClientAuth>,
        timeout: Duration,
        ca: Option<&reqwest::Certificate>,
    ) -> Result<HttpHub> {
        let mut http = reqwest::blocking::Client::builder().timeout(timeout);
        if let Some(ca) = ca {
            http = http.add_root_certificate(ca.clone());
        }
        Ok(HttpHub {
            base: base.trim_end_matches('/').to_string(),
            identity,
            http: http.build()?,
            auth,
        })
    }

    fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, ApiFailure> {
        self.send_max(method, path, body, CONTROL_REPLY_BYTES_MAX)
    }

    fn send_max(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        reply_max: usize,
    ) -> Result<Vec<u8>, ApiFailure> {
        let signer = (method != "GET").then_some(&self.identity);
        let reply = call_blocking(
            &self.http, &self.base, &self.auth, signer, method, path, body, reply_max,
        )
        .with_context(|| format!("{method} {}{path}", self.base))
        .map_err(ApiFailure::Transport)?;
        if !(200..300).contains(&reply.status) {
            return Err(match serde_json::from_slice::<ErrorBody>(&reply.body) {
                Ok(body) => ApiFailure::Refused {
                    status: reply.status,
                    body,
                },
                Err(_) => {
                    ApiFailure::Transport(anyhow::anyhow!("{method} {path}: {}", reply.status))
                }
            });
        }
        Ok(reply.body)
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        bytes: Vec<u8>,
        what: &str,
    ) -> Result<T, ApiFailure> {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiFailure::Transport(anyhow::anyhow!("malformed {what} from the hub: {e}"))
        })
    }

    /// `GET /summary`: the run at a glance (O(nodes), so a larger reply bound).
    pub fn summary(&self) -> Result<tessera_protocol::wire::Summary, ApiFailure> {
        let bytes = self.send_max("GET", "/summary", Vec::new(), SUMMARY_REPLY_BYTES_MAX)?;
        self.json(bytes, "summary")
    }

    /// `GET /api/ledger`: the run's public ledger view (its `earned` map is what
    /// [`NodeReport::earned_tokens`] reads).
    pub fn ledger_view(&self) -> Result<serde_json::Value, ApiFailure> {
        let bytes = self.send_max("GET", "/api/ledger", Vec::new(), SUMMARY_REPLY_BYTES_MAX)?;
        self.json(bytes, "ledger view")
    }

    fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<Vec<u8>, ApiFailure> {
        self.send(
            "POST",
            path,
            serde_json::to_vec(body).expect("bodies serialise"),
        )
    }
}

impl HubApi for HttpHub {
    fn run_info(&self) -> Result<RunInfo, ApiFailure> {
        let bytes = self.send("GET", "/run", Vec::new())?;
        let version = protocol_of(&bytes).map_err(|e| ApiFailure::Transport(anyhow!(e)))?;
        if version != PROTOCOL_VERSION {
            return Err(ApiFailure::Transport(anyhow!(
                "the hub speaks protocol version {version} and this node {PROTOCOL_VERSION}; \
                 run the same Tessera release as the hub"
            )));
        }
        self.json(bytes, "run info")
    }

    fn data_file(&self, name: &str) -> Result<Vec<u8>, ApiFailure> {
        self.send_max(
            "GET",
            &format!("/data/{name}"),
            Vec::new(),
            DATA_FILE_BYTES_MAX,
        )
    }

    fn join(&self) -> Result<(), ApiFailure> {
        self.send("POST", "/node/join", Vec::new()).map(drop)
    }

    fn leave(&self) -> Result<(), ApiFailure> {
        self.send("POST", "/node/leave", Vec::new()).map(drop)
    }

    fn heartbeat(&self, stats: &NodeStats) -> Result<(), ApiFailure> {
        self.post("/node/heartbeat", stats).map(drop)
    }

    fn state(&self, node: &NodeId) -> Result<StateView, ApiFailure> {
        let bytes = self.send("GET", &format!("/state?node={node}"), Vec::new())?;
        self.json(bytes, "state view")
    }

    fn round(&self, round: u64) -> Result<RoundRecord, ApiFailure> {
        let bytes = self.send("GET", &format!("/rounds/{round}"), Vec::new())?;
        self.json(bytes, "round record")
    }

    fn commit(&self, body: &CommitBody) -> Result<(), ApiFailure> {
        self.post("/commit", body).map(drop)
    }

    fn theta(&self, report: &ThetaReport) -> Result<ThetaReply, ApiFailure> {
        let bytes = self.post("/theta", report)?;
        self.json(bytes, "θ reply")
    }

    fn reveal(&self, body: &RevealBody) -> Result<(), ApiFailure> {
        let bytes = self.post("/reveal", body)?;
        self.json::<Ack>(bytes, "reveal reply").map(drop)
    }

    fn trail(&self, body: &tessera_protocol::wire::TrailBody) -> Result<(), ApiFailure> {
        let bytes = self.post("/trail", body)?;
        self.json::<Ack>(bytes, "trail reply").map(drop)
    }

    fn aggregate(&self, body: &AggregateReport) -> Result<AggregateReply, ApiFailure> {
        let bytes = self.post("/aggregate", body)?;
        self.json(bytes, "aggregate reply")
    }
}

/// What an action's failure tells the engine.
fn outcome_of(e: &ApiFailure) -> Outcome {
    match e {
        ApiFailure::Refused { body, .. } => Outcome::Refused { code: body.code },
        ApiFailure::Transport(_) => Outcome::Failed,
    }
}

/// A data file name the hub may give: a plain file name, never a path.
fn check_file_name(name: &str) -> Result<()> {
    if !tessera_train::data::is_plain_file_name(name) {
        bail!(
            "the hub names a data file `{}`; refusing a name that is not a plain file name",
            name.escape_debug()
        );
    }
    Ok(())
}

/// Downloads the run's data set into `dir` (skipping files already there) and opens it,
/// which verifies every shard against the manifest.
pub fn fetch_data(hub: &dyn HubApi, info: &RunInfo, dir: &Path) -> Result<Dataset> {
    fetch_data_as(hub, info, dir, None)
}

/// Whether the run trains on a sealed (private) data set.
fn is_sealed(info: &RunInfo) -> bool {
    info.data_files
        .iter()
        .any(|f| f == tessera_seal::SEALED_MANIFEST_FILE)
}

/// Why a node cannot train on a run's sealed data: said before it joins.
pub fn private_run_refusal(info: &RunInfo, attest: Option<&str>) -> Option<String> {
    (is_sealed(info) && attest.is_none()).then(|| {
        format!(
            "run `{}` trains on a sealed (private) data set: its keys are released only to nodes \
             that attest, by a hardware quote, that they run an allow-listed build in a TEE \
             (tee = required, key server {}). This node has no quote provider: run it inside a \
             TDX or SEV-SNP confidential VM with `--attest configfs`.",
            info.spec.run_id, info.spec.key_server
        )
    })
}

/// The quote provider `attest` names (`configfs`, `test:SEED_FILE`), or the reason
/// this process cannot take part in a private run without one.
pub fn quote_provider(
    info: &RunInfo,
    attest: Option<&str>,
) -> Result<Option<Box<dyn tessera_attest::provider::QuoteProvider>>> {
    if let Some(why) = private_run_refusal(info, attest) {
        bail!(why);
    }
    attest.map(tessera_attest::provider::from_spec).transpose()
}

/// Fetches the run's data set into `dir` (files already there are kept). A sealed data
/// set's files are ciphertext; its keys come from the run's key server for the quote
/// `access` makes, and its plaintext is opened in memory only, never written.
pub fn fetch_data_as(
    hub: &dyn HubApi,
    info: &RunInfo,
    dir: &Path,
    access: Option<(&Identity, &dyn tessera_attest::provider::QuoteProvider)>,
) -> Result<Dataset> {
    std::fs::create_dir_all(dir)?;
    for file in &info.data_files {
        check_file_name(file)?;
        let path = dir.join(file);
        if !path.exists() {
            let bytes = hub.data_file(file)?;
            // Written aside and renamed, so an interrupted download is never mistaken
            // for a complete file on the next start.
            // Named per process: nodes sharing a cache once renamed each other's
            // `.part` file away, and the slower one failed.
            let tmp = path.with_extension(format!("part.{}", std::process::id()));
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
        }
    }
    let sealed = is_sealed(info);
    let manifest_file = if sealed {
        tessera_seal::SEALED_MANIFEST_FILE
    } else {
        tessera_train::data::MANIFEST_FILE
    };
    let manifest = std::fs::read(dir.join(manifest_file))?;
    if Hash32::of(&manifest) != info.data_manifest {
        bail!(
            "the data manifest does not match the run's; delete {} and retry",
            dir.display()
        );
    }
    if !sealed {
        return Ok(Dataset::open(dir)?);
    }
    let Some((identity, provider)) = access else {
        bail!(private_run_refusal(info, None).unwrap_or_default());
    };
    let text = String::from_utf8(manifest).context("the sealed manifest is not UTF-8")?;
    let sealed_manifest = tessera_seal::SealedManifest::parse(&text)?;
    let plain = tessera_keyserver::open_sealed(
        dir,
        &sealed_manifest,
        &info.spec.key_server,
        &info.spec.run_id,
        identity,
        provider,
    )
    .context("getting the sealed data set's keys from the run's key server")?;
    Ok(Dataset::from_sealed(&sealed_manifest, plain)?)
}

/// The model the hub names must be the run's preset sized to the data set's
/// vocabulary, as the hub itself derives it: a hub cannot make a node build a model of
/// any other shape (and size).
fn check_model(info: &RunInfo, data_vocab: usize) -> Result<()> {
    let expected =
        tessera_model_config::Preset::by_name(&info.spec.preset)?.config_for_vocab(data_vocab);
    if info.model != expected {
        bail!(
            "the hub names a model that is not preset `{}` for this data set; refusing to build it",
            info.spec.preset
        );
    }
    Ok(())
}

/// Training time and progress, shared with the heartbeat thread.
#[derive(Default)]
struct Counters {
    train_ms: AtomicU64,
    loss_micro: AtomicU64,
    rounds: AtomicU64,
    /// Set by the heartbeat thread when the hub no longer counts us as a member.
    evicted: AtomicBool,
}

fn stats(c: &Counters, blobs: &dyn BlobTransport, started: Instant) -> NodeStats {
    let traffic = blobs.traffic();
    NodeStats {
        bytes_sent: traffic.sent,
        bytes_received: traffic.received,
        train_seconds: c.train_ms.load(Ordering::Relaxed) as f64 / 1e3,
        wall_seconds: started.elapsed().as_secs_f64(),
        last_loss: c.loss_micro.load(Ordering::Relaxed) as f64 / 1e6,
        rounds_committed: c.rounds.load(Ordering::Relaxed),
        paths: traffic.paths,
    }
}

/// Where a node's blob endpoint binds when not told: loopback for a hub on this
/// machine (tests, local demos: nothing leaves it), every interface otherwise, so
/// peers and the run's relay can reach it. The port is the system's choice.
pub fn default_blob_bind(hub_url: &str) -> SocketAddr {
    // A URL that does not parse is refused later, when the node dials the hub; until
    // then nothing is exposed.
    let loopback = match reqwest::Url::parse(hub_url) {
        Ok(url) => {
            // An IPv6 host comes in brackets.
            let host = url.host_str().unwrap_or("");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Err(_) => true,
    };
    if loopback {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

/// Set when the node is stopping (SIGINT/SIGTERM), under the lock joins also take.
///
/// Story: a node stopped with SIGTERM sent `leave`; its main loop, refused a θ report
/// as no longer a member, joined again before the process exited, and the hub kept a
/// member that was gone. A join now happens only under this lock and never after the
/// stop handler has taken it.
static STOPPING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

fn join_unless_stopping(hub: &dyn HubApi) -> Result<(), ApiFailure> {
    let stopping = STOPPING.lock().unwrap_or_else(|e| e.into_inner());
    if *stopping {
        // The stop handler is leaving and about to exit the process.
        drop(stopping);
        loop {
            std::thread::park();
        }
    }
    hub.join()
}

/// Runs a node until the run finishes.
pub fn run(opts: NodeOptions) -> Result<()> {
    tessera_net::install_tls_provider();
    let json = opts.json;
    let counters = Arc::new(Counters::default());
    // One pin for every connection to the hub: the given key, or the first one seen.
    let auth = Arc::new(ClientAuth::new(opts.hub_key));
    let ca = match &opts.hub_ca {
        Some(path) => Some(tessera_net::tls::root_certificate(path)?),
        None => None,
    };
    let hub = Arc::new(HttpHub::new(
        &opts.hub,
        opts.identity.clone(),
        auth.clone(),
        Duration::from_secs(600),
        ca.as_ref(),
    )?);
    let info = hub.run_info().context("reading the run from the hub")?;
    let audience = auth
        .audience()
        .expect("a checked reply taught the audience");
    if audience.scope != info.spec.run_id {
        bail!(
            "the hub signs for run `{}` but serves run `{}`",
            audience.scope,
            info.spec.run_id.escape_debug()
        );
    }
    eprintln!(
        "node: hub key {}{}",
        audience.server,
        if opts.hub_key.is_some() {
            " (pinned)"
        } else {
            " (first seen; pin it with --hub-key)"
        }
    );
    // The run id names the data cache directory: refuse one that is not a plain name.
    info.spec
        .validate()
        .context("the hub's run settings are not valid")?;
    let spec = info.spec.clone();
    let me = NodeId::from_hex(&opts.identity.public_hex()).expect("our own key is canonical");
    let tag = me.short(12);
    // Bound once the run is known: its relays are how peers behind NATs reach us.
    let blobs = Arc::new(
        IrohBlobs::bind(IrohOptions {
            bind: opts.blob_bind,
            secret_key: Some(opts.identity.derive_secret(BLOB_KEY_CONTEXT)),
            bandwidth_mbps: opts.bandwidth_mbps,
            fetch_timeout: Duration::from_secs(300),
            relays: info.relays.clone(),
            ..IrohOptions::loopback()
        })
        .context("starting the blob endpoint (with the run's relays)")?,
    );
    if !info.relays.is_empty() {
        // A held connection to the hub keeps our NAT's mapping open, so the hub can
        // fetch our updates and revealed states directly even when the relay is gone.
        blobs
            .hold(&info.hub_blobs)
            .context("the hub's blob address in its run info")?;
        let urls: Vec<&str> = info.relays.iter().map(|r| r.url.as_str()).collect();
        eprintln!(
            "node {tag}: blob endpoint {} with relays {}",
            opts.blob_bind,
            urls.join(", ")
        );
    }
    let provider = quote_provider(&info, opts.attest.as_deref())?;
    let access = provider.as_deref().map(|p| (&opts.identity, p));
    let data = fetch_data_as(
        hub.as_ref(),
        &info,
        &opts.cache_dir.join(&spec.run_id),
        access,
    )?;
    check_model(&info, data.manifest.vocab_size)?;
    let windows = Windows::new(&data.train, spec.seq_len);
    let mut worker =
        Worker::new(spec.clone(), &info.model, opts.device).map_err(anyhow::Error::msg)?;
    if let Some(rounds) = opts.alone_rounds {
        let state = initial_state(&spec, &info.model);
        let began = Instant::now();
        let mut tokens = 0;
        for r in 0..rounds {
            let batches: Vec<u64> = (r * spec.inner_steps..(r + 1) * spec.inner_steps).collect();
            tokens += worker.train_round(&state, &data, &windows, &batches).tokens;
        }
        let secs = began.elapsed().as_secs_f64();
        eprintln!(
            "node {tag}: alone: trained {tokens} tokens in {rounds} rounds at {:.1} tok/s",
            tokens as f64 / secs.max(1e-9)
        );
        return Ok(());
    }
    {
        // Leave cleanly when stopped, so the run does not wait for us at the deadline.
        let hub = hub.clone();
        let tag = tag.clone();
        ctrlc::set_handler(move || {
            // Taken for good: no join can be in flight or follow the leave.
            let mut stopping = STOPPING.lock().unwrap_or_else(|e| e.into_inner());
            *stopping = true;
            match hub.leave() {
                Ok(()) => eprintln!("node {tag}: left the run"),
                Err(e) => eprintln!("node {tag}: could not leave cleanly: {e}"),
            }
            std::process::exit(0);
        })
        .context("installing the stop handler")?;
    }
    let started = Instant::now();
    {
        let hb = HttpHub::new(
            &opts.hub,
            opts.identity.clone(),
            auth.clone(),
            Duration::from_secs(30),
            ca.as_ref(),
        )?;
        let counters = counters.clone();
        let blobs = blobs.clone();
        std::thread::spawn(move || loop {
            let s = stats(&counters, blobs.as_ref(), started);
            if let Err(ApiFailure::Refused { body, .. }) = hb.heartbeat(&s) {
                if body.code == ErrorCode::NotMember {
                    counters.evicted.store(true, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(1000));
        });
    }
    let params = info.model.params_total();
    let update_max = worker
        .spec
        .codec()
        .map_err(anyhow::Error::msg)?
        .max_encoded_bytes(params as usize) as u64;
    let mut runner = Runner {
        tag,
        me,
        hub_blobs: vec![info.hub_blobs.clone()],
        // θ₀ is a pure function of the run's seed: computed, not downloaded.
        state: initial_state(&spec, &info.model),
        spec,
        hub,
        blobs,
        worker,
        data,
        windows,
        held: Vec::new(),
        counters: counters.clone(),
        started,
        params,
        update_max,
        adversary: opts.adversary,
        revealable: BTreeMap::new(),
        revealed: BTreeMap::new(),
        trailed: BTreeMap::new(),
        earlier: None,
        copy_source: None,
        own_update: None,
        wrong_shards: opts.wrong_shards,
        ahead: None,
        span: Span::default(),
        spent: BTreeMap::new(),
        revealing: None,
    };
    if let Some(a) = opts.adversary {
        eprintln!(
            "node {}: ADVERSARY `{a}`: this node cheats on purpose (a test tool for verification)",
            runner.tag
        );
    }
    let mut engine = if runner.spec.overlap {
        NodeState::overlapped(POLL_MS, 1000)
    } else {
        NodeState::new(POLL_MS, 1000)
    };
    let mut outcome = Outcome::Started { round: 0 };
    loop {
        if counters.evicted.swap(false, Ordering::Relaxed) {
            engine.evicted();
        }
        match runner.act(engine.next(outcome)) {
            Some(o) => outcome = o,
            None => break,
        }
    }
    match runner.report() {
        Ok(report) => {
            eprintln!("node {}: {}", runner.tag, report.line());
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        Err(e) => eprintln!("node {}: no end report from the hub: {e}", runner.tag),
    }
    Ok(())
}

/// Refuses a state view that hands this node more batches than a round trains (a
/// broken or hostile hub would have it train without end).
pub fn check_view(view: &StateView, spec: &RunSpec) -> Result<()> {
    for (what, batches) in [
        ("this round", &view.assignment),
        ("the next round", &view.next_assignment),
    ] {
        let n = batches.as_ref().map_or(0, Vec::len) as u64;
        if n > spec.inner_steps {
            bail!(
                "the hub's view assigns {n} batches for {what}; the run trains {} a round",
                spec.inner_steps
            );
        }
    }
    if view.next_assignment.is_some() && !spec.overlap {
        bail!("the hub's view assigns next round's batches in a run without overlap");
    }
    Ok(())
}

/// The shard layout a sharded round's record implies, once the record is checked
/// against what the run's settings make of its accepted set: as many shards as
/// `shard_count` gives, each drawn aggregator one of the accepted members. A record
/// that says otherwise (a broken or hostile hub) is refused before anything is
/// fetched or indexed by it.
pub fn shard_layout(rec: &RoundRecord, spec: &RunSpec, params: u64) -> Result<ShardLayout> {
    let params = params as usize;
    let per = spec.aggregators_per_shard as usize;
    let expected = tessera_outer::shard::shard_count(rec.accepted.len(), per, params);
    if rec.shards.len() != expected {
        bail!(
            "round {} names {} shards; {} accepted updates make {expected}",
            rec.round,
            rec.shards.len(),
            rec.accepted.len()
        );
    }
    let member = |id: &NodeId| rec.accepted.binary_search_by_key(id, |(n, _)| *n).is_ok();
    if rec
        .shards
        .iter()
        .any(|s| s.aggregators.len() > per || !s.aggregators.iter().all(member))
    {
        bail!(
            "round {} draws aggregators outside its accepted set",
            rec.round
        );
    }
    Ok(ShardLayout::new(params, expected))
}

/// Carries out the node engine's actions: HTTP to the hub, blobs, training.
struct Runner {
    tag: String,
    me: NodeId,
    spec: RunSpec,
    hub: Arc<HttpHub>,
    blobs: Arc<IrohBlobs>,
    hub_blobs: Vec<PeerAddr>,
    worker: Worker,
    data: Dataset,
    windows: Windows,
    /// θ and outer velocity of the round the engine holds.
    state: OuterState,
    /// Blobs of the last round applied: still served to peers catching up, then let go.
    held: Vec<Hash32>,
    counters: Arc<Counters>,
    started: Instant,
    params: u64,
    update_max: u64,
    adversary: Option<Adversary>,
    /// What this node started each of its last rounds from (θ, its private state, its
    /// batches), kept for audits: the hub asks for the state, and in a dispute for the
    /// state after every step, which the node recomputes from these.
    revealable: BTreeMap<u64, (OuterState, PrivateState, Vec<u64>)>,
    /// When each disputed round's trail was last sent.
    trailed: BTreeMap<u64, Instant>,
    /// When each round's state was last sent: sent again if the hub still asks after
    /// [`REVEAL_AGAIN`] (a restarted hub forgets a replay in flight).
    revealed: BTreeMap<u64, Instant>,
    /// An adversary's own update of an earlier round (`stale`).
    earlier: Option<Vec<f32>>,
    /// Another node's update of the last closed round: the only updates a copier can
    /// get, since this round's are not served before commits close (`copy`).
    copy_source: Option<Vec<f32>>,
    /// The update this node committed last, and its round: cut into pieces for the
    /// round's aggregators and, once the round is applied, what the aggregate dropped of
    /// it goes back into the residual (sharded aggregation).
    own_update: Option<(u64, Vec<u8>)>,
    /// Test tool: publish wrong shards ([`NodeOptions::wrong_shards`]).
    wrong_shards: bool,
    /// Under `overlap`: the update trained ahead for the next round, held until that
    /// round opens (or one whose commit went unanswered).
    ahead: Option<Update>,
    /// When this node trained, for its utilization.
    span: Span,
    /// Seconds spent per kind of action, and how many.
    spent: BTreeMap<&'static str, (u64, f64)>,
    /// The reveal being sent, if any.
    revealing: Option<std::thread::JoinHandle<()>>,
}

/// How often a waiting node polls the hub.
const POLL_MS: u64 = 100;
/// Rounds of private state a node keeps for audits: the hub asks for a round's state
/// right after it closes, before the node's next round. Under `overlap` one more: the
/// node has trained the next round ahead by then.
const REVEALABLE_ROUNDS: usize = 2;
/// How long a node waits before sending a state the hub still asks for again (a hub
/// restarted meanwhile forgot the replay in flight). Well inside the hub's reveal
/// window of two round deadlines, so an honest node is never late for it.
const REVEAL_AGAIN: Duration = Duration::from_secs(2);

impl Runner {
    /// Carries out one action; `None` when the run is over.
    fn act(&mut self, action: Action) -> Option<Outcome> {
        let kind = match &action {
            Action::Join => "join",
            Action::Poll => "poll",
            Action::Wait { .. } => "wait",
            Action::Step { .. } => "step",
            Action::LoadCheckpoint { .. } => "checkpoint",
            Action::Train { .. } => "train+commit",
            Action::TrainAhead { .. } => "train ahead",
            Action::Commit { .. } => "commit",
            Action::Report { .. } => "report",
            Action::Done => "done",
        };
        let began = Instant::now();
        let outcome = self.act_timed(action);
        let slot = self.spent.entry(kind).or_default();
        slot.0 += 1;
        slot.1 += began.elapsed().as_secs_f64();
        outcome
    }

    /// What this node did in the run, as the hub and its ledger record it.
    fn report(&self) -> Result<NodeReport, ApiFailure> {
        let summary = self.hub.summary()?;
        let ledger = self.hub.ledger_view()?;
        let work = summary.work.get(&self.me).copied().unwrap_or_default();
        let v = summary
            .verification
            .get(&self.me)
            .copied()
            .unwrap_or_default();
        let judged = v.accepted + v.refused;
        let st = stats(&self.counters, self.blobs.as_ref(), self.started);
        Ok(NodeReport {
            node: self.me.to_hex(),
            run_id: summary.run_id,
            run_finished: summary.finished,
            rounds_accepted: work.rounds_accepted,
            rounds_late: work.rounds_late,
            tokens: work.tokens,
            refused: v.refused,
            score_mean: (judged > 0).then(|| f64::from(v.score_ppm_mean) / 1e6),
            audits_passed: v.audits_passed,
            audits_failed: v.audits_failed,
            ejected: v.ejected,
            earned_tokens: ledger["earned"][self.me.to_hex()]
                .as_str()
                .map(str::to_string),
            tokens_per_second: self.span.tokens_per_second().map(|(_, r)| r),
            bytes_sent: st.bytes_sent,
            bytes_received: st.bytes_received,
        })
    }

    /// Where this node's time went, per kind of action.
    fn time_spent(&self) -> String {
        self.spent
            .iter()
            .map(|(k, (n, secs))| format!("{k} {secs:.1} s ({n}×)"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn act_timed(&mut self, action: Action) -> Option<Outcome> {
        let tag = self.tag.clone();
        Some(match action {
            Action::Done => {
                // The last rounds' audits may still need this node's private state.
                let until =
                    Instant::now() + Duration::from_millis(2 * self.spec.round_deadline_ms + 5_000);
                while Instant::now() < until {
                    if let Ok(v) = self.hub.state(&self.me) {
                        if v.audit.is_none() && v.dispute.is_none() {
                            break;
                        }
                        if let Some(round) = v.audit {
                            self.reveal(round);
                        }
                        if let Some(round) = v.dispute {
                            self.send_trail(round);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                let _ =
                    self.hub
                        .heartbeat(&stats(&self.counters, self.blobs.as_ref(), self.started));
                if let Some((tokens, rate)) = self.span.tokens_per_second() {
                    eprintln!(
                        "node {tag}: trained {tokens} tokens at {rate:.1} tok/s from the start of \
                         its first round's training to the end of its last"
                    );
                }
                eprintln!("node {tag}: time spent: {}", self.time_spent());
                eprintln!("node {tag}: run finished");
                return None;
            }
            Action::Join => match join_unless_stopping(self.hub.as_ref()) {
                Ok(()) => {
                    eprintln!("node {tag}: joined run {}", self.spec.run_id);
                    Outcome::Joined
                }
                Err(e) => {
                    eprintln!("node {tag}: joining failed: {e}");
                    if let ApiFailure::Refused { body, .. } = &e {
                        if body.code == ErrorCode::Ejected {
                            eprintln!("node {tag}: ejected from the run; stopping");
                            return None;
                        }
                    }
                    outcome_of(&e)
                }
            },
            Action::Poll => match self
                .hub
                .state(&self.me)
                .map_err(anyhow::Error::new)
                .and_then(|v| check_view(&v, &self.spec).map(|()| v))
            {
                Ok(v) => {
                    if let Some(round) = v.audit {
                        self.reveal(round);
                    }
                    if let Some(round) = v.dispute {
                        self.send_trail(round);
                    }
                    Outcome::View(v)
                }
                Err(e) => {
                    eprintln!("node {tag}: reading the state failed: {e:#}");
                    e.downcast_ref::<ApiFailure>()
                        .map_or(Outcome::Failed, outcome_of)
                }
            },
            Action::Wait { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
                Outcome::Waited
            }
            Action::Step { round } => match self.step(round) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("node {tag}: outer step of round {round} failed: {e:#}");
                    Outcome::Failed
                }
            },
            Action::LoadCheckpoint { hash } => match self.load_checkpoint(hash) {
                Ok(round) => {
                    eprintln!("node {tag}: loaded checkpoint of round {round}");
                    Outcome::Loaded { round }
                }
                Err(e) => {
                    eprintln!("node {tag}: loading checkpoint {hash} failed: {e:#}");
                    Outcome::Failed
                }
            },
            Action::Train { round, batches } => self.train(round, &batches),
            Action::TrainAhead { round, batches } => {
                let update = self.train_update(round, &batches);
                self.ahead = Some(update);
                Outcome::Trained { round, batches }
            }
            Action::Commit { round } => match self.ahead.take() {
                Some(u) if u.round == round => self.commit_update(u),
                _ => {
                    eprintln!("node {tag}: no update held for round {round}");
                    Outcome::Refused {
                        code: ErrorCode::NotAssigned,
                    }
                }
            },
            Action::Report { round, theta } => {
                let report = ThetaReport {
                    run_id: self.spec.run_id.clone(),
                    round,
                    hash: theta,
                };
                match self.hub.theta(&report) {
                    Ok(_) => Outcome::Reported,
                    Err(e) => {
                        eprintln!("node {tag}: θ report for round {round} failed: {e}");
                        outcome_of(&e)
                    }
                }
            }
        })
    }

    /// The outer step of closed round `round`: its accepted updates, each from the node
    /// that made it first and the hub second, applied to θ.
    fn step(&mut self, round: u64) -> Result<Outcome> {
        let rec = self.hub.round(round)?;
        if !rec.shards.is_empty() {
            return self.step_sharded(rec);
        }
        let updates = rec
            .accepted
            .iter()
            .enumerate()
            .map(|(i, (_, h))| {
                let mut from: Vec<PeerAddr> = rec.sources.get(i).cloned().into_iter().collect();
                from.extend(self.hub_blobs.iter().cloned());
                Ok(self.blobs.fetch(&h.to_hex(), &from, self.update_max)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut next = self.state.clone();
        let codec = self.spec.codec().map_err(anyhow::Error::msg)?;
        if matches!(self.adversary, Some(Adversary::Copy | Adversary::CopyNoise)) {
            self.copy_source = rec
                .accepted
                .iter()
                .zip(&updates)
                .find(|((n, _), _)| *n != self.me)
                .and_then(|(_, blob)| tessera_outer::decode_for(codec, blob, self.params).ok());
        }
        next.apply(codec, self.spec.aggregator, &updates)?;
        self.state = next;
        let used = rec.accepted.iter().map(|(_, h)| *h).collect();
        self.stepped(round, &rec, used)
    }

    /// After a round's step: lets go of the blobs of the round before (peers one round
    /// behind may still fetch this one's), and compares θ with the hub's.
    fn stepped(&mut self, round: u64, rec: &RoundRecord, used: Vec<Hash32>) -> Result<Outcome> {
        for old in std::mem::replace(&mut self.held, used) {
            self.blobs.forget(&old.to_hex());
        }
        let theta = Hash32(self.state.digest());
        if theta != rec.theta_after {
            eprintln!(
                "node {}: θ after round {round} differs from the hub's; loading its checkpoint",
                self.tag
            );
        }
        Ok(Outcome::Stepped {
            round,
            theta,
            expected: rec.theta_after,
        })
    }

    /// The outer step of a sharded round: this node serves its pieces of its accepted
    /// update, aggregates the shards it was drawn for (and reports them), fetches the
    /// other aggregated shards from their aggregators (the hub second), applies them,
    /// and keeps what the aggregate dropped of its own update for the next round.
    fn step_sharded(&mut self, rec: RoundRecord) -> Result<Outcome> {
        let round = rec.round;
        let codec = self.spec.codec().map_err(anyhow::Error::msg)?;
        let n = self.params;
        let layout = shard_layout(&rec, &self.spec, n)?;
        let shard_codec = self.spec.shard_codec().map_err(anyhow::Error::msg)?;
        let accepted = rec
            .accepted
            .binary_search_by_key(&self.me, |(id, _)| *id)
            .is_ok();
        // Kept until the step succeeds: a step tried again still has it.
        let own = match &self.own_update {
            Some((r, blob)) if *r == round && accepted => Some(blob.clone()),
            _ => None,
        };
        let mut used = Vec::new();
        if let Some(blob) = &own {
            for s in 0..layout.count() {
                let piece = tessera_outer::slice(codec, blob, n, layout.range(s))?;
                used.push(Hash32::from_hex(&self.blobs.publish(&piece)?)?);
            }
        }
        let mut made = BTreeMap::new();
        for (s, shard) in rec.shards.iter().enumerate() {
            if shard.aggregators.contains(&self.me) {
                match self.aggregate(&rec, &layout, s) {
                    Ok(bytes) => {
                        used.push(Hash32::of(&bytes));
                        made.insert(s, bytes);
                    }
                    Err(e) => eprintln!(
                        "node {}: aggregating shard {s} of round {round} failed: {e:#}",
                        self.tag
                    ),
                }
            }
        }
        let mut applied = Vec::with_capacity(n as usize);
        for (s, shard) in rec.shards.iter().enumerate() {
            let len = layout.len(s);
            let bytes = match made.remove(&s) {
                Some(b) if Hash32::of(&b) == shard.hash => b,
                _ => {
                    let mut from: Vec<PeerAddr> = shard
                        .aggregators
                        .iter()
                        .filter(|a| **a != self.me)
                        .filter_map(|a| rec.accepted.binary_search_by_key(a, |(id, _)| *id).ok())
                        .filter_map(|i| rec.sources.get(i).cloned())
                        .collect();
                    from.extend(self.hub_blobs.iter().cloned());
                    let max = shard_codec.max_encoded_bytes(len) as u64;
                    self.blobs.fetch(&shard.hash.to_hex(), &from, max)?
                }
            };
            applied.extend(tessera_outer::decode_for(shard_codec, &bytes, len as u64)?);
        }
        let sent = match &own {
            Some(blob) => Some(tessera_outer::decode_for(codec, blob, n)?),
            None => None,
        };
        // Nothing can fail from here: θ, the residual and the kept update change
        // together.
        self.state.apply_aggregate(&applied);
        if let Some(sent) = &sent {
            self.worker.keep_what_was_dropped(sent, &applied);
        }
        self.own_update = None;
        self.stepped(round, &rec, used)
    }

    /// Aggregates shard `s` of a closed round: its inputs from the hub, each accepted
    /// update's piece from that update's node (the hub second), combined and encoded
    /// (`tessera_outer::shard::aggregate_shard`), published and reported.
    fn aggregate(&mut self, rec: &RoundRecord, layout: &ShardLayout, s: usize) -> Result<Vec<u8>> {
        let codec = self.spec.codec().map_err(anyhow::Error::msg)?;
        let members = rec.accepted.len();
        let max = (36 * members + 20) as u64;
        let bytes = self
            .blobs
            .fetch(&rec.shards[s].inputs.to_hex(), &self.hub_blobs, max)?;
        let inputs = ShardInputs::from_bytes(&bytes, rec.round, s as u32, members)
            .map_err(anyhow::Error::msg)?;
        let len = layout.len(s);
        let max = codec.max_encoded_bytes(len) as u64;
        let pieces = inputs
            .pieces
            .iter()
            .enumerate()
            .map(|(i, (hash, _))| {
                let mut from: Vec<PeerAddr> = rec.sources.get(i).cloned().into_iter().collect();
                from.extend(self.hub_blobs.iter().cloned());
                let bytes = self.blobs.fetch(&Hash32(*hash).to_hex(), &from, max)?;
                Ok(tessera_outer::decode_for(codec, &bytes, len as u64)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[f32]> = pieces.iter().map(Vec::as_slice).collect();
        let scales: Vec<f32> = inputs.pieces.iter().map(|(_, scale)| *scale).collect();
        let shard_codec = self.spec.shard_codec().map_err(anyhow::Error::msg)?;
        let bytes = if self.wrong_shards {
            let mut combined = tessera_outer::combine(self.spec.aggregator, &refs, &scales);
            combined[0] += 1.0;
            tessera_outer::encode(shard_codec, &combined, &mut vec![0.0; len], 1.0)
        } else {
            aggregate_shard(shard_codec, self.spec.aggregator, &refs, &scales)
        };
        let hash = Hash32::from_hex(&self.blobs.publish(&bytes)?)?;
        let reply = self.hub.aggregate(&AggregateReport {
            run_id: self.spec.run_id.clone(),
            round: rec.round,
            shard: s as u32,
            hash,
        })?;
        eprintln!(
            "node {}: aggregated shard {s} of round {} ({} pieces): {}",
            self.tag,
            rec.round,
            members,
            if reply.matches {
                "agrees with the hub"
            } else {
                "REFUSED by the hub"
            }
        );
        Ok(bytes)
    }

    /// Replaces θ by the hub's checkpoint; returns its round.
    fn load_checkpoint(&mut self, hash: Hash32) -> Result<u64> {
        let max = 8 + 8 * self.params;
        let bytes = self.blobs.fetch(&hash.to_hex(), &self.hub_blobs, max)?;
        self.blobs.forget(&hash.to_hex());
        let s = OuterState::from_bytes(
            &bytes,
            self.params as usize,
            self.spec.effective_outer_lr(),
            self.spec.outer_momentum,
        )
        .map_err(anyhow::Error::msg)?;
        let round = s.round;
        self.state = s;
        Ok(round)
    }

    /// Sends the hub the private state this node started `round` from, once (again
    /// after [`REVEAL_AGAIN`] if the hub still asks), on a thread of its own: a state
    /// is many times an update (44 MB for `micro`), and training goes on meanwhile.
    fn reveal(&mut self, round: u64) {
        if self.revealing.as_ref().is_some_and(|t| !t.is_finished())
            || self
                .revealed
                .get(&round)
                .is_some_and(|at| at.elapsed() < REVEAL_AGAIN)
        {
            return;
        }
        self.revealed.insert(round, Instant::now());
        let Some((_, state, _)) = self.revealable.get(&round) else {
            eprintln!(
                "node {}: the hub audits round {round}, whose state this node no longer holds",
                self.tag
            );
            return;
        };
        let state = state.clone();
        let (hub, blobs) = (self.hub.clone(), self.blobs.clone());
        let (run_id, tag) = (self.spec.run_id.clone(), self.tag.clone());
        self.revealing = Some(std::thread::spawn(move || {
            let bytes = state.to_bytes();
            let result = blobs
                .publish(&bytes)
                .map_err(anyhow::Error::new)
                .and_then(|hash| {
                    let body = RevealBody {
                        run_id,
                        round,
                        blob_hash: Hash32::from_hex(&hash)?,
                        provider: blobs.addr(),
                    };
                    let sent = hub.reveal(&body).map_err(anyhow::Error::new);
                    blobs.forget(&hash);
                    sent
                });
            match result {
                Ok(()) => {
                    eprintln!("node {tag}: audited in round {round}: revealed its private state")
                }
                Err(e) => eprintln!("node {tag}: revealing round {round} failed: {e:#}"),
            }
        }));
    }

    /// Recomputes a disputed round from what it started from and sends the hub its
    /// state after every inner step, with its private state again, once (again after
    /// [`REVEAL_AGAIN`] if the hub still asks).
    fn send_trail(&mut self, round: u64) {
        if self
            .trailed
            .get(&round)
            .is_some_and(|at| at.elapsed() < REVEAL_AGAIN)
        {
            return;
        }
        self.trailed.insert(round, Instant::now());
        let Some((outer, before, batches)) = self.revealable.get(&round).cloned() else {
            eprintln!(
                "node {}: the hub disputes round {round}, whose state this node no longer holds",
                self.tag
            );
            return;
        };
        eprintln!(
            "node {}: the replay of round {round} differed; sending the state after each step",
            self.tag
        );
        // The trail reuses this node's trainer: keep its own state around it.
        let carried = self.worker.private_state();
        let steps = self
            .worker
            .trail(&outer, &before, &self.data, &self.windows, &batches);
        if let Err(e) = self.worker.restore(&carried) {
            eprintln!("node {}: restoring its state failed: {e}", self.tag);
        }
        let steps = match steps {
            Ok(s) => s,
            Err(e) => {
                eprintln!("node {}: recomputing round {round} failed: {e}", self.tag);
                return;
            }
        };
        let blobs: Vec<Vec<u8>> = std::iter::once(before.to_bytes())
            .chain(steps.iter().map(|s| s.to_bytes()))
            .collect();
        let result = (|| -> Result<()> {
            let mut hashes = Vec::new();
            for b in &blobs {
                hashes.push(Hash32::from_hex(&self.blobs.publish(b)?)?);
            }
            let body = tessera_protocol::wire::TrailBody {
                run_id: self.spec.run_id.clone(),
                round,
                state: hashes[0],
                steps: hashes[1..].to_vec(),
                provider: self.blobs.addr(),
            };
            let sent = self.hub.trail(&body).map_err(anyhow::Error::new);
            for h in &hashes {
                self.blobs.forget(&h.to_hex());
            }
            sent
        })();
        match result {
            Ok(()) => eprintln!("node {}: sent the step trail of round {round}", self.tag),
            Err(e) => eprintln!(
                "node {}: sending the trail of round {round} failed: {e:#}",
                self.tag
            ),
        }
    }

    /// What an adversary trains and submits this round (a test tool).
    fn cheat(
        &mut self,
        adversary: Adversary,
        round: u64,
        batches: &[u64],
    ) -> tessera_train::worker::RoundWork {
        let codec = self.worker.codec();
        let params = self.params as usize;
        let unassigned: Vec<u64> = batches.iter().map(|b| b + (1 << 32)).collect();
        let partner = None;
        let k = Knowledge {
            codec,
            params,
            assigned: batches,
            unassigned: &unassigned,
            earlier: self.earlier.as_deref(),
            committed_before: self.copy_source.as_deref(),
            partner,
            seed: u64::from_le_bytes(self.me.as_bytes()[..8].try_into().expect("8 bytes")) ^ round,
        };
        let trained = adversary.batches_to_train(&k).map(|b| {
            self.worker
                .train_round(&self.state, &self.data, &self.windows, &b)
        });
        let decoded = trained
            .as_ref()
            .and_then(|w| tessera_outer::decode_for(codec, &w.blob, self.params).ok());
        let copier = matches!(adversary, Adversary::Copy | Adversary::CopyNoise);
        let blob = if copier && self.copy_source.is_none() {
            // Nothing to copy yet: free-ride with an empty update.
            tessera_train::adversary::encode_crafted(codec, &vec![0.0; params])
        } else {
            match adversary.submit(&k, decoded.as_deref()) {
                Submission::AsTrained => trained.as_ref().expect("it trained").blob.clone(),
                Submission::Crafted(blob) => blob,
            }
        };
        if self.earlier.is_none() {
            self.earlier = decoded;
        }
        let (mean_loss, train_seconds) = trained
            .as_ref()
            .map_or((0.0, 0.0), |w| (w.mean_loss, w.train_seconds));
        tessera_train::worker::RoundWork {
            blob,
            // The claim an adversary makes: the whole assignment.
            tokens: batches.len() as u64 * self.spec.tokens_per_batch(),
            mean_loss,
            train_seconds,
        }
    }

    /// Trains `batches` from θ of `round`, publishes the update and commits it.
    fn train(&mut self, round: u64, batches: &[u64]) -> Outcome {
        let update = self.train_update(round, batches);
        self.commit_update(update)
    }

    /// Trains `batches` of `round` from the θ held now, keeping what an audit of the
    /// round asks for.
    fn train_update(&mut self, round: u64, batches: &[u64]) -> Update {
        let before = self.worker.private_state();
        let state_hash = Hash32(before.digest());
        self.revealable
            .insert(round, (self.state.clone(), before, batches.to_vec()));
        let kept = REVEALABLE_ROUNDS + usize::from(self.spec.overlap);
        while self.revealable.len() > kept {
            self.revealable.pop_first();
        }
        let began = Instant::now();
        let work = match self.adversary {
            None => self
                .worker
                .train_round(&self.state, &self.data, &self.windows, batches),
            Some(a) => self.cheat(a, round, batches),
        };
        let c = &self.counters;
        c.train_ms
            .fetch_add((work.train_seconds * 1e3) as u64, Ordering::Relaxed);
        c.loss_micro
            .store((work.mean_loss * 1e6) as u64, Ordering::Relaxed);
        self.span.add(began, Instant::now(), work.tokens);
        let wall = self.started.elapsed().as_secs_f64();
        let traffic = self.blobs.traffic();
        eprintln!(
            "node {}: round {round} loss {:.4} {:.0} tok/s sent {} recv {} utilization {:.0}%",
            self.tag,
            work.mean_loss,
            work.tokens as f64 / work.train_seconds.max(1e-9),
            traffic.sent,
            traffic.received,
            100.0 * c.train_ms.load(Ordering::Relaxed) as f64 / 1e3 / wall.max(1e-9)
        );
        Update {
            round,
            work,
            theta_hash: Hash32(self.state.digest()),
            state_hash,
        }
    }

    /// Publishes a trained update and commits it.
    fn commit_update(&mut self, update: Update) -> Outcome {
        let Update {
            round,
            work,
            theta_hash,
            state_hash,
        } = update;
        let committed = self
            .blobs
            .publish(&work.blob)
            .map_err(anyhow::Error::new)
            .and_then(|hash| {
                let body = CommitBody {
                    run_id: self.spec.run_id.clone(),
                    round,
                    commit: Commit {
                        blob_hash: Hash32::from_hex(&hash)?,
                        tokens: work.tokens,
                        loss_micro: (work.mean_loss * 1e6) as u64,
                        theta_hash,
                        state_hash,
                    },
                    provider: self.blobs.addr(),
                };
                self.hub.commit(&body).map_err(anyhow::Error::new)
            });
        match committed {
            Ok(()) => {
                self.own_update = Some((round, work.blob));
                self.counters.rounds.fetch_add(1, Ordering::Relaxed);
                Outcome::Committed { round }
            }
            Err(e) => {
                eprintln!("node {}: commit for round {round} refused: {e:#}", self.tag);
                let outcome = e
                    .downcast_ref::<ApiFailure>()
                    .map_or(Outcome::Failed, outcome_of);
                if outcome == Outcome::Failed {
                    // Not answered: held, and committed again next time.
                    self.ahead = Some(Update {
                        round,
                        work,
                        theta_hash,
                        state_hash,
                    });
                }
                outcome
            }
        }
    }
}

/// An update trained and not yet committed.
struct Update {
    round: u64,
    work: tessera_train::worker::RoundWork,
    theta_hash: Hash32,
    state_hash: Hash32,
}

/// When a node trained, for its utilization: tokens trained and the time from the
/// start of its first round's training to the end of its last.
#[derive(Default)]
struct Span {
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: u64,
}

impl Span {
    fn add(&mut self, began: Instant, ended: Instant, tokens: u64) {
        self.first.get_or_insert(began);
        self.last = Some(ended);
        self.tokens += tokens;
    }

    /// Tokens trained per second of the span, `None` before any training.
    fn tokens_per_second(&self) -> Option<(u64, f64)> {
        let secs = self.last?.duration_since(self.first?).as_secs_f64();
        (secs > 0.0).then(|| (self.tokens, self.tokens as f64 / secs))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sharded_record_must_match_its_accepted_set() {
        use super::{shard_layout, Hash32, NodeId, RoundRecord, RunSpec};
        use tessera_protocol::wire::ShardRecord;
        let spec = RunSpec {
            aggregation: tessera_protocol::AggregationMode::Sharded,
            ..RunSpec::default()
        };
        let ids: Vec<NodeId> = (1..=4u8).map(|i| NodeId([i; 32])).collect();
        let shard = |aggregators: Vec<NodeId>| ShardRecord {
            aggregators,
            inputs: Hash32::of(b"i"),
            hash: Hash32::of(b"s"),
        };
        let rec = RoundRecord {
            round: 3,
            accepted: ids.iter().map(|n| (*n, Hash32::of(&n.0))).collect(),
            sources: Vec::new(),
            late: Vec::new(),
            tokens: 0,
            work: Vec::new(),
            theta_before: Hash32::of(b"a"),
            theta_after: Hash32::of(b"b"),
            checkpoint: Hash32::of(b"c"),
            refused: Vec::new(),
            verdicts: Vec::new(),
            shards: vec![shard(vec![ids[0], ids[2]]), shard(vec![ids[1], ids[3]])],
        };
        let params = 3 * 4096;
        assert_eq!(shard_layout(&rec, &spec, params).unwrap().count(), 2);
        // A million shards (a hostile hub) or one too few: refused, not indexed.
        let mut many = rec.clone();
        many.shards = vec![shard(vec![ids[0]]); 1_000_000];
        assert!(shard_layout(&many, &spec, params)
            .unwrap_err()
            .to_string()
            .contains("1000000 shards"));
        let mut few = rec.clone();
        few.shards.pop();
        assert!(shard_layout(&few, &spec, params).is_err());
        // An aggregator that is not an accepted member, or too many per shard.
        let mut outsider = rec.clone();
        outsider.shards[1] = shard(vec![ids[1], NodeId([9; 32])]);
        assert!(shard_layout(&outsider, &spec, params).is_err());
        let mut crowded = rec.clone();
        crowded.shards[0] = shard(ids.clone());
        assert!(shard_layout(&crowded, &spec, params).is_err());
    }

    /// A hostile hub's view can't make a node train without end.
    #[test]
    fn a_view_assigns_at_most_a_rounds_batches() {
        use super::{check_view, Hash32, RunSpec, StateView};
        let spec = RunSpec {
            overlap: true,
            ..RunSpec::default()
        };
        let view = |now: usize, next: usize| StateView {
            phase: tessera_protocol::wire::Phase::Training { round: 1 },
            assignment: Some((0..now as u64).collect()),
            committed: false,
            deadline_ms: 0,
            closed_rounds: 1,
            checkpoint: Hash32::of(b"c"),
            audit: None,
            dispute: None,
            next_assignment: Some((0..next as u64).collect()),
        };
        let h = spec.inner_steps as usize;
        assert!(check_view(&view(h, h), &spec).is_ok());
        for (now, next) in [(h + 1, h), (h, h + 1), (1 << 20, 0)] {
            let e = check_view(&view(now, next), &spec).unwrap_err().to_string();
            assert!(e.contains("batches"), "{e}");
        }
        let plain = RunSpec::default();
        assert!(check_view(&view(h, h), &plain).is_err());
        let mut v = view(h, 0);
        v.next_assignment = None;
        assert!(check_view(&v, &plain).is_ok());
    }

    #[test]
    fn blob_bind_follows_the_hub() {
        for (url, local) in [
            ("http://127.0.0.1:7000", true),
            ("http://localhost:7000/", true),
            ("https://[::1]:7000", true),
            ("http://127.0.0.1", true),
            ("http://203.0.113.10:7000", false),
            ("https://hub.example.org", false),
            ("https://[2001:db8::1]:443", false),
            ("http://user@203.0.113.10:7000", false),
            ("not a url", true),
        ] {
            let bind = super::default_blob_bind(url);
            assert_eq!(bind.ip().is_loopback(), local, "{url}: {bind}");
            assert_eq!(bind.port(), 0);
        }
    }

    use super::check_file_name;

    /// Story: a hub (or anyone on its plain-HTTP path) could name data files `/abs` or
    /// `../../x` and the node wrote them there. Only plain file names are taken now.
    /// A hub naming a model far larger than its preset (a node would allocate it) is
    /// refused before anything is built.
    #[test]
    fn the_hubs_model_must_be_the_runs_preset() {
        let spec = tessera_protocol::RunSpec {
            run_id: "r".into(),
            preset: "nano".into(),
            ..tessera_protocol::RunSpec::default()
        };
        let model = tessera_model_config::Preset::by_name("nano")
            .unwrap()
            .config_for_vocab(300);
        let mut info = tessera_protocol::wire::RunInfo {
            protocol: tessera_protocol::wire::PROTOCOL_VERSION,
            spec,
            model,
            data_manifest: tessera_protocol::Hash32::default(),
            data_files: Vec::new(),
            hub_blobs: tessera_protocol::PeerAddr(String::new()),
            relays: Vec::new(),
        };
        super::check_model(&info, 300).unwrap();
        assert!(
            super::check_model(&info, 5000).is_err(),
            "another vocabulary"
        );
        info.model.hidden_size *= 1000;
        let e = super::check_model(&info, 300).unwrap_err().to_string();
        assert!(e.contains("nano"), "{e}");
    }

    #[test]
    fn data_file_names_from_the_hub_are_plain_names() {
        for good in [
            "manifest.json",
            "tokenizer.json",
            "train-00000.bin",
            "val-00000.bin",
        ] {
            check_file_name(good).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/b",
            ".hidden",
            "..",
            "a\\b",
            "x\0y",
            "é",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
