//! `tessera status --hub URL [--watch]`: the dashboard's facts in the terminal, read
//! from the hub's public JSON (`/run`, `/summary`, `/api/history`, `/api/ledger`).

use std::time::Duration;

use anyhow::{Context, Result};
use tessera_hub::dashboard::{LedgerView, RoundStats};
use tessera_protocol::wire::{RunInfo, Summary};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The hub's URL, e.g. http://127.0.0.1:7000
    #[arg(long)]
    hub: String,
    /// Print again every few seconds until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between prints with --watch.
    #[arg(long, default_value_t = 2)]
    every: u64,
    /// Closed rounds listed.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
}

/// What one look at the hub gives.
struct Snapshot {
    run: RunInfo,
    summary: Summary,
    history: Vec<RoundStats>,
    ledger: LedgerView,
}

fn fetch(http: &reqwest::blocking::Client, hub: &str, rows: usize) -> Result<Snapshot> {
    let get = |path: &str| -> Result<reqwest::blocking::Response> {
        let r = http
            .get(format!("{hub}{path}"))
            .send()
            .with_context(|| format!("reaching {hub}{path}"))?;
        let status = r.status();
        if !status.is_success() {
            anyhow::bail!("{hub}{path} answered {status}");
        }
        Ok(r)
    };
    let run: RunInfo = get("/run")?.json().context("/run is not a run's info")?;
    let summary: Summary = get("/summary")?.json().context("/summary")?;
    let from = summary.rounds_closed.saturating_sub(rows as u64);
    let history: Vec<RoundStats> = get(&format!("/api/history?from={from}"))?
        .json()
        .context("/api/history")?;
    let ledger: LedgerView = get("/api/ledger")?.json().context("/api/ledger")?;
    Ok(Snapshot {
        run,
        summary,
        history,
        ledger,
    })
}

fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The snapshot as text (what `tessera status` prints).
fn render(s: &Snapshot, rows: usize) -> String {
    let mut out = String::new();
    let sum = &s.summary;
    let spec = &s.run.spec;
    let phase = if sum.finished {
        "finished".to_string()
    } else if let Some(r) = sum.open_round {
        format!("training round {r}")
    } else {
        "forming (waiting for nodes)".to_string()
    };
    out += &format!(
        "run {} · {phase} · {}/{} rounds closed · {} member(s) · {} ({} parameters)\n",
        sum.run_id, sum.rounds_closed, spec.rounds, sum.members, spec.preset, sum.params
    );
    if let Some(why) = &sum.read_only {
        out += &format!("READ-ONLY: {why}\n");
    }
    match (
        sum.final_eval,
        s.history.iter().rev().find(|r| r.val_bpb.is_some()),
    ) {
        (Some(e), _) => out += &format!("validation: {:.4} bits per byte (final)\n", e.bpb),
        (None, Some(r)) => {
            out += &format!(
                "validation: {:.4} bits per byte (after round {})\n",
                r.val_bpb.unwrap_or(f64::NAN),
                r.round
            )
        }
        _ => {}
    }
    out += &format!(
        "\n{:>6} {:>8} {:>8} {:>5} {:>7} {:>7} {:>9} {:>8}\n",
        "round", "secs", "accepted", "late", "refused", "dropped", "node loss", "val bpb"
    );
    let start = s.history.len().saturating_sub(rows);
    for (i, r) in s.history.iter().enumerate().skip(start) {
        let began = r
            .started_ms
            .or_else(|| i.checked_sub(1).map(|p| s.history[p].closed_ms));
        let secs = began.map(|b| r.closed_ms.saturating_sub(b) as f64 / 1000.0);
        out += &format!(
            "{:>6} {:>8} {:>8} {:>5} {:>7} {:>7} {:>9} {:>8}\n",
            r.round,
            opt(secs, 1),
            r.accepted,
            r.late,
            r.refused,
            r.dropped,
            opt(r.loss_mean, 3),
            opt(r.val_bpb, 4)
        );
    }
    out += &format!(
        "\n{:<14} {:<8} {:>10} {:>6} {:>4} {:>6} {:>10} {:>10} {:>6} {:>10}  verification\n",
        "node", "status", "tokens", "rounds", "late", "util", "sent", "received", "score", "earned"
    );
    let mut ids: Vec<_> = sum
        .work
        .keys()
        .chain(sum.nodes.keys())
        .chain(sum.verification.keys())
        .copied()
        .collect();
    ids.sort();
    ids.dedup();
    let mut moved = Vec::new();
    for id in ids {
        let w = sum.work.get(&id).copied().unwrap_or_default();
        let st = sum.nodes.get(&id);
        let v = sum.verification.get(&id);
        let ejected = v.is_some_and(|v| v.ejected);
        let status = if ejected {
            "ejected"
        } else if w.member && sum.finished {
            "finished"
        } else if w.member {
            "training"
        } else {
            "left"
        };
        if let Some(st) = st {
            moved.push((st.bytes_sent + st.bytes_received) as f64);
        }
        let mut flags = Vec::new();
        if let Some(v) = v {
            if v.refused > 0 {
                flags.push(format!("{} refused", v.refused));
            }
            if v.audits_passed > 0 {
                flags.push(format!("{} audit(s) passed", v.audits_passed));
            }
            if v.audits_failed > 0 {
                flags.push(format!("{} audit(s) FAILED", v.audits_failed));
            }
            if ejected {
                flags.push(match s.ledger.slashed_nodes.get(&id.to_hex()) {
                    Some(t) => format!("EJECTED, pay forfeited, {t} staked tokens slashed"),
                    None => "EJECTED, pay forfeited".into(),
                });
            }
        }
        out += &format!(
            "{:<14} {:<8} {:>10} {:>6} {:>4} {:>6} {:>10} {:>10} {:>6} {:>10}  {}\n",
            id.short(12),
            status,
            w.tokens,
            w.rounds_accepted,
            w.rounds_late,
            st.filter(|s| s.wall_seconds > 0.0)
                .map_or("–".into(), |s| format!(
                    "{:.0}%",
                    100.0 * s.train_seconds / s.wall_seconds
                )),
            st.map_or("–".into(), |s| bytes(s.bytes_sent as f64)),
            st.map_or("–".into(), |s| bytes(s.bytes_received as f64)),
            v.map_or("–".into(), |v| format!(
                "{:.3}",
                f64::from(v.score_ppm_mean) / 1e6
            )),
            s.ledger
                .earned
                .get(&id.to_hex())
                .map_or("–".to_string(), |e| e.clone()),
            if flags.is_empty() {
                if v.is_some() {
                    "clean".into()
                } else {
                    "–".to_string()
                }
            } else {
                flags.join(", ")
            }
        );
    }
    if !moved.is_empty() {
        let mean = moved.iter().sum::<f64>() / moved.len() as f64;
        let ddp = sum.ddp_bytes_per_node as f64;
        out += &format!(
            "\ndata moved: {} per node; DDP would have moved {}{}\n",
            bytes(mean),
            bytes(ddp),
            if mean > 0.0 {
                format!(" ({:.0}× more)", ddp / mean)
            } else {
                String::new()
            }
        );
    }
    let l = &s.ledger;
    if l.enabled {
        out += &format!(
            "ledger: pool {} · paid {} over {} round(s) · reward {} per round · slashed {} · treasury {} · root {}\n",
            l.pool,
            l.paid_total,
            l.paid.len(),
            l.reward_per_round,
            l.slashed,
            l.treasury,
            &l.root[..l.root.len().min(16)]
        );
    } else {
        out += "ledger: none (this run pays nobody)\n";
    }
    out
}

pub fn run(args: StatusArgs) -> Result<()> {
    tessera_net::install_tls_provider();
    let hub = args.hub.trim_end_matches('/').to_string();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    if !args.watch {
        let s = fetch(&http, &hub, args.rounds)?;
        print!("{}", render(&s, args.rounds));
        return Ok(());
    }
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    loop {
        let text = match fetch(&http, &hub, args.rounds) {
            Ok(s) => render(&s, args.rounds),
            Err(e) => format!("{e:#}; retrying\n"),
        };
        if tty {
            // Clear the screen and home the cursor.
            print!("\x1b[2J\x1b[H");
        }
        print!("{text}");
        if !tty {
            println!();
        }
        std::thread::sleep(Duration::from_secs(args.every.max(1)));
    }
}
