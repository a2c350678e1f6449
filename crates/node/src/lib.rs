//! A contributor node: joins a run, downloads and verifies the data set, trains the
//! batches the coordinator assigns it, publishes its compressed pseudo-gradient on its
//! blob endpoint (iroh-blobs) and commits its hash, and after each round fetches the
//! accepted updates — from the nodes that made them, or from the hub — takes the outer
//! step itself and reports the hash of θ. A node that joins late or falls behind
//! fetches the hub's checkpoint (θ and outer velocity) and continues from there, so a
//! crash costs at most the round in flight. Every blob is verified against its hash
//! while it streams. On SIGINT or SIGTERM the node leaves the run before exiting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_net::http_auth::now_ms;

use anyhow::{bail, Context, Result};
use tessera_blobs::{BlobTransport, IrohBlobs, IrohOptions, PeerAddr};
use tessera_coordinator::{Commit, Phase};
use tessera_hub::{CommitBody, NodeStats, RoundRecord, RunInfo, StateView, ThetaReport};
use tessera_protocol::auth::sign_request;
use tessera_protocol::Identity;
use tessera_train::data::{Dataset, Windows};
use tessera_train::worker::{OuterState, Worker};

/// Options of `tessera node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub hub: String,
    pub identity: Identity,
    /// Where the data set is cached.
    pub cache_dir: PathBuf,
    pub device: tch::Device,
    /// Upload and download rate limit of the blob endpoint, in megabits per second.
    pub bandwidth_mbps: Option<f64>,
    /// UDP address the node's blob endpoint binds.
    pub blob_bind: SocketAddr,
}

/// Context under which the blob endpoint's key is derived from the node key.
pub const BLOB_KEY_CONTEXT: &str = "tessera 2026 blob endpoint key v1";

/// Training time and progress, shared with the heartbeat thread.
#[derive(Default)]
struct Counters {
    train_ms: AtomicU64,
    loss_micro: AtomicU64,
    rounds: AtomicU64,
}

/// The control plane: signed HTTP requests to the hub.
struct Client {
    base: String,
    identity: Identity,
    http: reqwest::blocking::Client,
}

impl Client {
    fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "POST" => self.http.post(&url),
            _ => self.http.get(&url),
        };
        if method != "GET" {
            for (k, v) in sign_request(&self.identity, method, path, now_ms(), &body) {
                req = req.header(k, v);
            }
        }
        let resp = req
            .body(body)
            .send()
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes()?.to_vec();
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(bytes)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(serde_json::from_slice(&self.send(
            "GET",
            path,
            Vec::new(),
        )?)?)
    }
}

