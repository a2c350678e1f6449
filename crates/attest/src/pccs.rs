//! Fetching collateral: TDX collateral from a PCCS-compatible service (Intel's PCS or a
//! caching PCCS, API v4), SNP VCEKs from the host's certificate table or AMD's KDS.
//! Whatever is fetched is checked by the verifier against pinned roots: these are
//! untrusted transports.

use anyhow::{anyhow, bail, Context, Result};

/// The largest response body read from a collateral service.
const BODY_MAX: u64 = 1024 * 1024;

fn client() -> Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

struct Response {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

fn get(c: &reqwest::blocking::Client, url: &str) -> Result<Response> {
    use std::io::Read;
    let resp = c.get(url).send().with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: HTTP {}", resp.status());
    }
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    resp.take(BODY_MAX + 1).read_to_end(&mut body)?;
    if body.len() as u64 > BODY_MAX {
        bail!("GET {url}: response larger than {BODY_MAX} bytes");
    }
    Ok(Response { headers, body })
}

/// Percent-decoding of an issuer-chain header (PCCS URL-encodes the PEM).
pub fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s
                .get(i + 1..i + 3)
                .ok_or_else(|| anyhow!("truncated percent escape"))?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| anyhow!("bad percent escape %{h}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("issuer chain is not UTF-8"))
}

fn header(r: &Response, names: &[&str]) -> Result<String> {
    for n in names {
        if let Some(v) = r.headers.get(*n) {
            return percent_decode(v.to_str().map_err(|_| anyhow!("header {n} is not ASCII"))?);
        }
    }
    bail!("missing header {}", names.join(" / "))
}

#[derive(serde::Deserialize)]
struct TcbInfoResponse {
    #[serde(rename = "tcbInfo")]
    tcb_info: Box<serde_json::value::RawValue>,
    signature: String,
}

#[derive(serde::Deserialize)]
struct QeIdentityResponse {
    #[serde(rename = "enclaveIdentity")]
    enclave_identity: Box<serde_json::value::RawValue>,
    signature: String,
}

/// The collateral for a TDX quote from a PCCS-compatible service at `base`
/// (for example `https://api.trustedservices.intel.com` or `https://pccs.example:8081`).
pub fn fetch_tdx_collateral(base: &str, quote: &[u8]) -> Result<dcap_qvl::QuoteCollateralV3> {
    use scale::Decode;
    let base = base.trim_end_matches('/');
    let parsed = dcap_qvl::quote::Quote::decode(&mut &quote[..])
        .map_err(|e| anyhow!("not a DCAP quote: {e}"))?;
    let fmspc = hex::encode_upper(dcap_qvl::intel::quote_fmspc(&parsed)?);
    let ca = dcap_qvl::intel::quote_ca(&parsed)?.as_id_str();
    let c = client()?;
    let crl = get(
        &c,
        &format!("{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"),
    )?;
    let pck_crl_issuer_chain = header(&crl, &["SGX-PCK-CRL-Issuer-Chain"])?;
    let tcb = get(
        &c,
        &format!("{base}/tdx/certification/v4/tcb?fmspc={fmspc}"),
    )?;
    let tcb_info_issuer_chain = header(
        &tcb,
        &["SGX-TCB-Info-Issuer-Chain", "TCB-Info-Issuer-Chain"],
    )?;
    let tcb_resp: TcbInfoResponse =
        serde_json::from_slice(&tcb.body).context("TCB info response is not JSON")?;
    let qe = get(&c, &format!("{base}/tdx/certification/v4/qe/identity"))?;
    let qe_identity_issuer_chain = header(&qe, &["SGX-Enclave-Identity-Issuer-Chain"])?;
    let qe_resp: QeIdentityResponse =
        serde_json::from_slice(&qe.body).context("QE identity response is not JSON")?;
    // A PCCS serves the root CA CRL hex-encoded; Intel's PCS serves DER.
    let root = get(&c, &format!("{base}/sgx/certification/v4/rootcacrl"))?;
    let root_ca_crl = match std::str::from_utf8(&root.body)
        .ok()
        .and_then(|t| hex::decode(t.trim()).ok())
    {
        Some(der) => der,
        None => root.body,
    };
    Ok(dcap_qvl::QuoteCollateralV3 {
        pck_crl_issuer_chain,
        root_ca_crl,
        pck_crl: crl.body,
        tcb_info_issuer_chain,
        tcb_info: tcb_resp.tcb_info.get().to_string(),
        tcb_info_signature: hex::decode(&tcb_resp.signature).context("TCB info signature")?,
        qe_identity_issuer_chain,
        qe_identity: qe_resp.enclave_identity.get().to_string(),
        qe_identity_signature: hex::decode(&qe_resp.signature).context("QE identity signature")?,
        pck_certificate_chain: None,
    })
}

/// The VCEK from an SNP extended-report certificate table (configfs-tsm `auxblob`):
/// entries of GUID (16) + offset (u32) + length (u32), ended by an all-zero entry.
pub fn vcek_from_cert_table(table: &[u8]) -> Result<Option<Vec<u8>>> {
    // 63da758d-e664-4564-adc5-f4b93be8accd, in its little-endian GUID layout.
    const VCEK_GUID: [u8; 16] = [
        0x8d, 0x75, 0xda, 0x63, 0x64, 0xe6, 0x64, 0x45, 0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac,
        0xcd,
    ];
    let mut at = 0;
    while at + 24 <= table.len() {
        let guid = &table[at..at + 16];
        let off = u32::from_le_bytes(table[at + 16..at + 20].try_into()?) as usize;
        let len = u32::from_le_bytes(table[at + 20..at + 24].try_into()?) as usize;
        if guid == [0u8; 16] {
            return Ok(None);
        }
        if guid == VCEK_GUID {
            let end = off
                .checked_add(len)
                .filter(|&e| e <= table.len())
                .ok_or_else(|| anyhow!("certificate table entry runs past the table"))?;
            return Ok(Some(table[off..end].to_vec()));
        }
        at += 24;
    }
    Ok(None)
}

/// The VCEK for a report's chip and reported TCB from AMD's KDS.
pub fn fetch_vcek(kds: &str, report: &[u8]) -> Result<Vec<u8>> {
    use sev::firmware::guest::AttestationReport;
    use sev::parser::ByteParser;
    let r = AttestationReport::from_bytes(report).map_err(|e| anyhow!("SNP report: {e}"))?;
    let t = r.reported_tcb;
    let c = client()?;
    // The product line is not in the report; try each in turn.
    let mut last = None;
    for product in ["Milan", "Genoa", "Turin"] {
        let url = format!(
            "{}/vcek/v1/{product}/{}?blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
            kds.trim_end_matches('/'),
            hex::encode(r.chip_id),
            t.bootloader,
            t.tee,
            t.snp,
            t.microcode
        );
        match get(&c, &url) {
            Ok(resp) => return Ok(resp.body),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no product line")))
}
