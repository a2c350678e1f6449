//! The HTTP side of [`tessera_protocol::auth`]: a server's key, audience and replay
//! memory ([`ServerAuth`]), the layer that signs every reply ([`with_signed_replies`]),
//! and the client half ([`ClientAuth`]) that signs requests for the server's audience
//! and checks every reply against the pinned server key.
//!
//! A client learns the audience from `GET /auth` (itself a signed reply). A client
//! given no key pins the first key it sees for its lifetime; one given a key (a node's
//! `--hub-key`) refuses any other from the first reply on. When the server restarts
//! it draws a new session: the client's next signed request is refused (401), the
//! refusal's signed headers carry the new session, and the client signs once more.

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use tessera_protocol::auth::{
    new_nonce, sign_reply, sign_request, valid_scope, verify_reply, verify_request_once, Audience,
    AuthError, ReplayGuard, Session, HEADER_NONCE,
};
use tessera_protocol::{Identity, NodeId};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lookup(headers: &HeaderMap) -> impl Fn(&str) -> Option<String> + '_ {
    |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map_or(uri.path(), |p| p.as_str())
}

/// A server's side of signed HTTP: its key, its audience (key, scope, this start's
/// session) and the memory of requests already accepted.
pub struct ServerAuth {
    identity: Identity,
    audience: Audience,
    replays: ReplayGuard,
}

impl ServerAuth {
    /// A server signing with `identity` for `scope` (a run id, or `ledger`), with a
    /// fresh session.
    pub fn new(identity: Identity, scope: &str) -> anyhow::Result<ServerAuth> {
        if !valid_scope(scope) {
            anyhow::bail!(
                "`{}` can't name a server's scope: use 1-64 characters of A-Za-z0-9._-",
                scope.escape_debug()
            );
        }
        let server = NodeId::from_hex(&identity.public_hex()).expect("own key is canonical");
        Ok(ServerAuth {
            identity,
            audience: Audience {
                server,
                scope: scope.to_string(),
                session: Session::random(),
            },
            replays: ReplayGuard::new(),
        })
    }

    pub fn audience(&self) -> &Audience {
        &self.audience
    }

    /// Checks a received request's signature, audience and freshness, and refuses a
    /// signature already accepted; returns the signer.
    pub fn verify(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        now_ms: u64,
    ) -> Result<NodeId, AuthError> {
        verify_request_once(
            lookup(headers),
            &self.audience,
            method.as_str(),
            path_of(uri),
            body,
            now_ms,
            &self.replays,
        )
    }
}

/// Adds `GET /auth` (the audience) to `router` and signs every reply it gives,
/// refusals included.
pub fn with_signed_replies(router: Router, auth: Arc<ServerAuth>) -> Router {
    let audience = auth.audience.clone();
    router
        .route("/auth", get(move || async move { Json(audience) }))
        .layer(axum::middleware::from_fn_with_state(auth, sign_replies))
}

async fn sign_replies(State(auth): State<Arc<ServerAuth>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = path_of(req.uri()).to_string();
    let nonce = req
        .headers()
        .get(HEADER_NONCE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let response = next.run(req).await;
    let (mut parts, body) = response.into_parts();
    // Our own handlers made this body; it is already whole in memory or a file read.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => axum::body::Bytes::new(),
    };
    let headers = sign_reply(
        &auth.identity,
        &auth.audience,
        method.as_str(),
        &path,
        nonce.as_deref(),
        parts.status.as_u16(),
        &bytes,
    );
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            parts.headers.insert(HeaderName::from_static(name), v);
        }
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// A client's side of signed HTTP with one server.
#[derive(Debug, Default)]
pub struct ClientAuth {
    state: Mutex<ClientState>,
}

#[derive(Debug, Default)]
struct ClientState {
    /// Given by the user, or the first key seen.
    pinned: Option<NodeId>,
    audience: Option<Audience>,
}

/// One request's headers and what its reply is checked against.
pub struct Prepared {
    pub headers: Vec<(&'static str, String)>,
    nonce: String,
    session: Option<Session>,
}

/// What a reply's check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyCheck {
    /// Signed under the session the request used (or an unsigned request).
    Current,
    /// Signed under a new session: the server restarted. A refused signed request
    /// should be signed again.
    NewSession,
}

impl ClientAuth {
    /// A client that accepts only replies signed by `pinned`, or, without it, by the
    /// first key it sees.
    pub fn new(pinned: Option<NodeId>) -> ClientAuth {
        ClientAuth {
            state: Mutex::new(ClientState {
                pinned,
                audience: None,
            }),
        }
    }

    /// The audience learned so far.
    pub fn audience(&self) -> Option<Audience> {
        self.state
            .lock()
            .expect("client auth lock")
            .audience
            .clone()
    }

    /// The server key replies must carry (pinned or first seen).
    pub fn server_key(&self) -> Option<NodeId> {
        self.state.lock().expect("client auth lock").pinned
    }

