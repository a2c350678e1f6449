//! `tessera attest ...` and `tessera keys ...`: TEE evidence checked offline, the test
//! PKI for local private runs, and the data owner's key server.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tessera_attest::{Collateral, Evidence, Policy, TeeKind};

#[derive(Subcommand)]
pub enum AttestCommand {
    /// Verify a TDX quote or an SEV-SNP attestation report offline, at a given time.
    /// Exit 0 when valid, 1 when refused (the reason names the rule).
    Verify {
        /// The quote or report: raw bytes, or hex text.
        #[arg(long)]
        quote: PathBuf,
        /// TDX: dcap-qvl's collateral JSON. SNP: the chip's VCEK certificate (PEM or DER).
        #[arg(long)]
        collateral: PathBuf,
        /// The time the collateral must be valid at: ISO 8601 (2025-06-20T00:00:00Z)
        /// or unix seconds.
        #[arg(long)]
        at: String,
        /// A policy (TOML, see `tessera_attest::policy`; a run file's `[tee_policy]`
        /// works too). Without one: authenticity and TCB status only.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// `tdx` or `snp`; by default read from the quote's header.
        #[arg(long)]
        tee: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask this machine's quote provider for a quote (to check a TDX or SEV-SNP guest
    /// and read its measurements for a run's policy); writes the quote and its
    /// collateral, which `attest verify` checks.
    Quote {
        /// `configfs`, `configfs:PCCS_URL` or `test:SEED_FILE`.
        #[arg(long)]
        attest: String,
        /// 64 bytes of report_data (hex); zeros by default.
        #[arg(long)]
        report_data: Option<String>,
        /// Where the quote goes (raw bytes).
        #[arg(long)]
        out: PathBuf,
        /// Where its collateral goes (JSON for TDX, the VCEK's DER for SNP).
        #[arg(long)]
        collateral_out: PathBuf,
    },
    /// Write a new test PKI seed (a secret of tests and local demos) and print the
    /// policy that accepts its quotes. Never name a test root in a production policy.
    TestPki {
        /// Where the seed goes (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Serve a sealed data set's keys: each release needs a fresh quote that passes
    /// the run's policy and binds the node key, an HPKE key, the run and a nonce.
    Serve {
        /// The keys file from `tessera data seal`.
        #[arg(long)]
        keys: PathBuf,
        /// The run file: its `run_id` and `[tee_policy]`.
        #[arg(long, conflicts_with_all = ["policy", "run"])]
        config: Option<PathBuf>,
        /// A policy file (instead of `--config`).
        #[arg(long, requires = "run")]
        policy: Option<PathBuf>,
        /// The run id (with `--policy`).
        #[arg(long)]
        run: Option<String>,
        /// The release journal (SQLite; created if missing).
        #[arg(long, default_value = "keys-journal.db")]
        journal: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: String,
    },
    /// Print the release journal: who got which item, for which quote, when.
    Journal {
        #[arg(long, default_value = "keys-journal.db")]
        journal: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `--at`: unix seconds, or ISO 8601 / RFC 3339 (a bare date is midnight UTC).
pub fn parse_time(text: &str) -> Result<u64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().context("--at: unix seconds out of range");
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return u64::try_from(t.timestamp()).context("--at: before 1970");
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let t = d
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp();
        return u64::try_from(t).context("--at: before 1970");
    }
    bail!("--at `{text}` is neither unix seconds nor ISO 8601 (e.g. 2025-06-20T00:00:00Z)")
}

/// Reads a file of at most `max` bytes, checking its size before reading it.
fn read_bounded(path: &Path, max: usize, what: &str) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > max as u64 {
        bail!(
            "{} is {len} bytes, larger than any {what} ({max})",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads a quote file: raw bytes, or hex text (with optional whitespace).
pub fn read_quote(path: &Path) -> Result<Vec<u8>> {
    // Hex text takes twice the bytes, plus whitespace.
    let bytes = read_bounded(path, 4 * tessera_attest::evidence::QUOTE_MAX_BYTES, "quote")?;
    let text: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !text.is_empty() && text.iter().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(&text).with_context(|| format!("{} is odd-length hex", path.display()));
    }
    Ok(bytes)
}

/// A policy from a file: a policy TOML, or a run file's `[tee_policy]` table.
pub fn read_policy(path: &Path) -> Result<Policy> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
    let policy = match table.get("tee_policy") {
        Some(toml::Value::Table(t)) => Policy::from_toml(&toml::to_string(t)?),
        _ => Policy::from_toml(&text),
    };
    policy.with_context(|| format!("{}", path.display()))
}

pub fn attest(c: AttestCommand) -> Result<()> {
    match c {
        AttestCommand::Verify {
            quote,
            collateral,
            at,
            policy,
            tee,
            json,
        } => verify(
            &quote,
            &collateral,
            &at,
            policy.as_deref(),
            tee.as_deref(),
            json,
        ),
        AttestCommand::TestPki { out } => test_pki(&out),
        AttestCommand::Quote {
            attest,
            report_data,
            out,
            collateral_out,
        } => {
            let mut rd = [0u8; 64];
            if let Some(h) = report_data {
                let b = hex::decode(&h).context("--report-data is not hex")?;
                if b.len() != 64 {
                    bail!("--report-data is {} bytes, not 64", b.len());
                }
                rd.copy_from_slice(&b);
            }
            let provider = tessera_attest::provider::from_spec(&attest)?;
            let e = provider.evidence(&rd)?;
            std::fs::write(&out, &e.quote).with_context(|| format!("writing {}", out.display()))?;
            let c = match &e.collateral {
                Collateral::Tdx(c) => serde_json::to_vec_pretty(c)?,
                Collateral::Snp { vcek_der } => vcek_der.clone(),
            };
            std::fs::write(&collateral_out, c)
                .with_context(|| format!("writing {}", collateral_out.display()))?;
            println!(
                "{} quote from {}: {} ({} bytes), collateral {}",
                e.tee(),
                provider.describe(),
                out.display(),
                e.quote.len(),
                collateral_out.display()
            );
            Ok(())
        }
    }
}

fn verify(
    quote: &Path,
    collateral: &Path,
    at: &str,
    policy: Option<&Path>,
    tee: Option<&str>,
    json: bool,
) -> Result<()> {
    let at = parse_time(at)?;
    let quote = read_quote(quote)?;
    let tee = match tee {
        Some(t) => TeeKind::parse(t).map_err(anyhow::Error::msg)?,
        None => TeeKind::sniff(&quote).ok_or_else(|| {
            anyhow::anyhow!("the quote is neither a TDX quote (v4/v5) nor an SNP report (1184 bytes); give --tee")
        })?,
    };
    let cbytes = read_bounded(
        collateral,
        tessera_attest::evidence::COLLATERAL_MAX_BYTES,
        "collateral",
    )?;
    let collateral = Collateral::from_file_bytes(tee, &cbytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", collateral.display()))?;
    let evidence = Evidence { quote, collateral };
    let policy = policy.map(read_policy).transpose()?;
    let roots = policy.as_ref().map(|p| p.roots()).unwrap_or_default();
    let result = tessera_attest::verify::verify(&evidence, at, &roots).and_then(|v| {
        match &policy {
            Some(p) => p.check(&v, at)?,
            None => tessera_attest::policy::check_tcb_only(&v)?,
        }
        Ok(v)
    });
    if json {
        let out = match &result {
            Ok(v) => serde_json::json!({"valid": true, "at": at, "verdict": v}),
            Err(r) => serde_json::json!({
                "valid": false, "at": at,
                "refusal": {"rule": r.rule(), "message": r.to_string()}
            }),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match &result {
            Ok(v) => {
                println!(
                    "valid: {} evidence, root {}, TCB {}",
                    v.tee, v.root, v.tcb_status
                );
                if !v.advisories.is_empty() {
                    println!("  advisories: {}", v.advisories.join(", "));
                }
                println!("  debug: {}", if v.debug { "yes" } else { "no" });
                match &v.measurements {
                    tessera_attest::verify::Measurements::Tdx { mr_td, rtmr, .. } => {
                        println!("  mr_td: {mr_td}");
                        for (i, r) in rtmr.iter().enumerate() {
                            println!("  rtmr{i}: {r}");
                        }
                    }
                    tessera_attest::verify::Measurements::Snp {
                        measurement,
                        reported_tcb,
                        ..
                    } => {
                        println!("  measurement: {measurement}");
                        println!("  reported TCB: {reported_tcb:?}");
                    }
                }
                println!("  report_data: {}", v.report_data);
                println!(
                    "  checked at {at} against {}",
                    if policy.is_some() {
                        "the policy"
                    } else {
                        "authenticity and TCB only"
                    }
                );
            }
            Err(r) => println!("refused ({}): {r}", r.rule()),
        }
    }
    if result.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

fn test_pki(out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} exists; refusing to overwrite it", out.display());
    }
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    write_secret(out, hex::encode(seed).as_bytes())?;
    let provider = tessera_attest::provider::TestProvider::from_seed_file(out)?;
    println!(
        "# A policy that accepts quotes from test PKI {} (tests and local demos only)",
        out.display()
    );
    println!("{}", provider.policy_toml());
    Ok(())
}

/// Writes a secret file with mode 0600, refusing to overwrite.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub fn keys(c: KeysCommand) -> Result<()> {
    match c {
        KeysCommand::Serve {
            keys,
            config,
            policy,
            run,
            journal,
            listen,
        } => {
            let sealed_keys = tessera_seal::SealKeys::parse(
                &std::fs::read_to_string(&keys)
                    .with_context(|| format!("reading {}", keys.display()))?,
            )
            .with_context(|| format!("{}", keys.display()))?;
            let (run_id, policy) = match (config, policy, run) {
                (Some(c), _, _) => {
                    let table: toml::Table = toml::from_str(
                        &std::fs::read_to_string(&c)
                            .with_context(|| format!("reading {}", c.display()))?,
                    )?;
                    let run = table
                        .get("run_id")
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| anyhow::anyhow!("{}: no `run_id`", c.display()))?
                        .to_string();
                    if table.get("tee_policy").is_none() {
                        bail!(
                            "{}: no `[tee_policy]` table: a key server needs a policy",
                            c.display()
                        );
                    }
                    (run, read_policy(&c)?)
                }
                (None, Some(p), Some(r)) => (r, read_policy(&p)?),
                _ => bail!("give --config RUN_FILE, or --policy FILE with --run RUN_ID"),
            };
            if !policy.test_roots.is_empty() {
                eprintln!(
                    "keys: WARNING: the policy accepts test roots {:?}: quotes from a test PKI \
                     pass; never do this with real private data",
                    policy.test_roots
                );
            }
            let n = sealed_keys.len();
            let server = Arc::new(tessera_keyserver::KeyServer::new(
                run_id.clone(),
                policy,
                sealed_keys,
                &journal,
            )?);
            eprintln!(
                "keys: {n} item keys of run `{run_id}`, journal {}",
                journal.display()
            );
            tokio::runtime::Runtime::new()?.block_on(tessera_keyserver::serve(server, &listen))
        }
        KeysCommand::Journal { journal, json } => {
            if !journal.exists() {
                bail!("{} does not exist", journal.display());
            }
            let entries = tessera_keyserver::Journal::open(&journal)?.entries()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    let what = e
                        .item
                        .map(|i| format!("item {i}"))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{} run {} node {} {} {} quote {} {}",
                        e.at,
                        e.run_id,
                        e.node_key,
                        what,
                        e.outcome,
                        &e.quote_hash[..16.min(e.quote_hash.len())],
                        e.message
                    );
                }
                println!("{} entries", entries.len());
            }
            Ok(())
        }
    }
}
