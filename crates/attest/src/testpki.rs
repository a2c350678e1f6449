//! A test Intel DCAP PKI and TDX quote generator.
//!
//! [`TestPki`] plays Intel's part in TDX attestation so that tests and the local demo can
//! produce TDX quotes, and the collateral to check them, that go through the *real*
//! dcap-qvl verification path ([`dcap_qvl::verify::QuoteVerifier`]) — only chained to a
//! test root instead of Intel's SGX root CA. A verifier pinned to Intel's root
//! (`QuoteVerifier::new_prod()`) refuses everything made here.
//!
//! # The chain
//!
//! Every key is a P-256 key derived from a 32-byte seed (`blake3(seed || label)`), and
//! every signature is deterministic (RFC 6979), so a seed always gives byte-identical
//! certificates, quotes and collateral.
//!
//! ```text
//! Test Root CA (self-signed; the only trust anchor)
//! ├── signs the Root CA CRL
//! ├── TCB Signing certificate ─┬─ signs TCB Info (TDX, v3)       ┐ collateral, with the
//! │                            └─ signs QE Identity (TD_QE, v2)  ┘ chain "TCB signer, root"
//! └── PCK Platform CA
//!     ├── signs the PCK CRL
//!     └── PCK certificate (Intel SGX extension: PPID, TCB, PCE-ID, FMSPC, SGX type, ...)
//!         └── signs the QE report
//!             whose report_data = sha256(attestation key || QE auth data) || 0^32
//!             └── attestation key
//!                 └── signs the quote: header || TD report
//! ```
//!
//! The quote is a TDX quote v4 with a TD 1.0 report body. Its authentication data carries
//! certification data of type 6 (QE report certification data), which holds the QE
//! report, its signature, 32 bytes of QE authentication data and, as certification data
//! of type 5, the PCK chain in PEM: the PCK certificate and the PCK Platform CA. The root
//! is left out of the embedded chain on purpose: the verifier uses its own pinned root and
//! never looks at a root in the quote, so bytes of an embedded root would not be bound by
//! anything (see "Unbound bytes" below).
//!
//! # What dcap-qvl checks, and what this module provides for it
//!
//! - Root CA CRL signed by the pinned root, covering the root itself, the TCB signer and
//!   the Platform CA; PCK CRL signed by the Platform CA, covering the PCK certificate
//!   (webpki, revocation depth "chain", unknown status denied, expired CRLs refused).
//! - TCB signer and QE Identity signer issued *directly* by the root, end-entity
//!   (`CA:FALSE`); raw `r || s` ECDSA signatures over the exact JSON text.
//! - TCB Info: `id` "TDX", version ≥ 3, `issueDate` ≤ now ≤ `nextUpdate`, `fmspc` equal to
//!   the PCK certificate's, a TCB level met by the PCK certificate's CPUSVN/PCESVN and the
//!   TD report's TEE_TCB_SVN; `tdxModule` and, as TEE_TCB_SVN\[1\] is 1, a
//!   `tdxModuleIdentities` entry `TDX_01` whose MRSIGNER (all zero) and SEAM attributes
//!   match the report and whose TCB levels cover the module ISVSVN (TEE_TCB_SVN\[0\]).
//! - QE Identity: `id` "TD_QE", version 2, MRSIGNER, ISVPRODID, MISCSELECT and
//!   ATTRIBUTES (masked) matching the QE report, a TCB level met by its ISVSVN, QE not in
//!   debug mode.
//! - Quote: version 4, ECDSA P-256 attestation key type, TEE type 0x81, Intel's QE vendor
//!   ID; TD attributes without reserved bits, with SEPT_VE_DISABLE, not migratable, and
//!   DEBUG only where the caller asks for it (refused unless `allow_debug`).
//! - [`dcap_qvl::QuotePolicy::strict`] additionally wants status UpToDate, unexpired
//!   collateral and the PCK certificate's platform flags (dynamic platform, cached keys,
//!   SMT) false; they are written as false.
//!
//! # Unbound bytes
//!
//! Flipping any single byte of a generated quote makes verification fail, except:
//!
//! - the outer certification data type (`offsets::OUTER_CERT_TYPE`, value 6): dcap-qvl
//!   parses the type-6 body whatever this field says and never checks it;
//! - the line feeds of the embedded PEM chain: the `pem` crate drops all whitespace from
//!   the base64 body and skips text between blocks, so LF (0x0A) turned into VT (0x0B)
//!   parses to the same certificates.
//!
//! Neither changes anything that is verified (no certificate, key or report field).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use p256::ecdsa::{signature::Signer, Signature, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    DistinguishedName, DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};

