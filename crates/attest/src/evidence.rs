//! What a node sends to prove where it runs: the hardware's signed statement (a TDX
//! quote or an SEV-SNP attestation report) and the collateral that lets a verifier
//! check it offline.

use serde::{Deserialize, Serialize};

/// The largest quote or report accepted, checked before anything is parsed. Real TDX
/// quotes are about 5 KiB (the PCK chain in PEM is most of it); SNP reports are 1184
/// bytes.
pub const QUOTE_MAX_BYTES: usize = 64 * 1024;
/// The largest collateral accepted (Intel's PCK CRLs are the largest part, ~3 KiB;
/// TDX TCB info with its issuer chain ~10 KiB).
pub const COLLATERAL_MAX_BYTES: usize = 1024 * 1024;

/// A trusted execution environment Tessera can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeKind {
    /// Intel TDX: a DCAP quote (v4 or v5) chained to Intel's SGX root.
    Tdx,
    /// AMD SEV-SNP: an attestation report signed by the chip's VCEK, chained to AMD's ARK.
    Snp,
}

impl TeeKind {
    pub fn name(self) -> &'static str {
        match self {
            TeeKind::Tdx => "tdx",
            TeeKind::Snp => "snp",
        }
    }

    pub fn parse(s: &str) -> Result<TeeKind, String> {
        match s {
            "tdx" => Ok(TeeKind::Tdx),
            "snp" => Ok(TeeKind::Snp),
            other => Err(format!("unknown TEE `{other}` (expected tdx or snp)")),
        }
    }

    /// Which TEE made these bytes, from their fixed header: a TDX quote is version 4
    /// or 5 with TEE type 0x81; an SNP report is exactly 1184 bytes. `None` if neither.
    pub fn sniff(quote: &[u8]) -> Option<TeeKind> {
        if quote.len() >= 8 {
            let version = u16::from_le_bytes([quote[0], quote[1]]);
            let tee_type = u32::from_le_bytes([quote[4], quote[5], quote[6], quote[7]]);
            if (version == 4 || version == 5) && tee_type == 0x81 {
                return Some(TeeKind::Tdx);
            }
        }
        (quote.len() == crate::verify::SNP_REPORT_BYTES).then_some(TeeKind::Snp)
    }
}

impl std::fmt::Display for TeeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The collateral for one quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "tee")]
pub enum Collateral {
    /// dcap-qvl's collateral: TCB info and QE identity (signed by Intel's TCB signing
    /// key), the PCK and root CRLs and their issuer chains.
    Tdx(Box<dcap_qvl::QuoteCollateralV3>),
    /// The chip's VCEK certificate (DER, hex on the wire). ARK and ASK are AMD's, built
    /// into the verifier; they are never taken from the sender.
    Snp {
        #[serde(with = "hex::serde")]
        vcek_der: Vec<u8>,
    },
}

impl Collateral {
    pub fn tee(&self) -> TeeKind {
        match self {
            Collateral::Tdx(_) => TeeKind::Tdx,
            Collateral::Snp { .. } => TeeKind::Snp,
        }
    }

    /// Reads collateral from a file: dcap-qvl's collateral JSON for TDX; for SNP a VCEK
    /// certificate (PEM or DER), or this type's own JSON.
    pub fn from_file_bytes(tee: TeeKind, bytes: &[u8]) -> Result<Collateral, String> {
        if bytes.len() > COLLATERAL_MAX_BYTES {
            return Err(format!(
                "collateral is {} bytes, more than the {} accepted",
                bytes.len(),
                COLLATERAL_MAX_BYTES
            ));
        }
        match tee {
            TeeKind::Tdx => {
                let c: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(bytes)
                    .map_err(|e| format!("not dcap-qvl collateral JSON: {e}"))?;
                Ok(Collateral::Tdx(Box::new(c)))
            }
            TeeKind::Snp => {
                if let Ok(c) = serde_json::from_slice::<Collateral>(bytes) {
                    return match c {
                        Collateral::Snp { .. } => Ok(c),
                        Collateral::Tdx(_) => Err("TDX collateral given for an SNP report".into()),
                    };
                }
                let der = if bytes.starts_with(b"-----BEGIN") {
                    pem_to_der(bytes)?
                } else {
                    bytes.to_vec()
                };
                Ok(Collateral::Snp { vcek_der: der })
            }
        }
    }
}

/// The body of the first PEM block.
fn pem_to_der(pem: &[u8]) -> Result<Vec<u8>, String> {
    use der::Decode;
    let text = std::str::from_utf8(pem).map_err(|_| "PEM is not UTF-8".to_string())?;
    let (_label, der) =
        der::pem::decode_vec(text.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    x509_cert::Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(der)
}

/// A quote and its collateral, as a node sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// The quote (TDX) or attestation report (SNP), hex on the wire.
    #[serde(with = "hex::serde")]
    pub quote: Vec<u8>,
    pub collateral: Collateral,
}

impl Evidence {
    pub fn tee(&self) -> TeeKind {
        self.collateral.tee()
    }

    /// blake3 of the quote bytes: how journals and logs name a quote.
    pub fn quote_hash(&self) -> String {
        blake3::hash(&self.quote).to_hex().to_string()
    }
}
