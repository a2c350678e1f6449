//! The ledger's HTTP API on loopback with real signatures: the organiser's key may
//! sell, fund and pay; a contributor may stake its own tokens and read its own
//! history but not others'; forged, stale, oversized and malformed requests are
//! refused with a clear error and change nothing.

use std::sync::Arc;

use tessera_ledger::state::LedgerConfig;
use tessera_ledger::{Account, Amount, Ledger, Operation, SqliteStore, Work};
use tessera_net::{
    ledger_router, with_signed_replies, ClientError, LedgerClient, LedgerService, ServerAuth,
};
use tessera_protocol::auth::{sign_request, Audience, HEADER_SIGNATURE};
use tessera_protocol::Identity;

/// Serves a fresh ledger; returns its URL, its directory and its audience.
async fn serve_with_audience(organiser: &Identity) -> (String, tempfile::TempDir, Audience) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::init(&dir.path().join("ledger.db"), LedgerConfig::default()).unwrap();
    let auth = Arc::new(ServerAuth::new(Identity::generate(), "ledger").unwrap());
    let audience = auth.audience().clone();
    let svc = Arc::new(LedgerService::new(
        Ledger::open(store).unwrap(),
        organiser.public_hex(),
        auth.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = with_signed_replies(ledger_router(svc), auth);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), dir, audience)
}

async fn serve(organiser: &Identity) -> (String, tempfile::TempDir) {
    let (url, dir, _) = serve_with_audience(organiser).await;
    (url, dir)
}

