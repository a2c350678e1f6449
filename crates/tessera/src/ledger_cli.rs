//! `tessera ledger ...`: the token ledger from the command line. Every command opens
//! the SQLite ledger (which replays and cross-checks its journal), does one thing, and
//! prints a line, or JSON with `--json`. Amounts are given in tokens with up to nine
//! decimals; JSON shows base units as strings.

use std::path::PathBuf;
use tessera_net::http_auth::now_ms;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tessera_ledger::state::{LedgerConfig, SlashTo, PPM};
use tessera_ledger::{
    merkle, Account, Amount, Ledger, Operation, Request, Signer, SqliteStore, Store, Work,
};

#[derive(Args)]
pub struct LedgerArgs {
    /// The ledger database.
    #[arg(long, global = true, default_value = "tessera-ledger.db")]
    db: PathBuf,
    /// Request id; re-running a command with the same id is a no-op. Default: a new id.
    #[arg(long, global = true)]
    id: Option<String>,
    /// Who signs: `organiser` or `contributor:ID`.
    #[arg(long = "as", global = true, default_value = "organiser")]
    signer: String,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Create a new ledger database.
    Init {
        /// Unbonding delay in hours.
        #[arg(long, default_value_t = 168.0)]
        unbond_delay_hours: f64,
        /// Where slashed stake goes: `burned` or `treasury`.
        #[arg(long, default_value = "burned")]
        slash_to: String,
    },
    /// Record a token sale: issue tokens to the buyer (and optionally to the treasury).
    Sale {
        #[arg(long)]
        buyer: String,
        #[arg(long)]
        tokens: String,
        #[arg(long, default_value = "0")]
        treasury_tokens: String,
        /// What the buyer paid, e.g. "25000 USD".
        #[arg(long)]
        proceeds: String,
    },
    /// Fund a run's pool from the treasury.
    Fund {
        #[arg(long)]
        run: String,
        #[arg(long)]
        model: String,
        #[arg(long)]
        tokens: String,
        #[arg(long)]
        reward_per_round: String,
    },
    /// Pay a round from a work file: JSON `[{"contributor": ID, "tokens": N, "score_ppm": N}]`.
    Payout {
        #[arg(long)]
        run: String,
        #[arg(long)]
        round: u64,
        #[arg(long)]
        work: PathBuf,
    },
    Stake {
        #[arg(long)]
        run: String,
        #[arg(long)]
        contributor: String,
        #[arg(long)]
        tokens: String,
    },
    /// Start unbonding stake; release it after the delay with `release`.
    Unbond {
        #[arg(long)]
        run: String,
        #[arg(long)]
        contributor: String,
        #[arg(long)]
        tokens: String,
    },
    Release {
        #[arg(long)]
        run: String,
        #[arg(long)]
        contributor: String,
    },
    /// Slash a fraction (0-1) of a contributor's stake for proven cheating.
    Slash {
        #[arg(long)]
        run: String,
        #[arg(long)]
        contributor: String,
        #[arg(long)]
        fraction: f64,
        #[arg(long)]
        reason: String,
    },
    /// Record model revenue paid by `payer`, split by contribution share.
    Revenue {
        #[arg(long)]
        model: String,
        #[arg(long)]
        payer: String,
        #[arg(long)]
        tokens: String,
        /// Fraction (0-1) reinvested into the treasury.
        #[arg(long, default_value_t = 0.2)]
        reinvest: f64,
    },
    /// An account's balance (e.g. `treasury`, `contributor:ID`, `pool:RUN`), from the
    /// database, or with --hub from a hub's ledger API signed with --key (a contributor
    /// reads its own and public accounts; the account defaults to the key's own).
    Balance {
        account: Option<String>,
        /// A hub (or `tessera ledger serve`) URL to ask instead of the database.
        #[arg(long)]
        hub: Option<String>,
        /// The key that signs the request (a node's identity file).
        #[arg(long, requires = "hub")]
        key: Option<PathBuf>,
        /// The server's public key (hex); every reply must be signed by it.
        #[arg(long, requires = "hub")]
        hub_key: Option<String>,
    },
    /// An account's newest transfers.
    History {
        account: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The Merkle root of all balances; `--epoch N` records it as epoch N's root.
    Root {
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// A Merkle proof of one account's balance.
    Prove { account: String },
    /// Serve the ledger's HTTP API (signed requests; see `tessera_net::ledger_api`).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// The run organiser's public key (hex), or a key file written by `tessera keygen`.
        #[arg(long)]
        organiser: String,
    },
    /// Check a proof (JSON from `prove --json`) against a root.
    Verify {
        /// With a proof file: check the proof. Without: re-check the whole ledger.
        #[arg(long)]
        proof: Option<PathBuf>,
        #[arg(long)]
        root: Option<String>,
    },
}

fn tokens(text: &str) -> Result<Amount> {
    Amount::parse_tokens(text).map_err(Into::into)
}

fn ppm(fraction: f64, what: &str) -> Result<u32> {
    if !(0.0..=1.0).contains(&fraction) {
        bail!("{what} must be between 0 and 1, got {fraction}");
    }
    Ok((fraction * PPM as f64).round() as u32)
}

fn signer(text: &str) -> Result<Signer> {
    match text {
        "organiser" | "organizer" => Ok(Signer::Organiser),
        other => match other.strip_prefix("contributor:") {
            Some(id) => {
                tessera_ledger::account::check_id(id)?;
                Ok(Signer::Contributor(id.to_string()))
            }
            None => bail!("--as must be `organiser` or `contributor:ID`, got `{other}`"),
        },
    }
}

fn print(json: bool, value: serde_json::Value, line: String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{line}");
    }
    Ok(())
}

