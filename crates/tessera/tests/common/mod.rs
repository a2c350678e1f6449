//! Helpers shared by the process-level tests (`network.rs`, `internet.rs`).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Processes killed (and reaped) when dropped, so a failing test leaves none behind.
pub struct Procs(pub Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_tessera")
}

/// Waits until `f` holds; on a timeout, fails with the tail of every log in `logs`.
pub fn wait_for(logs: &Path, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            let mut tails = String::new();
            let mut entries: Vec<_> = std::fs::read_dir(logs).unwrap().flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                    tails += &format!("\n==== {} ====\n{tail}", e.path().display());
                }
            }
            panic!("timed out waiting for {what}{tails}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Prepares a tiny data set in `d/data` and returns its path.
pub fn tiny_data(d: &Path) -> std::path::PathBuf {
    prepare(
        d,
        &"Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day.\n"
            .repeat(200),
    )
}

/// Prepares `text` as a data set (vocabulary 300) in `d/data` and returns its path.
pub fn prepare(d: &Path, text: &str) -> std::path::PathBuf {
    let corpus = d.join("c.txt");
    std::fs::write(&corpus, text).unwrap();
    let data = d.join("data");
    let out = Command::new(exe())
        .args([
            "data",
            "prepare",
            "--input",
            s(&corpus),
            "--out",
            s(&data),
            "--vocab",
            "300",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

/// Starts `tessera ARGS`, its output (both streams) into `log`.
pub fn spawn(args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(exe())
        .args(args)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// `GET url` as JSON, or `None` when it can't be had within 5 s.
pub fn get(url: &str) -> Option<serde_json::Value> {
    tessera_net::install_tls_provider();
    reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .ok()?
        .json()
        .ok()
}

/// `tessera node` against `hub` with identity `key` and data cache `cache`, on one CPU
/// thread (two nodes share the machine's two cores).
pub fn node_args<'a>(hub: &'a str, key: &'a Path, cache: &'a Path) -> Vec<&'a str> {
    vec![
        "node",
        "--hub",
        hub,
        "--key",
        s(key),
        "--cache",
        s(cache),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
}

/// Writes a `nano` run file on a free loopback port with state under `d/hub`, plus
/// `extra` settings; returns the hub's URL and the file.
pub fn run_file(d: &Path, data: &Path, extra: &str) -> (String, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = d.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "preset = \"nano\"\ndata = {data:?}\nlisten = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n\
             batch_size = 2\nseq_len = 32\ncodec = \"topk\"\n{extra}",
            d.join("hub")
        ),
    )
    .unwrap();
    (format!("http://127.0.0.1:{port}"), config)
}

/// Starts `tessera validator` following the hub at `url` (its key pinned from
/// `d/hub/hub.key`), with its state in `d/val` and its log in `d/validator.log`.
pub fn spawn_validator(d: &Path, url: &str) -> Child {
    let hub_key = tessera_protocol::Identity::load(&d.join("hub").join("hub.key"))
        .unwrap()
        .public_hex();
    let (key, dir) = (d.join("val.key"), d.join("val"));
    spawn(
        &[
            "validator",
            "--hub",
            url,
            "--hub-key",
            &hub_key,
            "--key",
            s(&key),
            "--dir",
            s(&dir),
            "--device",
            "cpu",
        ],
        &d.join("validator.log"),
    )
}

/// Runs `tessera ledger --db LEDGER --json ARGS…` and returns its stdout.
pub fn ledger_cmd(ledger: &Path, args: &[&str]) -> String {
    let out = Command::new(exe())
        .args(["ledger", "--db", s(ledger), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ledger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new ledger at `ledger` whose pool for `run` (model `nano`) holds `pool` tokens of a
/// `treasury`-token sale and pays `reward` tokens a round.
pub fn funded_ledger(ledger: &Path, run: &str, treasury: &str, pool: &str, reward: &str) {
    ledger_cmd(ledger, &["init"]);
    ledger_cmd(
        ledger,
        &[
            "sale",
            "--buyer",
            "organiser",
            "--tokens",
            "1",
            "--treasury-tokens",
            treasury,
            "--proceeds",
            "test",
        ],
    );
    ledger_cmd(
        ledger,
        &[
            "fund",
            "--run",
            run,
            "--model",
            "nano",
            "--tokens",
            pool,
            "--reward-per-round",
            reward,
        ],
    );
}

/// A new node key at `d/NAME.key` whose contributor bought and staked `tokens` on
/// `run` in `ledger`; returns its public key (hex).
pub fn staked_key(ledger: &Path, d: &Path, name: &str, run: &str, tokens: &str) -> String {
    let id = tessera_protocol::Identity::generate();
    id.save_new(&d.join(format!("{name}.key"))).unwrap();
    let hex = id.public_hex();
    ledger_cmd(
        ledger,
        &[
            "sale",
            "--buyer",
            &hex,
            "--tokens",
            tokens,
            "--proceeds",
            "test",
        ],
    );
    ledger_cmd(
        ledger,
        &[
            "stake",
            "--run",
            run,
            "--contributor",
            &hex,
            "--tokens",
            tokens,
        ],
    );
    hex
}
