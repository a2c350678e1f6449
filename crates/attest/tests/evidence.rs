//! Real hardware evidence, verified offline at pinned times: the TDX quotes dcap-qvl
//! ships (with their collateral) and the SEV-SNP Milan report `sev` ships (with its
//! VCEK). Every signed byte flipped is refused; so are expired collateral, a wrong
//! measurement, a debug guest, a wrong report_data and an unnamed test root.

use tessera_attest::evidence::{Collateral, Evidence, TeeKind};
use tessera_attest::provider::{test_mr_td, QuoteProvider, TestProvider};
use tessera_attest::verify::{verify, Refusal, Roots, SNP_SIGNED_BYTES};
use tessera_attest::Policy;

const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote");
const TDX_COLLATERAL: &[u8] = include_bytes!("../testdata/tdx_quote_collateral.json");
const TD15EX_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote_td15ex");
const TD15EX_COLLATERAL: &[u8] = include_bytes!("../testdata/tdx_quote_td15ex_collateral.json");
const OUTDATED_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote_outdated");
const OUTDATED_COLLATERAL: &[u8] = include_bytes!("../testdata/tdx_quote_outdated_collateral.json");
const SNP_REPORT_HEX: &str = include_str!("../testdata/report_milan.hex");
const SNP_VCEK: &[u8] = include_bytes!("../testdata/vcek_milan.der");

/// 2025-06-20T00:00:00Z: inside the first sample's collateral window.
const AT_TDX: u64 = 1_750_377_600;
/// 2026-10-10T00:00:00Z.
const AT_TD15EX: u64 = 1_791_590_400;
/// 2026-02-20T00:00:00Z.
const AT_OUTDATED: u64 = 1_771_545_600;

fn tdx(quote: &[u8], collateral: &[u8]) -> Evidence {
    Evidence {
        quote: quote.to_vec(),
        collateral: Collateral::from_file_bytes(TeeKind::Tdx, collateral).unwrap(),
    }
}

fn snp() -> Evidence {
    Evidence {
        quote: hex::decode(SNP_REPORT_HEX.trim()).unwrap(),
        collateral: Collateral::Snp {
            vcek_der: SNP_VCEK.to_vec(),
        },
    }
}

#[test]
fn shipped_tdx_quotes_verify_at_their_pinned_times() {
    let v = verify(
        &tdx(TDX_QUOTE, TDX_COLLATERAL),
        AT_TDX,
        &Roots::production(),
    )
    .unwrap();
    assert_eq!(v.tee, TeeKind::Tdx);
    assert_eq!(v.root, "intel-sgx-root");
    assert_eq!(v.tcb_status, "UpToDate");
    assert!(!v.debug);
    tessera_attest::policy::check_tcb_only(&v).unwrap();
    let v = verify(
        &tdx(TD15EX_QUOTE, TD15EX_COLLATERAL),
        AT_TD15EX,
        &Roots::production(),
    )
    .unwrap();
    assert_eq!(v.root, "intel-sgx-root");
    // The outdated sample: its collateral carries a newer PCK chain than the one the
    // quote embeds; Tessera verifies a quote against its own embedded chain, whose TCB
    // matches no level of this TCB info, so it is refused.
    let r = verify(
        &tdx(OUTDATED_QUOTE, OUTDATED_COLLATERAL),
        AT_OUTDATED,
        &Roots::production(),
    )
    .unwrap_err();
    assert_eq!(r.rule(), "signature", "{r}");
}

#[test]
fn shipped_snp_report_verifies_against_amd_milan() {
    let v = verify(&snp(), AT_TDX, &Roots::production()).unwrap();
    assert_eq!(v.tee, TeeKind::Snp);
    assert_eq!(v.root, "amd-milan");
    tessera_attest::policy::check_tcb_only(&v).unwrap();
    assert_eq!(TeeKind::sniff(&snp().quote), Some(TeeKind::Snp));
    assert_eq!(TeeKind::sniff(TDX_QUOTE), Some(TeeKind::Tdx));
}

