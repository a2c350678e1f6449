//! Signed HTTP requests. A client signs
//!
//! ```text
//! tessera-http-v1 \n METHOD \n PATH_AND_QUERY \n TIME_MS \n blake3(body) as hex
//! ```
//!
//! and sends its public key, the time and the signature in the headers
//! [`HEADER_KEY`], [`HEADER_TIME`] and [`HEADER_SIGNATURE`]. The server recomputes the
//! message from what it received, so a signature covers the method, the exact path and
//! query, the body, and a timestamp that must be within
//! [`crate::limits::SIGNED_REQUEST_SKEW_MS`] of the server's clock.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::identity::{verify, Identity};
use crate::limits::{REPLAY_CACHE_MAX, SIGNED_REQUEST_SKEW_MS};

pub const HEADER_KEY: &str = "x-tessera-key";
pub const HEADER_TIME: &str = "x-tessera-time-ms";
pub const HEADER_SIGNATURE: &str = "x-tessera-signature";

/// Why a signed request was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    #[error("missing header `{0}`; requests must be signed")]
    Missing(&'static str),
    #[error("header `{HEADER_TIME}` is not a millisecond timestamp")]
    BadTime,
    #[error("request time {time_ms} ms is more than {SIGNED_REQUEST_SKEW_MS} ms from the server's {now_ms} ms; check the clock")]
    Stale { time_ms: u64, now_ms: u64 },
    #[error("signature does not match key {key} for this request")]
    BadSignature { key: String },
    #[error("this exact signed request was already received; sign each request anew")]
    Replayed,
}

/// Remembers the signatures of accepted requests for as long as their timestamps are
/// acceptable, so a captured request cannot be sent again. (A signed request is valid
/// for [`SIGNED_REQUEST_SKEW_MS`] either side of the server's clock; every honest
/// request carries a fresh timestamp and therefore a fresh signature.)
#[derive(Debug, Default)]
pub struct ReplayGuard {
    inner: Mutex<ReplayState>,
}

#[derive(Debug, Default)]
struct ReplayState {
    seen: HashSet<String>,
    /// (time the entry may be dropped, signature), oldest first.
    expiry: VecDeque<(u64, String)>,
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Records `signature` (of a request stamped `time_ms`), refusing one seen before.
    pub fn check(&self, signature: &str, time_ms: u64, now_ms: u64) -> Result<(), AuthError> {
        let mut s = self.inner.lock().expect("replay guard lock");
        while let Some((until, _)) = s.expiry.front() {
            if *until > now_ms && s.seen.len() < REPLAY_CACHE_MAX {
                break;
            }
            let (_, sig) = s.expiry.pop_front().expect("front exists");
            s.seen.remove(&sig);
        }
        if !s.seen.insert(signature.to_string()) {
            return Err(AuthError::Replayed);
        }
        // Past this moment the timestamp itself is refused as stale.
        s.expiry
            .push_back((time_ms + SIGNED_REQUEST_SKEW_MS + 1, signature.to_string()));
        Ok(())
    }
}

