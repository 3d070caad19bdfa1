//! Sign-in with Ethereum: `POST /api/v1/auth/nonce` and `POST /api/v1/auth/login`.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use serde::{Deserialize, Serialize};

use super::{AppState, error::ApiError, registry::json};
use crate::auth::Session;

#[derive(Serialize, utoipa::ToSchema)]
pub struct NonceAnswer {
    /// Put it in the SIWE message's `Nonce:` line; it works once.
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// The chain id the message must name.
    pub chain_id: u64,
}

/// A single-use nonce for a sign-in message.
#[utoipa::path(post, path = "/api/v1/auth/nonce", tag = "auth", responses((status = 200, body = NonceAnswer)))]
pub async fn nonce(State(state): State<AppState>) -> Json<NonceAnswer> {
    let (nonce, expires_at) = state.sessions.nonce();
    Json(NonceAnswer { nonce, expires_at, chain_id: state.sessions.chain_id() })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The EIP-4361 message, as signed.
    pub message: String,
    /// The EIP-191 signature, 0x-hex (65 bytes; a contract wallet's ERC-1271 signature too).
    pub signature: String,
}

/// Checks a signed sign-in message; answers a session token bound to the address.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses((status = 200, body = Session), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody))
)]
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Session>, ApiError> {
    let request: LoginRequest = json(&body)?;
    let signature = alloy::primitives::hex::decode(request.signature.trim()).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("`signature` is not hex: {e}"))
    })?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let session = state.sessions.login(&request.message, &signature, host).await.map_err(|e| match e {
        crate::auth::AuthError::Unavailable(why) => ApiError::chain_unavailable(why),
        e => ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
    })?;
    tracing::info!(target: "agora::auth", address = %session.address, "signed in");
    Ok(Json(session))
}
