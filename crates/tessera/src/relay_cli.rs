//! `tessera relay`: a run's relay (iroh's relay server) and certificates for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tessera_blobs::{RelayServer, RelayServerOptions, RelayTls};
use tessera_hub::config::RelayEntry;

#[derive(Subcommand)]
pub enum RelayCommand {
    /// Runs one of the run file's `[[relays]]` until stopped, printing its traffic as
    /// a JSON line every `--stats-every` seconds.
    Serve(ServeArgs),
    /// Writes a certificate for a relay without a domain name: `relay-ca.pem` (the
    /// run file's `ca_cert`, what nodes trust), `relay-cert.pem` and `relay-key.pem`
    /// (the relay's `tls_cert` and `tls_key`). The CA's key is never written.
    Cert(CertArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// The run file (`tessera hub --config` takes the same one).
    #[arg(long)]
    config: PathBuf,
    /// Which `[[relays]]` entry to serve, by its position (from 0).
    #[arg(long, default_value_t = 0)]
    index: usize,
    #[arg(long, default_value_t = 10.0)]
    stats_every: f64,
}

#[derive(Args)]
pub struct CertArgs {
    /// A name or IP address the relay is reached at (repeat for several).
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// Directory for the three files (created; existing files are not overwritten).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: RelayCommand) -> Result<()> {
    match cmd {
        RelayCommand::Serve(args) => serve(args),
        RelayCommand::Cert(args) => cert(args),
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    const PEM_BYTES_MAX: u64 = 1 << 20;
    let meta =
        std::fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if meta.len() > PEM_BYTES_MAX {
        bail!(
            "{what} {} is {} bytes, more than {PEM_BYTES_MAX}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// The server options of one `[[relays]]` entry.
pub fn server_options(entry: &RelayEntry) -> Result<RelayServerOptions> {
    let tls = match (&entry.tls_cert, &entry.tls_key) {
        (Some(cert), Some(key)) => Some(RelayTls {
            https_bind: entry.https_bind,
            cert_chain_pem: read_pem(cert, "the relay's `tls_cert`")?,
            key_pem: read_pem(key, "the relay's `tls_key`")?,
        }),
        (None, None) => None,
        _ => bail!("relay {}: `tls_cert` and `tls_key` go together", entry.url),
    };
    if tls.is_none() && entry.url.starts_with("https://") {
        bail!(
            "relay {} is https but has no `tls_cert`/`tls_key` (make them with \
             `tessera relay cert --host HOST --out DIR`)",
            entry.url
        );
    }
    Ok(RelayServerOptions {
        http_bind: entry.http_bind,
        tls,
        quic_bind: entry.quic_bind,
        client_rx_bytes_per_second: entry.client_rx_bytes_per_second,
    })
}

fn serve(args: ServeArgs) -> Result<()> {
    let config = tessera_hub::HubConfig::load(&args.config)?;
    let relays = &config.deployment.relays;
    let Some(entry) = relays.get(args.index) else {
        bail!(
            "{} has {} `[[relays]]` entries; there is no --index {}",
            args.config.display(),
            relays.len(),
            args.index
        );
    };
    if !(args.stats_every > 0.0 && args.stats_every.is_finite()) {
        bail!("--stats-every must be positive, got {}", args.stats_every);
    }
    tessera_net::install_tls_provider();
    let server = RelayServer::spawn(server_options(entry)?)
        .with_context(|| format!("starting relay {}", entry.url))?;
    eprintln!(
        "relay {}: http {:?}, https {:?}, quic {:?}",
        entry.url,
        server.http_addr(),
        server.https_addr(),
        server.quic_addr()
    );
    loop {
        std::thread::sleep(Duration::from_secs_f64(args.stats_every));
        println!("{}", serde_json::to_string(&server.stats())?);
    }
}

fn cert(args: CertArgs) -> Result<()> {
    let (ca, leaf, key) = tessera_blobs::self_signed(&args.hosts)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let files = [
        ("relay-ca.pem", ca, 0o644),
        ("relay-cert.pem", leaf, 0o644),
        ("relay-key.pem", key, 0o600),
    ];
    for (name, _, _) in &files {
        let p = args.out.join(name);
        if p.exists() {
            bail!("{} exists; not overwriting it", p.display());
        }
    }
    for (name, text, mode) in files {
        let p = args.out.join(name);
        write_new(&p, text.as_bytes(), mode)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