/// FMSPC of the test platform (the value of a real Emerald Rapids TDX platform).
pub const FMSPC: [u8; 6] = [0xB0, 0xC0, 0x6F, 0x00, 0x00, 0x00];
/// PCE ID of the test platform.
pub const PCE_ID: [u8; 2] = [0x00, 0x00];
/// SGX TCB components (CPUSVN) in the PCK certificate, and in the UpToDate TCB level.
pub const CPU_SVN: [u8; 16] = [3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0];
/// PCE SVN in the PCK certificate, and in the UpToDate TCB level.
pub const PCE_SVN: u16 = 11;
/// TEE_TCB_SVN of the TD report: TDX module ISVSVN 6, module major version 1 (so the
/// TCB Info's `TDX_01` module identity applies), late microcode SVN 3.
pub const TEE_TCB_SVN: [u8; 16] = [6, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// SGX type in the PCK certificate (1 = Scalable, as on TDX platforms).
pub const SGX_TYPE: u8 = 1;
/// TCB evaluation data number of the TCB Info and QE Identity.
pub const TCB_EVALUATION_DATA_NUMBER: u32 = 17;
/// MRSIGNER of the TDX module (Intel's is all zero), in TCB Info and TD report.
pub const TDX_MODULE_MRSIGNER: [u8; 48] = [0; 48];
/// XFAM of the TD report (x87, SSE, AVX, AVX-512, PK, ...; as on a real TD).
pub const XFAM: [u8; 8] = [0xE7, 0x02, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00];
/// TD_ATTRIBUTES bit 0: the TD runs in debug mode.
pub const TD_ATTRIBUTES_DEBUG: u64 = 1 << 0;
/// TD_ATTRIBUTES bit 28: SEPT_VE_DISABLE, required by dcap-qvl.
pub const TD_ATTRIBUTES_SEPT_VE_DISABLE: u64 = 1 << 28;

/// MRSIGNER of the TD quoting enclave (Intel's real TD_QE signer).
pub const QE_MRSIGNER: [u8; 32] = [
    0xDC, 0x9E, 0x2A, 0x7C, 0x6F, 0x94, 0x8F, 0x17, 0x47, 0x4E, 0x34, 0xA7, 0xFC, 0x43, 0xED, 0x03,
    0x0F, 0x7C, 0x15, 0x63, 0xF1, 0xBA, 0xBD, 0xDF, 0x63, 0x40, 0xC8, 0x2E, 0x0E, 0x54, 0xA8, 0xC5,
];
/// ISVPRODID of the TD quoting enclave.
pub const QE_ISVPRODID: u16 = 2;
/// ISVSVN of the TD quoting enclave (the QE Identity's UpToDate level).
pub const QE_ISVSVN: u16 = 4;
/// MISCSELECT of the QE report (and expected by the QE Identity, mask all ones).
pub const QE_MISCSELECT: u32 = 0;
/// ATTRIBUTES of the QE report: INIT | MODE64BIT | PROVISIONKEY, XFRM 0xE7; not DEBUG.
pub const QE_ATTRIBUTES: [u8; 16] = [0x15, 0, 0, 0, 0, 0, 0, 0, 0xE7, 0, 0, 0, 0, 0, 0, 0];
/// ATTRIBUTES expected by the QE Identity (under [`QE_ATTRIBUTES_MASK`]).
pub const QE_IDENTITY_ATTRIBUTES: [u8; 16] = [0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// ATTRIBUTES mask of the QE Identity (Intel's: everything but PROVISIONKEY in the flags).
pub const QE_ATTRIBUTES_MASK: [u8; 16] = [
    0xFB, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Byte offsets in a quote made by [`TestPki::tdx_quote`] (TDX quote v4, TD 1.0 body).
pub mod offsets {
    use std::ops::Range;

    /// Quote header: version, key type, TEE type, reserved, QE vendor ID, user data.
    pub const HEADER: Range<usize> = 0..48;
    /// TD 1.0 report body.
    pub const TD_REPORT: Range<usize> = 48..632;
    /// TD_ATTRIBUTES inside the quote.
    pub const TD_ATTRIBUTES: Range<usize> = 48 + 120..48 + 128;
    /// REPORTDATA inside the quote.
    pub const REPORT_DATA: Range<usize> = 48 + 520..632;
    /// What the attestation key signs: header and report body.
    pub const SIGNED: Range<usize> = 0..632;
    /// Length of the authentication data (u32, little endian).
    pub const AUTH_DATA_LEN: Range<usize> = 632..636;
    /// Quote signature, raw `r || s`.
    pub const QUOTE_SIGNATURE: Range<usize> = 636..700;
    /// Attestation public key, raw `x || y`.
    pub const ATTESTATION_KEY: Range<usize> = 700..764;
    /// Certification data type of the outer certification data (6). Not checked by
    /// dcap-qvl.
    pub const OUTER_CERT_TYPE: Range<usize> = 764..766;
    /// Size of the outer certification data (u32).
    pub const OUTER_CERT_SIZE: Range<usize> = 766..770;
    /// QE report (an SGX enclave report).
    pub const QE_REPORT: Range<usize> = 770..1154;
    /// QE report signature by the PCK key, raw `r || s`.
    pub const QE_REPORT_SIGNATURE: Range<usize> = 1154..1218;
    /// Size of the QE authentication data (u16, always 32).
    pub const QE_AUTH_DATA_LEN: Range<usize> = 1218..1220;
    /// QE authentication data, hashed into the QE report's report data.
    pub const QE_AUTH_DATA: Range<usize> = 1220..1252;
    /// Certification data type of the PCK chain (5).
    pub const PCK_CERT_TYPE: Range<usize> = 1252..1254;
    /// Size of the PCK chain (u32).
    pub const PCK_CHAIN_SIZE: Range<usize> = 1254..1258;
    /// Start of the PCK chain (PEM), which runs to the end of the quote.
    pub const PCK_CHAIN: usize = 1258;
}

/// The TD-specific fields of a generated quote. Everything else in the TD report
/// (TEE_TCB_SVN, MRSEAM, module signer, XFAM, ...) is the test platform's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestTd {
    /// MRTD: the TD's build-time measurement.
    pub mr_td: [u8; 48],
    /// RTMR0..3: the run-time measurement registers.
    pub rtmr: [[u8; 48]; 4],
    /// REPORTDATA: the 64 bytes the TD asked the quote to carry.
    pub report_data: [u8; 64],
    /// TD_ATTRIBUTES bit 0 (DEBUG). dcap-qvl refuses such a TD unless `allow_debug`.
    pub debug: bool,
    /// MRCONFIGID.
    pub mr_config_id: [u8; 48],
    /// MROWNER.
    pub mr_owner: [u8; 48],
}

impl Default for TestTd {
    /// All measurements and report data zero, not debug.
    fn default() -> Self {
        Self {
            mr_td: [0; 48],
            rtmr: [[0; 48]; 4],
            report_data: [0; 64],
            debug: false,
            mr_config_id: [0; 48],
            mr_owner: [0; 48],
        }
    }
}

/// One certificate of the test PKI with its key.
struct Party {
    /// The same key as `key_pair`, for raw signatures.
    key: SigningKey,
    /// The key as rcgen sees it, to issue certificates and CRLs.
    key_pair: KeyPair,
    cert: rcgen::Certificate,
}

impl Party {
    fn pem(&self) -> Result<String> {
        der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, self.cert.der())
            .map_err(|e| anyhow::anyhow!("PEM encoding failed: {e}"))
    }
}

/// A test Intel DCAP PKI: root CA, TCB signer, PCK Platform CA, PCK certificate, their
/// P-256 keys, and the test platform's quoting enclave (attestation key, QE ID). See the
/// module documentation for the chain.
pub struct TestPki {
    root: Party,
    tcb_signer: Party,
    pck_platform_ca: Party,
    pck: Party,
    attestation_key: SigningKey,
    /// QE ID, in the quote header's user data.
    qe_id: [u8; 16],
    /// MRENCLAVE of the quoting enclave (not checked by verifiers).
    qe_mr_enclave: [u8; 32],
    /// MRSEAM of the TDX module (not checked by dcap-qvl).
    mr_seam: [u8; 48],
    ppid: [u8; 16],
    platform_instance_id: [u8; 16],
    /// The PCK chain embedded in quotes: PCK certificate, PCK Platform CA, root (PEM).
    pck_chain_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("root_sha256", &hex::encode(Sha256::digest(self.root_der())))
            .field("qe_id", &hex::encode(self.qe_id))
            .finish_non_exhaustive()
    }
}

