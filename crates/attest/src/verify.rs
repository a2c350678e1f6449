//! Checking a quote's authenticity: TDX through dcap-qvl against Intel's SGX root (or a
//! test root a policy names), SEV-SNP through `sev` against AMD's built-in ARK/ASK.
//! The result is a typed [`Verdict`]; what a run accepts is [`crate::policy`]'s call.

use crate::evidence::{Collateral, Evidence, TeeKind, QUOTE_MAX_BYTES};
use serde::{Deserialize, Serialize};

/// Zero bytes allowed after a TDX quote's end (quote buffers come padded).
pub const PADDING_MAX: usize = 1024;

/// An SEV-SNP attestation report is exactly this long.
pub const SNP_REPORT_BYTES: usize = 1184;
/// The signed part of an SNP report: bytes 0..0x2A0; the signature follows.
pub const SNP_SIGNED_BYTES: usize = 0x2A0;

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub tee: TeeKind,
    /// blake3 of the quote bytes.
    pub quote_hash: String,
    /// The root the signatures chain to: `intel-sgx-root`, `amd-milan`, `amd-genoa`,
    /// `amd-turin`, or `test:<blake3 of the root DER>`.
    pub root: String,
    /// TDX: dcap-qvl's TCB status (`UpToDate`, `SWHardeningNeeded`, `OutOfDate`, ...).
    /// SNP: `VcekMatches` when the report's reported TCB is the VCEK's (AMD's KDS
    /// issues one VCEK per chip and TCB).
    pub tcb_status: String,
    pub advisories: Vec<String>,
    /// A debuggable TD (TD_ATTRIBUTES.DEBUG) or guest (policy DEBUG_ALLOWED): its
    /// memory is readable by the host, so it keeps nothing confidential.
    pub debug: bool,
    /// The 64 bytes the guest put into the quote (hex).
    pub report_data: String,
    pub measurements: Measurements,
    /// The oldest issue date among the collateral (TDX), unix seconds.
    pub collateral_issued: Option<u64>,
    /// When the first piece of collateral expires (TDX), unix seconds.
    pub collateral_expires: Option<u64>,
}

impl Verdict {
    pub fn report_data_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        if let Ok(b) = hex::decode(&self.report_data) {
            if b.len() == 64 {
                out.copy_from_slice(&b);
            }
        }
        out
    }
}

/// The measured identity of the guest (all hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "tee")]
pub enum Measurements {
    Tdx {
        /// The initial TD contents (firmware), 48 bytes.
        mr_td: String,
        /// Runtime measurement registers 0-3 (RTMR3 is where an app's hash is extended).
        rtmr: [String; 4],
        mr_config_id: String,
        mr_owner: String,
        mr_owner_config: String,
        mr_seam: String,
        tee_tcb_svn: String,
    },
    Snp {
        /// The launch measurement, 48 bytes.
        measurement: String,
        host_data: String,
        id_key_digest: String,
        /// The guest policy word.
        policy: u64,
        vmpl: u32,
        reported_tcb: SnpTcb,
        chip_id: String,
    },
}

/// An SNP TCB version (security patch levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpTcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

/// Why evidence was refused. Every variant names the rule that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed evidence: {0}")]
    Malformed(String),
    #[error("the quote's signatures or certificates do not verify: {0}")]
    Signature(String),
    #[error("the certificate chain ends in a root this verifier does not trust ({0})")]
    UnknownRoot(String),
    #[error("collateral is not valid at {at}: {reason}")]
    CollateralTime { at: u64, reason: String },
    #[error("policy `tee`: {tee} is not among the allowed TEEs {allowed:?}")]
    TeeNotAllowed { tee: TeeKind, allowed: Vec<String> },
    #[error("policy `tcb_status`: TCB status {status} is not among {allowed:?}")]
    TcbStatus {
        status: String,
        allowed: Vec<String>,
    },
    #[error("policy `allow_debug`: the guest is debuggable (its memory is readable by the host)")]
    Debug,
    #[error("policy `{rule}`: {value} is not allow-listed")]
    Measurement { rule: &'static str, value: String },
    #[error("policy `snp_min_tcb`: reported TCB {reported:?} is below {min:?}")]
    SnpTcb { reported: SnpTcb, min: SnpTcb },
    #[error("policy `max_collateral_age_secs`: collateral issued {age_secs} s ago, more than {max_secs} s")]
    CollateralAge { age_secs: u64, max_secs: u64 },
    #[error("binding: report_data is not the hash of this node key, HPKE key, run and nonce")]
    ReportData,
}

