//! Where a node's quotes come from.
//!
//! - [`ConfigfsTsm`]: Linux's configfs-tsm report interface
//!   (`/sys/kernel/config/tsm/report`), which serves both TDX and SEV-SNP guests on
//!   real hardware (Linux 6.7+). Collateral comes from a PCCS (TDX) or the host's
//!   certificate table / AMD's KDS (SNP).
//! - [`TestProvider`]: quotes in Intel's real TDX format, signed by a test PCK chain
//!   generated in memory ([`crate::testpki`]). They pass dcap-qvl's full verification,
//!   but only against the test root: a verifier accepts them only when its policy
//!   names that root's hash (`test_roots`), which no production policy does.

use crate::evidence::{Collateral, Evidence};
use crate::testpki::{TestPki, TestTd};
use std::path::{Path, PathBuf};

/// Produces evidence with the given report_data.
pub trait QuoteProvider: Send + Sync {
    fn evidence(&self, report_data: &[u8; 64]) -> anyhow::Result<Evidence>;
    /// For logs: what this provider is.
    fn describe(&self) -> String;
}

/// The kernel's configfs-tsm report interface.
pub struct ConfigfsTsm {
    /// Normally `/sys/kernel/config/tsm/report`.
    pub root: PathBuf,
    /// Where TDX collateral is fetched (a PCCS, or Intel's PCS).
    pub pccs_url: String,
    /// Where SNP VCEKs are fetched when the host supplies none (AMD's KDS).
    pub kds_url: String,
}

pub const CONFIGFS_TSM_ROOT: &str = "/sys/kernel/config/tsm/report";
pub const INTEL_PCS_URL: &str = "https://api.trustedservices.intel.com";
pub const AMD_KDS_URL: &str = "https://kdsintf.amd.com";

impl ConfigfsTsm {
    pub fn new(root: impl Into<PathBuf>, pccs_url: &str) -> ConfigfsTsm {
        ConfigfsTsm {
            root: root.into(),
            pccs_url: pccs_url.to_string(),
            kds_url: AMD_KDS_URL.to_string(),
        }
    }

    /// Whether this machine offers configfs-tsm at all (and which provider).
    pub fn detect(root: &Path) -> Result<(), String> {
        if !root.is_dir() {
            return Err(format!(
                "{} does not exist: this machine is not a TDX or SEV-SNP guest with configfs-tsm \
                 (Linux 6.7+, `mount -t configfs none /sys/kernel/config`)",
                root.display()
            ));
        }
        Ok(())
    }

    /// One report request: make an entry, write inblob, read outblob (and the
    /// provider, auxblob and generation), remove the entry. The generation counter
    /// detects another writer racing on the same entry.
    pub fn raw_report(&self, report_data: &[u8; 64]) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
        use anyhow::Context;
        Self::detect(&self.root).map_err(anyhow::Error::msg)?;
        let entry = self.root.join(format!(
            "tessera-{}-{}",
            std::process::id(),
            hex::encode(&report_data[..8])
        ));
        std::fs::create_dir(&entry).with_context(|| format!("creating {}", entry.display()))?;
        let result = (|| -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
            let gen_before = read_trim(&entry.join("generation"))?;
            std::fs::write(entry.join("inblob"), report_data).context("writing inblob")?;
            let outblob = std::fs::read(entry.join("outblob")).context("reading outblob")?;
            let provider = read_trim(&entry.join("provider"))?;
            let auxblob = std::fs::read(entry.join("auxblob")).unwrap_or_default();
            let gen_after = read_trim(&entry.join("generation"))?;
            let expected = gen_before.parse::<u64>().unwrap_or(0) + 1;
            if gen_after.parse::<u64>().ok() != Some(expected) {
                anyhow::bail!(
                    "configfs-tsm generation went {gen_before} → {gen_after}: another writer raced this report"
                );
            }
            Ok((provider, outblob, auxblob))
        })();
        let _ = std::fs::remove_dir(&entry);
        result
    }
}

fn read_trim(p: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?
        .trim()
        .to_string())
}

impl QuoteProvider for ConfigfsTsm {
    fn evidence(&self, report_data: &[u8; 64]) -> anyhow::Result<Evidence> {
        let (provider, outblob, auxblob) = self.raw_report(report_data)?;
        match provider.as_str() {
            "tdx_guest" => {
                let collateral = crate::pccs::fetch_tdx_collateral(&self.pccs_url, &outblob)?;
                Ok(Evidence {
                    quote: outblob,
                    collateral: Collateral::Tdx(Box::new(collateral)),
                })
            }
            "sev_guest" => {
                let vcek_der = match crate::pccs::vcek_from_cert_table(&auxblob)? {
                    Some(v) => v,
                    None => crate::pccs::fetch_vcek(&self.kds_url, &outblob)?,
                };
                Ok(Evidence {
                    quote: outblob,
                    collateral: Collateral::Snp { vcek_der },
                })
            }
            other => anyhow::bail!("configfs-tsm provider `{other}` is not tdx_guest or sev_guest"),
        }
    }

