//! TEE evidence for Tessera: who may receive a private data set's keys.
//!
//! - [`verify`]: a TDX quote (dcap-qvl, against Intel's SGX root) or an SEV-SNP report
//!   (`sev`, against AMD's built-in ARK/ASK), with its collateral, checked offline at a
//!   given time → a typed [`Verdict`] (TEE, measurements, TCB status, advisories,
//!   debug flag, report_data).
//! - [`policy`]: what a run accepts; a refusal names the rule that failed.
//! - [`binding`]: report_data = SHA-512 over a tag, the node key, an ephemeral HPKE
//!   key, a key-server nonce and the run id.
//! - [`provider`]: where quotes come from (configfs-tsm on real guests, or a test PKI).
//! - [`pccs`]: collateral from a PCCS / AMD KDS.
//! - [`testpki`]: a test Intel DCAP PKI and TDX quote generator.

pub mod binding;
pub mod evidence;
pub mod pccs;
pub mod policy;
pub mod provider;
pub mod testpki;
pub mod verify;

pub use evidence::{Collateral, Evidence, TeeKind};
pub use policy::Policy;
pub use verify::{Refusal, Roots, Verdict};

/// Verifies evidence and applies a policy, then checks the binding: the one call a key
/// server makes.
pub fn appraise(
    evidence: &Evidence,
    at: u64,
    policy: &Policy,
    expected_report_data: &[u8; 64],
) -> Result<Verdict, Refusal> {
    let verdict = verify::verify(evidence, at, &policy.roots())?;
    policy.check(&verdict, at)?;
    if &verdict.report_data_bytes() != expected_report_data {
        return Err(Refusal::ReportData);
    }
    Ok(verdict)
}
