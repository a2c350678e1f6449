//! `run.toml`: what a run organiser writes to start a hub. Two kinds of keys: where the
//! hub runs (`data`, `state_dir`, `listen`, `blob_bind`, `ledger`, `organiser`,
//! `tls_cert`, `tls_key`, `attest`, `tee_policy`, `relays`) and the
//! run's settings, which are the keys of [`RunSpec`] with its defaults (the measured
//! best; see `tessera_protocol::spec`). Only `run_id`, `data` and `state_dir` are
//! required; an unknown key is an error that names it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tessera_protocol::RunSpec;

/// Where and how the hub runs, beside the run's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// A data set prepared by `tessera data prepare`.
    pub data: PathBuf,
    /// Where the hub keeps its database, blobs and checkpoints.
    pub state_dir: PathBuf,
    #[serde(default = "d_listen")]
    pub listen: String,
    /// UDP address of the hub's blob endpoint (iroh). Loopback by default; a public
    /// run binds a reachable address, e.g. `0.0.0.0:7001`.
    #[serde(default = "d_blob_bind")]
    pub blob_bind: std::net::SocketAddr,
    /// A ledger (from `tessera ledger init`) whose run pool `run_id` pays every closed
    /// round; fund the run with `tessera ledger fund --run RUN_ID` first.
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// The run organiser's public key (hex): the key allowed to sell, fund and record
    /// revenue through the hub's `/ledger/` API.
    #[serde(default)]
    pub organiser: Option<String>,
    /// A PEM certificate chain: with `tls_key`, the hub serves HTTPS (see
    /// `tessera_net::tls` for when that is needed).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// How the hub attests for a sealed data set's keys: `configfs` (inside a TDX or
    /// SEV-SNP guest) or `test:SEED_FILE` (the test PKI; only a key server whose policy
    /// names that test root accepts it).
    #[serde(default)]
    pub attest: Option<String>,
    /// The attestation policy of a private run (`[tee_policy]`, see
    /// `tessera_attest::policy`): what the run's key server accepts
    /// (`tessera keys serve --config run.toml`).
    #[serde(default)]
    pub tee_policy: Option<toml::Table>,
    /// The run's relays (`[[relays]]`): the hub advertises them in its run info, and
    /// every endpoint of the run (hub, nodes, validators) uses them to reach peers
    /// behind NATs. `tessera relay serve --config run.toml` runs one.
    #[serde(default)]
    pub relays: Vec<RelayEntry>,
    /// The dashboard's validation curve: after every `eval_every`-th round's outer
    /// step the hub measures θ's bits per byte on the first `eval_tokens` tokens of the
    /// validation set, on a thread of its own (0 in either turns it off). It costs a
    /// forward pass over those tokens per evaluated round.
    #[serde(default = "d_eval_every")]
    pub eval_every: u64,
    #[serde(default = "d_eval_tokens")]
    pub eval_tokens: usize,
}

/// One `[[relays]]` entry: what nodes are told (`url`, `quic_port`, `ca_cert`), and
/// how `tessera relay serve` runs it (the `*_bind` keys, `tls_cert`, `tls_key`,
/// `client_rx_bytes_per_second`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayEntry {
    /// What peers dial: `https://HOST:PORT`, HOST a name the certificate is for, or an
    /// IP address for a certificate from `tessera relay cert`.
    pub url: String,
    /// UDP port of the relay's QUIC address discovery (`quic_bind`'s port when the
    /// relay is reached at the same port); none turns discovery off, and with it hole
    /// punching for nodes behind NATs.
    #[serde(default)]
    pub quic_port: Option<u16>,
    /// A PEM certificate nodes trust for this relay (the CA `tessera relay cert`
    /// writes); absent, the relay needs a certificate from a public CA.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Plain HTTP (captive-portal probes).
    #[serde(default = "d_relay_http")]
    pub http_bind: std::net::SocketAddr,
    /// HTTPS: the relay protocol.
    #[serde(default = "d_relay_https")]
    pub https_bind: std::net::SocketAddr,
    /// UDP: QUIC address discovery; none serves no discovery.
    #[serde(default)]
    pub quic_bind: Option<std::net::SocketAddr>,
    /// The relay's certificate chain and key (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Most bytes per second the relay reads from one client.
    #[serde(default)]
    pub client_rx_bytes_per_second: Option<u32>,
}