/// Latest time X.509 and the `time` crate (without large dates) can both express:
/// 9999-12-31T23:59:59Z.
const MAX_TIME: u64 = 253_402_300_799;

impl TestPki {
    /// Generates the PKI, deterministically from `seed`: every P-256 key is derived from
    /// blake3(seed || label), and all signatures are RFC 6979. Certificates are valid
    /// from `not_before` to `not_after` (unix seconds, at most 9999-12-31).
    pub fn generate(seed: &[u8; 32], not_before: u64, not_after: u64) -> Result<TestPki> {
        ensure!(
            not_before < not_after,
            "certificate validity is empty: not_before {not_before} >= not_after {not_after}"
        );
        ensure!(
            not_after <= MAX_TIME,
            "not_after {not_after} is after 9999-12-31"
        );

        let params = |cn: &str, is_ca: IsCa, key_usages: Vec<KeyUsagePurpose>| {
            let mut p = CertificateParams::default();
            p.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_before);
            p.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after);
            let mut serial: [u8; 16] = derive_bytes(seed, &format!("serial/{cn}"));
            serial[0] &= 0x7F; // positive
            p.serial_number = Some(SerialNumber::from_slice(&serial));
            p.distinguished_name = distinguished_name(cn);
            p.is_ca = is_ca;
            p.key_usages = key_usages;
            p.use_authority_key_identifier_extension = true;
            p
        };
        let ca_usages = || vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let signer_usages = || {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::ContentCommitment,
            ]
        };

        let root_key = derive_signing_key(seed, "root-ca");
        let root_key_pair = remote_key_pair(&root_key)?;
        let mut root_params = params(
            "Tessera Test SGX Root CA",
            IsCa::Ca(BasicConstraints::Constrained(1)),
            ca_usages(),
        );
        root_params.use_authority_key_identifier_extension = false;
        let root = Party {
            cert: root_params
                .self_signed(&root_key_pair)
                .context("self-signing the test root CA")?,
            key: root_key,
            key_pair: root_key_pair,
        };

        let issue = |issuer: &Party, label: &str, params: CertificateParams| -> Result<Party> {
            let key = derive_signing_key(seed, label);
            let key_pair = remote_key_pair(&key)?;
            let cert = params
                .signed_by(&key_pair, &issuer.cert, &issuer.key_pair)
                .with_context(|| format!("issuing the test {label} certificate"))?;
            Ok(Party {
                key,
                key_pair,
                cert,
            })
        };

        let tcb_signer = issue(
            &root,
            "tcb-signer",
            params(
                "Tessera Test SGX TCB Signing",
                IsCa::ExplicitNoCa,
                signer_usages(),
            ),
        )?;
        let pck_platform_ca = issue(
            &root,
            "pck-platform-ca",
            params(
                "Tessera Test SGX PCK Platform CA",
                IsCa::Ca(BasicConstraints::Constrained(0)),
                ca_usages(),
            ),
        )?;

        let ppid: [u8; 16] = derive_bytes(seed, "ppid");
        let platform_instance_id: [u8; 16] = derive_bytes(seed, "platform-instance-id");
        let mut pck_params = params(
            "Tessera Test SGX PCK Certificate",
            IsCa::ExplicitNoCa,
            signer_usages(),
        );
        pck_params.custom_extensions = vec![CustomExtension::from_oid_content(
            SGX_EXTENSION_OID,
            sgx_extension(&ppid, &platform_instance_id),
        )];
        let pck = issue(&pck_platform_ca, "pck", pck_params)?;

        // Leaf, its issuer, then the root, in canonical PEM, as Intel's quoting enclave
        // embeds them: Tessera's verifier picks the root to verify against by the
        // chain's last certificate, and refuses any other PEM framing.
        let pck_chain_pem = format!("{}{}{}", pck.pem()?, pck_platform_ca.pem()?, root.pem()?);

        Ok(TestPki {
            root,
            tcb_signer,
            pck_platform_ca,
            pck,
            attestation_key: derive_signing_key(seed, "attestation-key"),
            qe_id: derive_bytes(seed, "qe-id"),
            qe_mr_enclave: derive_bytes(seed, "qe-mrenclave"),
            mr_seam: derive_bytes(seed, "mrseam"),
            ppid,
            platform_instance_id,
            pck_chain_pem,
        })
    }

    /// The test root CA certificate (DER): the trust anchor to give
    /// `QuoteVerifier::new`.
    pub fn root_der(&self) -> &[u8] {
        self.root.cert.der()
    }

    /// The test root CA certificate (PEM).
    pub fn root_pem(&self) -> Result<String> {
        self.root.pem()
    }

    /// The PCK chain embedded in quotes (PEM): PCK certificate, then PCK Platform CA.
    pub fn pck_chain_pem(&self) -> &str {
        &self.pck_chain_pem
    }

    /// The PCK certificate (DER).
    pub fn pck_der(&self) -> &[u8] {
        self.pck.cert.der()
    }

    /// The PPID in the PCK certificate (reported as `VerifiedReport::ppid`).
    pub fn ppid(&self) -> [u8; 16] {
        self.ppid
    }

    /// The platform instance ID in the PCK certificate.
    pub fn platform_instance_id(&self) -> [u8; 16] {
        self.platform_instance_id
    }

    /// The QE ID in the quote header's user data.
    pub fn qe_id(&self) -> [u8; 16] {
        self.qe_id
    }

    /// MRSEAM of the test TDX module, as in every quote's TD report.
    pub fn mr_seam(&self) -> [u8; 48] {
        self.mr_seam
    }

    /// The attestation public key, raw `x || y` as in the quote.
    pub fn attestation_public_key(&self) -> [u8; 64] {
        let point = self.attestation_key.verifying_key().to_encoded_point(false);
        let mut raw = [0u8; 64];
        raw.copy_from_slice(&point.as_bytes()[1..]);
        raw
    }

    /// A TDX v4 quote (TD 1.0 report body) with `td`'s fields, signed by the attestation
    /// key; the QE report, signed by the PCK key, vouches for the attestation key; the
    /// PCK chain (PEM, certification data type 5) is embedded. Layout: [`offsets`].
    pub fn tdx_quote(&self, td: &TestTd) -> Result<Vec<u8>> {
        let mut td_attributes = TD_ATTRIBUTES_SEPT_VE_DISABLE;
        if td.debug {
            td_attributes |= TD_ATTRIBUTES_DEBUG;
        }

        let mut quote = Vec::with_capacity(offsets::PCK_CHAIN + self.pck_chain_pem.len());
        // Header.
        quote.extend_from_slice(&4u16.to_le_bytes()); // version
        quote.extend_from_slice(&2u16.to_le_bytes()); // attestation key: ECDSA P-256
        quote.extend_from_slice(&0x81u32.to_le_bytes()); // TEE type: TDX
        quote.extend_from_slice(&[0; 4]); // reserved (QE SVN, PCE SVN in v3)
        quote.extend_from_slice(&dcap_qvl::INTEL_QE_VENDOR_ID);
        quote.extend_from_slice(&self.qe_id);
        quote.extend_from_slice(&[0; 4]);
        // TD report 1.0.
        quote.extend_from_slice(&TEE_TCB_SVN);
        quote.extend_from_slice(&self.mr_seam);
        quote.extend_from_slice(&TDX_MODULE_MRSIGNER);
        quote.extend_from_slice(&[0; 8]); // SEAM attributes
        quote.extend_from_slice(&td_attributes.to_le_bytes());
        quote.extend_from_slice(&XFAM);
        quote.extend_from_slice(&td.mr_td);
        quote.extend_from_slice(&td.mr_config_id);
        quote.extend_from_slice(&td.mr_owner);
        quote.extend_from_slice(&[0; 48]); // MROWNERCONFIG
        for rtmr in &td.rtmr {
            quote.extend_from_slice(rtmr);
        }
        quote.extend_from_slice(&td.report_data);
        ensure!(
            quote.len() == offsets::SIGNED.end,
            "TD quote body has the wrong size"
        );
        let quote_signature: Signature = self.attestation_key.sign(&quote);

        // QE report certification data (type 6): QE report, its signature by the PCK
        // key, QE authentication data, and the PCK chain as certification data type 5.
        let attestation_key = self.attestation_public_key();
        let qe_auth_data: [u8; 32] = std::array::from_fn(|i| i as u8);
        let qe_report = self.qe_report(&attestation_key, &qe_auth_data);
        let qe_report_signature: Signature = self.pck.key.sign(&qe_report);
        let chain = self.pck_chain_pem.as_bytes();
        let mut qe_cert_data = Vec::with_capacity(384 + 64 + 2 + 32 + 6 + chain.len());
        qe_cert_data.extend_from_slice(&qe_report);
        qe_cert_data.extend_from_slice(&qe_report_signature.to_bytes());
        qe_cert_data.extend_from_slice(&(qe_auth_data.len() as u16).to_le_bytes());
        qe_cert_data.extend_from_slice(&qe_auth_data);
        qe_cert_data.extend_from_slice(&5u16.to_le_bytes());
        qe_cert_data.extend_from_slice(&u32::try_from(chain.len())?.to_le_bytes());
        qe_cert_data.extend_from_slice(chain);

        let mut auth_data = Vec::with_capacity(64 + 64 + 6 + qe_cert_data.len());
        auth_data.extend_from_slice(&quote_signature.to_bytes());
        auth_data.extend_from_slice(&attestation_key);
        auth_data.extend_from_slice(&6u16.to_le_bytes());
        auth_data.extend_from_slice(&u32::try_from(qe_cert_data.len())?.to_le_bytes());
        auth_data.extend_from_slice(&qe_cert_data);

        quote.extend_from_slice(&u32::try_from(auth_data.len())?.to_le_bytes());
        quote.extend_from_slice(&auth_data);
        Ok(quote)
    }

    /// The TD quoting enclave's report (384 bytes) vouching for `attestation_key`.
    fn qe_report(&self, attestation_key: &[u8; 64], qe_auth_data: &[u8]) -> Vec<u8> {
        let mut report = Vec::with_capacity(384);
        report.extend_from_slice(&CPU_SVN);
        report.extend_from_slice(&QE_MISCSELECT.to_le_bytes());
        report.extend_from_slice(&[0; 28]);
        report.extend_from_slice(&QE_ATTRIBUTES);
        report.extend_from_slice(&self.qe_mr_enclave);
        report.extend_from_slice(&[0; 32]);
        report.extend_from_slice(&QE_MRSIGNER);
        report.extend_from_slice(&[0; 96]);
        report.extend_from_slice(&QE_ISVPRODID.to_le_bytes());
        report.extend_from_slice(&QE_ISVSVN.to_le_bytes());
        report.extend_from_slice(&[0; 60]);
        let hash = Sha256::new()
            .chain_update(attestation_key)
            .chain_update(qe_auth_data)
            .finalize();
        report.extend_from_slice(&hash);
        report.extend_from_slice(&[0; 32]);
        debug_assert_eq!(report.len(), 384);
        report
    }

    /// dcap-qvl collateral signed by this PKI: TCB Info (TDX, version 3) whose top level
    /// makes this PKI's quotes UpToDate, QE Identity (TD_QE, version 2), root CA CRL and
    /// PCK CRL (empty), all issued at `issued` and valid until `next_update` (unix
    /// seconds). `pck_certificate_chain` is `None`: the verifier takes the chain from the
    /// quote.
    pub fn collateral(&self, issued: u64, next_update: u64) -> Result<dcap_qvl::QuoteCollateralV3> {
        ensure!(
            issued < next_update,
            "collateral validity is empty: issued {issued} >= next_update {next_update}"
        );
        ensure!(
            next_update <= MAX_TIME,
            "next_update {next_update} is after 9999-12-31"
        );
        let issue_date = rfc3339(issued)?;
        let next_update_date = rfc3339(next_update)?;

        let tcb_info = self.tcb_info_json(&issue_date, &next_update_date);
        let tcb_info_signature: Signature = self.tcb_signer.key.sign(tcb_info.as_bytes());
        let qe_identity = qe_identity_json(&issue_date, &next_update_date);
        let qe_identity_signature: Signature = self.tcb_signer.key.sign(qe_identity.as_bytes());

        let root_pem = self.root.pem()?;
        let tcb_chain = format!("{}{}", self.tcb_signer.pem()?, root_pem);
        Ok(dcap_qvl::QuoteCollateralV3 {
            pck_crl_issuer_chain: format!("{}{}", self.pck_platform_ca.pem()?, root_pem),
            root_ca_crl: empty_crl(&self.root, issued, next_update)?,
            pck_crl: empty_crl(&self.pck_platform_ca, issued, next_update)?,
            tcb_info_issuer_chain: tcb_chain.clone(),
            tcb_info,
            tcb_info_signature: tcb_info_signature.to_bytes().to_vec(),
            qe_identity_issuer_chain: tcb_chain,
            qe_identity,
            qe_identity_signature: qe_identity_signature.to_bytes().to_vec(),
            pck_certificate_chain: None,
        })
    }

    /// TCB Info for the test FMSPC, laid out like Intel's: an UpToDate level at exactly
    /// the test platform's SVNs, an older OutOfDate level, and the TDX module identity.
    fn tcb_info_json(&self, issue_date: &str, next_update: &str) -> String {
        let older = |svns: &[u8; 16]| svns.map(|svn| svn.saturating_sub(1));
        let module_mrsigner = hex::encode_upper(TDX_MODULE_MRSIGNER);
        serde_json::json!({
            "id": "TDX",
            "version": 3,
            "issueDate": issue_date,
            "nextUpdate": next_update,
            "fmspc": hex::encode_upper(FMSPC),
            "pceId": hex::encode_upper(PCE_ID),
            "tcbType": 0,
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "tdxModule": {
                "mrsigner": module_mrsigner,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [{
                "id": format!("TDX_{:02X}", TEE_TCB_SVN[1]),
                "mrsigner": module_mrsigner,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
                "tcbLevels": [
                    {
                        "tcb": { "isvsvn": TEE_TCB_SVN[0] },
                        "tcbDate": issue_date,
                        "tcbStatus": "UpToDate",
                    },
                    {
                        "tcb": { "isvsvn": TEE_TCB_SVN[0] / 2 },
                        "tcbDate": "2023-08-09T00:00:00Z",
                        "tcbStatus": "OutOfDate",
                    },
                ],
            }],
            "tcbLevels": [
                tcb_level(&CPU_SVN, PCE_SVN, &TEE_TCB_SVN, issue_date, "UpToDate", &[]),
                tcb_level(
                    &older(&CPU_SVN),
                    PCE_SVN / 2,
                    &older(&TEE_TCB_SVN),
                    "2018-01-04T00:00:00Z",
                    "OutOfDate",
                    &["TEST-SA-00001"],
                ),
            ],
        })
        .to_string()
    }
}

