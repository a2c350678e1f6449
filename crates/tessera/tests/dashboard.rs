//! The dashboard in a real browser: a hub with a ledger and two nodes train `nano`, and
//! `python/dashboard_check.py` opens the hub's page in headless Chromium while it
//! trains and checks what it renders against the hub's JSON (see that script). Then
//! `tessera status` is checked against the same JSON, `/metrics` against Tessera's
//! naming conventions, and a restarted hub serves the finished run's page with its
//! whole history and final evaluation.
//!
//! The browser is Debian's `chromium` (`make test` installs it as root) driven by the
//! PyPI `playwright` in the project's virtual environment. Without them the test says
//! what is missing and passes only outside CI: under `CI=true` it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{
    exe, funded_ledger, get, node_args, run_file, s, spawn, staked_key, tiny_data, wait_for, Procs,
};

/// The Python of the project's virtual environment (what `make test` puts on PATH).
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// What is missing to drive a browser, if anything.
fn browser_missing() -> Option<String> {
    let chromium = std::env::var("TESSERA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !Path::new(&chromium).exists() {
        missing.push(format!(
            "the Chromium browser at {chromium} (as root: `apt-get install -y chromium`, \
             which `make test` does)"
        ));
    }
    let ok = Command::new(python())
        .args(["-c", "import playwright, prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing.push(format!(
            "the Python packages playwright and prometheus_client for {} \
             (`make setup` installs python/requirements.txt)",
            python().display()
        ));
    }
    (!missing.is_empty()).then(|| missing.join("; and "))
}

