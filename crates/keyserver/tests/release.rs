//! Key release: a fresh quote that passes the policy and binds the node key, HPKE key,
//! run and nonce gets the keys, sealed to the HPKE key; a reused nonce, a quote
//! replayed for another node key, run or nonce, a bad signature, an unnamed test root
//! or a debug TD gets nothing, and every outcome is journaled.

use tessera_attest::provider::{now_unix, QuoteProvider, TestProvider};
use tessera_attest::Policy;
use tessera_keyserver::{
    request_signing_bytes, HpkeKeyPair, KeyServer, ReleaseRequest, NONCE_TTL_SECS,
};
use tessera_protocol::Identity;

const RUN: &str = "private-run";
const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn keys() -> tessera_seal::SealKeys {
    let text = format!(
        r#"{{"format_version":1,"dataset_id":"{}","manifest_id":"{}","keys":[{{"index":0,"key_hex":"{}"}},{{"index":1,"key_hex":"{}"}}]}}"#,
        "11".repeat(32),
        "22".repeat(32),
        "aa".repeat(32),
        "bb".repeat(32)
    );
    tessera_seal::SealKeys::parse(&text).unwrap()
}

fn policy(p: &TestProvider) -> Policy {
    Policy::from_toml(&p.policy_toml()).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: KeyServer,
    provider: TestProvider,
    now: u64,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let now = now_unix();
    let provider = TestProvider::new(&[3; 32], now - 60, 86_400, false).unwrap();
    let server = KeyServer::new(
        RUN.into(),
        policy(&provider),
        keys(),
        &dir.path().join("journal.db"),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        server,
        provider,
        now,
    }
}

/// A request as an honest node makes it, with the binding over `bind_*`.
fn request(
    f: &Fixture,
    id: &Identity,
    hpke: &HpkeKeyPair,
    nonce: &str,
    run: &str,
    provider: &dyn QuoteProvider,
) -> ReleaseRequest {
    let n: [u8; 32] = hex::decode(nonce).unwrap().try_into().unwrap();
    let pk: [u8; 32] = hex::decode(id.public_hex()).unwrap().try_into().unwrap();
    let rd = tessera_attest::binding::report_data(&pk, &hpke.public(), &n, run);
    let evidence = provider.evidence(&rd).unwrap();
    let items = vec![0, 1];
    let signed = request_signing_bytes(run, &n, &hpke.public(), &evidence.quote, &items);
    let _ = f;
    ReleaseRequest {
        run_id: run.into(),
        node_key: id.public_hex(),
        hpke_key: hex::encode(hpke.public()),
        nonce: nonce.into(),
        items,
        evidence,
        signature: id.sign(&signed),
    }
}

/// Re-signs `req` as `id` after it was changed (what an attacker holding `id` can do).
fn resign(req: &mut ReleaseRequest, id: &Identity, hpke_key: &[u8; 32]) {
    let n: [u8; 32] = hex::decode(&req.nonce).unwrap().try_into().unwrap();
    req.signature = id.sign(&request_signing_bytes(
        &req.run_id,
        &n,
        hpke_key,
        &req.evidence.quote,
        &req.items,
    ));
}

#[test]
fn an_attested_node_gets_its_keys_sealed_to_its_hpke_key() {
    let f = fixture();
    let id = Identity::generate();
    let hpke = HpkeKeyPair::generate();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let req = request(&f, &id, &hpke, &nonce, RUN, &f.provider);
    let reply = f.server.release(&req, f.now).unwrap();
    let n: [u8; 32] = hex::decode(&nonce).unwrap().try_into().unwrap();
    let released = hpke.open(&reply, RUN, &n).unwrap();
    assert_eq!(released.keys.len(), 2);
    assert_eq!(released.keys[0].key, "aa".repeat(32));
    assert_eq!(released.keys[1].key, "bb".repeat(32));
    // Another HPKE key cannot open it.
    assert!(HpkeKeyPair::generate().open(&reply, RUN, &n).is_err());
    let journal = f.server.journal_entries().unwrap();
    assert_eq!(journal.len(), 2);
    assert!(journal
        .iter()
        .all(|e| e.outcome == "released" && e.node_key == id.public_hex()));
    assert_eq!(journal[0].quote_hash, req.evidence.quote_hash());
}