fn message(method: &str, path_and_query: &str, time_ms: u64, body: &[u8]) -> Vec<u8> {
    format!(
        "tessera-http-v1\n{method}\n{path_and_query}\n{time_ms}\n{}",
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// The three header values for a request.
pub fn sign_request(
    id: &Identity,
    method: &str,
    path_and_query: &str,
    time_ms: u64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let sig = id.sign(&message(method, path_and_query, time_ms, body));
    [
        (HEADER_KEY, id.public_hex()),
        (HEADER_TIME, time_ms.to_string()),
        (HEADER_SIGNATURE, sig),
    ]
}

/// Checks a request's headers (given as a lookup) and returns the signer's public key.
pub fn verify_request(
    header: impl Fn(&str) -> Option<String>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<String, AuthError> {
    let key = header(HEADER_KEY).ok_or(AuthError::Missing(HEADER_KEY))?;
    let time = header(HEADER_TIME).ok_or(AuthError::Missing(HEADER_TIME))?;
    let sig = header(HEADER_SIGNATURE).ok_or(AuthError::Missing(HEADER_SIGNATURE))?;
    let time_ms: u64 = time.parse().map_err(|_| AuthError::BadTime)?;
    if time_ms.abs_diff(now_ms) > SIGNED_REQUEST_SKEW_MS {
        return Err(AuthError::Stale { time_ms, now_ms });
    }
    if !verify(&key, &message(method, path_and_query, time_ms, body), &sig) {
        return Err(AuthError::BadSignature { key });
    }
    Ok(key.to_ascii_lowercase())
}

/// [`verify_request`], and then refuses the request if `guard` has seen it before.
pub fn verify_request_once(
    header: impl Fn(&str) -> Option<String>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
    guard: &ReplayGuard,
) -> Result<String, AuthError> {
    let key = verify_request(&header, method, path_and_query, body, now_ms)?;
    let sig = header(HEADER_SIGNATURE).ok_or(AuthError::Missing(HEADER_SIGNATURE))?;
    let time_ms: u64 = header(HEADER_TIME)
        .and_then(|t| t.parse().ok())
        .ok_or(AuthError::BadTime)?;
    guard.check(&sig, time_ms, now_ms)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_method_path_body_and_time() {
        let id = Identity::from_secret([7; 32]);
        let headers = sign_request(&id, "POST", "/ledger/requests", 1_000_000, b"{}");
        let lookup = |h: &[(&'static str, String); 3]| {
            let h = h.clone();
            move |name: &str| h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        };
        assert_eq!(
            verify_request(
                lookup(&headers),
                "POST",
                "/ledger/requests",
                b"{}",
                1_000_500
            ),
            Ok(id.public_hex())
        );
        assert!(matches!(
            verify_request(
                lookup(&headers),
                "POST",
                "/ledger/requests",
                b"{ }",
                1_000_000
            ),
            Err(AuthError::BadSignature { .. })
        ));
        assert!(matches!(
            verify_request(
                lookup(&headers),
                "GET",
                "/ledger/requests",
                b"{}",
                1_000_000
            ),
            Err(AuthError::BadSignature { .. })
        ));
        assert!(matches!(
            verify_request(
                lookup(&headers),
                "POST",
                "/ledger/requests",
                b"{}",
                1_000_000 + SIGNED_REQUEST_SKEW_MS + 1
            ),
            Err(AuthError::Stale { .. })
        ));
        assert_eq!(
            verify_request(|_| None, "POST", "/", b"", 0),
            Err(AuthError::Missing(HEADER_KEY))
        );
    }

    #[test]
    fn a_request_is_accepted_once() {
        let id = Identity::from_secret([8; 32]);
        let guard = ReplayGuard::new();
        let t = 5_000_000;
        let headers = sign_request(&id, "POST", "/commit", t, b"x");
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert!(verify_request_once(lookup, "POST", "/commit", b"x", t, &guard).is_ok());
        assert_eq!(
            verify_request_once(lookup, "POST", "/commit", b"x", t + 10, &guard),
            Err(AuthError::Replayed)
        );
        // A fresh signature of the same content (a new timestamp) is a new request.
        let again = sign_request(&id, "POST", "/commit", t + 1, b"x");
        let lookup2 = |name: &str| {
            again
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert!(verify_request_once(lookup2, "POST", "/commit", b"x", t + 10, &guard).is_ok());
        // Once the original's timestamp is stale, it is refused as stale rather than
        // remembered for ever.
        let late = t + SIGNED_REQUEST_SKEW_MS + 2;
        assert!(matches!(
            verify_request_once(lookup, "POST", "/commit", b"x", late, &guard),
            Err(AuthError::Stale { .. })
        ));
        assert!(guard.inner.lock().unwrap().seen.len() <= 2);
    }
}