impl Refusal {
    /// A short, stable name for the rule (journals and metrics).
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Signature(_) => "signature",
            Refusal::UnknownRoot(_) => "root",
            Refusal::CollateralTime { .. } => "collateral_time",
            Refusal::TeeNotAllowed { .. } => "tee",
            Refusal::TcbStatus { .. } => "tcb_status",
            Refusal::Debug => "allow_debug",
            Refusal::Measurement { rule, .. } => rule,
            Refusal::SnpTcb { .. } => "snp_min_tcb",
            Refusal::CollateralAge { .. } => "max_collateral_age_secs",
            Refusal::ReportData => "report_data",
        }
    }
}

/// The roots a verifier trusts: always Intel's SGX root and AMD's ARKs; test roots
/// only when a policy names them, by hash.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    /// blake3 (hex) of the DER of test roots (from [`crate::testpki`]). A quote whose
    /// PCK chain ends in a certificate with one of these hashes is verified against it.
    pub test_roots: Vec<String>,
}

impl Roots {
    pub fn production() -> Roots {
        Roots::default()
    }

    pub fn with_test_root(mut self, blake3_hex: String) -> Roots {
        self.test_roots.push(blake3_hex);
        self
    }
}

/// The name of a test root: `test:` and the blake3 of its DER.
pub fn test_root_name(der: &[u8]) -> String {
    format!("test:{}", blake3::hash(der).to_hex())
}

/// Checks evidence's signatures, chain and collateral at `at` (unix seconds). Policy
/// (which measurements, TCB statuses, debug) is applied afterwards by
/// [`crate::policy::Policy::check`]; debug guests verify here and are flagged.
pub fn verify(evidence: &Evidence, at: u64, roots: &Roots) -> Result<Verdict, Refusal> {
    if evidence.quote.len() > QUOTE_MAX_BYTES {
        return Err(Refusal::Malformed(format!(
            "quote is {} bytes, more than the {QUOTE_MAX_BYTES} accepted",
            evidence.quote.len()
        )));
    }
    match &evidence.collateral {
        Collateral::Tdx(c) => verify_tdx(&evidence.quote, c, at, roots),
        Collateral::Snp { vcek_der } => verify_snp(&evidence.quote, vcek_der, at),
    }
}

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

