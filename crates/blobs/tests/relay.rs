//! Blobs through a relay: a relay on loopback with a certificate of its own, and two
//! endpoints that know each other only by endpoint id and relay URL.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_blobs::{
    hash_of, self_signed, BlobTransport, IrohBlobs, IrohOptions, PeerAddr, RelayInfo, RelayServer,
    RelayServerOptions, RelayTls,
};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn relay() -> (RelayServer, RelayInfo) {
    let (ca, cert, key) = self_signed(&["127.0.0.1".into()]).unwrap();
    let server = RelayServer::spawn(RelayServerOptions {
        http_bind: loopback(0),
        tls: Some(RelayTls {
            https_bind: loopback(0),
            cert_chain_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
        }),
        quic_bind: Some(loopback(0)),
        client_rx_bytes_per_second: None,
    })
    .unwrap();
    let info = RelayInfo {
        url: format!("https://127.0.0.1:{}", server.https_addr().unwrap().port()),
        quic_port: Some(server.quic_addr().unwrap().port()),
        cert_pem: Some(ca),
    };
    (server, info)
}

fn endpoint(relays: Vec<RelayInfo>) -> IrohBlobs {
    let mut o = IrohOptions::loopback();
    o.fetch_timeout = Duration::from_secs(20);
    o.connect_timeout = Duration::from_secs(10);
    o.relays = relays;
    IrohBlobs::bind(o).unwrap()
}

/// The address `peer` hands out, cut to its endpoint id and relay: what a node behind
/// a NAT that blocks incoming packets can offer.
fn relay_only(peer: &PeerAddr) -> PeerAddr {
    let mut v: serde_json::Value = serde_json::from_str(&peer.0).unwrap();
    let addrs = v["addrs"].as_array_mut().unwrap();
    addrs.retain(|a| a.get("Relay").is_some());
    assert_eq!(addrs.len(), 1, "the endpoint names its relay: {peer}");
    PeerAddr(v.to_string())
}

#[test]
fn a_blob_moves_through_the_relay() {
    let (server, info) = relay();
    let a = endpoint(vec![info.clone()]);
    let b = endpoint(vec![info.clone()]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let hash = a.publish(&data).unwrap();
    let got = b.fetch(&hash, &[relay_only(&a.addr())], 1 << 20).unwrap();
    assert_eq!(hash_of(&got), hash);
    let (ta, tb) = (a.traffic(), b.traffic());
    assert!(
        tb.paths.relay_received > 0,
        "b received through the relay: {tb:?}"
    );
    assert!(ta.paths.relay_sent > 0, "a sent through the relay: {ta:?}");
    assert_eq!(tb.paths.fetches_direct + tb.paths.fetches_relayed, 1);
    let s = server.stats();
    assert!(s.accepts >= 2 && s.bytes_received > 0, "{s:?}");
}

/// The hub cuts a commit's address down to what it may dial: the run's relays stay,
/// a relay the run does not name is dropped.
#[test]
fn reachable_at_keeps_only_the_runs_relays() {
    let (_server, info) = relay();
    let hub = endpoint(vec![info.clone()]);
    let node = endpoint(vec![info.clone()]);
    let elsewhere: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    let cut = hub.reachable_at(&node.addr(), elsewhere).unwrap();
    assert!(
        cut.0.contains(&info.url.trim_end_matches('/').to_string()),
        "{cut}"
    );
    assert!(
        !cut.0.contains("127.0.0.1\""),
        "no direct address survives: {cut}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&node.addr().0).unwrap();
    for a in v["addrs"].as_array_mut().unwrap() {
        if a.get("Relay").is_some() {
            *a = serde_json::json!({"Relay": "https://relay.attacker.example/"});
        }
    }
    let foreign = PeerAddr(v.to_string());
    assert!(
        hub.reachable_at(&foreign, elsewhere).is_err(),
        "a foreign relay is not the run's"
    );
}

#[test]
fn bad_relay_settings_are_refused() {
    for (url, what) in [
        ("ftp://relay.example", "not http"),
        ("https://", "no host"),
        ("https://user@relay.example", "userinfo"),
    ] {
        let info = RelayInfo {
            url: url.into(),
            quic_port: None,
            cert_pem: None,
        };
        let mut o = IrohOptions::loopback();
        o.relays = vec![info];
        assert!(IrohBlobs::bind(o).is_err(), "{what}: {url}");
    }
    // More relays than a run may name, and a certificate that is not PEM.
    let relay = |i: usize| RelayInfo {
        url: format!("https://relay{i}.example.org"),
        quic_port: Some(7842),
        cert_pem: None,
    };
    let mut o = IrohOptions::loopback();
    o.relays = (0..=tessera_protocol::limits::RELAYS_MAX)
        .map(relay)
        .collect();
    let e = IrohBlobs::bind(o)
        .err()
        .expect("too many relays")
        .to_string();
    assert!(e.contains("relays, more than"), "{e}");
    let mut o = IrohOptions::loopback();
    o.relays = vec![RelayInfo {
        cert_pem: Some(
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
        ),
        ..relay(0)
    }];
    assert!(IrohBlobs::bind(o).is_err(), "a broken certificate");
}