    /// Headers for a request: a fresh nonce and, with `signer`, a signature for the
    /// audience learned so far (None when none is known yet: fetch `/auth` first).
    pub fn prepare(
        &self,
        signer: Option<&Identity>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Option<Prepared> {
        let nonce = new_nonce();
        let mut headers = vec![(HEADER_NONCE, nonce.clone())];
        let mut session = None;
        if let Some(id) = signer {
            let audience = self.audience()?;
            session = Some(audience.session);
            headers.extend(sign_request(id, &audience, method, path, now_ms(), body));
        }
        Some(Prepared {
            headers,
            nonce,
            session,
        })
    }

    /// Checks a reply's signature against the pinned key and the request it answers;
    /// learns the server's audience from it.
    pub fn check(
        &self,
        prepared: &Prepared,
        method: &str,
        path: &str,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<ReplyCheck, AuthError> {
        let mut s = self.state.lock().expect("client auth lock");
        let audience = verify_reply(
            lookup(headers),
            s.pinned.as_ref(),
            method,
            path,
            &prepared.nonce,
            status,
            body,
        )?;
        s.pinned = Some(audience.server);
        let fresh = prepared
            .session
            .is_some_and(|used| used != audience.session);
        s.audience = Some(audience);
        Ok(if fresh {
            ReplyCheck::NewSession
        } else {
            ReplyCheck::Current
        })
    }
}

/// Why a call to a server gave no checked reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("cannot reach the server: {0}")]
    Transport(#[from] reqwest::Error),
    /// The reply was not signed by the server's key, or not for this request.
    #[error("the server's reply can't be trusted: {0}")]
    Auth(#[from] AuthError),
    #[error("reading the server's reply: {0}")]
    Read(std::io::Error),
    #[error("the server's reply is over {max} bytes")]
    TooLarge { max: usize },
}

/// A reply whose signature checked out.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Checks the reply to `prepared` and says whether to sign once more (a signed request
/// refused under a session the server no longer has).
fn retry_after(
    auth: &ClientAuth,
    prepared: &Prepared,
    method: &str,
    path: &str,
    reply: &Reply,
    headers: &HeaderMap,
) -> Result<bool, AuthError> {
    let check = auth.check(prepared, method, path, reply.status, headers, &reply.body)?;
    Ok(check == ReplyCheck::NewSession && reply.status == 401)
}

/// One call to a server with reqwest's async client: learns the audience first when a
/// signed request needs it, signs, checks the reply's signature, and signs once more
/// if the server restarted meanwhile. Replies over `reply_max` bytes are refused
/// while they stream in.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    http: &reqwest::Client,
    base: &str,
    auth: &ClientAuth,
    signer: Option<&Identity>,
    method: &str,
    path: &str,
    body: Vec<u8>,
    reply_max: usize,
) -> Result<Reply, CallError> {
    for attempt in 0..2 {
        let prepared = match auth.prepare(signer, method, path, &body) {
            Some(p) => p,
            None => {
                Box::pin(call(
                    http,
                    base,
                    auth,
                    None,
                    "GET",
                    "/auth",
                    Vec::new(),
                    4096,
                ))
                .await?;
                auth.prepare(signer, method, path, &body)
                    .ok_or(AuthError::Missing(
                        tessera_protocol::auth::HEADER_SERVER_KEY,
                    ))?
            }
        };
        let url = format!("{base}{path}");
        let mut req = match method {
            "POST" => http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone()),
            _ => http.get(&url),
        };
        for (k, v) in &prepared.headers {
            req = req.header(*k, v);
        }
        let mut resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if bytes.len() + chunk.len() > reply_max {
                return Err(CallError::TooLarge { max: reply_max });
            }
            bytes.extend_from_slice(&chunk);
        }
        let reply = Reply {
            status,
            body: bytes,
        };
        if retry_after(auth, &prepared, method, path, &reply, &headers)? && attempt == 0 {
            continue;
        }
        return Ok(reply);
    }
    unreachable!("the loop returns on its second pass")
}

/// [`call`] with reqwest's blocking client.
#[allow(clippy::too_many_arguments)]
pub fn call_blocking(
    http: &reqwest::blocking::Client,
    base: &str,
    auth: &ClientAuth,
    signer: Option<&Identity>,
    method: &str,
    path: &str,
    body: Vec<u8>,
    reply_max: usize,
) -> Result<Reply, CallError> {
    use std::io::Read;
    for attempt in 0..2 {
        let prepared = match auth.prepare(signer, method, path, &body) {
            Some(p) => p,
            None => {
                call_blocking(http, base, auth, None, "GET", "/auth", Vec::new(), 4096)?;
                auth.prepare(signer, method, path, &body)
                    .ok_or(AuthError::Missing(
                        tessera_protocol::auth::HEADER_SERVER_KEY,
                    ))?
            }
        };
        let url = format!("{base}{path}");
        let mut req = match method {
            "POST" => http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone()),
            _ => http.get(&url),
        };
        for (k, v) in &prepared.headers {
            req = req.header(*k, v);
        }
        let resp = req.send()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut bytes = Vec::new();
        resp.take(reply_max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(CallError::Read)?;
        if bytes.len() > reply_max {
            return Err(CallError::TooLarge { max: reply_max });
        }
        let reply = Reply {
            status,
            body: bytes,
        };
        if retry_after(auth, &prepared, method, path, &reply, &headers)? && attempt == 0 {
            continue;
        }
        return Ok(reply);
    }
    unreachable!("the loop returns on its second pass")
}