#[test]
fn the_dashboard_shows_a_live_run_as_the_hub_reports_it() {
    if let Some(missing) = browser_missing() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "the browser test needs {missing}");
        eprintln!("SKIPPED the browser test (not under CI=true): it needs {missing}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = tiny_data(d);
    // A ledger whose pool pays 10 tokens a round; three nodes stake 5 tokens each, and
    // one of them (`c`) cheats by resending another node's update (a test tool).
    let ledger = d.join("ledger.db");
    funded_ledger(&ledger, "dash", "500", "300", "10");
    let names = ["a", "b", "c"];
    let ids: Vec<String> = names
        .iter()
        .map(|n| staked_key(&ledger, d, n, "dash", "5"))
        .collect();
    let rounds = 20;
    let (url, config) = run_file(
        d,
        &data,
        &format!(
            "run_id = \"dash\"\nmin_nodes = 2\nrounds = {rounds}\ninner_steps = 2\n\
             round_deadline_ms = 20000\nmin_stake = 5\ntopk = 256\nledger = {ledger:?}\n"
        ),
    );
    let mut procs = Procs(Vec::new());
    procs
        .0
        .push(spawn(&["hub", "--config", s(&config)], &d.join("hub.log")));
    wait_for(d, "the hub", Duration::from_secs(30), || {
        get(&format!("{url}/run")).is_some()
    });

    // The browser opens the page while the run waits for nodes; then they start, and
    // it watches the run train, finish and be paid.
    let shots =
        std::env::var_os("TESSERA_SCREENSHOTS").map_or_else(|| d.join("shots"), PathBuf::from);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python/dashboard_check.py");
    let ready = d.join("page-loaded");
    let browser = Command::new(python())
        .arg(&script)
        .arg(&url)
        .arg(&shots)
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut browser = Some(browser);
    wait_for(d, "the page to load", Duration::from_secs(60), || {
        let exited = browser.as_mut().unwrap().try_wait().unwrap().is_some();
        ready.exists() || exited
    });
    let cache = d.join("cache");
    for name in names {
        let key = d.join(format!("{name}.key"));
        let mut args = node_args(&url, &key, &cache);
        args.push("--json");
        if name == "c" {
            args.extend(["--adversary", "copy"]);
        }
        procs
            .0
            .push(spawn(&args, &d.join(format!("node-{name}.log"))));
    }
    let out = browser.take().unwrap().wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{report}\nhub log tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&d.join("hub.log"))
    );
    eprintln!("browser check: {report}");
    assert!(shots.join("dashboard.png").exists());
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["rounds"], rounds);
    assert_eq!(report["nodes"], 3);
    assert_eq!(report["ejected"], 1);

    let summary = get(&format!("{url}/summary")).unwrap();
    let ledger_view = get(&format!("{url}/api/ledger")).unwrap();
    // The cheater was caught: ejected, its stake slashed; the honest nodes were not.
    for (id, name) in ids.iter().zip(names) {
        let cheat = name == "c";
        assert_eq!(summary["verification"][id]["ejected"], cheat, "{name}");
        assert_eq!(
            ledger_view["slashed_nodes"]
                .get(id)
                .and_then(|v| v.as_str()),
            cheat.then_some("5"),
            "{name}: {ledger_view}"
        );
    }

    // `tessera status` says the same.
    let status = Command::new(exe())
        .args(["status", "--hub", &url])
        .output()
        .unwrap();
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("{rounds}/{rounds} rounds closed"))
            && text.contains("finished")
            && text.contains("EJECTED, pay forfeited, 5 staked tokens slashed"),
        "{text}"
    );
    let work = summary["work"].as_object().unwrap();
    for (node, w) in work
        .iter()
        .filter(|(n, _)| ledger_view["earned"].get(*n).is_some())
    {
        let line = text
            .lines()
            .find(|l| l.starts_with(&node[..12]))
            .unwrap_or_else(|| panic!("no line for {node} in\n{text}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[2], w["tokens"].to_string(), "{line}");
        let earned = ledger_view["earned"][node].as_str().unwrap();
        assert!(fields.contains(&earned), "{earned} earned is not in {line}");
    }
    assert!(
        text.contains(&format!(
            "paid {} over {rounds} round(s)",
            ledger_view["paid_total"].as_str().unwrap()
        )),
        "{text}"
    );

    // /metrics by the conventions.
    let metrics = reqwest::blocking::get(format!("{url}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let names = tessera_hub::metrics::check(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    for name in [
        "tessera_rounds_closed_total",
        "tessera_validation_bits_per_byte",
        "tessera_ledger_paid_tokens_total",
        "tessera_node_tokens_total",
        "tessera_node_earned_tokens_total",
    ] {
        assert!(names.contains(name), "{name} missing from\n{metrics}");
    }
    // The documented table and the example Grafana dashboard name exactly what the hub
    // serves (`tessera_round_open` is absent once the run is finished).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let table = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `tessera_"))
        .map(|l| format!("tessera_{}", &l[..l.find('`').unwrap()]))
        .collect();
    let mut served = names.clone();
    served.insert("tessera_round_open".into());
    assert_eq!(documented, served, "docs/metrics.md against /metrics");
    let grafana = std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap();
    let grafana: serde_json::Value = serde_json::from_str(&grafana).unwrap();
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("tessera_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(served.contains(&name), "Grafana names {name}, not served");
            }
        }
    }

    // Row 28 (docs/security.md): the public reads refuse what they don't serve.
    let status_of = |path: &str| {
        reqwest::blocking::get(format!("{url}{path}"))
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status_of("/assets/..%2F..%2FCargo.toml"), 404);
    assert_eq!(status_of("/assets/vendor%2FuPlot.LICENSE"), 404);
    assert_eq!(status_of("/api/history?from=-1"), 400);
    assert_eq!(status_of("/api/history?from=1&limit=5"), 400);
    assert_eq!(status_of("/api/history?from=18"), 200);

    // A restarted hub serves the finished run: its whole history, final evaluation
    // and members' last statistics.
    let history = get(&format!("{url}/api/history")).unwrap();
    // Every node stops, the cheater too: a slashed node asking to join again is told
    // it was ejected, not that its stake is gone (it would ask forever).
    wait_for(d, "the nodes to stop", Duration::from_secs(60), || {
        procs.0[1..]
            .iter_mut()
            .all(|c| c.try_wait().unwrap().is_some())
    });
    // Past the age a public read may have, so the summary holds the last heartbeats.
    std::thread::sleep(Duration::from_millis(
        tessera_hub::dashboard::PUBLIC_READ_MAX_AGE_MS + 100,
    ));
    let summary = get(&format!("{url}/summary")).unwrap();

    // Each node's end report (`--json`) and its balance read from the hub's ledger API
    // with its own key.
    for name in ["a", "b"] {
        let log = std::fs::read_to_string(d.join(format!("node-{name}.log"))).unwrap();
        let line = log
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("node {name} printed no JSON report:\n{log}"));
        let report: tessera_node::NodeReport = serde_json::from_str(line).unwrap();
        let w = &summary["work"][&report.node];
        assert_eq!(report.tokens, w["tokens"].as_u64().unwrap(), "{line}");
        // A node may join a round or two late (the run starts with two members).
        assert_eq!(
            report.rounds_accepted,
            w["rounds_accepted"].as_u64().unwrap(),
            "{line}"
        );
        assert!(report.rounds_accepted >= rounds - 2, "{line}");
        assert!(report.run_finished && !report.ejected, "{line}");
        let earned: f64 = ledger_view["earned"][&report.node]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let reported: f64 = report
            .earned_tokens
            .as_deref()
            .unwrap_or("0")
            .parse()
            .unwrap();
        assert!(reported > 0.0 && reported <= earned, "{line}");
        let out = Command::new(exe())
            .args(["ledger", "--json", "balance", "--hub", &url, "--key"])
            .arg(d.join(format!("{name}.key")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            b["tokens"].as_str().unwrap().parse::<f64>().unwrap(),
            earned
        );
    }
    procs.0[0].kill().unwrap();
    procs.0[0].wait().unwrap();
    procs.0[0] = spawn(&["hub", "--config", s(&config)], &d.join("hub2.log"));
    wait_for(d, "the restarted hub", Duration::from_secs(30), || {
        get(&format!("{url}/run")).is_some()
    });
    let again = get(&format!("{url}/summary")).unwrap();
    assert_eq!(again["finished"], true);
    assert_eq!(again["final_eval"], summary["final_eval"]);
    assert_eq!(again["nodes"], summary["nodes"]);
    assert_eq!(get(&format!("{url}/api/history")).unwrap(), history);
    let page = reqwest::blocking::get(format!("{url}/")).unwrap();
    assert!(page.status().is_success());
    assert!(page.text().unwrap().contains("/assets/dashboard.js"));
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
