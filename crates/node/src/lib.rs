//! A contributor node: joins a run, downloads and verifies the data set, trains the
//! batches the coordinator assigns it, uploads its compressed pseudo-gradient (hash
//! verified by the hub), commits its hash, and after each round fetches the accepted
//! updates, takes the outer step itself and reports the hash of θ. A node that joins
//! late or falls behind downloads the hub's checkpoint (θ and outer velocity, hash
//! checked) and continues from there, so a crash costs at most the round in flight.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_net::http_auth::now_ms;

use anyhow::{bail, Context, Result};
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
    /// Upload and download rate limit, in megabits per second.
    pub bandwidth_mbps: Option<f64>,
}

/// Bytes moved and time spent, shared with the heartbeat thread.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    train_ms: AtomicU64,
    loss_micro: AtomicU64,
    rounds: AtomicU64,
}

struct Client {
    base: String,
    identity: Identity,
    http: reqwest::blocking::Client,
    counters: Arc<Counters>,
    bandwidth_mbps: Option<f64>,
}

impl Client {
    /// Sleeps long enough that `bytes` took at least as long as the rate limit allows.
    fn throttle(&self, bytes: usize, took: Duration) {
        if let Some(mbps) = self.bandwidth_mbps {
            let needed = Duration::from_secs_f64(bytes as f64 * 8.0 / (mbps * 1e6));
            if needed > took {
                std::thread::sleep(needed - took);
            }
        }
    }

    /// A control-plane request (small JSON; not counted as training communication).
    fn send(&self, method: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>> {
        self.send_counted(method, path, body, false)
    }

    /// Sends a request; `count` says whether its bytes are data-plane traffic (update
    /// blobs and checkpoints), which the node reports and compares with DDP.
    fn send_counted(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        count: bool,
    ) -> Result<Vec<u8>> {
        let start = Instant::now();
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "POST" => self.http.post(&url),
            "PUT" => self.http.put(&url),
            _ => self.http.get(&url),
        };
        if method != "GET" {
            for (k, v) in sign_request(&self.identity, method, path, now_ms(), &body) {
                req = req.header(k, v);
            }
        }
        let sent = body.len();
        let resp = req
            .body(body)
            .send()
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes()?.to_vec();
        if count {
            self.counters.sent.fetch_add(sent as u64, Ordering::Relaxed);
            self.counters
                .received
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.throttle(sent + bytes.len(), start.elapsed());
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

    /// Downloads a content-addressed blob and checks its hash.
    fn blob(&self, hash: &str) -> Result<Vec<u8>> {
        let bytes = self.send_counted("GET", &format!("/blobs/{hash}"), Vec::new(), true)?;
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != hash {
            bail!("blob {hash} arrived with hash {actual}; refusing it");
        }
        Ok(bytes)
    }
}

/// Downloads the run's data set into `dir` (skipping files already there) and opens it,
/// which verifies every shard against the manifest.
fn fetch_data(client: &Client, info: &RunInfo, dir: &Path) -> Result<Dataset> {
    std::fs::create_dir_all(dir)?;
    for file in &info.data_files {
        let path = dir.join(file);
        if !path.exists() {
            let bytes = client.send_counted("GET", &format!("/data/{file}"), Vec::new(), false)?;
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

fn stats(c: &Counters, started: Instant) -> NodeStats {
    NodeStats {
        bytes_sent: c.sent.load(Ordering::Relaxed),
        bytes_received: c.received.load(Ordering::Relaxed),
        train_seconds: c.train_ms.load(Ordering::Relaxed) as f64 / 1e3,
        wall_seconds: started.elapsed().as_secs_f64(),
        last_loss: c.loss_micro.load(Ordering::Relaxed) as f64 / 1e6,
        rounds_committed: c.rounds.load(Ordering::Relaxed),
    }
}

/// Runs a node until the run finishes.
pub fn run(opts: NodeOptions) -> Result<()> {
    let counters = Arc::new(Counters::default());
    let client = Client {
        base: opts.hub.trim_end_matches('/').to_string(),
        identity: opts.identity.clone(),
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?,
        counters: counters.clone(),
        bandwidth_mbps: opts.bandwidth_mbps,
    };
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

    let started = Instant::now();
    let heartbeat = {
        let hb = Client {
            base: client.base.clone(),
            identity: client.identity.clone(),
            http: reqwest::blocking::Client::new(),
            counters: counters.clone(),
            bandwidth_mbps: None,
        };
        std::thread::spawn(move || loop {
            let stats = stats(&hb.counters, started);
            let body = serde_json::to_vec(&stats).expect("stats serialise");
            if let Err(e) = hb.send_counted("POST", "/node/heartbeat", body, false) {
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
    let mut committed_round: Option<u64> = None;
    // Our own last blob, so we do not download what we uploaded.
    let mut own_blob: Option<(String, Vec<u8>)> = None;
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
                        let blobs = rec
                            .accepted
                            .iter()
                            .map(|(_, h)| match &own_blob {
                                Some((own, bytes)) if own == h => Ok(bytes.clone()),
                                _ => client.blob(h),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        s.apply(&spec, &blobs)?;
                        let report = ThetaReport {
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
                    let bytes = client.blob(&view.checkpoint)?;
                    let s = OuterState::from_bytes(&spec, &bytes).map_err(anyhow::Error::msg)?;
                    eprintln!("node {}: loaded checkpoint of round {}", &me[..12], s.round);
                    state = Some(s);
                }
            }
            if view.phase == Phase::Finished {
                let _ = client.send_counted(
                    "POST",
                    "/node/heartbeat",
                    serde_json::to_vec(&stats(&counters, started))?,
                    false,
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
                    let hash = blake3::hash(&work.blob).to_hex().to_string();
                    client.send_counted(
                        "PUT",
                        &format!("/blobs/{hash}"),
                        work.blob.clone(),
                        true,
                    )?;
                    own_blob = Some((hash.clone(), work.blob.clone()));
                    let body = CommitBody {
                        run_id: spec.run_id.clone(),
                        round,
                        commit: Commit {
                            blob_hash: hash,
                            tokens: work.tokens,
                            loss_micro: (work.mean_loss * 1e6) as u64,
                            theta_hash: current.hash(),
                        },
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
                    eprintln!(
                        "node {}: round {round} loss {:.4} {:.0} tok/s sent {} recv {} utilization {:.0}%",
                        &me[..12],
                        work.mean_loss,
                        work.tokens as f64 / work.train_seconds.max(1e-9),
                        counters.sent.load(Ordering::Relaxed),
                        counters.received.load(Ordering::Relaxed),
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
