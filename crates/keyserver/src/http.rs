//! The key server's HTTP API (axum): `POST /v1/nonce`, `POST /v1/release`,
//! `GET /v1/journal`.

use crate::{now_unix, KeyServer, Refused, ReleaseRequest, BODY_MAX};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::FORBIDDEN);
        (status, Json(self)).into_response()
    }
}

async fn nonce(State(s): State<Arc<KeyServer>>) -> Response {
    match s.issue_nonce(now_unix()) {
        Ok(n) => Json(n).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn release(State(s): State<Arc<KeyServer>>, body: axum::body::Bytes) -> Response {
    // Parsed here, strictly (unknown fields refused), so a malformed body gets a
    // refusal naming what was wrong rather than axum's generic rejection.
    let req: ReleaseRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Refused {
                status: 400,
                rule: "malformed".into(),
                message: format!("not a release request: {e}"),
            }
            .into_response()
        }
    };
    let res = tokio::task::spawn_blocking(move || s.release(&req, now_unix())).await;
    match res {
        Ok(Ok(reply)) => Json(reply).into_response(),
        Ok(Err(r)) => {
            eprintln!("keys: refused ({}): {}", r.rule, r.message);
            r.into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn journal(State(s): State<Arc<KeyServer>>) -> Response {
    match tokio::task::spawn_blocking(move || s.journal_entries()).await {
        Ok(Ok(entries)) => Json(entries).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub fn router(server: Arc<KeyServer>) -> Router {
    Router::new()
        .route("/v1/nonce", post(nonce))
        .route("/v1/release", post(release))
        .route("/v1/journal", get(journal))
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .with_state(server)
}

/// Serves until the process stops.
pub async fn serve(server: Arc<KeyServer>, listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    eprintln!("keys: serving on http://{}", listener.local_addr()?);
    axum::serve(listener, router(server)).await?;
    Ok(())
}