fn d_relay_http() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 3340))
}
fn d_relay_https() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 3341))
}

impl RelayEntry {
    /// What nodes are told of this relay, with its CA certificate read.
    pub fn info(&self) -> Result<tessera_protocol::RelayInfo> {
        let cert_pem = match &self.ca_cert {
            Some(p) => {
                let meta = std::fs::metadata(p).with_context(|| {
                    format!("relay {}: reading `ca_cert` {}", self.url, p.display())
                })?;
                if meta.len() > tessera_protocol::limits::RELAY_CERT_PEM_BYTES_MAX as u64 {
                    bail!(
                        "relay {}: `ca_cert` {} is {} bytes, more than {}",
                        self.url,
                        p.display(),
                        meta.len(),
                        tessera_protocol::limits::RELAY_CERT_PEM_BYTES_MAX
                    );
                }
                Some(std::fs::read_to_string(p).with_context(|| {
                    format!("relay {}: reading `ca_cert` {}", self.url, p.display())
                })?)
            }
            None => None,
        };
        self.checked(cert_pem)
    }

    /// What nodes are told, with `cert_pem`, checked as a node checks it.
    fn checked(&self, cert_pem: Option<String>) -> Result<tessera_protocol::RelayInfo> {
        let info = tessera_protocol::RelayInfo {
            url: self.url.clone(),
            quic_port: self.quic_port,
            cert_pem,
        };
        info.check()
            .map_err(|e| anyhow::anyhow!("`[[relays]]` entry: {e}"))?;
        Ok(info)
    }
}

impl Deployment {
    /// The run's attestation policy, checked.
    pub fn policy(&self) -> Result<Option<tessera_attest::Policy>> {
        self.tee_policy
            .as_ref()
            .map(|t| {
                let text = toml::to_string(t)?;
                Ok(tessera_attest::Policy::from_toml(&text)?)
            })
            .transpose()
    }
}

fn d_eval_every() -> u64 {
    1
}
fn d_eval_tokens() -> usize {
    8192
}
fn d_listen() -> String {
    "127.0.0.1:7000".into()
}
fn d_blob_bind() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

const DEPLOYMENT_KEYS: &[&str] = &[
    "data",
    "state_dir",
    "listen",
    "blob_bind",
    "ledger",
    "organiser",
    "tls_cert",
    "tls_key",
    "attest",
    "tee_policy",
    "relays",
];

/// A hub's whole configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub deployment: Deployment,
    pub spec: RunSpec,
}