fn status(err: ClientError) -> (u16, String, String) {
    match err {
        ClientError::Refused {
            status,
            kind,
            message,
        } => (status, kind, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn tokens(n: u128) -> Amount {
    Amount(n * tessera_ledger::BASE_UNITS_PER_TOKEN)
}

#[tokio::test]
async fn organiser_and_contributors_have_their_rights_and_no_more() {
    let organiser = Identity::generate();
    let alice = Identity::generate();
    let bob = Identity::generate();
    let (url, _dir) = serve(&organiser).await;
    let org = LedgerClient::new(&url, organiser.clone());
    let a = LedgerClient::new(&url, alice.clone());

    let sale = Operation::Sale {
        buyer: alice.public_hex(),
        tokens: tokens(100),
        treasury_tokens: tokens(1000),
        proceeds: "100 USD".into(),
    };
    let receipt = org.submit("sale-1", sale.clone()).await.unwrap();
    assert_eq!(receipt.transfers.len(), 2);
    // The same id and content is a no-op returning the original receipt.
    assert_eq!(org.submit("sale-1", sale).await.unwrap(), receipt);
    let fund = Operation::Fund {
        run: "run-1".into(),
        model: "m1".into(),
        amount: tokens(500),
        reward_per_round: tokens(10),
    };
    org.submit("fund-1", fund.clone()).await.unwrap();

    // A contributor may not fund, sell or pay.
    let (code, kind, msg) = status(a.submit("fund-2", fund).await.unwrap_err());
    assert_eq!((code, kind.as_str()), (403, "wrong_signer"), "{msg}");
    let payout = Operation::Payout {
        run: "run-1".into(),
        round: 0,
        work: vec![Work {
            contributor: alice.public_hex(),
            tokens: 10,
            score_ppm: 1_000_000,
        }],
    };
    assert_eq!(
        status(a.submit("pay-0", payout.clone()).await.unwrap_err()).0,
        403
    );
    org.submit("pay-0", payout).await.unwrap();

    // It may stake its own tokens, not bob's.
    let stake = |c: &Identity, n| Operation::Stake {
        run: "run-1".into(),
        contributor: c.public_hex(),
        amount: tokens(n),
    };
    a.submit("stake-a", stake(&alice, 5)).await.unwrap();
    assert_eq!(
        status(a.submit("stake-b", stake(&bob, 5)).await.unwrap_err()).0,
        403
    );

    let me = Account::Contributor(alice.public_hex());
    let balance = a.balance(&me).await.unwrap();
    assert_eq!(
        balance.base_units,
        (tokens(100).0 + tokens(10).0 - tokens(5).0).to_string()
    );
    let history = a.history(&me, 10).await.unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(
        a.balance(&Account::Treasury).await.is_ok(),
        "public balances are readable"
    );
    let bobs = Account::Contributor(bob.public_hex());
    assert_eq!(status(a.history(&bobs, 10).await.unwrap_err()).0, 403);
    assert_eq!(status(a.verify().await.unwrap_err()).0, 403);
    let report = org.verify().await.unwrap();
    assert_eq!(report["problems"], serde_json::json!([]));
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let organiser = Identity::generate();
    let alice = Identity::generate();
    let (url, _dir, audience) = serve_with_audience(&organiser).await;
    let org = LedgerClient::new(&url, organiser.clone());
    let a = LedgerClient::new(&url, alice.clone());
    org.submit(
        "sale",
        Operation::Sale {
            buyer: alice.public_hex(),
            tokens: tokens(3),
            treasury_tokens: tokens(50),
            proceeds: "3 USD".into(),
        },
    )
    .await
    .unwrap();
    org.submit(
        "fund",
        Operation::Fund {
            run: "r".into(),
            model: "m".into(),
            amount: tokens(10),
            reward_per_round: tokens(1),
        },
    )
    .await
    .unwrap();
    let before = org.root().await.unwrap();

    // Overdraft.
    let (code, _, msg) = status(
        a.submit(
            "big",
            Operation::Stake {
                run: "r".into(),
                contributor: alice.public_hex(),
                amount: tokens(4),
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(msg.contains("overdraft"), "{msg}");
    // Unknown account: carol never received tokens.
    let carol = Identity::generate();
    let c = LedgerClient::new(&url, carol.clone());
    let (code, kind, _) = status(
        c.submit(
            "c1",
            Operation::Stake {
                run: "r".into(),
                contributor: carol.public_hex(),
                amount: tokens(1),
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((code, kind.as_str()), (404, "unknown_account"));
    // The same id with other content.
    let (code, kind, _) = status(
        org.submit(
            "sale",
            Operation::Sale {
                buyer: alice.public_hex(),
                tokens: tokens(4),
                treasury_tokens: Amount(0),
                proceeds: "x".into(),
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((code, kind.as_str()), (409, "duplicate_id"));
    // Malformed amount and malformed JSON.
    let body = br#"{"id":"x","op":"stake","run":"r","contributor":"c","amount":"12.5"}"#.to_vec();
    let (code, _, msg) = status(a.submit_raw(body).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains("malformed amount `12.5`"), "{msg}");
    let (code, _, msg) = status(a.submit_raw(b"{not json".to_vec()).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(msg.contains("malformed request body"), "{msg}");
    // Oversized body.
    let (code, _, _) = status(a.submit_raw(vec![b' '; 2 << 20]).await.unwrap_err());
    assert_eq!(code, 413);

    // A forged signature and a stale timestamp.
    tessera_net::install_tls_provider();
    let http = reqwest::Client::new();
    let body = br#"{"id":"f","op":"close_epoch","epoch":1}"#.to_vec();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (time, forge, expect) in [
        (now, true, "signature does not match"),
        (now - 3_600_000, false, "check the clock"),
    ] {
        let mut req = http
            .post(format!("{url}/ledger/requests"))
            .body(body.clone());
        for (k, mut v) in sign_request(
            &organiser,
            &audience,
            "POST",
            "/ledger/requests",
            time,
            &body,
        ) {
            if forge && k == HEADER_SIGNATURE {
                v = alice.sign(b"something else");
            }
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        let text = resp.text().await.unwrap();
        assert!(text.contains(expect), "{text}");
    }
    let unsigned = http.get(format!("{url}/ledger/root")).send().await.unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);

    // Every reply is signed by the server: a client pinned to another key refuses it.
    let impostor = tessera_protocol::NodeId::from_hex(&Identity::generate().public_hex()).unwrap();
    let pinned = LedgerClient::pinned(&url, alice.clone(), Some(impostor));
    let err = pinned.root().await.unwrap_err().to_string();
    assert!(err.contains("not the pinned server key"), "{err}");
    let pinned = LedgerClient::pinned(&url, alice.clone(), Some(audience.server));
    assert!(pinned.root().await.is_ok());

    assert_eq!(
        org.root().await.unwrap(),
        before,
        "a refused request changed the ledger"
    );
}
