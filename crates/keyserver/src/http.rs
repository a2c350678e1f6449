//! The key server's HTTP API (axum): `POST /v1/nonce`, `POST /v1/release`. The
//! journal is read from its file by the data owner (`tessera keys journal`), not
//! served: it names every member, and serving it let anyone make the server build
//! replies as large as the journal.

use crate::{now_unix, KeyServer, Refused, ReleaseRequest, BODY_MAX};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::FORBIDDEN);
        (status, Json(self)).into_response()
    }
}

async fn nonce(
    State(s): State<Arc<KeyServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    match s.issue_nonce(now_unix(), peer.ip()) {
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
            // Bounded and escaped; nonce refusals (the cheap ones) are only counted.
            if r.rule != "nonce" {
                let message: String = r.message.chars().take(200).collect();
                eprintln!("keys: refused ({}): {}", r.rule, message.escape_debug());
            }
            r.into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub fn router(server: Arc<KeyServer>) -> Router {
    Router::new()
        .route("/v1/nonce", post(nonce))
        .route("/v1/release", post(release))
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .with_state(server)
}

/// Serves until the process stops.
pub async fn serve(server: Arc<KeyServer>, listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    eprintln!("keys: serving on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        router(server).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