    fn describe(&self) -> String {
        format!("configfs-tsm at {}", self.root.display())
    }
}

/// Quotes signed by a test PKI. Never accepted by a policy that does not name its root.
pub struct TestProvider {
    pki: TestPki,
    td: TestTd,
    collateral: dcap_qvl::QuoteCollateralV3,
}

/// The MRTD the test provider reports: what a test policy allow-lists.
pub fn test_mr_td() -> [u8; 48] {
    let mut out = [0u8; 48];
    let mut h = blake3::Hasher::new();
    h.update(b"tessera test TD firmware");
    h.finalize_xof().fill(&mut out);
    out
}

/// The validity window of the test PKI: 2020-01-01 to 2100-01-01.
pub const TEST_PKI_NOT_BEFORE: u64 = 1_577_836_800;
pub const TEST_PKI_NOT_AFTER: u64 = 4_102_444_800;

impl TestProvider {
    /// A provider from a 32-byte seed; collateral issued `issued` and valid for `valid_secs`.
    pub fn new(
        seed: &[u8; 32],
        issued: u64,
        valid_secs: u64,
        debug: bool,
    ) -> anyhow::Result<TestProvider> {
        let pki = TestPki::generate(seed, TEST_PKI_NOT_BEFORE, TEST_PKI_NOT_AFTER)?;
        let collateral = pki.collateral(issued, issued + valid_secs)?;
        let td = TestTd {
            mr_td: test_mr_td(),
            debug,
            ..TestTd::default()
        };
        Ok(TestProvider {
            pki,
            td,
            collateral,
        })
    }

    /// Reads the seed (64 hex characters) from a file, collateral issued now for a day.
    pub fn from_seed_file(path: &Path) -> anyhow::Result<TestProvider> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading test PKI seed {}: {e}", path.display()))?;
        let seed = parse_seed(text.trim())
            .ok_or_else(|| anyhow::anyhow!("{} is not 64 hex characters", path.display()))?;
        let now = now_unix();
        TestProvider::new(&seed, now.saturating_sub(60), 24 * 3600, false)
    }

    /// blake3 hex of the test root's DER: what a policy names in `test_roots`.
    pub fn root_hash(&self) -> String {
        blake3::hash(self.pki.root_der()).to_hex().to_string()
    }

    pub fn mr_td_hex(&self) -> String {
        hex::encode(self.td.mr_td)
    }

    /// The `[tee_policy]` body that accepts this provider's quotes: its MRTD, its
    /// RTMR1 and RTMR2, and its test root. Tests and local demos only.
    pub fn policy_toml(&self) -> String {
        format!(
            "types = [\"tdx\"]\ntdx_mrtd = [\"{}\"]\ntdx_rtmr = [[\"*\", \"{}\", \"{}\", \"*\"]]\ntest_roots = [\"{}\"]\n",
            self.mr_td_hex(),
            hex::encode(self.td.rtmr[1]),
            hex::encode(self.td.rtmr[2]),
            self.root_hash()
        )
    }
}

pub fn parse_seed(text: &str) -> Option<[u8; 32]> {
    let b = hex::decode(text).ok()?;
    b.try_into().ok()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl QuoteProvider for TestProvider {
    fn evidence(&self, report_data: &[u8; 64]) -> anyhow::Result<Evidence> {
        let td = TestTd {
            report_data: *report_data,
            ..self.td.clone()
        };
        Ok(Evidence {
            quote: self.pki.tdx_quote(&td)?,
            collateral: Collateral::Tdx(Box::new(self.collateral.clone())),
        })
    }

    fn describe(&self) -> String {
        format!("test provider (test root {})", &self.root_hash()[..16])
    }
}

/// A provider from its command-line / run-file form: `configfs` (the kernel's
/// configfs-tsm, collateral from `$TESSERA_PCCS_URL` or Intel's PCS), `configfs:URL`
/// (a PCCS at URL), or `test:SEED_FILE` (the test PKI).
pub fn from_spec(spec: &str) -> anyhow::Result<Box<dyn QuoteProvider>> {
    if let Some(path) = spec.strip_prefix("test:") {
        return Ok(Box::new(TestProvider::from_seed_file(Path::new(path))?));
    }
    let pccs = if let Some(url) = spec.strip_prefix("configfs:") {
        url.to_string()
    } else if spec == "configfs" {
        std::env::var("TESSERA_PCCS_URL").unwrap_or_else(|_| INTEL_PCS_URL.to_string())
    } else {
        anyhow::bail!("attestation provider `{spec}` is not `configfs`, `configfs:PCCS_URL` or `test:SEED_FILE`");
    };
    ConfigfsTsm::detect(Path::new(CONFIGFS_TSM_ROOT)).map_err(anyhow::Error::msg)?;
    Ok(Box::new(ConfigfsTsm::new(CONFIGFS_TSM_ROOT, &pccs)))
}
