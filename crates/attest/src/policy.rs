//! What a run accepts: which TEEs, which measured builds, which TCB statuses, no debug
//! guests, how old the collateral may be, and (for tests and local demos only) which
//! test roots. Written in TOML, in the run file's `[tee.policy]` or a file of its own.
//!
//! ```toml
//! types = ["tdx", "snp"]
//! tdx_mrtd = ["<96 hex chars>"]                 # allow-listed TD firmware measurements
//! tdx_rtmr = [["*", "<96 hex>", "<96 hex>", "*"]]  # RTMR0-3, "*" matches any; RTMR1, RTMR2 required
//! snp_measurement = ["<96 hex chars>"]
//! tcb_status = ["UpToDate", "SWHardeningNeeded"]
//! snp_min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # required with snp
//! allow_debug = false
//! max_collateral_age_secs = 2592000             # 30 days
//! test_roots = []                               # blake3 hex of a test root; never in production
//! ```

use crate::evidence::TeeKind;
use crate::verify::{Measurements, Refusal, SnpTcb, Verdict};
use serde::{Deserialize, Serialize};

/// TCB statuses accepted when a policy does not list its own: the platform is patched,
/// possibly needing configuration or software hardening that Intel documents in the
/// advisories. `OutOfDate*` and `Revoked` are refused.
pub const DEFAULT_TCB_STATUSES: &[&str] = &[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
];

/// Every TCB status dcap-qvl reports (and SNP's `VcekMatches`).
const KNOWN_STATUSES: &[&str] = &[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Which TEEs are accepted.
    #[serde(default = "all_tees")]
    pub types: Vec<TeeKind>,
    /// Allow-listed MRTDs (hex, 48 bytes). Required when `types` holds tdx.
    #[serde(default)]
    pub tdx_mrtd: Vec<String>,
    /// Allow-listed RTMR sets: four hex values or `*`; each set names RTMR1 and RTMR2.
    /// Required when `types` holds tdx.
    #[serde(default)]
    pub tdx_rtmr: Vec<[String; 4]>,
    /// Allow-listed SNP launch measurements (hex, 48 bytes). Required when `types`
    /// holds snp.
    #[serde(default)]
    pub snp_measurement: Vec<String>,
    /// Accepted TDX TCB statuses.
    #[serde(default = "default_statuses")]
    pub tcb_status: Vec<String>,
    /// The lowest SNP TCB accepted (and the VCEK must be issued for the reported TCB).
    /// Required when `types` holds snp.
    #[serde(default)]
    pub snp_min_tcb: Option<SnpTcb>,
    /// Debuggable guests keep nothing confidential: refused unless this is true.
    #[serde(default)]
    pub allow_debug: bool,
    /// The oldest collateral accepted, by its issue date (TDX).
    #[serde(default = "default_age")]
    pub max_collateral_age_secs: u64,
    /// Test roots (blake3 hex of the root's DER) whose quotes are accepted. Only tests
    /// and local demos name one; a production policy leaves this empty.
    #[serde(default)]
    pub test_roots: Vec<String>,
}

fn all_tees() -> Vec<TeeKind> {
    vec![TeeKind::Tdx, TeeKind::Snp]
}

fn default_statuses() -> Vec<String> {
    DEFAULT_TCB_STATUSES.iter().map(|s| s.to_string()).collect()
}

fn default_age() -> u64 {
    30 * 24 * 3600
}

/// Why a policy is not one Tessera can apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attestation policy: {0}")]
pub struct PolicyError(pub String);

fn check_hex(field: &str, v: &str, bytes: usize) -> Result<(), PolicyError> {
    match hex::decode(v) {
        Ok(b) if b.len() == bytes => Ok(()),
        _ => Err(PolicyError(format!(
            "`{field}` entry `{v}` is not {bytes} bytes of hex"
        ))),
    }
}