fn open(args: &LedgerArgs) -> Result<Ledger<SqliteStore>> {
    let store = SqliteStore::open(&args.db)?;
    Ledger::open(store).with_context(|| format!("opening ledger {}", args.db.display()))
}

pub fn run(args: LedgerArgs) -> Result<()> {
    let op = match &args.command {
        LedgerCommand::Init {
            unbond_delay_hours,
            slash_to,
        } => {
            if !(*unbond_delay_hours >= 0.0 && unbond_delay_hours.is_finite()) {
                bail!("--unbond-delay-hours must be a non-negative number");
            }
            let slash_to = match slash_to.as_str() {
                "burned" => SlashTo::Burned,
                "treasury" => SlashTo::Treasury,
                other => bail!("--slash-to must be `burned` or `treasury`, got `{other}`"),
            };
            let config = LedgerConfig {
                unbond_delay_ms: (unbond_delay_hours * 3_600_000.0) as u64,
                slash_to,
            };
            SqliteStore::init(&args.db, config)?;
            return print(
                args.json,
                serde_json::json!({"db": args.db, "config": config}),
                format!("created ledger {}", args.db.display()),
            );
        }
        LedgerCommand::Sale {
            buyer,
            tokens: t,
            treasury_tokens,
            proceeds,
        } => Operation::Sale {
            buyer: buyer.clone(),
            tokens: tokens(t)?,
            treasury_tokens: tokens(treasury_tokens)?,
            proceeds: proceeds.clone(),
        },
        LedgerCommand::Fund {
            run,
            model,
            tokens: t,
            reward_per_round,
        } => Operation::Fund {
            run: run.clone(),
            model: model.clone(),
            amount: tokens(t)?,
            reward_per_round: tokens(reward_per_round)?,
        },
        LedgerCommand::Payout { run, round, work } => {
            let text = std::fs::read_to_string(work)
                .with_context(|| format!("reading {}", work.display()))?;
            let work: Vec<Work> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected [{{\"contributor\", \"tokens\", \"score_ppm\"}}]",
                    work.display()
                )
            })?;
            Operation::Payout {
                run: run.clone(),
                round: *round,
                work,
            }
        }
        LedgerCommand::Stake {
            run,
            contributor,
            tokens: t,
        } => Operation::Stake {
            run: run.clone(),
            contributor: contributor.clone(),
            amount: tokens(t)?,
        },
        LedgerCommand::Unbond {
            run,
            contributor,
            tokens: t,
        } => Operation::Unbond {
            run: run.clone(),
            contributor: contributor.clone(),
            amount: tokens(t)?,
        },
        LedgerCommand::Release { run, contributor } => Operation::Release {
            run: run.clone(),
            contributor: contributor.clone(),
        },
        LedgerCommand::Slash {
            run,
            contributor,
            fraction,
            reason,
        } => Operation::Slash {
            run: run.clone(),
            contributor: contributor.clone(),
            fraction_ppm: ppm(*fraction, "--fraction")?,
            reason: reason.clone(),
        },
        LedgerCommand::Revenue {
            model,
            payer,
            tokens: t,
            reinvest,
        } => Operation::Revenue {
            model: model.clone(),
            payer: payer.clone(),
            amount: tokens(t)?,
            reinvest_ppm: ppm(*reinvest, "--reinvest")?,
        },
        LedgerCommand::Root { epoch: Some(epoch) } => Operation::CloseEpoch { epoch: *epoch },
        LedgerCommand::Root { epoch: None } => {
            let ledger = open(&args)?;
            let root = ledger.state().root();
            return print(
                args.json,
                serde_json::json!({"root": root, "epochs": ledger.state().epochs()}),
                root,
            );
        }
        LedgerCommand::Balance {
            account,
            hub: Some(hub),
            key,
            hub_key,
        } => {
            let key = key
                .as_ref()
                .context("--hub needs --key: the identity file that signs the request")?;
            let id = tessera_protocol::Identity::load(key)
                .with_context(|| format!("reading the key {}", key.display()))?;
            let account: Account = match account {
                Some(a) => a.parse()?,
                None => Account::Contributor(id.public_hex()),
            };
            let pin = hub_key
                .as_deref()
                .map(tessera_protocol::NodeId::from_hex)
                .transpose()
                .context("--hub-key: 64 hex digits")?;
            tessera_net::install_tls_provider();
            let client = tessera_net::LedgerClient::pinned(hub, id, pin);
            let reply = tokio::runtime::Runtime::new()?
                .block_on(client.balance(&account))
                .map_err(|e| anyhow::anyhow!("{hub}: {e}"))?;
            let text = Amount::parse_base_units(&reply.base_units)
                .map_or(reply.base_units.clone(), |a| a.tokens_string());
            return print(
                args.json,
                serde_json::json!({"account": account, "base_units": reply.base_units, "tokens": text}),
                format!("{account}: {text} tokens"),
            );
        }
        LedgerCommand::Balance { account, .. } => {
            let account: Account = account
                .as_deref()
                .context("name the account (or give --hub and --key for your own)")?
                .parse()?;
            let ledger = open(&args)?;
            let (units, text) = match account {
                Account::Issuance => (
                    format!("-{}", ledger.state().issued()),
                    format!("-{}", Amount(ledger.state().issued()).tokens_string()),
                ),
                ref a => {
                    let b = ledger
                        .state()
                        .balance(a)
                        .with_context(|| format!("unknown account `{a}`"))?;
                    (b.to_string(), Amount(b).tokens_string())
                }
            };
            return print(
                args.json,
                serde_json::json!({"account": account, "base_units": units, "tokens": text}),
                format!("{account}: {text} tokens"),
            );
        }
        LedgerCommand::History { account, limit } => {
            let account: Account = account.parse()?;
            let ledger = open(&args)?;
            if let Signer::Contributor(c) = signer(&args.signer)? {
                // A contributor sees only its own accounts' history.
                let own = matches!(&account, Account::Contributor(x) | Account::Stake { contributor: x, .. } | Account::Unbonding { contributor: x, .. } if *x == c);
                if !own {
                    bail!("contributor:{c} may only read its own history, not {account}");
                }
            }
            let history = ledger.store().history(&account, *limit)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                for t in &history {
                    let sign = if t.credit == account { "+" } else { "-" };
                    println!(
                        "{:<32} {:?} {sign}{} {} -> {}",
                        t.id,
                        t.kind,
                        Amount(t.amount.0).tokens_string(),
                        t.debit,
                        t.credit
                    );
                }
            }
            return Ok(());
        }
        LedgerCommand::Prove { account } => {
            let account: Account = account.parse()?;
            let ledger = open(&args)?;
            let proof = ledger.state().prove(&account)?;
            let root = ledger.state().root();
            return print(
                args.json,
                serde_json::json!({"root": root, "proof": proof}),
                format!(
                    "{account} = {} base units under root {root} ({} steps)",
                    proof.balance,
                    proof.steps.len()
                ),
            );
        }
        LedgerCommand::Serve { listen, organiser } => return serve(&args, listen, organiser),
        LedgerCommand::Verify {
            proof: Some(path),
            root,
        } => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            let proof: merkle::Proof =
                serde_json::from_value(value.get("proof").cloned().unwrap_or(value.clone()))
                    .with_context(|| format!("{}: not a proof", path.display()))?;
            let root = root
                .clone()
                .or_else(|| value.get("root").and_then(|r| r.as_str()).map(String::from));
            let Some(root) = root else {
                bail!("give --root or a proof file that carries one")
            };
            let ok = merkle::verify(&root, &proof);
            print(
                args.json,
                serde_json::json!({"valid": ok}),
                format!("proof {}", if ok { "valid" } else { "INVALID" }),
            )?;
            if !ok {
                bail!("the proof does not match root {root}");
            }
            return Ok(());
        }
        LedgerCommand::Verify { proof: None, .. } => {
            let ledger = open(&args)?;
            let report = ledger.verify()?;
            let clean = report.problems.is_empty();
            print(
                args.json,
                serde_json::to_value(&report)?,
                format!(
                    "{}: {} requests, {} transfers, {} accounts, supply {} tokens, root {}",
                    if clean { "clean" } else { "PROBLEMS" },
                    report.requests,
                    report.transfers,
                    report.accounts,
                    Amount(report.supply.parse().unwrap_or(0)).tokens_string(),
                    report.root
                ),
            )?;
            if !clean {
                bail!("ledger verification failed: {}", report.problems.join("; "));
            }
            return Ok(());
        }
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{}-{}", now_ms(), std::process::id()));
    let request = Request {
        id,
        signer: signer(&args.signer)?,
        op,
    };
    let mut ledger = open(&args)?;
    let receipt = ledger.submit(&request, now_ms())?;
    let mut line = format!(
        "request {}: {} transfer(s)",
        receipt.request,
        receipt.transfers.len()
    );
    for t in &receipt.transfers {
        line.push_str(&format!(
            "\n  {} {} -> {}",
            Amount(t.amount.0).tokens_string(),
            t.debit,
            t.credit
        ));
    }
    if let Some(root) = &receipt.root {
        line.push_str(&format!("\n  root {root}"));
    }
    print(args.json, serde_json::to_value(&receipt)?, line)
}