#[test]
fn a_nonce_serves_once_and_expires() {
    let f = fixture();
    let id = Identity::generate();
    let hpke = HpkeKeyPair::generate();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let req = request(&f, &id, &hpke, &nonce, RUN, &f.provider);
    f.server.release(&req, f.now).unwrap();
    let again = f.server.release(&req, f.now).unwrap_err();
    assert_eq!(again.rule, "nonce", "{again}");
    // Expired.
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let req = request(&f, &id, &hpke, &nonce, RUN, &f.provider);
    let late = f
        .server
        .release(&req, f.now + NONCE_TTL_SECS + 1)
        .unwrap_err();
    assert_eq!(late.rule, "nonce", "{late}");
    // Never issued.
    let req = request(&f, &id, &hpke, &"77".repeat(32), RUN, &f.provider);
    assert_eq!(f.server.release(&req, f.now).unwrap_err().rule, "nonce");
    // Nonce refusals are counted, not journaled: nobody grows the journal without
    // spending a nonce.
    assert_eq!(f.server.unjournaled_refusals(), 3);
    assert_eq!(f.server.journal_entries().unwrap().len(), 2);
}

#[test]
fn one_address_cannot_take_every_nonce() {
    let f = fixture();
    let attacker = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));
    let mut taken = 0;
    while f.server.issue_nonce(f.now, attacker).is_ok() {
        taken += 1;
        assert!(taken <= tessera_keyserver::NONCES_PER_ADDRESS_MAX);
    }
    assert_eq!(taken, tessera_keyserver::NONCES_PER_ADDRESS_MAX);
    let r = f.server.issue_nonce(f.now, attacker).unwrap_err();
    assert_eq!((r.status, r.rule.as_str()), (429, "busy"));
    // An honest node elsewhere still gets one and its keys.
    let id = Identity::generate();
    let hpke = HpkeKeyPair::generate();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    f.server
        .release(&request(&f, &id, &hpke, &nonce, RUN, &f.provider), f.now)
        .unwrap();
    // Expired nonces free the attacker's share again.
    assert!(f
        .server
        .issue_nonce(f.now + NONCE_TTL_SECS + 1, attacker)
        .is_ok());
}

#[test]
fn a_quote_replayed_for_another_key_run_or_nonce_is_refused() {
    let f = fixture();
    let honest = Identity::generate();
    let hpke = HpkeKeyPair::generate();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let good = request(&f, &honest, &hpke, &nonce, RUN, &f.provider);

    // The same quote, now presented by another node key (re-signed by it), with a
    // fresh nonce: the report_data binds the honest key and the old nonce.
    let thief = Identity::generate();
    let fresh = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let mut stolen = good.clone();
    stolen.node_key = thief.public_hex();
    stolen.nonce = fresh.clone();
    resign(&mut stolen, &thief, &hpke.public());
    assert_eq!(
        f.server.release(&stolen, f.now).unwrap_err().rule,
        "report_data"
    );

    // Same node, the attacker's own HPKE key swapped in (to read the keys).
    let fresh = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let mine = request(&f, &honest, &hpke, &fresh, RUN, &f.provider);
    let mut swapped = mine.clone();
    let attacker_hpke = HpkeKeyPair::generate();
    swapped.hpke_key = hex::encode(attacker_hpke.public());
    resign(&mut swapped, &honest, &attacker_hpke.public());
    assert_eq!(
        f.server.release(&swapped, f.now).unwrap_err().rule,
        "report_data"
    );

    // A quote bound to another run: refused for the run id before anything else when
    // presented to this run's server under the other run's name...
    let fresh = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let other_run = request(&f, &honest, &hpke, &fresh, "other-run", &f.provider);
    assert_eq!(f.server.release(&other_run, f.now).unwrap_err().rule, "run");
    // ...and for its binding when the run id is rewritten (and re-signed).
    let fresh = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let mut rewritten = request(&f, &honest, &hpke, &fresh, "other-run", &f.provider);
    rewritten.run_id = RUN.into();
    resign(&mut rewritten, &honest, &hpke.public());
    assert_eq!(
        f.server.release(&rewritten, f.now).unwrap_err().rule,
        "report_data"
    );

    // A request not signed by the node key it names.
    let fresh = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let mut forged = request(&f, &honest, &hpke, &fresh, RUN, &f.provider);
    forged.signature = thief.sign(b"something else");
    assert_eq!(
        f.server.release(&forged, f.now).unwrap_err().rule,
        "signature"
    );

    // Nothing was released; every refusal is journaled with its rule.
    let journal = f.server.journal_entries().unwrap();
    assert!(
        journal.iter().all(|e| e.outcome != "released"),
        "{journal:?}"
    );
    assert_eq!(journal.len(), 5);
}