impl Policy {
    /// Parses TOML and checks the result ([`Policy::validate`]).
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Every value is well-formed, and every allowed TEE has a measurement allow-list:
    /// a policy that would admit any build is refused here, not discovered later.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.types.is_empty() {
            return Err(PolicyError("`types` is empty: no TEE could attest".into()));
        }
        for m in &self.tdx_mrtd {
            check_hex("tdx_mrtd", m, 48)?;
        }
        for set in &self.tdx_rtmr {
            for r in set {
                if r != "*" {
                    check_hex("tdx_rtmr", r, 48)?;
                }
            }
        }
        for m in &self.snp_measurement {
            check_hex("snp_measurement", m, 48)?;
        }
        for r in &self.test_roots {
            check_hex("test_roots", r, 32)?;
            if r.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(PolicyError(format!(
                    "`test_roots` entry `{r}` is not lowercase hex"
                )));
            }
        }
        if self.types.contains(&TeeKind::Tdx) && self.tdx_mrtd.is_empty() {
            return Err(PolicyError(
                "`types` allows tdx but `tdx_mrtd` lists no measurement".into(),
            ));
        }
        // MRTD measures only the TD firmware, which every TD on that firmware shares:
        // the kernel, initrd and command line (RTMR1, RTMR2) must be pinned too.
        if self.types.contains(&TeeKind::Tdx)
            && (self.tdx_rtmr.is_empty()
                || self
                    .tdx_rtmr
                    .iter()
                    .any(|set| set[1] == "*" || set[2] == "*"))
        {
            return Err(PolicyError(
                "`types` allows tdx: `tdx_rtmr` must list at least one set, each naming RTMR1 and RTMR2 \
                 (kernel, initrd and command line); MRTD alone admits any software on that firmware"
                    .into(),
            ));
        }
        if self.types.contains(&TeeKind::Snp) && self.snp_measurement.is_empty() {
            return Err(PolicyError(
                "`types` allows snp but `snp_measurement` lists no measurement".into(),
            ));
        }
        if self.types.contains(&TeeKind::Snp) && self.snp_min_tcb.is_none() {
            return Err(PolicyError(
                "`types` allows snp but `snp_min_tcb` sets no TCB floor".into(),
            ));
        }
        if let Some(s) = self
            .tcb_status
            .iter()
            .find(|s| !KNOWN_STATUSES.contains(&s.as_str()))
        {
            return Err(PolicyError(format!(
                "`tcb_status` entry `{s}` is not a TCB status (one of {KNOWN_STATUSES:?})"
            )));
        }
        Ok(())
    }

    /// The test roots' names as verdicts carry them (`test:<hex>`).
    pub fn test_root_names(&self) -> Vec<String> {
        self.test_roots
            .iter()
            .map(|r| format!("test:{r}"))
            .collect()
    }

    /// Applies every rule to a verified quote, the first failure named.
    pub fn check(&self, v: &Verdict, at: u64) -> Result<(), Refusal> {
        if !self.types.contains(&v.tee) {
            return Err(Refusal::TeeNotAllowed {
                tee: v.tee,
                allowed: self.types.iter().map(|t| t.to_string()).collect(),
            });
        }
        if v.root.starts_with("test:") && !self.test_root_names().contains(&v.root) {
            return Err(Refusal::UnknownRoot(format!(
                "{} is a test root this policy does not name",
                v.root
            )));
        }
        if v.debug && !self.allow_debug {
            return Err(Refusal::Debug);
        }
        match &v.measurements {
            Measurements::Tdx { mr_td, rtmr, .. } => {
                if !self.tcb_status.contains(&v.tcb_status) {
                    return Err(Refusal::TcbStatus {
                        status: v.tcb_status.clone(),
                        allowed: self.tcb_status.clone(),
                    });
                }
                if !self.tdx_mrtd.iter().any(|m| m.eq_ignore_ascii_case(mr_td)) {
                    return Err(Refusal::Measurement {
                        rule: "tdx_mrtd",
                        value: mr_td.clone(),
                    });
                }
                let rtmr_ok = self.tdx_rtmr.iter().any(|set| {
                    set.iter()
                        .zip(rtmr)
                        .all(|(want, got)| want == "*" || want.eq_ignore_ascii_case(got))
                });
                if !rtmr_ok {
                    return Err(Refusal::Measurement {
                        rule: "tdx_rtmr",
                        value: rtmr.join(","),
                    });
                }
                if let Some(issued) = v.collateral_issued {
                    let age = at.saturating_sub(issued);
                    if age > self.max_collateral_age_secs {
                        return Err(Refusal::CollateralAge {
                            age_secs: age,
                            max_secs: self.max_collateral_age_secs,
                        });
                    }
                }
            }
            Measurements::Snp {
                measurement,
                reported_tcb,
                vmpl,
                ..
            } => {
                // A report requested from a less privileged level (a guest OS under a
                // paravisor) does not speak for the whole VM.
                if *vmpl != 0 {
                    return Err(Refusal::Measurement {
                        rule: "snp_vmpl",
                        value: vmpl.to_string(),
                    });
                }
                if v.tcb_status != "VcekMatches" {
                    return Err(Refusal::TcbStatus {
                        status: v.tcb_status.clone(),
                        allowed: vec!["VcekMatches".into()],
                    });
                }
                if let Some(min) = self.snp_min_tcb {
                    let r = reported_tcb;
                    if r.bootloader < min.bootloader
                        || r.tee < min.tee
                        || r.snp < min.snp
                        || r.microcode < min.microcode
                    {
                        return Err(Refusal::SnpTcb { reported: *r, min });
                    }
                }
                if !self
                    .snp_measurement
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(measurement))
                {
                    return Err(Refusal::Measurement {
                        rule: "snp_measurement",
                        value: measurement.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The roots to hand the verifier: production roots and the test roots named here.
    pub fn roots(&self) -> crate::verify::Roots {
        crate::verify::Roots {
            test_roots: self.test_roots.iter().map(|r| r.to_lowercase()).collect(),
        }
    }
}

/// The check `tessera attest verify` makes without `--policy`: authenticity and TCB
/// only (any TEE, any measurement, debug reported but not refused), at a TCB status
/// of [`DEFAULT_TCB_STATUSES`] for TDX and a VCEK issued for the reported TCB for SNP.
pub fn check_tcb_only(v: &Verdict) -> Result<(), Refusal> {
    let ok = match v.tee {
        TeeKind::Tdx => DEFAULT_TCB_STATUSES.contains(&v.tcb_status.as_str()),
        TeeKind::Snp => v.tcb_status == "VcekMatches",
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal::TcbStatus {
            status: v.tcb_status.clone(),
            allowed: match v.tee {
                TeeKind::Tdx => default_statuses(),
                TeeKind::Snp => vec!["VcekMatches".into()],
            },
        })
    }
}
