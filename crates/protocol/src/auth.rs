//! Signed HTTP, both ways.
//!
//! **Requests.** A client signs
//!
//! ```text
//! tessera-http-v2 \n SERVER_KEY \n SCOPE \n SESSION \n METHOD \n PATH_AND_QUERY \n TIME_MS \n blake3(body) as hex
//! ```
//!
//! and sends its public key, the time, the session and the signature in the headers
//! [`HEADER_KEY`], [`HEADER_TIME`], [`HEADER_SESSION`] and [`HEADER_SIGNATURE`]. The
//! first three lines after the tag are the request's [`Audience`]: the server's public
//! key, its scope (the run id for a hub, `ledger` for a stand-alone ledger) and the
//! session the server drew when it started. A signature is therefore good at one server,
//! for one run, until that server restarts: a captured request can't be replayed at
//! another hub, for another run, or after a restart (when the server's replay memory
//! is gone). The server recomputes the message from what it received, so a signature
//! also covers the method, the exact path and query, the body, and a timestamp within
//! [`SIGNED_REQUEST_SKEW_MS`] of the server's clock. Within that window the server's
//! [`ReplayGuard`] refuses a signature it has seen.
//!
//! **Replies.** The server signs every reply,
//!
//! ```text
//! tessera-reply-v1 \n SERVER_KEY \n SCOPE \n SESSION \n METHOD \n PATH_AND_QUERY \n NONCE \n STATUS \n blake3(body) as hex
//! ```
//!
//! where `NONCE` is the [`HEADER_NONCE`] the client sent (fresh per request), and sends
//! the audience and signature in [`HEADER_SERVER_KEY`], [`HEADER_SERVER_SCOPE`],
//! [`HEADER_SERVER_SESSION`] and [`HEADER_SERVER_SIGNATURE`]. A client that pins the
//! server's key (a node's `--hub-key`) refuses a reply that is unsigned, signed by
//! another key, for another request, or an old reply played back.
//!
//! Every header has one text form (lowercase hex of exact length, decimal digits), so
//! the replay guard compares bytes, not spellings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::{signature_from_hex, verify_bytes, Identity};
use crate::ids::NodeId;
use crate::limits::{REPLAY_CACHE_MAX, REPLAY_SIGNER_SHARE_MAX, SIGNED_REQUEST_SKEW_MS};

pub const HEADER_KEY: &str = "x-tessera-key";
pub const HEADER_TIME: &str = "x-tessera-time-ms";
pub const HEADER_SESSION: &str = "x-tessera-session";
pub const HEADER_SIGNATURE: &str = "x-tessera-signature";
/// A client's fresh random value for one request, bound into the reply's signature.
pub const HEADER_NONCE: &str = "x-tessera-nonce";
pub const HEADER_SERVER_KEY: &str = "x-tessera-server-key";
pub const HEADER_SERVER_SCOPE: &str = "x-tessera-server-scope";
pub const HEADER_SERVER_SESSION: &str = "x-tessera-server-session";
pub const HEADER_SERVER_SIGNATURE: &str = "x-tessera-server-signature";

/// Longest nonce a reply is bound to (64 lowercase hex digits).
pub const NONCE_CHARS_MAX: usize = 64;

/// Why a signed request or reply was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    #[error("missing header `{0}`; requests must be signed")]
    Missing(&'static str),
    #[error("header `{0}` is not in its one text form")]
    Malformed(&'static str),
    #[error("header `{HEADER_TIME}` is not a millisecond timestamp")]
    BadTime,
    #[error("request time {time_ms} ms is more than {SIGNED_REQUEST_SKEW_MS} ms from the server's {now_ms} ms; check the clock")]
    Stale { time_ms: u64, now_ms: u64 },
    #[error("the request was signed for session {sent}, but this server's session is {current} (it restarted); fetch /auth and sign again")]
    OtherSession { sent: String, current: String },
    #[error("signature does not match key {key} for this request at this server and run")]
    BadSignature { key: String },
    #[error("this exact signed request was already received; sign each request anew")]
    Replayed,
    #[error("request time {time_ms} ms is not after {floor_ms} ms, the oldest time the server still remembers; sign again")]
    Forgotten { time_ms: u64, floor_ms: u64 },
    #[error("more than {REPLAY_SIGNER_SHARE_MAX} signed requests from one key within {SIGNED_REQUEST_SKEW_MS} ms; slow down")]
    TooMany,
    #[error("the reply is signed by {got}, not the pinned server key {pinned}")]
    OtherServer { got: String, pinned: String },
    #[error("the reply's signature does not match the server key {key}")]
    BadReply { key: String },
}

/// A server session: 16 random bytes drawn when the server starts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Session(pub [u8; 16]);

impl Session {
    pub fn random() -> Session {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Session(bytes)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Exactly 32 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Session> {
        crate::identity::from_hex::<16>(text).map(Session)
    }
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Session({self})")
    }
}

impl Serialize for Session {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Session, D::Error> {
        let text = String::deserialize(d)?;
        Session::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("a session is 32 lowercase hex digits"))
    }
}

