//! TDX collateral fetched from a PCCS-compatible service (API v4) is the collateral the
//! service holds, byte for byte, and verifies the quote. The service here serves the
//! test PKI's collateral on loopback the way a PCCS does (issuer chains URL-encoded in
//! headers, the root CA CRL hex-encoded).

use axum::http::header::HeaderMap;
use axum::routing::get;
use axum::Router;
use tessera_attest::provider::{now_unix, QuoteProvider, TestProvider};
use tessera_attest::{Collateral, Evidence};

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_header(name: &'static str, value: String, body: Vec<u8>) -> (HeaderMap, Vec<u8>) {
    let mut h = HeaderMap::new();
    h.insert(name, value.parse().unwrap());
    (h, body)
}

#[test]
fn collateral_from_a_pccs_verifies_the_quote() {
    tessera_net::install_tls_provider();
    let now = now_unix();
    let provider = TestProvider::new(&[8; 32], now - 60, 86_400, false).unwrap();
    let evidence = provider.evidence(&[1; 64]).unwrap();
    let Collateral::Tdx(c) = evidence.collateral.clone() else {
        panic!("TDX")
    };
    let c = *c;
    let (c1, c2, c3, c4) = (c.clone(), c.clone(), c.clone(), c.clone());
    let app = Router::new()
        .route(
            "/sgx/certification/v4/pckcrl",
            get(move || async move {
                with_header(
                    "SGX-PCK-CRL-Issuer-Chain",
                    pct(&c1.pck_crl_issuer_chain),
                    c1.pck_crl.clone(),
                )
            }),
        )
        .route(
            "/tdx/certification/v4/tcb",
            get(move || async move {
                let body = format!(
                    "{{\"tcbInfo\":{},\"signature\":\"{}\"}}",
                    c2.tcb_info,
                    hex::encode(&c2.tcb_info_signature)
                );
                with_header(
                    "TCB-Info-Issuer-Chain",
                    pct(&c2.tcb_info_issuer_chain),
                    body.into_bytes(),
                )
            }),
        )
        .route(
            "/tdx/certification/v4/qe/identity",
            get(move || async move {
                let body = format!(
                    "{{\"enclaveIdentity\":{},\"signature\":\"{}\"}}",
                    c3.qe_identity,
                    hex::encode(&c3.qe_identity_signature)
                );
                with_header(
                    "SGX-Enclave-Identity-Issuer-Chain",
                    pct(&c3.qe_identity_issuer_chain),
                    body.into_bytes(),
                )
            }),
        )
        .route(
            "/sgx/certification/v4/rootcacrl",
            get(move || async move { hex::encode(&c4.root_ca_crl) }),
        );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(l, app).await.unwrap();
            })
    });
    let fetched =
        tessera_attest::pccs::fetch_tdx_collateral(&format!("http://{addr}/"), &evidence.quote)
            .unwrap();
    assert_eq!(fetched, c);
    let e = Evidence {
        quote: evidence.quote.clone(),
        collateral: Collateral::Tdx(Box::new(fetched)),
    };
    let roots = tessera_attest::Roots::production().with_test_root(provider.root_hash());
    tessera_attest::verify::verify(&e, now, &roots).unwrap();
    // A PCCS that is down is an error naming the URL, not a panic.
    let err = tessera_attest::pccs::fetch_tdx_collateral("http://127.0.0.1:9", &evidence.quote)
        .unwrap_err();
    assert!(format!("{err:#}").contains("127.0.0.1:9"), "{err:#}");
}
