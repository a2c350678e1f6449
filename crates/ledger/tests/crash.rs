//! Crash consistency: a child process pays rounds in a loop against a SQLite ledger
//! and is killed with SIGKILL at random moments, 100 times. After every kill the
//! ledger must reopen (which replays and cross-checks the journal), verify clean,
//! contain every round the child reported as committed, and hold each round's
//! transfers exactly once. Each child first re-submits the last round it finds paid,
//! as a caller who cannot know whether its last request landed would; that must be a
//! no-op.
//!
//! This file has its own `main` (no test harness) because the same executable is the
//! child: `crash child PATH`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_ledger::state::{LedgerConfig, TransferKind};
use tessera_ledger::{
    Account, Amount, Ledger, Operation, Request, Signer, SqliteStore, Store, Work,
};

const RUN: &str = "run-1";
const CONTRIBUTORS: usize = 20;
const KILLS: usize = 100;
const REWARD: u128 = 1_000_003;

fn payout(round: u64) -> Request {
    let work = (0..CONTRIBUTORS)
        .map(|i| Work {
            contributor: format!("node-{i:02}"),
            tokens: 1000 + (i as u64 * 37 + round) % 500,
            score_ppm: 1_000_000,
        })
        .collect();
    Request {
        id: format!("payout:{RUN}:{round}"),
        signer: Signer::Organiser,
        op: Operation::Payout {
            run: RUN.into(),
            round,
            work,
        },
    }
}

fn child(path: &Path) {
    let mut ledger = Ledger::open(SqliteStore::open(path).expect("open")).expect("replay");
    let last = ledger
        .state()
        .run(RUN)
        .and_then(|r| r.paid.keys().next_back().copied());
    let mut round = last.unwrap_or(0);
    let stdout = std::io::stdout();
    loop {
        ledger.submit(&payout(round), round).expect("payout");
        let mut out = stdout.lock();
        writeln!(out, "paid {round}").unwrap();
        out.flush().unwrap();
        round += 1;
    }
}

fn setup(path: &Path) -> u128 {
    let mut ledger =
        Ledger::open(SqliteStore::init(path, LedgerConfig::default()).unwrap()).unwrap();
    let pool = REWARD * 1_000_000;
    let sale = Request {
        id: "sale-1".into(),
        signer: Signer::Organiser,
        op: Operation::Sale {
            buyer: "funder".into(),
            tokens: Amount(1),
            treasury_tokens: Amount(pool),
            proceeds: "1 USD".into(),
        },
    };
    ledger.submit(&sale, 0).unwrap();
    let fund = Request {
        id: "fund-1".into(),
        signer: Signer::Organiser,
        op: Operation::Fund {
            run: RUN.into(),
            model: "model-a".into(),
            amount: Amount(pool),
            reward_per_round: Amount(REWARD),
        },
    };
    ledger.submit(&fund, 0).unwrap();
    pool
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(Path::new(&args[2]));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let pool = setup(&path);
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut reported = std::collections::BTreeSet::new();
    let mut failures = 0;
    for kill in 0..KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = Command::new(&exe)
            .arg("child")
            .arg(&path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(2_000 + seed % 60_000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            if let Some(r) = line.unwrap().strip_prefix("paid ") {
                reported.insert(r.parse::<u64>().unwrap());
            }
        }
        let ledger = match SqliteStore::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|s| Ledger::open(s).map_err(|e| e.to_string()))
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("kill {kill}: ledger does not reopen: {e}");
                failures += 1;
                break;
            }
        };
        let report = ledger.verify().unwrap();
        let paid = ledger
            .state()
            .run(RUN)
            .map(|r| r.paid.clone())
            .unwrap_or_default();
        let lost: Vec<&u64> = reported.iter().filter(|r| !paid.contains_key(r)).collect();
        let payouts = ledger
            .store()
            .transfers()
            .unwrap()
            .iter()
            .filter(|t| t.kind == TransferKind::Payout)
            .count();
        let paid_out: u128 = (0..CONTRIBUTORS)
            .map(|i| {
                ledger
                    .state()
                    .balance(&Account::Contributor(format!("node-{i:02}")))
                    .unwrap_or(0)
            })
            .sum();
        let in_pool = ledger
            .state()
            .balance(&Account::Pool(RUN.into()))
            .unwrap_or(0);
        let problems = [
            (
                !report.problems.is_empty(),
                format!("verify: {:?}", report.problems),
            ),
            (!lost.is_empty(), format!("committed rounds lost: {lost:?}")),
            (
                payouts != paid.len() * CONTRIBUTORS,
                format!("{payouts} payout transfers for {} rounds", paid.len()),
            ),
            (
                paid_out != paid.len() as u128 * REWARD,
                format!("paid {paid_out} for {} rounds", paid.len()),
            ),
            (
                paid_out + in_pool != pool,
                "tokens created or destroyed".to_string(),
            ),
        ];
        for (bad, what) in problems {
            if bad {
                eprintln!("kill {kill}: {what}");
                failures += 1;
            }
        }
    }
    let rounds = reported.len();
    if failures > 0 || rounds < KILLS {
        eprintln!("crash test failed: {failures} problem(s), {rounds} rounds reported");
        println!("0 passed; 1 failed");
        std::process::exit(1);
    }
    println!("crash test: {KILLS} SIGKILLs, {rounds} committed rounds, none lost or repeated, verify clean");
    println!("1 passed; 0 failed");
}