impl HubConfig {
    pub fn load(path: &Path) -> Result<HubConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        HubConfig::parse(&text).with_context(|| format!("{}: bad run config", path.display()))
    }

    pub fn parse(text: &str) -> Result<HubConfig> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut deployment = toml::Table::new();
        for key in DEPLOYMENT_KEYS {
            if let Some(v) = table.remove(*key) {
                deployment.insert((*key).to_string(), v);
            }
        }
        if !table.contains_key("run_id") {
            bail!("missing `run_id`");
        }
        let deployment: Deployment = toml::Value::Table(deployment).try_into()?;
        deployment.policy()?;
        // A sealed data set implies a private run: members must attest.
        if deployment
            .data
            .join(tessera_seal::SEALED_MANIFEST_FILE)
            .exists()
        {
            match table.get("tee").and_then(|v| v.as_str()) {
                None => {
                    table.insert("tee".into(), toml::Value::String("required".into()));
                }
                Some("required") => {}
                Some(other) => bail!(
                    "`data` is a sealed data set, so `tee` must be \"required\", not \"{other}\""
                ),
            }
        }
        if deployment.tls_cert.is_some() != deployment.tls_key.is_some() {
            bail!("`tls_cert` and `tls_key` go together: give both to serve HTTPS, or neither");
        }
        if deployment.relays.len() > tessera_protocol::limits::RELAYS_MAX {
            bail!(
                "`relays`: {} entries, more than {}",
                deployment.relays.len(),
                tessera_protocol::limits::RELAYS_MAX
            );
        }
        for r in &deployment.relays {
            r.checked(None)?;
            if r.tls_cert.is_some() != r.tls_key.is_some() {
                bail!("relay {}: `tls_cert` and `tls_key` go together", r.url);
            }
        }
        let spec: RunSpec = toml::Value::Table(table).try_into()?;
        spec.validate()?;
        Ok(HubConfig { deployment, spec })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_run_gets_the_measured_defaults() {
        let c = HubConfig::parse("run_id = \"r\"\ndata = \"d\"\nstate_dir = \"s\"\n").unwrap();
        assert_eq!(
            c.spec,
            RunSpec {
                run_id: "r".into(),
                ..RunSpec::default()
            }
        );
        assert_eq!(c.spec.inner_steps, 5);
        assert_eq!(c.spec.effective_outer_lr(), 2.5);
        assert_eq!(c.deployment.listen, "127.0.0.1:7000");
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let base = "run_id = \"r\"\ndata = \"d\"\nstate_dir = \"s\"\n";
        for (extra, named) in [
            ("colour = 1\n", "colour"),
            ("codec = \"zip\"\n", "zip"),
            ("aggregator = \"max\"\n", "max"),
            ("inner_steps = 0\n", "inner_steps"),
            ("tls_cert = \"c.pem\"\n", "tls_key"),
            ("[[relays]]\nurl = \"ftp://r\"\n", "not http"),
            ("[[relays]]\nurl = \"https://r\"\ncolour = 1\n", "colour"),
        ] {
            let e = format!(
                "{:#}",
                HubConfig::parse(&format!("{base}{extra}")).unwrap_err()
            );
            assert!(e.contains(named), "{extra}: {e}");
        }
        let e = format!(
            "{:#}",
            HubConfig::parse("run_id = \"r\"\ndata = \"d\"\n").unwrap_err()
        );
        assert!(e.contains("state_dir"), "{e}");
    }

    /// Hardening #17: a run id that the ledger's id rules refuse made every payout
    /// fail, logged only. Such ids are refused when the run file is read, and every id
    /// a run accepts is a valid ledger id.
    #[test]
    fn run_ids_are_valid_ledger_ids() {
        let file = |id: &str| format!("run_id = {id:?}\ndata = \"d\"\nstate_dir = \"s\"\n");
        for bad in ["pool:x", "a b", "", "../x", &"x".repeat(65)] {
            let e = format!("{:#}", HubConfig::parse(&file(bad)).unwrap_err());
            assert!(e.contains("run_id"), "{bad:?}: {e}");
        }
        for good in ["r", "shakespeare-1", "Run_2.b", &"x".repeat(64)] {
            HubConfig::parse(&file(good)).unwrap();
            tessera_ledger::account::check_id(good).unwrap();
        }
    }
}

#[cfg(test)]
mod private_run_tests {
    use super::*;

    fn run_file(data: &Path, extra: &str) -> String {
        format!(
            "run_id = \"p\"\ndata = {data:?}\nstate_dir = \"s\"\nkey_server = \"http://127.0.0.1:7100\"\n{extra}"
        )
    }

    #[test]
    fn sealed_data_makes_a_run_private_and_bad_policies_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(tessera_seal::SEALED_MANIFEST_FILE), "{}").unwrap();
        let c = HubConfig::parse(&run_file(dir.path(), "")).unwrap();
        assert_eq!(c.spec.tee, tessera_protocol::TeeMode::Required);
        let e = HubConfig::parse(&run_file(dir.path(), "tee = \"off\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("sealed"), "{e:#}");
        // A policy that would admit any build is refused when the file is read.
        let e = HubConfig::parse(&run_file(dir.path(), "[tee_policy]\ntypes = [\"tdx\"]\n"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("tdx_mrtd"), "{e:#}");
        let z = "00".repeat(48);
        let good = format!(
            "[tee_policy]\ntypes = [\"tdx\"]\ntdx_mrtd = [\"{z}\"]\ntdx_rtmr = [[\"*\", \"{z}\", \"{z}\", \"*\"]]\n"
        );
        let c = HubConfig::parse(&run_file(dir.path(), &good)).unwrap();
        assert_eq!(c.deployment.policy().unwrap().unwrap().tdx_mrtd.len(), 1);
        // Required without a key server is refused by name.
        let e = HubConfig::parse(
            "run_id = \"p\"\ndata = \"d\"\nstate_dir = \"s\"\ntee = \"required\"\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("key_server"), "{e:#}");
    }
}