fn verify_tdx(
    quote: &[u8],
    collateral: &dcap_qvl::QuoteCollateralV3,
    at: u64,
    roots: &Roots,
) -> Result<Verdict, Refusal> {
    use scale::Decode;
    let mut rest = quote;
    let parsed = dcap_qvl::quote::Quote::decode(&mut rest)
        .map_err(|e| Refusal::Malformed(format!("not a DCAP quote: {e}")))?;
    check_tdx_layout(quote, parsed.signed_length())?;
    if parsed.header.tee_type != 0x81 {
        return Err(Refusal::Malformed(format!(
            "TEE type {:#x} is not TDX",
            parsed.header.tee_type
        )));
    }
    // Which root the embedded PCK chain ends in decides which root verifies it: Intel's,
    // or a test root the caller was told to trust. Anything else is refused by name.
    let chain = dcap_qvl::intel::extract_cert_chain(&parsed)
        .map_err(|e| Refusal::Malformed(format!("PCK certificate chain: {e}")))?;
    let last = chain
        .last()
        .ok_or_else(|| Refusal::Malformed("empty PCK certificate chain".into()))?;
    let intel_root = dcap_qvl::verify::QuoteVerifier::new_prod();
    let (verifier, root_name) = if last.as_slice() == INTEL_ROOT_DER {
        (intel_root, "intel-sgx-root".to_string())
    } else if roots
        .test_roots
        .contains(&blake3::hash(last).to_hex().to_string())
    {
        (
            dcap_qvl::verify::QuoteVerifier::new(last.clone()),
            test_root_name(last),
        )
    } else {
        return Err(Refusal::UnknownRoot(format!(
            "PCK chain root {}",
            test_root_name(last)
        )));
    };
    // A quote that embeds its PCK chain is verified against that chain, never against
    // one the collateral carries instead: otherwise the embedded chain's bytes would
    // be unchecked.
    let mut collateral = collateral.clone();
    if parsed.raw_cert_chain().is_ok() {
        collateral.pck_certificate_chain = None;
    }
    // Debug TDs are verified and flagged; the policy refuses them by name.
    let verifier = verifier.allow_debug(true);
    let claims = verifier
        .verify_with_policy(
            quote,
            collateral.clone(),
            at,
            &dcap_qvl::QuotePolicy::claims_only(at),
        )
        .map_err(|e| classify_dcap_error(&e, at))?;
    let td = claims
        .report
        .as_td10()
        .ok_or_else(|| Refusal::Malformed("not a TD report".into()))?;
    let (td_attributes, m, report_data) = (td.td_attributes, tdx_measurements(td), td.report_data);
    Ok(Verdict {
        tee: TeeKind::Tdx,
        quote_hash: blake3::hash(quote).to_hex().to_string(),
        root: root_name,
        tcb_status: claims.tcb.status.to_string(),
        advisories: claims.tcb.advisory_ids.clone(),
        debug: td_attributes[0] & 0x01 != 0,
        report_data: hexs(&report_data),
        measurements: m,
        collateral_issued: Some(issued_tdx(&collateral, at)?),
        collateral_expires: Some(claims.earliest_expiration_date),
    })
}

/// When the TCB info and QE identity were issued (the older of the two): how old the
/// collateral is. (Certificates' notBefore dates are years old by design; they do not
/// count.)
fn issued_tdx(c: &dcap_qvl::QuoteCollateralV3, at: u64) -> Result<u64, Refusal> {
    let issue = |json: &str, what: &str| -> Result<u64, Refusal> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Refusal::Malformed(format!("{what} is not JSON: {e}")))?;
        let text = v["issueDate"]
            .as_str()
            .ok_or_else(|| Refusal::Malformed(format!("{what} has no issueDate")))?;
        let t = chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|e| Refusal::Malformed(format!("{what} issueDate `{text}`: {e}")))?;
        u64::try_from(t.timestamp()).map_err(|_| Refusal::CollateralTime {
            at,
            reason: format!("{what} issued before 1970"),
        })
    };
    Ok(issue(&c.tcb_info, "TCB info")?.min(issue(&c.qe_identity, "QE identity")?))
}

