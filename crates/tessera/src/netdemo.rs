//! The decentralized demo: a hub and four nodes as separate processes on loopback,
//! training `micro` on the bundled corpus with compressed DiLoCo updates, then a summary.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tessera_protocol::wire::Summary;
use tessera_protocol::RunSpec;

/// Children are killed when the demo ends, however it ends.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct NetDemo {
    pub nodes: usize,
    pub rounds: u64,
    pub inner_steps: u64,
    pub codec: tessera_outer::CodecKind,
    pub seed: u64,
    /// A private run: the corpus sealed, its keys served by a key server to nodes that
    /// attest with the test PKI (what a TDX/SEV-SNP guest does with `--attest configfs`).
    pub private: bool,
    /// The run setting `overlap`.
    pub overlap: bool,
    /// Measure one node alone first, and each node's utilization against it.
    pub utilization: bool,
    /// Each node's blob rate limit.
    pub bandwidth_mbps: Option<f64>,
}

/// Rounds the utilization's denominator trains alone.
const ALONE_ROUNDS: u64 = 8;

/// The number after `before` and up to the next space on the last line holding it.
fn figure_after(text: &str, before: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.contains(before))?;
    let rest = &line[line.find(before)? + before.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// What a private demo adds: the sealed data, the key server and its journal.
struct Private {
    sealed: std::path::PathBuf,
    keys_url: String,
    keys_listen: String,
    owner_keys: std::path::PathBuf,
    journal: std::path::PathBuf,
    attest: String,
    policy: String,
}

/// Seals the prepared corpus (afresh), makes a test PKI and its policy.
fn private_setup(exe: &Path, dir: &Path, data: &Path) -> Result<Private> {
    let sealed = dir.join("sealed");
    let owner_keys = dir.join("owner.keys");
    let seed = dir.join("test-pki.seed");
    let journal = dir.join("keys-journal.db");
    for p in [&owner_keys, &seed, &journal] {
        let _ = std::fs::remove_file(p);
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("keys-journal.db{suffix}")));
    }
    if sealed.exists() {
        std::fs::remove_dir_all(&sealed)?;
    }
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(exe).args(args).output()?;
        if !out.status.success() {
            bail!(
                "tessera {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let p = |x: &Path| x.to_string_lossy().into_owned();
    run(&[
        "data",
        "seal",
        "--data",
        &p(data),
        "--out",
        &p(&sealed),
        "--keys",
        &p(&owner_keys),
    ])?;
    let policy = run(&["attest", "test-pki", "--out", &p(&seed)])?;
    let port = free_port()?;
    eprintln!(
        "private run: the corpus is sealed in {}; its keys go only to nodes whose quotes pass \
         the run's policy (here: the test PKI, as a TDX guest's quotes would)",
        sealed.display()
    );
    Ok(Private {
        sealed,
        keys_url: format!("http://127.0.0.1:{port}"),
        keys_listen: format!("127.0.0.1:{port}"),
        owner_keys,
        journal,
        attest: format!("test:{}", p(&seed)),
        policy,
    })
}

pub fn run(dir: &Path, demo: &NetDemo) -> Result<()> {
    let data = crate::demo::bundled_data(dir)?;
    let exe = std::env::current_exe()?;
    let private = demo
        .private
        .then(|| private_setup(&exe, dir, &data))
        .transpose()?;
    let data = private.as_ref().map_or(data, |p| p.sealed.clone());
    let hub_dir = dir.join("hub");
    if hub_dir.exists() {
        std::fs::remove_dir_all(&hub_dir)
            .with_context(|| format!("clearing {}", hub_dir.display()))?;
    }
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    // Every setting not written here is the run default (`RunSpec::default`): the
    // settings measured best (docs/results.md), so the demo runs what a hub with a
    // minimal run.toml runs.
    let defaults = RunSpec::default();
    let mut config = format!(
        "run_id = \"demo\"\ndata = {data:?}\nlisten = \"127.0.0.1:{port}\"\nstate_dir = {hub_dir:?}\n\
         min_nodes = {n}\nseed = {seed}\n",
        n = demo.nodes,
        seed = demo.seed,
    );
    if demo.rounds != defaults.rounds {
        config += &format!("rounds = {}\n", demo.rounds);
    }
    if demo.inner_steps != defaults.inner_steps {
        config += &format!("inner_steps = {}\n", demo.inner_steps);
    }
    if demo.codec != defaults.codec {
        config += &format!("codec = \"{}\"\n", demo.codec);
    }
    if demo.overlap {
        config += "overlap = true\n";
    }
    // A ledger whose pool pays every round, so the demo shows what each node earned
    // for verified work.
    let ledger = dir.join("ledger.db");
    for file in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    let reward = DEMO_REWARD_PER_ROUND.to_string();
    let pool = (DEMO_REWARD_PER_ROUND * demo.rounds).to_string();
    for args in [
        vec!["init"],
        vec![
            "sale",
            "--buyer",
            "organiser",
            "--tokens",
            "1",
            "--treasury-tokens",
            &pool,
            "--proceeds",
            "demo",
        ],
        vec![
            "fund",
            "--run",
            "demo",
            "--model",
            "demo",
            "--tokens",
            &pool,
            "--reward-per-round",
            &reward,
        ],
    ] {
        demo_ledger(&exe, &ledger, &args)?;
    }
    // Each node stakes the run's minimum, as a contributor must before joining.
    let stake = defaults.min_stake.to_string();
    for i in 0..demo.nodes {
        let key = dir.join(format!("node{i}.key"));
        let (id, _) = tessera_protocol::Identity::load_or_create(&key)?;
        let hex = id.public_hex();
        demo_ledger(
            &exe,
            &ledger,
            &[
                "sale",
                "--buyer",
                &hex,
                "--tokens",
                &stake,
                "--proceeds",
                "demo",
            ],
        )?;
        demo_ledger(
            &exe,
            &ledger,
            &[
                "stake",
                "--run",
                "demo",
                "--contributor",
                &hex,
                "--tokens",
                &stake,
            ],
        )?;
    }
    config += &format!("ledger = {ledger:?}\n");
    if let Some(p) = &private {
        config += &format!(
            "key_server = {:?}\nattest = {:?}\n[tee_policy]\n{}",
            p.keys_url, p.attest, p.policy
        );
    }
    let config_path = dir.join("run.toml");
    std::fs::write(&config_path, config)?;
    let log = |name: &str| -> Result<Stdio> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
    };
    let mut children = Children(Vec::new());
    if let Some(p) = &private {
        let keys = Command::new(&exe)
            .args(["keys", "serve", "--config"])
            .arg(&config_path)
            .arg("--keys")
            .arg(&p.owner_keys)
            .arg("--journal")
            .arg(&p.journal)
            .args(["--listen", &p.keys_listen])
            .stdout(log("keys")?)
            .stderr(log("keys")?)
            .spawn()?;
        children.0.push(("keys".into(), keys));
        let start = Instant::now();
        while std::net::TcpStream::connect(&p.keys_listen).is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the key server did not start; see {}",
                    dir.join("keys.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let hub = Command::new(&exe)
        .arg("hub")
        .arg("--config")
        .arg(&config_path)
        .stdout(log("hub")?)
        .stderr(log("hub")?)
        .spawn()?;
    children.0.push(("hub".into(), hub));
    tessera_net::install_tls_provider();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let start = Instant::now();
    while http.get(format!("{url}/run")).send().is_err() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "the hub did not start; see {}",
                dir.join("hub.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nodes pin the hub's key, as contributors do with the key the hub prints.
    let hub_key =
        tessera_protocol::Identity::load(&hub_dir.join(tessera_hub::HUB_KEY_FILE))?.public_hex();
    eprintln!(
        "hub on {url} (key {}); starting {} nodes (logs in {})",
        &hub_key[..16],
        demo.nodes,
        dir.display()
    );
    eprintln!("dashboard: {url}/ (or in a terminal: tessera status --hub {url} --watch)");
    if private.is_some() {
        // A node that cannot attest asks too, and is told why it cannot take part.
        let out = Command::new(&exe)
            .args(["node", "--hub", &url, "--hub-key", &hub_key])
            .args(["--threads", "1", "--device", "cpu"])
            .arg("--key")
            .arg(dir.join("unattested.key"))
            .arg("--cache")
            .arg(dir.join("node-cache-unattested"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let why = text.lines().find(|l| l.starts_with("error:")).unwrap_or("");
        eprintln!(
            "a node without attestation: {}",
            why.trim_start_matches("error: ")
        );
    }
    let node_cmd = |key: &Path| {
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--hub", &url, "--hub-key", &hub_key])
            .args(["--threads", "1", "--device", "cpu"])
            .arg("--key")
            .arg(key)
            .arg("--cache")
            .arg(dir.join("node-cache"));
        if let Some(p) = &private {
            cmd.args(["--attest", &p.attest]);
        }
        if let Some(b) = demo.bandwidth_mbps {
            cmd.args(["--bandwidth-mbps", &b.to_string()]);
        }
        cmd
    };
    let alone = if demo.utilization {
        eprintln!("measuring one node training {ALONE_ROUNDS} rounds alone (one thread)");
        let out = node_cmd(&dir.join("node0.key"))
            .args(["--alone-rounds", &ALONE_ROUNDS.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let rate = figure_after(&text, " rounds at ")
            .filter(|_| out.status.success())
            .with_context(|| format!("measuring a node alone failed:\n{text}"))?;
        eprintln!("alone: {rate:.1} tokens/s");
        Some(rate)
    } else {
        None
    };
    let start = Instant::now();
    for i in 0..demo.nodes {
        let name = format!("node{i}");
        let key = dir.join(format!("{name}.key"));
        let mut cmd = node_cmd(&key);
        let child = cmd.stdout(log(&name)?).stderr(log(&name)?).spawn()?;
        children.0.push((name, child));
    }
    let mut last = u64::MAX;
    let summary: Summary = loop {
        std::thread::sleep(Duration::from_secs(2));
        for (name, c) in &mut children.0 {
            if let Some(status) = c.try_wait()? {
                if !status.success() {
                    bail!(
                        "{name} exited with {status}; see {}",
                        dir.join(format!("{name}.log")).display()
                    );
                }
            }
        }
        let Ok(resp) = http.get(format!("{url}/summary")).send() else {
            continue;
        };
        let s: Summary = resp.json()?;
        if s.rounds_closed != last {
            last = s.rounds_closed;
            let loss: Vec<String> = s
                .nodes
                .values()
                .map(|n| format!("{:.3}", n.last_loss))
                .collect();
            eprintln!(
                "{}/{} rounds closed ({:.0} s); node losses {}",
                s.rounds_closed,
                demo.rounds,
                start.elapsed().as_secs_f64(),
                loss.join(" ")
            );
        }
        // Done once the final model is evaluated and the last audits are decided
        // (pay leaves escrow then).
        if s.finished && s.final_eval.is_some() && s.audits_open == 0 {
            break s;
        }
    };
    // What each node earned: its balance in the hub's ledger, read with its own key.
    let rt = tokio::runtime::Runtime::new()?;
    let mut earned = std::collections::BTreeMap::new();
    for i in 0..demo.nodes {
        let id = tessera_protocol::Identity::load(&dir.join(format!("node{i}.key")))?;
        let node = tessera_protocol::NodeId::from_hex(&id.public_hex())?;
        let client = tessera_net::LedgerClient::pinned(
            &url,
            id.clone(),
            Some(tessera_protocol::NodeId::from_hex(&hub_key)?),
        );
        let account = tessera_ledger::Account::Contributor(id.public_hex());
        if let Ok(b) = rt.block_on(client.balance(&account)) {
            let tokens = tessera_ledger::Amount::parse_base_units(&b.base_units)
                .map_or(b.base_units, |a| a.tokens_string());
            earned.insert(node, tokens);
        }
    }
    print_summary(&summary, &earned, start.elapsed().as_secs_f64());
    let reopen = format!(
        "{} hub --config {}",
        exe.file_name()
            .map_or("tessera".into(), |n| n.to_string_lossy()),
        config_path.display()
    );
    if let Some(alone) = alone {
        // Each node prints its span when it stops.
        let until = Instant::now() + Duration::from_secs(120);
        for (_, c) in children.0.iter_mut().filter(|(n, _)| n.starts_with("node")) {
            while c.try_wait()?.is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        println!(
            "utilization: a node's tokens/s in the run (from the start of its first round's \
             training to the end of its last) ÷ one node's alone ({alone:.1} tokens/s, \
             {ALONE_ROUNDS} rounds, one thread)"
        );
        for i in 0..demo.nodes {
            let name = format!("node{i}");
            let text = std::fs::read_to_string(dir.join(format!("{name}.log")))?;
            match figure_after(&text, " tokens at ") {
                Some(r) => println!("  {name}: {r:.1} tokens/s, {:.1}%", 100.0 * r / alone),
                None => println!("  {name}: no training span in its log"),
            }
        }
    }
    if let Some(p) = &private {
        let journal = tessera_keyserver::Journal::open(&p.journal)?.entries()?;
        let mut by_node = std::collections::BTreeMap::<String, (usize, usize)>::new();
        for e in &journal {
            let slot = by_node.entry(e.node_key[..12].to_string()).or_default();
            if e.outcome == "released" {
                slot.0 += 1;
            } else {
                slot.1 += 1;
            }
        }
        println!(
            "key server journal ({}): {} entries",
            p.journal.display(),
            journal.len()
        );
        for (node, (released, refused)) in by_node {
            let who = if node == hub_key[..12] {
                " (the hub)"
            } else {
                ""
            };
            println!("  {node}{who}: {released} item keys released, {refused} refusals");
        }
        println!(
            "plaintext lived only in the attested processes' memory; the nodes' cache holds \
             ciphertext ({})",
            dir.join("node-cache").display()
        );
    }
    show_finished_run(&mut children, &url, &reopen)
}

/// On an interactive terminal the hub stays up, serving the finished run's dashboard,
/// until Ctrl-C; otherwise the demo ends and says how to open it again.
fn show_finished_run(children: &mut Children, url: &str, reopen: &str) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        println!("the finished run's dashboard stays at {url}/ until Ctrl-C");
        if let Some((_, hub)) = children.0.iter_mut().find(|(n, _)| n == "hub") {
            hub.wait()?;
        }
    } else {
        println!("to see the finished run's dashboard again: `{reopen}`, then open {url}/");
    }
    Ok(())
}

/// Runs `tessera ledger --db LEDGER ARGS…` for the demo's set-up.
fn demo_ledger(exe: &Path, ledger: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(exe)
        .arg("ledger")
        .arg("--db")
        .arg(ledger)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "setting up the demo's ledger ({}) failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Tokens the demo's pool pays per round.
const DEMO_REWARD_PER_ROUND: u64 = 100;

fn print_summary(
    s: &Summary,
    earned: &std::collections::BTreeMap<tessera_protocol::NodeId, String>,
    seconds: f64,
) {
    let eval = s.final_eval.expect("checked by the caller");
    println!(
        "---- decentralized run `{}`: {} rounds in {:.0} s ----",
        s.run_id, s.rounds_closed, seconds
    );
    println!(
        "validation: {:.4} bits per byte (loss {:.4} nats/token)",
        eval.bpb, eval.loss
    );
    println!(
        "θ hash: {} ({} divergent node reports)",
        s.theta_hash, s.divergent_reports
    );
    println!(
        "{:<14} {:>10} {:>10} {:>8} {:>8} {:>9} {:>7} {:>8} {:>6}",
        "node", "sent", "received", "vs DDP", "util", "accepted", "score", "audits", "paid"
    );
    for (id, n) in &s.nodes {
        let moved = (n.bytes_sent + n.bytes_received).max(1);
        let v = s.verification.get(id).copied().unwrap_or_default();
        println!(
            "{:<14} {:>10} {:>10} {:>7.0}x {:>7.0}% {:>9} {:>7.3} {:>8} {:>6}",
            id.short(12),
            crate::human_bytes(n.bytes_sent),
            crate::human_bytes(n.bytes_received),
            s.ddp_bytes_per_node as f64 / moved as f64,
            100.0 * n.train_seconds / n.wall_seconds.max(1e-9),
            format!("{}/{}", v.accepted, v.accepted + v.refused),
            f64::from(v.score_ppm_mean) / 1e6,
            format!(
                "{}{}",
                v.audits_passed,
                if v.audits_failed > 0 {
                    format!(" ({} failed)", v.audits_failed)
                } else {
                    String::new()
                }
            ),
            earned.get(id).map_or("-", String::as_str)
        );
    }
    println!(
        "accepted: commits the validator accepted; score: mean pay weight; audits: replays \
         passed; paid: tokens the ledger paid for verified work"
    );
    println!(
        "a DDP all-reduce of the same steps: {} per node",
        crate::human_bytes(s.ddp_bytes_per_node)
    );
    if let Some(dir) = &s.final_checkpoint {
        println!("checkpoint: {dir}");
        println!("next: tessera generate --checkpoint {dir} --prompt 'ROMEO:'");
    }
}
