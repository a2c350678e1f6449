//! Signed HTTP from `tessera_protocol::auth`: a request's headers as a server checks
//! them (`verify_request`, `verify_request_once` with a replay guard), and a reply's
//! headers as a node checks its hub's (`verify_reply`).
//!
//! An input is newline-terminated UTF-8 fields followed by the body as raw bytes; an
//! empty field stands for a missing header.

use tessera_protocol::auth::{
    self, Audience, Session, HEADER_KEY, HEADER_SERVER_KEY, HEADER_SERVER_SCOPE,
    HEADER_SERVER_SESSION, HEADER_SERVER_SIGNATURE, HEADER_SESSION, HEADER_SIGNATURE, HEADER_TIME,
};
use tessera_protocol::{identity, Identity, NodeId};

/// The server's clock in these targets.
pub const NOW_MS: u64 = 1_800_000_000_000;

/// The server the requests are signed for (a hub of run `demo-1`).
pub fn server() -> Identity {
    Identity::from_secret([9; 32])
}

pub fn audience() -> Audience {
    Audience {
        server: NodeId::from_hex(&server().public_hex()).expect("a key is a node id"),
        scope: "demo-1".into(),
        session: Session([0xa5; 16]),
    }
}

/// Splits `data` into `N` newline-terminated UTF-8 fields and the rest.
pub fn fields<const N: usize>(data: &[u8]) -> Option<([&str; N], &[u8])> {
    let mut out = [""; N];
    let mut rest = data;
    for f in out.iter_mut() {
        let nl = rest.iter().position(|&b| b == b'\n')?;
        *f = std::str::from_utf8(&rest[..nl]).ok()?;
        rest = &rest[nl + 1..];
    }
    Some((out, rest))
}

/// The input for `fields` and a body.
pub fn join(fields: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(f.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(body);
    out
}

/// A header lookup over `(name, value)` pairs; an empty value is a missing header.
fn lookup<'a>(pairs: &'a [(&'static str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name: &str| {
        pairs
            .iter()
            .find(|(n, v)| *n == name && !v.is_empty())
            .map(|(_, v)| v.to_string())
    }
}

/// Fields: key, time, session, signature, method, path and query; then the body.
pub fn signed_request(data: &[u8]) {
    let Some(([key, time, session, signature, method, path], body)) = fields::<6>(data) else {
        return;
    };
    let pairs = [
        (HEADER_KEY, key),
        (HEADER_TIME, time),
        (HEADER_SESSION, session),
        (HEADER_SIGNATURE, signature),
    ];
    let header = lookup(&pairs);
    let audience = audience();
    let verified = auth::verify_request(&header, &audience, method, path, body, NOW_MS);
    let guard = auth::ReplayGuard::new();
    let once = auth::verify_request_once(&header, &audience, method, path, body, NOW_MS, &guard);
    assert_eq!(
        verified.as_ref().map(|v| v.signer),
        once.as_ref().copied(),
        "the replay guard changed a first request's verdict"
    );
    let Ok(v) = verified else {
        return;
    };
    // Every header that was accepted is in its one text form.
    assert_eq!(v.signer.to_hex(), key);
    assert_eq!(v.time_ms.to_string(), time);
    assert_eq!(session, audience.session.to_hex());
    assert_eq!(identity::signature_from_hex(signature), Some(v.signature));
    // The same request again is a replay.
    assert_eq!(
        auth::verify_request_once(&header, &audience, method, path, body, NOW_MS, &guard),
        Err(auth::AuthError::Replayed)
    );
}

/// Fields: server key, scope, session, signature, method, path and query, nonce,
/// status; then the body. Checked unpinned and pinned to the target's server.
pub fn signed_reply(data: &[u8]) {
    let Some(([key, scope, session, signature, method, path, nonce, status], body)) =
        fields::<8>(data)
    else {
        return;
    };
    let Ok(status) = status.parse::<u16>() else {
        return;
    };
    let pairs = [
        (HEADER_SERVER_KEY, key),
        (HEADER_SERVER_SCOPE, scope),
        (HEADER_SERVER_SESSION, session),
        (HEADER_SERVER_SIGNATURE, signature),
    ];
    let header = lookup(&pairs);
    let pinned = audience().server;
    let open = auth::verify_reply(&header, None, method, path, nonce, status, body);
    let pin = auth::verify_reply(&header, Some(&pinned), method, path, nonce, status, body);
    if let Ok(a) = &open {
        assert_eq!(a.server.to_hex(), key);
        assert_eq!(a.scope, scope);
        assert_eq!(a.session.to_hex(), session);
        assert!(auth::valid_scope(&a.scope));
        // Pinning only adds a refusal: of another server's reply.
        assert_eq!(pin.is_ok(), a.server == pinned, "{pin:?}");
    } else {
        assert!(pin.is_err(), "pinning accepted what the open check refused");
    }
}