/// One canonical encoding of a TDX quote, so that no byte of it goes unchecked:
/// dcap-qvl verifies the signatures, the QE report and the PCK certificates' DER, but
/// not the framing around them (length fields, the certification data types, PEM
/// line breaks). Checked here: the auth data length covers exactly the ECDSA
/// signature, attestation key and certification data (type 6, QE report); that holds
/// exactly the QE report, its signature, the QE auth data and the PCK chain (type 5);
/// the chain is the canonical PEM of its certificates; and only zero padding follows.
fn check_tdx_layout(q: &[u8], signed: usize) -> Result<(), Refusal> {
    let bad = |what: &str| Refusal::Malformed(format!("non-canonical quote: {what}"));
    let u16_at = |o: usize| -> Result<usize, Refusal> {
        q.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| bad("truncated"))
    };
    let u32_at = |o: usize| -> Result<usize, Refusal> {
        q.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("truncated"))
    };
    let auth_len = u32_at(signed)?;
    let a = signed + 4;
    if u16_at(a + 128)? != 6 {
        return Err(bad("certification data is not type 6 (QE report)"));
    }
    let cert_len = u32_at(a + 130)?;
    if auth_len != 128 + 6 + cert_len {
        return Err(bad("the auth data length does not match its contents"));
    }
    let b = a + 134;
    let qe_auth_len = u16_at(b + 448)?;
    let c = b + 450 + qe_auth_len;
    if u16_at(c)? != 5 {
        return Err(bad("the QE certification data is not type 5 (PCK chain)"));
    }
    let chain_len = u32_at(c + 2)?;
    if cert_len != 450 + qe_auth_len + 6 + chain_len {
        return Err(bad(
            "the certification data length does not match its contents",
        ));
    }
    let d = c + 6;
    let end = d + chain_len;
    let chain = q.get(d..end).ok_or_else(|| bad("truncated"))?;
    // Quote buffers come zero-padded (the shipped samples carry 70 zero bytes): up to
    // PADDING_MAX zero bytes are allowed, anything else after the quote is not.
    if q.len() - end > PADDING_MAX || q[end..].iter().any(|&b| b != 0) {
        return Err(bad("bytes after the end of the quote are not zero padding"));
    }
    let ders = pem_blocks(chain).ok_or_else(|| bad("the PCK chain is not PEM"))?;
    let mut canonical = String::new();
    for der in &ders {
        canonical.push_str(
            &der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
                .map_err(|_| bad("PEM"))?,
        );
    }
    // The chain may end in NULs inside its declared length (a C string).
    let text_end = chain.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if &chain[..text_end] != canonical.as_bytes() {
        return Err(bad("the PCK chain is not in canonical PEM"));
    }
    Ok(())
}

/// The DER of each `CERTIFICATE` block of a PEM text.
fn pem_blocks(text: &[u8]) -> Option<Vec<Vec<u8>>> {
    let text = std::str::from_utf8(text).ok()?.trim_end_matches('\0');
    let mut out = Vec::new();
    let mut rest = text;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(i) = rest.find(BEGIN) {
        let j = rest[i..].find(END)? + i + END.len();
        let (_, der) = der::pem::decode_vec(&rest.as_bytes()[i..j]).ok()?;
        out.push(der);
        rest = &rest[j..];
    }
    (!out.is_empty()).then_some(out)
}

/// dcap-qvl reports failures as text; time failures get their own variant so the
/// refusal says the collateral, not the quote, is the problem.
fn classify_dcap_error(e: &anyhow::Error, at: u64) -> Refusal {
    let text = format!("{e:#}");
    let lower = text.to_lowercase();
    if lower.contains("expired")
        || lower.contains("in the future")
        || lower.contains("not yet valid")
        || lower.contains("notvalidforname")
        || lower.contains("certexpired")
        || lower.contains("certnotvalidyet")
    {
        Refusal::CollateralTime { at, reason: text }
    } else {
        Refusal::Signature(text)
    }
}

fn tdx_measurements(r: &dcap_qvl::quote::TDReport10) -> Measurements {
    Measurements::Tdx {
        mr_td: hexs(&r.mr_td),
        rtmr: [
            hexs(&r.rt_mr0),
            hexs(&r.rt_mr1),
            hexs(&r.rt_mr2),
            hexs(&r.rt_mr3),
        ],
        mr_config_id: hexs(&r.mr_config_id),
        mr_owner: hexs(&r.mr_owner),
        mr_owner_config: hexs(&r.mr_owner_config),
        mr_seam: hexs(&r.mr_seam),
        tee_tcb_svn: hexs(&r.tee_tcb_svn),
    }
}

/// Intel's SGX root CA (the one dcap-qvl pins as its production root).
pub const INTEL_ROOT_DER: &[u8] = include_bytes!("../testdata/intel_sgx_root_ca.der");

