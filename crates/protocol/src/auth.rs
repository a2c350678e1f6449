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

use crate::identity::{verify, Identity};
use crate::limits::SIGNED_REQUEST_SKEW_MS;

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
}