/// Downloads the run's data set into `dir` (skipping files already there) and opens it,
/// which verifies every shard against the manifest.
fn fetch_data(client: &Client, info: &RunInfo, dir: &Path) -> Result<Dataset> {
    std::fs::create_dir_all(dir)?;
    for file in &info.data_files {
        let path = dir.join(file);
        if !path.exists() {
            let bytes = client.send("GET", &format!("/data/{file}"), Vec::new())?;
            // Written aside and renamed, so an interrupted download is never mistaken
            // for a complete file on the next start.
            let tmp = path.with_extension("part");
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    let manifest = std::fs::read(dir.join(tessera_train::data::MANIFEST_FILE))?;
    if blake3::hash(&manifest).to_hex().to_string() != info.spec.data_manifest_blake3 {
        bail!(
            "the data manifest does not match the run's; delete {} and retry",
            dir.display()
        );
    }
    Ok(Dataset::open(dir)?)
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
    }
}

/// Runs a node until the run finishes.
pub fn run(opts: NodeOptions) -> Result<()> {
    let counters = Arc::new(Counters::default());
    tessera_net::install_tls_provider();
    let client = Arc::new(Client {
        base: opts.hub.trim_end_matches('/').to_string(),
        identity: opts.identity.clone(),
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?,
    });
    let blobs = Arc::new(
        IrohBlobs::bind(IrohOptions {
            bind: opts.blob_bind,
            secret_key: Some(opts.identity.derive_secret(BLOB_KEY_CONTEXT)),
            bandwidth_mbps: opts.bandwidth_mbps,
            fetch_timeout: Duration::from_secs(300),
            ..IrohOptions::loopback()
        })
        .context("starting the blob endpoint")?,
    );
    let info: RunInfo = client
        .get_json("/run")
        .context("reading the run from the hub")?;
    let spec = info.spec.clone();
    let me = opts.identity.public_hex();
    let data = fetch_data(&client, &info, &opts.cache_dir.join(&spec.run_id))?;
    let windows = Windows::new(&data.train, spec.seq_len);
    let mut worker = Worker::new(spec.clone(), opts.device);
    client
        .send("POST", "/node/join", Vec::new())
        .context("joining the run")?;
    eprintln!("node {}: joined run {}", &me[..12], spec.run_id);
    {
        // Leave cleanly when stopped, so the run does not wait for us at the deadline.
        let client = client.clone();
        let me = me.clone();
        ctrlc::set_handler(move || {
            match client.send("POST", "/node/leave", Vec::new()) {
                Ok(_) => eprintln!("node {}: left the run", &me[..12]),
                Err(e) => eprintln!("node {}: could not leave cleanly: {e:#}", &me[..12]),
            }
            std::process::exit(0);
        })
        .context("installing the stop handler")?;
    }
    let hub_blobs = vec![info.hub_blobs.clone()];
    let update_max = spec
        .codec
        .max_encoded_bytes(spec.model.params_total() as usize) as u64;

    let started = Instant::now();
    let heartbeat = {
        let hb = Client {
            base: client.base.clone(),
            identity: client.identity.clone(),
            http: reqwest::blocking::Client::new(),
        };
        let hb_counters = counters.clone();
        let hb_blobs = blobs.clone();
        std::thread::spawn(move || loop {
            let stats = stats(&hb_counters, hb_blobs.as_ref(), started);
            let body = serde_json::to_vec(&stats).expect("stats serialise");
            if let Err(e) = hb.send("POST", "/node/heartbeat", body) {
                // A restarted hub may have dropped us as silent: join again. Other
                // failures (the hub restarting) are retried on the next beat.
                if format!("{e:#}").contains("not a member") {
                    let _ = hb.send("POST", "/node/join", Vec::new());
                }
            }
            std::thread::sleep(Duration::from_millis(1000));
        })
    };
    let _ = heartbeat;

    // θ₀ is a pure function of the run's seed: compute it rather than download it.
    let mut state: Option<OuterState> = Some(OuterState::initial(&spec));
    let checkpoint_max = state.as_ref().map_or(0, |s| s.to_bytes().len() as u64);
    let mut committed_round: Option<u64> = None;
    // Blobs of the last round applied: still served to peers catching up, then let go.
    let mut held: Vec<String> = Vec::new();
    loop {
        // One pass: catch up, then train if assigned. Any failure (the hub restarting,
        // a refused request) is logged and retried; the node never gives up on a run.
        let mut pass = || -> Result<bool> {
            let view: StateView = client.get_json(&format!("/state?node={me}"))?;
            // Catch up to θ of the latest closed round: one outer step from the round
            // record when we are one behind, else the hub's checkpoint.
            let target = view.closed_rounds;
            let have = state.as_ref().map(|s| s.round);
            if have != Some(target) {
                let stepped = match (&mut state, have) {
                    (Some(s), Some(r)) if r + 1 == target => {
                        let rec: RoundRecord = client.get_json(&format!("/rounds/{r}"))?;
                        // From the node that made it first, the hub second.
                        let updates = rec
                            .accepted
                            .iter()
                            .enumerate()
                            .map(|(i, (_, h))| {
                                let mut from: Vec<PeerAddr> =
                                    rec.sources.get(i).cloned().into_iter().collect();
                                from.extend(hub_blobs.iter().cloned());
                                Ok(blobs.fetch(h, &from, update_max)?)
                            })
                            .collect::<Result<Vec<_>>>()?;
                        s.apply(&spec, &updates)?;
                        for old in std::mem::take(&mut held) {
                            blobs.forget(&old);
                        }
                        held = rec.accepted.iter().map(|(_, h)| h.clone()).collect();
                        let report = ThetaReport {
                            run_id: spec.run_id.clone(),
                            round: r,
                            hash: s.hash(),
                        };
                        let answer = client.send("POST", "/theta", serde_json::to_vec(&report)?)?;
                        let agrees =
                            serde_json::from_slice::<serde_json::Value>(&answer)?["agrees"] == true;
                        if !agrees {
                            eprintln!("node {}: θ after round {r} differs from the hub's; reloading its checkpoint", &me[..12]);
                        }
                        agrees
                    }
                    _ => false,
                };
                let own_matches = state.as_ref().is_some_and(|s| {
                    s.round == target
                        && blake3::hash(&s.to_bytes()).to_hex().to_string() == view.checkpoint
                });
                if !stepped && !own_matches {
                    let bytes = blobs.fetch(&view.checkpoint, &hub_blobs, checkpoint_max)?;
                    blobs.forget(&view.checkpoint);
                    let s = OuterState::from_bytes(&spec, &bytes).map_err(anyhow::Error::msg)?;
                    eprintln!("node {}: loaded checkpoint of round {}", &me[..12], s.round);
                    state = Some(s);
                }
            }
            if view.phase == Phase::Finished {
                let _ = client.send(
                    "POST",
                    "/node/heartbeat",
                    serde_json::to_vec(&stats(&counters, blobs.as_ref(), started))?,
                );
                eprintln!("node {}: run finished", &me[..12]);
                return Ok(true);
            }
            let current = state.as_ref().expect("state loaded above");
            match (view.round, &view.assignment) {
                (Some(round), Some(batches))
                    if !view.committed
                        && committed_round != Some(round)
                        && current.round == round =>
                {
                    let work = worker.train_round(current, &data, &windows, batches);
                    let hash = blobs.publish(&work.blob)?;
                    let body = CommitBody {
                        run_id: spec.run_id.clone(),
                        round,
                        commit: Commit {
                            blob_hash: hash,
                            tokens: work.tokens,
                            loss_micro: (work.mean_loss * 1e6) as u64,
                            theta_hash: current.hash(),
                        },
                        provider: blobs.addr(),
                    };
                    match client.send("POST", "/commit", serde_json::to_vec(&body)?) {
                        Ok(_) => {
                            committed_round = Some(round);
                            counters.rounds.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => eprintln!(
                            "node {}: commit for round {round} refused: {e:#}",
                            &me[..12]
                        ),
                    }
                    counters
                        .train_ms
                        .fetch_add((work.train_seconds * 1e3) as u64, Ordering::Relaxed);
                    counters
                        .loss_micro
                        .store((work.mean_loss * 1e6) as u64, Ordering::Relaxed);
                    let wall = started.elapsed().as_secs_f64();
                    let traffic = blobs.traffic();
                    eprintln!(
                        "node {}: round {round} loss {:.4} {:.0} tok/s sent {} recv {} utilization {:.0}%",
                        &me[..12],
                        work.mean_loss,
                        work.tokens as f64 / work.train_seconds.max(1e-9),
                        traffic.sent,
                        traffic.received,
                        100.0 * counters.train_ms.load(Ordering::Relaxed) as f64 / 1e3 / wall.max(1e-9)
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
            Ok(false)
        };
        match pass() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                eprintln!("node {}: {e:#}; retrying", &me[..12]);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
