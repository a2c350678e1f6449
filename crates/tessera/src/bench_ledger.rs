//! `tessera bench ledger`: durable ledger throughput on this machine's disk. Measures
//! single-transfer requests per second with every commit synced (WAL,
//! `synchronous=FULL`), and the time to pay one round to 1,000 contributors, both
//! durable and in memory (the pure state machine alone).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tessera_ledger::{
    Amount, Ledger, LedgerConfig, MemoryStore, Operation, Request, Signer, SqliteStore, Store, Work,
};

#[derive(Args, Debug)]
pub struct LedgerBenchArgs {
    /// Single-transfer requests to time.
    #[arg(long, default_value_t = 2000)]
    transfers: u64,
    /// Rounds of payouts to time.
    #[arg(long, default_value_t = 50)]
    rounds: u64,
    /// Contributors per payout.
    #[arg(long, default_value_t = 1000)]
    contributors: usize,
    /// Directory for the database (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    durable_transfers_per_second: f64,
    durable_payout_ms: f64,
    durable_payout_transfers_per_second: f64,
    memory_payout_ms: f64,
    contributors: usize,
}

fn organiser(id: String, op: Operation) -> Request {
    Request {
        id,
        signer: Signer::Organiser,
        op,
    }
}

/// Sale, run funding and one stake per contributor, so every later request succeeds.
fn seed<S: Store>(ledger: &mut Ledger<S>) -> Result<()> {
    let big = Amount(1_000_000_000 * tessera_ledger::BASE_UNITS_PER_TOKEN);
    let sale = Operation::Sale {
        buyer: "staker".into(),
        tokens: big,
        treasury_tokens: big,
        proceeds: "bench".into(),
    };
    ledger.submit(&organiser("sale".into(), sale), 0)?;
    let fund = Operation::Fund {
        run: "bench".into(),
        model: "m".into(),
        amount: big,
        reward_per_round: Amount(1_000_000_007),
    };
    ledger.submit(&organiser("fund".into(), fund), 0)?;
    Ok(())
}

fn payout(round: u64, contributors: usize) -> Request {
    let work = (0..contributors)
        .map(|i| Work {
            contributor: format!("node-{i:05}"),
            tokens: 4096 + (i as u64 * 7919 + round) % 4096,
            score_ppm: 1_000_000 - (i as u32 % 7) * 1000,
        })
        .collect();
    organiser(
        format!("payout:bench:{round}"),
        Operation::Payout {
            run: "bench".into(),
            round,
            work,
        },
    )
}

pub fn run(args: LedgerBenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let path = dir.join(format!("bench-{}.db", std::process::id()));
    let mut ledger = Ledger::open(SqliteStore::init(&path, LedgerConfig::default())?)?;
    seed(&mut ledger)?;

    let start = Instant::now();
    for i in 0..args.transfers {
        let op = Operation::Stake {
            run: "bench".into(),
            contributor: "staker".into(),
            amount: Amount(1),
        };
        ledger.submit(
            &Request {
                id: format!("stake-{i}"),
                signer: Signer::Organiser,
                op,
            },
            i,
        )?;
    }
    let durable_transfers_per_second = args.transfers as f64 / start.elapsed().as_secs_f64();

    let requests: Vec<Request> = (0..args.rounds)
        .map(|r| payout(r, args.contributors))
        .collect();
    let start = Instant::now();
    for r in &requests {
        ledger.submit(r, 0)?;
    }
    let durable_payout_ms = start.elapsed().as_secs_f64() * 1e3 / args.rounds as f64;

    let mut memory = Ledger::open(MemoryStore::new(LedgerConfig::default()))?;
    seed(&mut memory)?;
    let start = Instant::now();
    for r in &requests {
        memory.submit(r, 0)?;
    }
    let memory_payout_ms = start.elapsed().as_secs_f64() * 1e3 / args.rounds as f64;
    drop(ledger);
    let _ = std::fs::remove_file(&path);

    let report = Report {
        durable_transfers_per_second,
        durable_payout_ms,
        durable_payout_transfers_per_second: args.contributors as f64 / (durable_payout_ms / 1e3),
        memory_payout_ms,
        contributors: args.contributors,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "single transfers, durable commits: {:>10.0} requests/s",
            report.durable_transfers_per_second
        );
        println!(
            "payout to {} contributors, durable: {:>8.2} ms/round ({:.0} transfers/s)",
            args.contributors, report.durable_payout_ms, report.durable_payout_transfers_per_second
        );
        println!(
            "payout to {} contributors, in memory: {:>6.2} ms/round",
            args.contributors, report.memory_payout_ms
        );
    }
    Ok(())
}