/// AMD's product lines whose ARK/ASK `sev` carries built in.
fn amd_chains() -> Vec<(&'static str, sev::certs::snp::ca::Chain)> {
    use sev::certs::snp::builtin::{genoa, milan, turin};
    let mut out = Vec::new();
    if let (Ok(ark), Ok(ask)) = (milan::ark(), milan::ask()) {
        out.push(("amd-milan", sev::certs::snp::ca::Chain { ark, ask }));
    }
    if let (Ok(ark), Ok(ask)) = (genoa::ark(), genoa::ask()) {
        out.push(("amd-genoa", sev::certs::snp::ca::Chain { ark, ask }));
    }
    if let (Ok(ark), Ok(ask)) = (turin::ark(), turin::ask()) {
        out.push(("amd-turin", sev::certs::snp::ca::Chain { ark, ask }));
    }
    out
}

fn verify_snp(report_bytes: &[u8], vcek_der: &[u8], at: u64) -> Result<Verdict, Refusal> {
    use sev::certs::snp::{Certificate, Chain, Verifiable};
    use sev::firmware::guest::AttestationReport;
    use sev::parser::ByteParser;

    if report_bytes.len() != SNP_REPORT_BYTES {
        return Err(Refusal::Malformed(format!(
            "an SNP report is {SNP_REPORT_BYTES} bytes, not {}",
            report_bytes.len()
        )));
    }
    let report = AttestationReport::from_bytes(report_bytes)
        .map_err(|e| Refusal::Malformed(format!("not an SNP attestation report: {e}")))?;
    let vcek = Certificate::from_der(vcek_der)
        .map_err(|e| Refusal::Malformed(format!("VCEK certificate: {e}")))?;
    let cert = parse_x509(vcek_der)?;
    // The VCEK must chain to one of AMD's ARKs, through its ASK.
    let (root, chain) = amd_chains()
        .into_iter()
        .map(|(name, ca)| {
            (
                name,
                Chain {
                    ca,
                    vek: vcek.clone(),
                },
            )
        })
        .find(|(_, chain)| chain.verify().is_ok())
        .ok_or_else(|| {
            Refusal::UnknownRoot("the VCEK is not signed by a built-in AMD ASK/ARK".into())
        })?;
    check_validity(&cert, at, "VCEK")?;
    for (name, pem) in amd_ca_pems(root) {
        check_validity(&parse_x509(&pem)?, at, name)?;
    }
    // sev verifies over its own re-encoding of the parsed report; the bytes signed are
    // the bytes received, so the signature is checked over those here as well, and a
    // report that does not re-encode to itself (a non-canonical encoding) is refused.
    let canonical = report
        .to_bytes()
        .map_err(|e| Refusal::Malformed(format!("re-encoding the report: {e}")))?;
    if canonical.as_ref() != report_bytes {
        return Err(Refusal::Malformed(
            "the report does not re-encode to the same bytes (non-canonical fields)".into(),
        ));
    }
    // The signature's r and s are 48-byte values in 72-byte little-endian fields, and
    // the rest of the 512-byte signature area is reserved: all of that must be zero,
    // or it would be bytes no signature covers.
    let sig = &report_bytes[SNP_SIGNED_BYTES..];
    if sig[48..72].iter().chain(&sig[120..]).any(|&b| b != 0) {
        return Err(Refusal::Malformed(
            "the signature's padding or reserved bytes are not zero".into(),
        ));
    }
    (&chain, &report)
        .verify()
        .map_err(|e| Refusal::Signature(format!("SNP report: {e}")))?;
    verify_snp_raw(report_bytes, &report, &cert)?;
    // The VCEK is issued per chip and per TCB: the report must name the same ones.
    let vcek_tcb = vcek_tcb(&cert)?;
    let reported = SnpTcb {
        bootloader: report.reported_tcb.bootloader,
        tee: report.reported_tcb.tee,
        snp: report.reported_tcb.snp,
        microcode: report.reported_tcb.microcode,
    };
    let tcb_status = if vcek_tcb == reported {
        "VcekMatches".to_string()
    } else {
        format!("VcekMismatch(vcek {vcek_tcb:?})")
    };
    let m = Measurements::Snp {
        measurement: hexs(&report.measurement),
        host_data: hexs(&report.host_data),
        id_key_digest: hexs(&report.id_key_digest),
        policy: report.policy.0,
        vmpl: report.vmpl,
        reported_tcb: reported,
        chip_id: hexs(&report.chip_id),
    };
    Ok(Verdict {
        tee: TeeKind::Snp,
        quote_hash: blake3::hash(report_bytes).to_hex().to_string(),
        root: root.to_string(),
        tcb_status,
        advisories: Vec::new(),
        debug: report.policy.debug_allowed(),
        report_data: hexs(&report.report_data),
        measurements: m,
        collateral_issued: None,
        collateral_expires: None,
    })
}

