//! The HTTP side of signed requests: the wall clock, and checking a received request's
//! headers with [`tessera_protocol::auth::verify_request`].

use axum::http::{HeaderMap, Method, Uri};
use tessera_protocol::auth::{verify_request, AuthError};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Verifies a received request's signature over its method, path and query, and body;
/// returns the signer's public key in hex.
pub fn verify_http(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: u64,
) -> Result<String, AuthError> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    verify_request(lookup(headers), method.as_str(), path, body, now_ms)
}

fn lookup(headers: &HeaderMap) -> impl Fn(&str) -> Option<String> + '_ {
    |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

/// [`verify_http`] that also refuses a request whose exact signature `guard` has seen:
/// for control planes where a replayed message must not count twice.
pub fn verify_http_once(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: u64,
    guard: &tessera_protocol::auth::ReplayGuard,
) -> Result<String, AuthError> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    tessera_protocol::auth::verify_request_once(
        lookup(headers),
        method.as_str(),
        path,
        body,
        now_ms,
        guard,
    )
}