#[test]
fn unattested_debug_and_foreign_quotes_get_nothing() {
    let f = fixture();
    let id = Identity::generate();
    let hpke = HpkeKeyPair::generate();
    // A debug TD from the same test PKI.
    let dbg = TestProvider::new(&[3; 32], f.now - 60, 86_400, true).unwrap();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let r = f
        .server
        .release(&request(&f, &id, &hpke, &nonce, RUN, &dbg), f.now)
        .unwrap_err();
    assert_eq!(r.rule, "allow_debug", "{r}");
    // A test PKI the policy does not name.
    let other = TestProvider::new(&[4; 32], f.now - 60, 86_400, false).unwrap();
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let r = f
        .server
        .release(&request(&f, &id, &hpke, &nonce, RUN, &other), f.now)
        .unwrap_err();
    assert_eq!(r.rule, "root", "{r}");
    // Items outside the data set, or named twice.
    let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
    let mut req = request(&f, &id, &hpke, &nonce, RUN, &f.provider);
    req.items = vec![0, 0];
    // Changed items break the signature (checked first)...
    assert_eq!(f.server.release(&req, f.now).unwrap_err().rule, "signature");
    // ...and, re-signed, are refused for what they name.
    for items in [vec![0, 0], vec![7], vec![]] {
        let nonce = f.server.issue_nonce(f.now, LOCAL).unwrap().nonce;
        let mut req = request(&f, &id, &hpke, &nonce, RUN, &f.provider);
        req.items = items;
        resign(&mut req, &id, &hpke.public());
        assert_eq!(f.server.release(&req, f.now).unwrap_err().rule, "items");
    }
}

#[test]
fn the_journal_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.db");
    let now = now_unix();
    let provider = TestProvider::new(&[3; 32], now - 60, 86_400, false).unwrap();
    {
        let server = KeyServer::new(RUN.into(), policy(&provider), keys(), &path).unwrap();
        let f = Fixture {
            _dir: tempfile::tempdir().unwrap(),
            server,
            provider: TestProvider::new(&[3; 32], now - 60, 86_400, false).unwrap(),
            now,
        };
        let id = Identity::generate();
        let hpke = HpkeKeyPair::generate();
        let nonce = f.server.issue_nonce(now, LOCAL).unwrap().nonce;
        f.server
            .release(&request(&f, &id, &hpke, &nonce, RUN, &f.provider), now)
            .unwrap();
    }
    let entries = tessera_keyserver::Journal::open(&path)
        .unwrap()
        .entries()
        .unwrap();
    assert_eq!(entries.len(), 2);
}

#[test]
fn release_cost_is_measured() {
    // Not a timing assertion: prints the cost of a whole release over HTTP (nonce,
    // quote from the test provider, verification, HPKE, journal write with fsync) for
    // docs/results.md (`cargo test --release -p tessera-keyserver --test release --
    // --nocapture cost`).
    // With the workspace's features, reqwest needs the process's TLS provider (the
    // binary installs it in main).
    tessera_net::install_tls_provider();
    let f = fixture();
    let server = std::sync::Arc::new(f.server);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let s = server.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(tessera_keyserver::serve(s, &addr.to_string()))
            .unwrap();
    });
    let url = format!("http://{addr}");
    let id = Identity::generate();
    let mut ok = false;
    for _ in 0..50 {
        if tessera_keyserver::request_keys(&url, RUN, &id, &f.provider, &[0, 1]).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "the key server did not answer");
    let n = 20;
    let t = std::time::Instant::now();
    for _ in 0..n {
        let (_, keys) =
            tessera_keyserver::request_keys(&url, RUN, &id, &f.provider, &[0, 1]).unwrap();
        assert_eq!(keys.len(), 2);
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    let quote = std::time::Instant::now();
    for _ in 0..n {
        f.provider.evidence(&[0; 64]).unwrap();
    }
    let quote_ms = quote.elapsed().as_secs_f64() * 1e3 / n as f64;
    println!("release cost: {ms:.2} ms per release over HTTP, of which {quote_ms:.2} ms making the test quote");
}