/// One entry of a TCB Info's `tcbLevels`.
fn tcb_level(
    cpu_svn: &[u8; 16],
    pce_svn: u16,
    tee_tcb_svn: &[u8; 16],
    tcb_date: &str,
    status: &str,
    advisory_ids: &[&str],
) -> serde_json::Value {
    let components = |svns: &[u8; 16]| {
        svns.iter()
            .map(|svn| serde_json::json!({ "svn": svn }))
            .collect::<Vec<_>>()
    };
    let mut level = serde_json::json!({
        "tcb": {
            "sgxtcbcomponents": components(cpu_svn),
            "pcesvn": pce_svn,
            "tdxtcbcomponents": components(tee_tcb_svn),
        },
        "tcbDate": tcb_date,
        "tcbStatus": status,
    });
    if !advisory_ids.is_empty() {
        level["advisoryIDs"] = serde_json::json!(advisory_ids);
    }
    level
}

/// QE Identity of the TD quoting enclave, laid out like Intel's.
fn qe_identity_json(issue_date: &str, next_update: &str) -> String {
    serde_json::json!({
        "id": "TD_QE",
        "version": 2,
        "issueDate": issue_date,
        "nextUpdate": next_update,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
        "miscselect": hex::encode_upper(QE_MISCSELECT.to_le_bytes()),
        "miscselectMask": "FFFFFFFF",
        "attributes": hex::encode_upper(QE_IDENTITY_ATTRIBUTES),
        "attributesMask": hex::encode_upper(QE_ATTRIBUTES_MASK),
        "mrsigner": hex::encode_upper(QE_MRSIGNER),
        "isvprodid": QE_ISVPRODID,
        "tcbLevels": [
            { "tcb": { "isvsvn": QE_ISVSVN }, "tcbDate": issue_date, "tcbStatus": "UpToDate" },
        ],
    })
    .to_string()
}