/// Whom a signed request is for, and who signs the replies: `GET /auth` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    pub server: NodeId,
    /// The run id at a hub; `ledger` at a stand-alone ledger server.
    pub scope: String,
    pub session: Session,
}

/// A scope is 1–64 characters of `A-Za-z0-9._-` (the rule for run ids), so it can't
/// contain the newline that separates the signed lines.
pub fn valid_scope(scope: &str) -> bool {
    (1..=64).contains(&scope.len())
        && scope
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl Audience {
    fn lines(&self) -> String {
        format!("{}\n{}\n{}", self.server, self.scope, self.session)
    }
}

/// Parses a millisecond timestamp: 1–20 decimal digits, no sign, no leading zero.
fn parse_time(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    text.parse().ok()
}

fn request_message(
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    time_ms: u64,
    body: &[u8],
) -> Vec<u8> {
    format!(
        "tessera-http-v2\n{}\n{method}\n{path_and_query}\n{time_ms}\n{}",
        audience.lines(),
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// The four header values of a request signed for `audience`.
pub fn sign_request(
    id: &Identity,
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    time_ms: u64,
    body: &[u8],
) -> [(&'static str, String); 4] {
    let sig = id.sign(&request_message(
        audience,
        method,
        path_and_query,
        time_ms,
        body,
    ));
    [
        (HEADER_KEY, id.public_hex()),
        (HEADER_TIME, time_ms.to_string()),
        (HEADER_SESSION, audience.session.to_hex()),
        (HEADER_SIGNATURE, sig),
    ]
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub signer: NodeId,
    pub time_ms: u64,
    pub signature: [u8; 64],
}

/// Checks a request's headers (given as a lookup) against this server's `audience`.
pub fn verify_request(
    header: impl Fn(&str) -> Option<String>,
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<Verified, AuthError> {
    let get = |name: &'static str| header(name).ok_or(AuthError::Missing(name));
    let key = get(HEADER_KEY)?;
    let time = get(HEADER_TIME)?;
    let session = get(HEADER_SESSION)?;
    let sig = get(HEADER_SIGNATURE)?;
    let signer = NodeId::from_hex(&key).map_err(|_| AuthError::Malformed(HEADER_KEY))?;
    let time_ms = parse_time(&time).ok_or(AuthError::BadTime)?;
    let sent = Session::from_hex(&session).ok_or(AuthError::Malformed(HEADER_SESSION))?;
    let signature = signature_from_hex(&sig).ok_or(AuthError::Malformed(HEADER_SIGNATURE))?;
    if time_ms.abs_diff(now_ms) > SIGNED_REQUEST_SKEW_MS {
        return Err(AuthError::Stale { time_ms, now_ms });
    }
    if sent != audience.session {
        return Err(AuthError::OtherSession {
            sent: sent.to_hex(),
            current: audience.session.to_hex(),
        });
    }
    let message = request_message(audience, method, path_and_query, time_ms, body);
    if !verify_bytes(signer.as_bytes(), &message, &signature) {
        return Err(AuthError::BadSignature { key });
    }
    Ok(Verified {
        signer,
        time_ms,
        signature,
    })
}

/// [`verify_request`], and then refuses the request if `guard` has seen it before.
pub fn verify_request_once(
    header: impl Fn(&str) -> Option<String>,
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
    guard: &ReplayGuard,
) -> Result<NodeId, AuthError> {
    let v = verify_request(header, audience, method, path_and_query, body, now_ms)?;
    guard.check(&v, now_ms)?;
    Ok(v.signer)
}

/// Remembers accepted signatures for as long as their timestamps are acceptable, so a
/// captured request can't be sent again.
///
/// Story (hardening #11): the guard kept up to 2^20 signature strings (~309 bytes each)
/// and, when full, forgot the oldest: any signer could fill it in minutes with fresh
/// requests, and a forgotten request could be replayed. Now entries are keyed by bytes
/// (16 bytes of a hash of signer and signature, ~100 bytes an entry with the queue),
/// each signer holds at most [`REPLAY_SIGNER_SHARE_MAX`] of them (past that its
/// requests are refused, not anyone else's forgotten), and when the whole cache is
/// full the oldest entry goes but raises a floor: no request stamped at or before a
/// forgotten one is accepted again. Forgetting can then make an honest client sign
/// again, but never lets a replay through.
#[derive(Debug)]
pub struct ReplayGuard {
    inner: Mutex<ReplayState>,
    cap: usize,
    share: u32,
}

#[derive(Debug, Default)]
struct ReplayState {
    seen: HashSet<[u8; 16]>,
    /// (timestamp, key, signer), in the order they were accepted.
    queue: VecDeque<(u64, [u8; 16], NodeId)>,
    per_signer: HashMap<NodeId, u32>,
    /// Requests stamped at or before this were possibly forgotten early.
    floor_ms: u64,
}

impl Default for ReplayGuard {
    fn default() -> ReplayGuard {
        ReplayGuard::with_limits(REPLAY_CACHE_MAX, REPLAY_SIGNER_SHARE_MAX)
    }
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// A guard holding at most `cap` entries, `share` per signer (tests use small ones).
    pub fn with_limits(cap: usize, share: u32) -> ReplayGuard {
        assert!(cap > 0 && share > 0);
        ReplayGuard {
            inner: Mutex::new(ReplayState::default()),
            cap,
            share,
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("replay guard lock").seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a verified request, refusing one seen (or possibly forgotten) before.
    pub fn check(&self, v: &Verified, now_ms: u64) -> Result<(), AuthError> {
        let mut s = self.inner.lock().expect("replay guard lock");
        // Entries whose timestamps are now refused as stale need no memory.
        while let Some(&(time_ms, _, _)) = s.queue.front() {
            if time_ms + SIGNED_REQUEST_SKEW_MS >= now_ms {
                break;
            }
            s.pop_front();
        }
        if v.time_ms <= s.floor_ms {
            return Err(AuthError::Forgotten {
                time_ms: v.time_ms,
                floor_ms: s.floor_ms,
            });
        }
        let mut h = blake3::Hasher::new();
        h.update(v.signer.as_bytes());
        h.update(&v.signature);
        let mut key = [0u8; 16];
        key.copy_from_slice(&h.finalize().as_bytes()[..16]);
        if s.seen.contains(&key) {
            return Err(AuthError::Replayed);
        }
        if s.per_signer.get(&v.signer).copied().unwrap_or(0) >= self.share {
            return Err(AuthError::TooMany);
        }
        while s.seen.len() >= self.cap {
            // Every key in `seen` has its entry in the queue, so this always pops.
            let Some(time_ms) = s.pop_front() else { break };
            s.floor_ms = s.floor_ms.max(time_ms);
        }
        s.seen.insert(key);
        s.queue.push_back((v.time_ms, key, v.signer));
        *s.per_signer.entry(v.signer).or_insert(0) += 1;
        Ok(())
    }
}

impl ReplayState {
    /// Forgets the oldest entry; returns its timestamp.
    fn pop_front(&mut self) -> Option<u64> {
        let (time_ms, key, signer) = self.queue.pop_front()?;
        self.seen.remove(&key);
        if let Some(n) = self.per_signer.get_mut(&signer) {
            *n -= 1;
            if *n == 0 {
                self.per_signer.remove(&signer);
            }
        }
        Some(time_ms)
    }
}

/// A nonce as a reply binds it: up to [`NONCE_CHARS_MAX`] lowercase hex digits; any
/// other header value binds as empty (and a client that sent it fails to verify).
fn nonce_line(nonce: Option<&str>) -> &str {
    match nonce {
        Some(n)
            if n.len() <= NONCE_CHARS_MAX
                && n.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            n
        }
        _ => "",
    }
}

fn reply_message(
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    nonce: Option<&str>,
    status: u16,
    body: &[u8],
) -> Vec<u8> {
    format!(
        "tessera-reply-v1\n{}\n{method}\n{path_and_query}\n{}\n{status}\n{}",
        audience.lines(),
        nonce_line(nonce),
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// The header values a server adds to a reply. `server` must be `audience.server`'s key.
pub fn sign_reply(
    server: &Identity,
    audience: &Audience,
    method: &str,
    path_and_query: &str,
    nonce: Option<&str>,
    status: u16,
    body: &[u8],
) -> [(&'static str, String); 4] {
    let message = reply_message(audience, method, path_and_query, nonce, status, body);
    [
        (HEADER_SERVER_KEY, audience.server.to_hex()),
        (HEADER_SERVER_SCOPE, audience.scope.clone()),
        (HEADER_SERVER_SESSION, audience.session.to_hex()),
        (HEADER_SERVER_SIGNATURE, server.sign(&message)),
    ]
}

/// A fresh random nonce for one request.
pub fn new_nonce() -> String {
    Session::random().to_hex()
}

/// Checks a reply to the request (`method`, `path_and_query`, `nonce`) and returns the
/// audience it was signed under. With `pinned`, a reply signed by another key is
/// refused.
pub fn verify_reply(
    header: impl Fn(&str) -> Option<String>,
    pinned: Option<&NodeId>,
    method: &str,
    path_and_query: &str,
    nonce: &str,
    status: u16,
    body: &[u8],
) -> Result<Audience, AuthError> {
    let get = |name: &'static str| header(name).ok_or(AuthError::Missing(name));
    let key = get(HEADER_SERVER_KEY)?;
    let scope = get(HEADER_SERVER_SCOPE)?;
    let session = get(HEADER_SERVER_SESSION)?;
    let sig = get(HEADER_SERVER_SIGNATURE)?;
    let server = NodeId::from_hex(&key).map_err(|_| AuthError::Malformed(HEADER_SERVER_KEY))?;
    if let Some(p) = pinned {
        if *p != server {
            return Err(AuthError::OtherServer {
                got: key,
                pinned: p.to_hex(),
            });
        }
    }
    if !valid_scope(&scope) {
        return Err(AuthError::Malformed(HEADER_SERVER_SCOPE));
    }
    let session = Session::from_hex(&session).ok_or(AuthError::Malformed(HEADER_SERVER_SESSION))?;
    let signature =
        signature_from_hex(&sig).ok_or(AuthError::Malformed(HEADER_SERVER_SIGNATURE))?;
    let audience = Audience {
        server,
        scope,
        session,
    };
    let message = reply_message(&audience, method, path_and_query, Some(nonce), status, body);
    if !verify_bytes(server.as_bytes(), &message, &signature) {
        return Err(AuthError::BadReply { key });
    }
    Ok(audience)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audience(server: &Identity, scope: &str) -> Audience {
        Audience {
            server: NodeId::from_hex(&server.public_hex()).unwrap(),
            scope: scope.into(),
            session: Session([0xa5; 16]),
        }
    }

    fn lookup<'a, const N: usize>(
        h: &'a [(&'static str, String); N],
    ) -> impl Fn(&str) -> Option<String> + 'a {
        move |name: &str| h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_signature_covers_audience_method_path_body_and_time() {
        let hub = Identity::from_secret([1; 32]);
        let aud = audience(&hub, "run-1");
        let id = Identity::from_secret([7; 32]);
        let h = sign_request(&id, &aud, "POST", "/ledger/requests", 1_000_000, b"{}");
        let ok = verify_request(
            lookup(&h),
            &aud,
            "POST",
            "/ledger/requests",
            b"{}",
            1_000_500,
        );
        assert_eq!(ok.unwrap().signer.to_hex(), id.public_hex());
        let bad = |aud: &Audience, method, path, body: &[u8], now| {
            verify_request(lookup(&h), aud, method, path, body, now).unwrap_err()
        };
        let path = "/ledger/requests";
        assert!(matches!(
            bad(&aud, "POST", path, b"{ }", 1_000_000),
            AuthError::BadSignature { .. }
        ));
        assert!(matches!(
            bad(&aud, "GET", path, b"{}", 1_000_000),
            AuthError::BadSignature { .. }
        ));
        assert!(matches!(
            bad(
                &aud,
                "POST",
                path,
                b"{}",
                1_000_000 + SIGNED_REQUEST_SKEW_MS + 1
            ),
            AuthError::Stale { .. }
        ));
        // Hardening #13: the same request is worthless at another hub, for another
        // run, or after the hub restarted.
        let other_hub = audience(&Identity::from_secret([2; 32]), "run-1");
        assert!(matches!(
            bad(&other_hub, "POST", path, b"{}", 1_000_000),
            AuthError::BadSignature { .. }
        ));
        let other_run = audience(&hub, "run-2");
        assert!(matches!(
            bad(&other_run, "POST", path, b"{}", 1_000_000),
            AuthError::BadSignature { .. }
        ));
        let restarted = Audience {
            session: Session([6; 16]),
            ..aud.clone()
        };
        assert!(matches!(
            bad(&restarted, "POST", path, b"{}", 1_000_000),
            AuthError::OtherSession { .. }
        ));
        assert_eq!(
            verify_request(|_| None, &aud, "POST", "/", b"", 0),
            Err(AuthError::Missing(HEADER_KEY))
        );
    }

    /// Every header has one text form: other spellings of the same values are refused
    /// before the signature is checked.
    #[test]
    fn headers_have_one_text_form() {
        let hub = Identity::from_secret([1; 32]);
        let aud = audience(&hub, "r");
        let id = Identity::from_secret([7; 32]);
        let h = sign_request(&id, &aud, "POST", "/x", 1_000_000, b"");
        for (name, spelling) in [
            (HEADER_KEY, h[0].1.to_uppercase()),
            (HEADER_TIME, format!("+{}", h[1].1)),
            (HEADER_TIME, format!("0{}", h[1].1)),
            (HEADER_SESSION, h[2].1.to_uppercase()),
            (HEADER_SIGNATURE, h[3].1.to_uppercase()),
            (HEADER_SIGNATURE, format!("+{}", &h[3].1[1..])),
        ] {
            let mut changed = h.clone();
            changed.iter_mut().find(|(k, _)| *k == name).unwrap().1 = spelling;
            let r = verify_request(lookup(&changed), &aud, "POST", "/x", b"", 1_000_000);
            assert!(
                matches!(r, Err(AuthError::Malformed(_) | AuthError::BadTime)),
                "{name} = {changed:?}: {r:?}"
            );
        }
    }

    #[test]
    fn a_request_is_accepted_once() {
        let hub = Identity::from_secret([1; 32]);
        let aud = audience(&hub, "r");
        let id = Identity::from_secret([8; 32]);
        let guard = ReplayGuard::new();
        let t = 5_000_000;
        let h = sign_request(&id, &aud, "POST", "/commit", t, b"x");
        let once = |h, now| verify_request_once(h, &aud, "POST", "/commit", b"x", now, &guard);
        assert!(once(lookup(&h), t).is_ok());
        assert_eq!(once(lookup(&h), t + 10), Err(AuthError::Replayed));
        // A fresh signature of the same content (a new timestamp) is a new request.
        let again = sign_request(&id, &aud, "POST", "/commit", t + 1, b"x");
        assert!(once(lookup(&again), t + 10).is_ok());
        // Once the original's timestamp is stale, it is refused as stale and no
        // longer remembered.
        let late = t + SIGNED_REQUEST_SKEW_MS + 2;
        assert!(matches!(
            once(lookup(&h), late),
            Err(AuthError::Stale { .. })
        ));
        let fresh = sign_request(&id, &aud, "POST", "/commit", late, b"x");
        assert!(once(lookup(&fresh), late).is_ok());
        assert_eq!(guard.len(), 1);
    }

    /// Hardening #11: one signer (or many fresh keys) filling the cache must not make
    /// an earlier request replayable, and one signer can't take more than its share.
    #[test]
    fn a_full_replay_cache_forgets_nothing_replayable() {
        let hub = Identity::from_secret([1; 32]);
        let aud = audience(&hub, "r");
        let guard = ReplayGuard::with_limits(8, 3);
        let t = 10_000_000;
        let victim = Identity::from_secret([9; 32]);
        let captured = sign_request(&victim, &aud, "POST", "/node/join", t, b"");
        let once = |h: &[(&'static str, String); 4], now| {
            verify_request_once(lookup(h), &aud, "POST", "/node/join", b"", now, &guard)
        };
        assert!(once(&captured, t).is_ok());
        // A flooding signer gets its share, then is refused; the victim keeps its
        // entry.
        let flooder = Identity::from_secret([10; 32]);
        for i in 1..=3 {
            assert!(once(
                &sign_request(&flooder, &aud, "POST", "/node/join", t + i, b""),
                t + i
            )
            .is_ok());
        }
        assert_eq!(
            once(
                &sign_request(&flooder, &aud, "POST", "/node/join", t + 4, b""),
                t + 4
            ),
            Err(AuthError::TooMany)
        );
        assert_eq!(once(&captured, t + 5), Err(AuthError::Replayed));
        // Fresh keys fill the whole cache: the victim's entry is forgotten, but its
        // capture is still refused (it is at or before the floor).
        for k in 0..20u8 {
            let fresh = Identity::from_secret([100 + k; 32]);
            let now = t + 10 + u64::from(k);
            assert!(once(
                &sign_request(&fresh, &aud, "POST", "/node/join", now, b""),
                now
            )
            .is_ok());
        }
        assert!(guard.len() <= 8);
        assert!(matches!(
            once(&captured, t + 40),
            Err(AuthError::Forgotten { .. })
        ));
        // The victim signs anew and is accepted.
        assert!(once(
            &sign_request(&victim, &aud, "POST", "/node/join", t + 41, b""),
            t + 41
        )
        .is_ok());
    }

    #[test]
    fn replies_are_bound_to_server_request_and_nonce() {
        let hub = Identity::from_secret([1; 32]);
        let aud = audience(&hub, "run-1");
        let pinned = aud.server;
        let h = sign_reply(
            &hub,
            &aud,
            "GET",
            "/state?node=ab",
            Some("00ff"),
            200,
            b"{}",
        );
        let check = |pin: Option<&NodeId>, path, nonce, status, body: &[u8]| {
            verify_reply(lookup(&h), pin, "GET", path, nonce, status, body)
        };
        assert_eq!(
            check(Some(&pinned), "/state?node=ab", "00ff", 200, b"{}"),
            Ok(aud.clone())
        );
        assert_eq!(
            check(None, "/state?node=ab", "00ff", 200, b"{}"),
            Ok(aud.clone())
        );
        for (path, nonce, status, body) in [
            ("/state?node=cd", "00ff", 200, &b"{}"[..]),
            ("/state?node=ab", "00fe", 200, b"{}"),
            ("/state?node=ab", "00ff", 409, b"{}"),
            ("/state?node=ab", "00ff", 200, b"{ }"),
        ] {
            assert!(matches!(
                check(Some(&pinned), path, nonce, status, body),
                Err(AuthError::BadReply { .. })
            ));
        }
        let impostor = Identity::from_secret([3; 32]);
        let other = NodeId::from_hex(&impostor.public_hex()).unwrap();
        assert!(matches!(
            check(Some(&other), "/state?node=ab", "00ff", 200, b"{}"),
            Err(AuthError::OtherServer { .. })
        ));
        // An impostor signing with its own key under the pinned key's name fails.
        let forged = sign_reply(
            &impostor,
            &aud,
            "GET",
            "/state?node=ab",
            Some("00ff"),
            200,
            b"{}",
        );
        assert!(matches!(
            verify_reply(
                lookup(&forged),
                Some(&pinned),
                "GET",
                "/state?node=ab",
                "00ff",
                200,
                b"{}"
            ),
            Err(AuthError::BadReply { .. })
        ));
        assert_eq!(
            verify_reply(|_| None, Some(&pinned), "GET", "/", "", 200, b""),
            Err(AuthError::Missing(HEADER_SERVER_KEY))
        );
    }
}