/// Flips every byte of `quote` in `range` once (XOR 0x01) and returns the positions
/// whose flip still verified.
fn accepted_flips(
    e: &Evidence,
    at: u64,
    range: std::ops::Range<usize>,
    roots: &Roots,
) -> Vec<usize> {
    range
        .filter(|&i| {
            let mut f = e.clone();
            f.quote[i] ^= 0x01;
            verify(&f, at, roots).is_ok()
        })
        .collect()
}

#[test]
fn every_byte_of_the_tdx_quotes_flipped_is_refused() {
    for (q, c, at) in [
        (TDX_QUOTE, TDX_COLLATERAL, AT_TDX),
        (TD15EX_QUOTE, TD15EX_COLLATERAL, AT_TD15EX),
    ] {
        let e = tdx(q, c);
        let accepted = accepted_flips(&e, at, 0..e.quote.len(), &Roots::production());
        assert!(accepted.is_empty(), "flips accepted at {accepted:?}");
    }
}

#[test]
fn every_signed_byte_of_the_snp_report_flipped_is_refused() {
    let e = snp();
    // Bytes 0..0x2A0 are signed; 0x2A0.. holds the signature (r, s: 72 bytes each,
    // little-endian) and the reserved rest of its 512-byte field.
    let accepted = accepted_flips(&e, AT_TDX, 0..SNP_SIGNED_BYTES + 144, &Roots::production());
    assert!(accepted.is_empty(), "flips accepted at {accepted:?}");
    // The reserved tail of the signature field carries nothing, and is refused too:
    // a report must re-encode to the same bytes.
    let tail = accepted_flips(
        &e,
        AT_TDX,
        SNP_SIGNED_BYTES + 144..e.quote.len(),
        &Roots::production(),
    );
    assert!(
        tail.is_empty(),
        "reserved signature bytes accepted at {tail:?}"
    );
}