/// An empty CRL (number 1) issued by `issuer`.
fn empty_crl(issuer: &Party, this_update: u64, next_update: u64) -> Result<Vec<u8>> {
    let params = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(this_update),
        next_update: rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(next_update),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer.cert, &issuer.key_pair)
        .context("signing a test CRL")?;
    Ok(crl.der().to_vec())
}

fn rfc3339(unix_secs: u64) -> Result<String> {
    let secs = i64::try_from(unix_secs).context("time out of range")?;
    let time = chrono::DateTime::from_timestamp(secs, 0).context("time out of range")?;
    Ok(time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Tessera Test PKI (not Intel)");
    dn
}

/// `N` bytes derived from the seed for `label`: blake3(seed || label), extended.
fn derive_bytes<const N: usize>(seed: &[u8; 32], label: &str) -> [u8; N] {
    let mut out = [0u8; N];
    blake3::Hasher::new()
        .update(seed)
        .update(label.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// The P-256 key for `label`: blake3(seed || label) as the scalar; in the (2^-32) case
/// that this is not a valid scalar, blake3(seed || label || counter) for the first
/// counter that is.
fn derive_signing_key(seed: &[u8; 32], label: &str) -> SigningKey {
    let mut hasher = blake3::Hasher::new();
    hasher.update(seed).update(label.as_bytes());
    let mut candidate = hasher.clone();
    let mut counter = 0u32;
    loop {
        if let Ok(key) = SigningKey::from_slice(candidate.finalize().as_bytes()) {
            return key;
        }
        counter += 1;
        candidate = hasher.clone();
        candidate.update(&counter.to_le_bytes());
    }
}

/// rcgen signing through a p256 key, so that certificate and CRL signatures are
/// deterministic (RFC 6979) like everything else.
struct P256Signer {
    key: SigningKey,
    public_key: Vec<u8>,
}

impl rcgen::RemoteKeyPair for P256Signer {
    fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let signature: Signature = self.key.sign(msg);
        Ok(signature.to_der().as_bytes().to_vec())
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn remote_key_pair(key: &SigningKey) -> Result<KeyPair> {
    let public_key = key
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    KeyPair::from_remote(Box::new(P256Signer {
        key: key.clone(),
        public_key,
    }))
    .context("wrapping a P-256 key for rcgen")
}

/// Intel's SGX extension, 1.2.840.113741.1.13.1.
const SGX_EXTENSION_OID: &[u64] = &[1, 2, 840, 113_741, 1, 13, 1];

/// The content of the SGX extension of a PCK certificate issued by the Platform CA, as
/// dcap-qvl's `intel::parse_pck_extension` reads it:
///
/// ```text
/// SEQUENCE {
///   { .1 PPID          OCTET STRING (16) }
///   { .2 TCB           SEQUENCE { { .2.1 .. .2.16 INTEGER (SGX TCB components) }
///                                 { .2.17 PCESVN INTEGER } { .2.18 CPUSVN OCTET STRING (16) } } }
///   { .3 PCE-ID        OCTET STRING (2) }
///   { .4 FMSPC         OCTET STRING (6) }
///   { .5 SGX Type      ENUMERATED }
///   { .6 PlatformInstanceID OCTET STRING (16) }
///   { .7 Configuration SEQUENCE { { .7.1 dynamicPlatform BOOLEAN } { .7.2 cachedKeys BOOLEAN }
///                                 { .7.3 SMTEnabled BOOLEAN } } }
/// }
/// ```
fn sgx_extension(ppid: &[u8; 16], platform_instance_id: &[u8; 16]) -> Vec<u8> {
    use asn1::*;
    let entry = |arcs: &[u64], value: Vec<u8>| {
        let oid: Vec<u64> = SGX_EXTENSION_OID.iter().chain(arcs).copied().collect();
        sequence(&[object_identifier(&oid), value])
    };
    let mut tcb: Vec<Vec<u8>> = CPU_SVN
        .iter()
        .zip(1u64..)
        .map(|(&svn, i)| entry(&[2, i], integer(svn.into())))
        .collect();
    tcb.push(entry(&[2, 17], integer(PCE_SVN.into())));
    tcb.push(entry(&[2, 18], octet_string(&CPU_SVN)));
    sequence(&[
        entry(&[1], octet_string(ppid)),
        entry(&[2], sequence(&tcb)),
        entry(&[3], octet_string(&PCE_ID)),
        entry(&[4], octet_string(&FMSPC)),
        entry(&[5], enumerated(SGX_TYPE)),
        entry(&[6], octet_string(platform_instance_id)),
        entry(
            &[7],
            sequence(&[
                entry(&[7, 1], boolean(false)), // dynamic platform
                entry(&[7, 2], boolean(false)), // cached keys
                entry(&[7, 3], boolean(false)), // SMT enabled
            ]),
        ),
    ])
}

/// Just enough DER for the SGX extension.
mod asn1 {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    pub fn sequence(items: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &items.concat())
    }

    pub fn octet_string(bytes: &[u8]) -> Vec<u8> {
        tlv(0x04, bytes)
    }

    pub fn boolean(value: bool) -> Vec<u8> {
        tlv(0x01, &[if value { 0xFF } else { 0x00 }])
    }

    pub fn enumerated(value: u8) -> Vec<u8> {
        tlv(0x0A, &[value])
    }

    /// A non-negative INTEGER, minimally encoded.
    pub fn integer(value: u64) -> Vec<u8> {
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count().min(7);
        let mut content = Vec::with_capacity(9);
        if bytes[skip] & 0x80 != 0 {
            content.push(0);
        }
        content.extend_from_slice(&bytes[skip..]);
        tlv(0x02, &content)
    }

    pub fn object_identifier(arcs: &[u64]) -> Vec<u8> {
        let mut content = Vec::new();
        let mut push_base128 = |mut value: u64| {
            let mut digits = vec![(value & 0x7F) as u8];
            value >>= 7;
            while value > 0 {
                digits.push(0x80 | (value & 0x7F) as u8);
                value >>= 7;
            }
            content.extend(digits.iter().rev());
        };
        push_base128(arcs[0] * 40 + arcs[1]);
        for &arc in &arcs[2..] {
            push_base128(arc);
        }
        tlv(0x06, &content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcap_qvl::verify::QuoteVerifier;
    use std::collections::BTreeSet;

    const NOT_BEFORE: u64 = 1_700_000_000; // 2023-11-14
    const NOT_AFTER: u64 = NOT_BEFORE + 10 * 365 * 86_400;
    const ISSUED: u64 = 1_750_000_000; // 2025-06-15
    const NEXT_UPDATE: u64 = ISSUED + 30 * 86_400;
    const NOW: u64 = ISSUED + 86_400;

    /// Intel's SGX root CA CRL of 2025-03-20 (next update 2026-04-03).
    const INTEL_ROOT_CA_CRL: &str = "308201203081c8020101300a06082a8648ce3d0403023068311a301806035504030c11496e74656c2053475820526f6f74204341311a3018060355040a0c11496e74656c20436f72706f726174696f6e3114301206035504070c0b53616e746120436c617261310b300906035504080c024341310b3009060355040613025553170d3235303332303131323135375a170d3236303430333131323135375aa02f302d300a0603551d140403020101301f0603551d2304183016801422650cd65a9d3489f383b49552bf501b392706ac300a06082a8648ce3d0403020347003044022030c9fce1438da0a94e4fffdd46c9650e393be6e5a7862d4e4e73527932d04af302206539efe3f734c3d7df20d9dfc4630e1c7ff0439a0f8ece101f15b5eaff9b4f33";

    fn pki(seed: u8) -> TestPki {
        TestPki::generate(&[seed; 32], NOT_BEFORE, NOT_AFTER).unwrap()
    }

    fn td() -> TestTd {
        TestTd {
            mr_td: [0x11; 48],
            rtmr: [[0x21; 48], [0x22; 48], [0x23; 48], [0x24; 48]],
            report_data: std::array::from_fn(|i| i as u8),
            debug: false,
            mr_config_id: [0x31; 48],
            mr_owner: [0x41; 48],
        }
    }

    #[test]
    fn sgx_extension_der_helpers() {
        assert_eq!(
            asn1::object_identifier(&[1, 2, 840, 113_741, 1, 13, 1]),
            [0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x01, 0x0D, 0x01]
        );
        assert_eq!(asn1::integer(0), [0x02, 0x01, 0x00]);
        assert_eq!(asn1::integer(11), [0x02, 0x01, 0x0B]);
        assert_eq!(asn1::integer(0xFF), [0x02, 0x02, 0x00, 0xFF]);
        let ext = dcap_qvl::intel::parse_pck_extension(pki(1).pck_der()).unwrap();
        assert_eq!(ext.fmspc, FMSPC);
        assert_eq!(ext.cpu_svn, CPU_SVN);
        assert_eq!(ext.pce_svn, PCE_SVN);
        assert_eq!(ext.pce_id, PCE_ID);
        assert_eq!(ext.sgx_type, u64::from(SGX_TYPE));
        assert_eq!(ext.ppid, pki(1).ppid());
        assert_eq!(ext.smt_enabled, Some(false));
    }

    #[test]
    fn deterministic_from_seed() {
        let (a, b) = (pki(1), pki(1));
        assert_eq!(a.root_der(), b.root_der());
        assert_eq!(a.pck_chain_pem(), b.pck_chain_pem());
        assert_eq!(a.tdx_quote(&td()).unwrap(), b.tdx_quote(&td()).unwrap());
        assert_eq!(
            a.collateral(ISSUED, NEXT_UPDATE).unwrap(),
            b.collateral(ISSUED, NEXT_UPDATE).unwrap()
        );
        assert_ne!(a.root_der(), pki(2).root_der());

        // A quote provider may share one PKI across threads.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TestPki>();
    }

    /// 1. A generated quote and its collateral verify against the test root, UpToDate,
    ///    with the TD's fields, also under the strict policy.
    #[test]
    fn quote_verifies_up_to_date() {
        let pki = pki(1);
        let td = td();
        let quote = pki.tdx_quote(&td).unwrap();
        let collateral = pki.collateral(ISSUED, NEXT_UPDATE).unwrap();
        let verifier = QuoteVerifier::new(pki.root_der().to_vec());

        let report = verifier.verify(&quote, &collateral, NOW).unwrap();
        assert_eq!(report.status, "UpToDate");
        assert!(report.advisory_ids.is_empty());
        assert_eq!(report.ppid, pki.ppid());
        let body = report.report.as_td10().expect("a TD report");
        assert_eq!(body.report_data, td.report_data);
        assert_eq!(body.mr_td, td.mr_td);
        assert_eq!(
            [body.rt_mr0, body.rt_mr1, body.rt_mr2, body.rt_mr3],
            td.rtmr
        );
        assert_eq!(body.mr_config_id, td.mr_config_id);
        assert_eq!(body.mr_owner, td.mr_owner);
        assert_eq!(body.mr_seam, pki.mr_seam());
        assert_eq!(body.tee_tcb_svn, TEE_TCB_SVN);
        assert_eq!(&quote[offsets::REPORT_DATA], &td.report_data[..]);

        // Valid at both ends of the collateral window.
        verifier.verify(&quote, &collateral, ISSUED).unwrap();
        verifier
            .verify(&quote, &collateral, NEXT_UPDATE - 1)
            .unwrap();

        let claims = verifier
            .verify_with_policy(
                &quote,
                &collateral,
                NOW,
                &dcap_qvl::QuotePolicy::strict(NOW),
            )
            .unwrap();
        assert_eq!(claims.tcb.status, dcap_qvl::TcbStatus::UpToDate);
        assert_eq!(claims.platform.pck.fmspc, FMSPC);
        assert_eq!(claims.qe.report.isv_svn, QE_ISVSVN);
    }

    /// 2. A test chain never passes as Intel's.
    #[test]
    fn refused_by_intel_root() {
        let pki = pki(1);
        let quote = pki.tdx_quote(&td()).unwrap();
        let collateral = pki.collateral(ISSUED, NEXT_UPDATE).unwrap();
        let err = QuoteVerifier::new_prod()
            .verify(&quote, &collateral, NOW)
            .unwrap_err();
        eprintln!("Intel root: {err:#}");
        assert!(dcap_qvl::verify::rustcrypto::verify(&quote, &collateral, NOW).is_err());

        // With Intel's real root CA CRL (from dcap-qvl's sample collateral, valid from
        // 2025-03-20 to 2026-04-03) the CRL checks pass and the chains themselves fail.
        let intel_root_crl = hex::decode(INTEL_ROOT_CA_CRL).unwrap();
        let collateral = dcap_qvl::QuoteCollateralV3 {
            root_ca_crl: intel_root_crl,
            ..collateral
        };
        let err = QuoteVerifier::new_prod()
            .verify(&quote, &collateral, NOW)
            .unwrap_err();
        eprintln!("Intel root, Intel root CRL: {err:#}");
        assert!(format!("{err:#}").contains("certificate chain"), "{err:#}");
    }

    /// 3. Refused with expired collateral, before it is issued, and under another test
    ///    root.
    #[test]
    fn refused_when_expired_or_other_root() {
        let pki = pki(1);
        let quote = pki.tdx_quote(&td()).unwrap();
        let collateral = pki.collateral(ISSUED, NEXT_UPDATE).unwrap();
        let verifier = QuoteVerifier::new(pki.root_der().to_vec());

        let err = verifier
            .verify(&quote, &collateral, NEXT_UPDATE + 1)
            .unwrap_err();
        eprintln!("expired: {err:#}");
        assert!(verifier.verify(&quote, &collateral, ISSUED - 1).is_err());
        // Certificates expired, collateral fresh.
        let late = NOT_AFTER + 86_400;
        let late_collateral = pki.collateral(late, late + 86_400).unwrap();
        assert!(verifier.verify(&quote, &late_collateral, late + 1).is_err());

        let other = self::pki(2);
        let other_verifier = QuoteVerifier::new(other.root_der().to_vec());
        let err = other_verifier.verify(&quote, &collateral, NOW).unwrap_err();
        eprintln!("other root: {err:#}");
        // Even with the other PKI's own collateral, the quote's PCK chain is not under it.
        let other_collateral = other.collateral(ISSUED, NEXT_UPDATE).unwrap();
        assert!(other_verifier
            .verify(&quote, &other_collateral, NOW)
            .is_err());
        assert!(verifier.verify(&quote, &other_collateral, NOW).is_err());
    }

    /// 4. Every single-byte change (XOR 0x01) is refused by Tessera's verifier. (dcap-qvl
    ///    alone leaves the framing unchecked: the outer certification data type and the
    ///    PEM line feeds; `crate::verify` checks the quote's canonical layout.)
    #[test]
    fn every_byte_flip_is_refused() {
        let pki = pki(1);
        let quote = pki.tdx_quote(&td()).unwrap();
        let collateral = pki.collateral(ISSUED, NEXT_UPDATE).unwrap();
        let roots = crate::verify::Roots::production()
            .with_test_root(blake3::hash(pki.root_der()).to_hex().to_string());
        let evidence = |q: &[u8]| crate::Evidence {
            quote: q.to_vec(),
            collateral: crate::Collateral::Tdx(Box::new(collateral.clone())),
        };
        crate::verify::verify(&evidence(&quote), NOW, &roots).unwrap();

        let start = std::time::Instant::now();
        let mut accepted = BTreeSet::new();
        let mut tampered = quote.clone();
        for i in 0..quote.len() {
            tampered[i] ^= 0x01;
            if crate::verify::verify(&evidence(&tampered), NOW, &roots).is_ok() {
                accepted.insert(i);
            }
            tampered[i] ^= 0x01;
        }
        eprintln!("{} positions flipped in {:?}", quote.len(), start.elapsed());
        assert!(accepted.is_empty(), "flips accepted at {accepted:?}");
    }

    /// 5. A debug TD is refused by default and accepted with `allow_debug(true)`.
    #[test]
    fn debug_td_needs_allow_debug() {
        let pki = pki(1);
        let td = TestTd {
            debug: true,
            ..td()
        };
        let quote = pki.tdx_quote(&td).unwrap();
        assert_eq!(quote[offsets::TD_ATTRIBUTES.start] & 1, 1);
        let collateral = pki.collateral(ISSUED, NEXT_UPDATE).unwrap();

        let err = QuoteVerifier::new(pki.root_der().to_vec())
            .verify(&quote, &collateral, NOW)
            .unwrap_err();
        assert!(format!("{err:#}").contains("Debug"), "{err:#}");

        let report = QuoteVerifier::new(pki.root_der().to_vec())
            .allow_debug(true)
            .verify(&quote, &collateral, NOW)
            .unwrap();
        assert_eq!(report.status, "UpToDate");
        assert_eq!(report.report.as_td10().unwrap().report_data, td.report_data);
    }

    #[test]
    fn rejects_bad_validity() {
        assert!(TestPki::generate(&[0; 32], 10, 10).is_err());
        assert!(TestPki::generate(&[0; 32], 0, u64::MAX).is_err());
        assert!(pki(1).collateral(NEXT_UPDATE, ISSUED).is_err());
    }
}