fn amd_ca_pems(root: &str) -> Vec<(&'static str, Vec<u8>)> {
    use sev::certs::snp::builtin::{genoa, milan, turin};
    let (ark, ask): (&[u8], &[u8]) = match root {
        "amd-milan" => (milan::ARK, milan::ASK),
        "amd-genoa" => (genoa::ARK, genoa::ASK),
        _ => (turin::ARK, turin::ASK),
    };
    [("ARK", ark), ("ASK", ask)]
        .into_iter()
        .filter_map(|(n, pem)| {
            let text = std::str::from_utf8(pem).ok()?;
            der::pem::decode_vec(text.as_bytes())
                .ok()
                .map(|(_, d)| (n, d))
        })
        .collect()
}

fn parse_x509(der_bytes: &[u8]) -> Result<x509_cert::Certificate, Refusal> {
    use der::Decode;
    x509_cert::Certificate::from_der(der_bytes)
        .map_err(|e| Refusal::Malformed(format!("X.509 certificate: {e}")))
}

fn check_validity(cert: &x509_cert::Certificate, at: u64, name: &str) -> Result<(), Refusal> {
    let v = &cert.tbs_certificate.validity;
    let nb = v.not_before.to_unix_duration().as_secs();
    let na = v.not_after.to_unix_duration().as_secs();
    if at < nb || at > na {
        return Err(Refusal::CollateralTime {
            at,
            reason: format!("the {name} certificate is valid from {nb} to {na}"),
        });
    }
    Ok(())
}

/// ECDSA P-384 over SHA-384 of the received bytes 0..0x2A0, with the VCEK's key.
fn verify_snp_raw(
    raw: &[u8],
    report: &sev::firmware::guest::AttestationReport,
    vcek: &x509_cert::Certificate,
) -> Result<(), Refusal> {
    use p384::ecdsa::signature::DigestVerifier;
    use sha2::Digest;
    let sig = p384::ecdsa::Signature::try_from(&report.signature)
        .map_err(|e| Refusal::Signature(format!("SNP signature: {e}")))?;
    let key_bytes = vcek
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(key_bytes)
        .map_err(|e| Refusal::Signature(format!("VCEK key: {e}")))?;
    let digest = sha2::Sha384::new_with_prefix(&raw[..SNP_SIGNED_BYTES]);
    key.verify_digest(digest, &sig)
        .map_err(|_| Refusal::Signature("the VCEK did not sign these report bytes".into()))
}

/// The TCB a VCEK was issued for: AMD's extensions 1.3.6.1.4.1.3704.1.3.{1,2,3,8}.
fn vcek_tcb(cert: &x509_cert::Certificate) -> Result<SnpTcb, Refusal> {
    let get = |last: &str| -> Result<u8, Refusal> {
        let oid = format!("1.3.6.1.4.1.3704.1.3.{last}");
        let ext = cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|e| e.extn_id.to_string() == oid)
            .ok_or_else(|| Refusal::Malformed(format!("VCEK has no extension {oid}")))?;
        // An INTEGER: tag 0x02, length, big-endian value (at most 2 bytes for a u8).
        let v = ext.extn_value.as_bytes();
        match v {
            [0x02, 1, x] => Ok(*x),
            [0x02, 2, 0, x] => Ok(*x),
            _ => Err(Refusal::Malformed(format!(
                "VCEK extension {oid} is not a small INTEGER"
            ))),
        }
    };
    Ok(SnpTcb {
        bootloader: get("1")?,
        tee: get("2")?,
        snp: get("3")?,
        microcode: get("8")?,
    })
}
