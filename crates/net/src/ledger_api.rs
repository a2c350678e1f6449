//! The ledger over HTTP/JSON.
//!
//! | method | path | who |
//! |---|---|---|
//! | POST | `/ledger/requests` | organiser: sale, fund, payout, slash, revenue, close_epoch; a contributor: its own stake, unbond, release |
//! | GET | `/ledger/balance/{account}` | organiser: any; contributor: its own and public accounts |
//! | GET | `/ledger/history/{account}?limit=N` | organiser: any; contributor: its own accounts |
//! | GET | `/ledger/prove/{account}` | as balance |
//! | GET | `/ledger/root` | anyone who signs |
//! | GET | `/ledger/verify` | organiser |
//!
//! A request body is a ledger request without its signer: `{"id": ..., "op": ..., ...}`.
//! Errors are `{"error": message, "kind": ...}` with 400 (malformed), 401 (signature),
//! 403 (not allowed), 404 (unknown account or run), 409 (id reused, round already paid),
//! 413 (body over the limit), 422 (refused by the ledger's rules), 500 (storage).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tessera_ledger::state::Operation;
use tessera_ledger::{
    Account, Ledger, LedgerError, Receipt, Request, Signer, SqliteStore, Store, SubmitError,
    Transfer,
};
use tessera_protocol::limits::{HISTORY_LIMIT_MAX, HTTP_BODY_BYTES_MAX};
use tessera_protocol::{Identity, NodeId};

use crate::http_auth::{call, CallError, ClientAuth, ServerAuth};

/// What the ledger routes share.
pub struct LedgerService {
    pub ledger: Mutex<Ledger<SqliteStore>>,
    /// The run organiser's public key (hex).
    pub organiser: String,
    /// Milliseconds since the epoch; injected so tests control time.
    pub clock: Box<dyn Fn() -> u64 + Send + Sync>,
    /// The server's key, audience and replay memory: a ledger request is good once,
    /// at this server, until it restarts.
    pub auth: Arc<ServerAuth>,
}

impl LedgerService {
    pub fn new(
        ledger: Ledger<SqliteStore>,
        organiser: String,
        auth: Arc<ServerAuth>,
    ) -> LedgerService {
        LedgerService {
            ledger: Mutex::new(ledger),
            organiser: organiser.to_ascii_lowercase(),
            clock: Box::new(crate::http_auth::now_ms),
            auth,
        }
    }
}

/// An error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub kind: String,
    #[serde(skip)]
    status: u16,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, error: impl ToString) -> ApiError {
        ApiError {
            error: error.to_string(),
            kind: kind.to_string(),
            status: status.as_u16(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self)).into_response()
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> ApiError {
        let (status, kind) = match &e {
            LedgerError::WrongSigner { .. } => (StatusCode::FORBIDDEN, "wrong_signer"),
            LedgerError::UnknownAccount { .. } => (StatusCode::NOT_FOUND, "unknown_account"),
            LedgerError::UnknownRun { .. } => (StatusCode::NOT_FOUND, "unknown_run"),
            LedgerError::UnknownModel { .. } => (StatusCode::NOT_FOUND, "unknown_model"),
            LedgerError::DuplicateId { .. } => (StatusCode::CONFLICT, "duplicate_id"),
            LedgerError::AlreadyPaid { .. } => (StatusCode::CONFLICT, "already_paid"),
            LedgerError::BadAccount(_)
            | LedgerError::BadRequestId { .. }
            | LedgerError::BadAmount { .. } => (StatusCode::BAD_REQUEST, "malformed"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "refused"),
        };
        ApiError::new(status, kind, e)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Refused(e) => e.into(),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", other),
        }
    }
}

/// Checks the signature and maps the key to a ledger signer.
fn authenticate(
    svc: &LedgerService,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Signer, ApiError> {
    let key = svc
        .auth
        .verify(method, uri, headers, body, (svc.clock)())
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e))?
        .to_hex();
    Ok(if key == svc.organiser {
        Signer::Organiser
    } else {
        Signer::Contributor(key)
    })
}