/// Serves the ledger over HTTP until interrupted.
fn serve(args: &LedgerArgs, listen: &str, organiser: &str) -> Result<()> {
    let organiser = match tessera_protocol::identity::parse_public(organiser) {
        Ok(key) => key,
        Err(_) => tessera_protocol::Identity::load(std::path::Path::new(organiser))
            .with_context(|| {
                format!("--organiser `{organiser}` is neither a public key nor a key file")
            })?
            .public_hex(),
    };
    let ledger = open(args)?;
    // The server's own key signs every reply; it lives next to the database.
    let key_path = args.db.with_extension("server.key");
    let (key, _) = tessera_protocol::Identity::load_or_create(&key_path)
        .with_context(|| format!("the ledger server's key {}", key_path.display()))?;
    let auth = std::sync::Arc::new(tessera_net::ServerAuth::new(key, "ledger")?);
    eprintln!("ledger server key {}", auth.audience().server);
    let svc = std::sync::Arc::new(tessera_net::LedgerService::new(
        ledger,
        organiser.clone(),
        auth.clone(),
    ));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        eprintln!(
            "ledger API on http://{} (organiser {organiser})",
            listener.local_addr()?
        );
        let router = tessera_net::with_signed_replies(tessera_net::ledger_router(svc), auth);
        axum::serve(listener, router).await?;
        Ok(())
    })
}