#[test]
fn trailing_bytes_and_truncation_are_refused() {
    // Zero padding after a quote is how quote buffers come; anything else is refused.
    let mut e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    e.quote.push(0);
    assert!(verify(&e, AT_TDX, &Roots::production()).is_ok());
    e.quote.push(1);
    assert!(matches!(
        verify(&e, AT_TDX, &Roots::production()),
        Err(Refusal::Malformed(_))
    ));
    // Padding is bounded, so one quote cannot take any number of hashes.
    let mut e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    e.quote
        .extend(vec![0u8; tessera_attest::verify::PADDING_MAX]);
    assert!(matches!(
        verify(&e, AT_TDX, &Roots::production()),
        Err(Refusal::Malformed(_))
    ));
    // Evidence on the wire refuses unknown fields.
    let mut json = serde_json::to_value(snp()).unwrap();
    json["extra"] = serde_json::json!(1);
    assert!(serde_json::from_value::<Evidence>(json).is_err());
    let mut e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    e.quote.truncate(1000);
    assert!(verify(&e, AT_TDX, &Roots::production()).is_err());
    let mut e = snp();
    e.quote.pop();
    assert!(matches!(
        verify(&e, AT_TDX, &Roots::production()),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn expired_and_not_yet_valid_collateral_is_refused() {
    let e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    // A month and a day after issue: TCB info expired.
    let r = verify(&e, AT_TDX + 31 * 86_400, &Roots::production()).unwrap_err();
    assert_eq!(r.rule(), "collateral_time", "{r}");
    let r = verify(&e, AT_TDX - 2 * 86_400, &Roots::production()).unwrap_err();
    assert_eq!(r.rule(), "collateral_time", "{r}");
    // The VCEK is valid until 2030.
    let r = verify(&snp(), 1_950_000_000, &Roots::production()).unwrap_err();
    assert_eq!(r.rule(), "collateral_time", "{r}");
}

#[test]
fn collateral_of_another_platform_is_refused() {
    // The first quote with the outdated sample's collateral (another FMSPC/issue).
    let e = tdx(TDX_QUOTE, OUTDATED_COLLATERAL);
    assert!(verify(&e, AT_OUTDATED, &Roots::production()).is_err());
}

fn sample_policy(tdx: &tessera_attest::Verdict, snp_m: &str) -> Policy {
    let tessera_attest::verify::Measurements::Tdx { mr_td, rtmr, .. } = &tdx.measurements else {
        panic!("not TDX")
    };
    Policy::from_toml(&format!(
        "tdx_mrtd = [\"{mr_td}\"]\ntdx_rtmr = [[\"*\", \"{}\", \"{}\", \"*\"]]\n\
         snp_measurement = [\"{snp_m}\"]\nsnp_min_tcb = {{ bootloader = 0, tee = 0, snp = 0, microcode = 0 }}\n\
         max_collateral_age_secs = 864000\n",
        rtmr[1], rtmr[2]
    ))
    .unwrap()
}

fn measurement_of(v: &tessera_attest::Verdict) -> String {
    match &v.measurements {
        tessera_attest::verify::Measurements::Tdx { mr_td, .. } => mr_td.clone(),
        tessera_attest::verify::Measurements::Snp { measurement, .. } => measurement.clone(),
    }
}

#[test]
fn policies_refuse_by_rule() {
    let e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    let v = verify(&e, AT_TDX, &Roots::production()).unwrap();
    let s = verify(&snp(), AT_TDX, &Roots::production()).unwrap();
    let good = sample_policy(&v, &measurement_of(&s));
    good.check(&v, AT_TDX).unwrap();
    good.check(&s, AT_TDX).unwrap();
    // A wrong measurement.
    let other = Policy {
        tdx_mrtd: vec!["ab".repeat(48)],
        snp_measurement: vec!["cd".repeat(48)],
        ..good.clone()
    };
    assert_eq!(other.check(&v, AT_TDX).unwrap_err().rule(), "tdx_mrtd");
    assert_eq!(
        other.check(&s, AT_TDX).unwrap_err().rule(),
        "snp_measurement"
    );
    // TEE type not allowed.
    let tdx_only = Policy {
        types: vec![TeeKind::Tdx],
        ..good.clone()
    };
    assert_eq!(tdx_only.check(&s, AT_TDX).unwrap_err().rule(), "tee");
    // Collateral too old for the policy (issued ~14 h before AT_TDX; allow 1 h).
    let fresh = Policy {
        max_collateral_age_secs: 3600,
        ..good.clone()
    };
    assert_eq!(
        fresh.check(&v, AT_TDX).unwrap_err().rule(),
        "max_collateral_age_secs"
    );
    // A TCB status not listed.
    let strict = Policy {
        tcb_status: vec!["SWHardeningNeeded".into()],
        ..good.clone()
    };
    assert_eq!(strict.check(&v, AT_TDX).unwrap_err().rule(), "tcb_status");
    // An SNP TCB below the minimum.
    let high = Policy {
        snp_min_tcb: Some(tessera_attest::verify::SnpTcb {
            bootloader: 255,
            tee: 0,
            snp: 0,
            microcode: 0,
        }),
        ..good.clone()
    };
    assert_eq!(high.check(&s, AT_TDX).unwrap_err().rule(), "snp_min_tcb");
    // A binding that does not match.
    let r = tessera_attest::appraise(&e, AT_TDX, &good, &[7u8; 64]).unwrap_err();
    assert_eq!(r.rule(), "report_data");
}

#[test]
fn policies_that_admit_any_build_are_refused() {
    let e = Policy::from_toml("types = [\"tdx\"]\n").unwrap_err();
    assert!(e.to_string().contains("tdx_mrtd"), "{e}");
    let e = Policy::from_toml("types = [\"tdx\"]\ntdx_mrtd = [\"00\"]\n").unwrap_err();
    assert!(e.to_string().contains("48 bytes"), "{e}");
    // MRTD alone admits any kernel on that firmware; RTMR1 and RTMR2 are required.
    let mrtd = "00".repeat(48);
    let e =
        Policy::from_toml(&format!("types = [\"tdx\"]\ntdx_mrtd = [\"{mrtd}\"]\n")).unwrap_err();
    assert!(e.to_string().contains("tdx_rtmr"), "{e}");
    let e = Policy::from_toml(&format!(
        "types = [\"tdx\"]\ntdx_mrtd = [\"{mrtd}\"]\ntdx_rtmr = [[\"*\", \"*\", \"*\", \"*\"]]\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("RTMR1"), "{e}");
    // SNP needs a TCB floor; test roots are lowercase hex.
    let e = Policy::from_toml(&format!(
        "types = [\"snp\"]\nsnp_measurement = [\"{mrtd}\"]\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("snp_min_tcb"), "{e}");
    let e = Policy::from_toml(&format!(
        "types = [\"tdx\"]\ntdx_mrtd = [\"{mrtd}\"]\ntdx_rtmr = [[\"*\", \"{mrtd}\", \"{mrtd}\", \"*\"]]\ntest_roots = [\"{}\"]\n",
        "AB".repeat(32)
    ))
    .unwrap_err();
    assert!(e.to_string().contains("lowercase"), "{e}");
    let e = Policy::from_toml("typos = 1\n").unwrap_err();
    assert!(e.to_string().contains("typos"), "{e}");
    let e = Policy::from_toml(&format!(
        "types = [\"tdx\"]\ntdx_mrtd = [\"{mrtd}\"]\ntdx_rtmr = [[\"*\", \"{mrtd}\", \"{mrtd}\", \"*\"]]\n\
         tcb_status = [\"Fine\"]\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("Fine"), "{e}");
}

fn test_policy(p: &TestProvider) -> Policy {
    Policy::from_toml(&p.policy_toml()).unwrap()
}

#[test]
fn test_provider_quotes_pass_only_where_the_policy_names_the_test_root() {
    let now = tessera_attest::provider::now_unix();
    let p = TestProvider::new(&[5; 32], now - 60, 86_400, false).unwrap();
    let rd = [9u8; 64];
    let e = p.evidence(&rd).unwrap();
    // Production roots: refused by name.
    let r = verify(&e, now, &Roots::production()).unwrap_err();
    assert_eq!(r.rule(), "root", "{r}");
    // The policy that names it: accepted, with the binding.
    let policy = test_policy(&p);
    let v = tessera_attest::appraise(&e, now, &policy, &rd).unwrap();
    assert_eq!(v.root, format!("test:{}", p.root_hash()));
    assert_eq!(measurement_of(&v), hex::encode(test_mr_td()));
    // Another test PKI's root: refused.
    let other = TestProvider::new(&[6; 32], now - 60, 86_400, false).unwrap();
    let r = tessera_attest::appraise(&e, now, &test_policy(&other), &rd).unwrap_err();
    assert_eq!(r.rule(), "root", "{r}");
    // A debug TD: refused under the policy.
    let dbg = TestProvider::new(&[5; 32], now - 60, 86_400, true).unwrap();
    let r = tessera_attest::appraise(&dbg.evidence(&rd).unwrap(), now, &policy, &rd).unwrap_err();
    assert_eq!(r.rule(), "allow_debug", "{r}");
    // Expired test collateral.
    let old = TestProvider::new(&[5; 32], now - 3 * 86_400, 86_400, false).unwrap();
    let r = tessera_attest::appraise(&old.evidence(&rd).unwrap(), now, &policy, &rd).unwrap_err();
    assert_eq!(r.rule(), "collateral_time", "{r}");
}

#[test]
fn verification_cost_is_measured() {
    // Not a timing assertion: prints the cost per quote for docs/results.md
    // (`cargo test --release -p tessera-attest --test evidence -- --nocapture cost`).
    let e = tdx(TDX_QUOTE, TDX_COLLATERAL);
    let n = 50;
    let t = std::time::Instant::now();
    for _ in 0..n {
        verify(&e, AT_TDX, &Roots::production()).unwrap();
    }
    let tdx_ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    let s = snp();
    let t = std::time::Instant::now();
    for _ in 0..n {
        verify(&s, AT_TDX, &Roots::production()).unwrap();
    }
    let snp_ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    println!("verification cost: TDX {tdx_ms:.2} ms/quote, SNP {snp_ms:.2} ms/report");
}