/// Whether `signer` may read `account`: the organiser reads everything; a contributor
/// its own accounts and, for balances, the public ones (treasury, pools, burned).
fn may_read(signer: &Signer, account: &Account, public_ok: bool) -> bool {
    match signer {
        Signer::Organiser => true,
        Signer::Contributor(me) => match account {
            Account::Contributor(c)
            | Account::Stake { contributor: c, .. }
            | Account::Unbonding { contributor: c, .. } => c == me,
            _ => public_ok,
        },
    }
}

fn parse_account(text: &str) -> Result<Account, ApiError> {
    text.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e))
}

fn forbidden(signer: &Signer, account: &Account) -> ApiError {
    let who = match signer {
        Signer::Organiser => "organiser".to_string(),
        Signer::Contributor(c) => format!("contributor:{c}"),
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{who} may not read {account}"),
    )
}

/// A request body: a ledger request without its signer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestBody {
    pub id: String,
    #[serde(flatten)]
    pub op: Operation,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?
}

async fn submit(
    State(svc): State<Arc<LedgerService>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Receipt>, ApiError> {
    let signer = authenticate(&svc, &method, &uri, &headers, &body)?;
    let parsed: RequestBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("malformed request body: {e}"),
        )
    })?;
    let request = Request {
        id: parsed.id,
        signer,
        op: parsed.op,
    };
    let now = (svc.clock)();
    blocking(move || {
        let mut ledger = svc.ledger.lock().expect("ledger lock");
        Ok(Json(ledger.submit(&request, now)?))
    })
    .await
}

#[derive(Serialize, Deserialize)]
pub struct BalanceResponse {
    pub account: Account,
    pub base_units: String,
}

async fn balance(
    State(svc): State<Arc<LedgerService>>,
    Path(account): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<BalanceResponse>, ApiError> {
    let signer = authenticate(&svc, &method, &uri, &headers, b"")?;
    let account = parse_account(&account)?;
    if !may_read(&signer, &account, true) {
        return Err(forbidden(&signer, &account));
    }
    let ledger = svc.ledger.lock().expect("ledger lock");
    let base_units = match &account {
        Account::Issuance => format!("-{}", ledger.state().issued()),
        a => ledger
            .state()
            .balance(a)
            .ok_or_else(|| {
                ApiError::from(LedgerError::UnknownAccount {
                    account: a.to_string(),
                })
            })?
            .to_string(),
    };
    Ok(Json(BalanceResponse {
        account,
        base_units,
    }))
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
}

async fn history(
    State(svc): State<Arc<LedgerService>>,
    Path(account): Path<String>,
    Query(q): Query<HistoryQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<Transfer>>, ApiError> {
    let signer = authenticate(&svc, &method, &uri, &headers, b"")?;
    let account = parse_account(&account)?;
    if !may_read(&signer, &account, false) {
        return Err(forbidden(&signer, &account));
    }
    let limit = q.limit.unwrap_or(100).min(HISTORY_LIMIT_MAX);
    blocking(move || {
        let ledger = svc.ledger.lock().expect("ledger lock");
        ledger
            .store()
            .history(&account, limit)
            .map(Json)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e))
    })
    .await
}

async fn prove(
    State(svc): State<Arc<LedgerService>>,
    Path(account): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let signer = authenticate(&svc, &method, &uri, &headers, b"")?;
    let account = parse_account(&account)?;
    if !may_read(&signer, &account, true) {
        return Err(forbidden(&signer, &account));
    }
    let ledger = svc.ledger.lock().expect("ledger lock");
    let proof = ledger.state().prove(&account)?;
    Ok(Json(
        serde_json::json!({"root": ledger.state().root(), "proof": proof}),
    ))
}

async fn root(
    State(svc): State<Arc<LedgerService>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authenticate(&svc, &method, &uri, &headers, b"")?;
    let ledger = svc.ledger.lock().expect("ledger lock");
    Ok(Json(
        serde_json::json!({"root": ledger.state().root(), "epochs": ledger.state().epochs()}),
    ))
}

async fn verify(
    State(svc): State<Arc<LedgerService>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    if authenticate(&svc, &method, &uri, &headers, b"")? != Signer::Organiser {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the organiser may run a full verification",
        ));
    }
    blocking(move || {
        let ledger = svc.ledger.lock().expect("ledger lock");
        let report = ledger
            .verify()
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e))?;
        Ok(Json(
            serde_json::to_value(report).expect("report serialises"),
        ))
    })
    .await
}

/// The ledger routes, with the body limit applied.
pub fn router(svc: Arc<LedgerService>) -> Router {
    Router::new()
        .route("/ledger/requests", post(submit))
        .route("/ledger/balance/{account}", get(balance))
        .route("/ledger/history/{account}", get(history))
        .route("/ledger/prove/{account}", get(prove))
        .route("/ledger/root", get(root))
        .route("/ledger/verify", get(verify))
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .with_state(svc)
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Call(#[from] CallError),
    /// The server answered with an error.
    #[error("hub refused ({status}, {kind}): {message}")]
    Refused {
        status: u16,
        kind: String,
        message: String,
    },
}

/// Largest ledger reply a client reads: a history of [`HISTORY_LIMIT_MAX`] transfers
/// is well under it.
pub const LEDGER_REPLY_BYTES_MAX: usize = 4 << 20;

/// A client that signs every request with its identity and checks every reply's
/// signature against the server's key.
pub struct LedgerClient {
    base: String,
    identity: Identity,
    http: reqwest::Client,
    auth: ClientAuth,
}

impl LedgerClient {
    /// A client that pins the first server key it sees.
    pub fn new(base: &str, identity: Identity) -> LedgerClient {
        LedgerClient::pinned(base, identity, None)
    }

    /// A client that accepts only replies signed by `server` (when given).
    pub fn pinned(base: &str, identity: Identity, server: Option<NodeId>) -> LedgerClient {
        LedgerClient {
            base: base.trim_end_matches('/').to_string(),
            identity,
            http: {
                crate::install_tls_provider();
                reqwest::Client::new()
            },
            auth: ClientAuth::new(server),
        }
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let reply = call(
            &self.http,
            &self.base,
            &self.auth,
            Some(&self.identity),
            method,
            path,
            body,
            LEDGER_REPLY_BYTES_MAX,
        )
        .await?;
        let (status, bytes) = (reply.status, reply.body);
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Refused {
                status,
                kind: "malformed_response".into(),
                message: e.to_string(),
            });
        }
        let err: ApiError = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiError {
            error: String::from_utf8_lossy(&bytes).into_owned(),
            kind: "http".into(),
            status,
        });
        Err(ClientError::Refused {
            status,
            kind: err.kind,
            message: err.error,
        })
    }
    pub async fn submit(&self, id: &str, op: Operation) -> Result<Receipt, ClientError> {
        let body = serde_json::to_vec(&RequestBody {
            id: id.to_string(),
            op,
        })
        .expect("request serialises");
        self.send("POST", "/ledger/requests", body).await
    }

    pub async fn balance(&self, account: &Account) -> Result<BalanceResponse, ClientError> {
        self.send("GET", &format!("/ledger/balance/{account}"), Vec::new())
            .await
    }

    pub async fn history(
        &self,
        account: &Account,
        limit: usize,
    ) -> Result<Vec<Transfer>, ClientError> {
        self.send(
            "GET",
            &format!("/ledger/history/{account}?limit={limit}"),
            Vec::new(),
        )
        .await
    }

    pub async fn root(&self) -> Result<serde_json::Value, ClientError> {
        self.send("GET", "/ledger/root", Vec::new()).await
    }

    pub async fn verify(&self) -> Result<serde_json::Value, ClientError> {
        self.send("GET", "/ledger/verify", Vec::new()).await
    }

    /// Sends raw bytes as a request body (tests of malformed input).
    pub async fn submit_raw(&self, body: Vec<u8>) -> Result<Receipt, ClientError> {
        self.send("POST", "/ledger/requests", body).await
    }
}
