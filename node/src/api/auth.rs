//! Who is calling: the bearer token of a request mapped to an [`Actor`], and the request id
//! that goes into the audit log.
//!
//! The operator token is compared through blake3 (whose hash equality is constant-time), so
//! the comparison does not leak how much of a guessed token was right. Any other token must be
//! a wallet session from sign-in (`POST /api/v1/auth/login`).

use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header};

use super::{AppState, error::ApiError};
use crate::registry::{Actor, Context};

/// The node's token settings.
#[derive(Clone, Debug)]
pub struct Auth {
    admin: blake3::Hash,
    /// Reads need a token too.
    pub private: bool,
}

impl Auth {
    pub fn new(admin_token: &str, private: bool) -> Self {
        Self { admin: blake3::hash(admin_token.as_bytes()), private }
    }
}

/// Why a request's credentials were refused.
#[derive(Debug)]
pub enum Refused {
    Malformed,
    Invalid(String),
}

impl Refused {
    pub fn message(&self) -> String {
        match self {
            Self::Malformed => "the Authorization header must be `Bearer <token>`".into(),
            Self::Invalid(why) => format!(
                "the bearer token is neither the operator token nor a valid session ({why}); sign in again"
            ),
        }
    }
}

/// The caller of a request: its actor (anonymous without an Authorization header) and request id.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Result<Context, Refused> {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .or_else(|| {
            let mut bytes = [0u8; 12];
            getrandom::fill(&mut bytes).ok()?;
            Some(crate::artifacts::hex(&bytes))
        });
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Context { actor: Actor::Anonymous, request_id });
    };
    let value = value.to_str().map_err(|_| Refused::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(Refused::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Refused::Malformed);
    }
    if blake3::hash(token.trim().as_bytes()) == state.auth.admin {
        return Ok(Context { actor: Actor::Operator, request_id });
    }
    match state.sessions.verify(token.trim()) {
        Ok(address) => Ok(Context { actor: Actor::Wallet(address), request_id }),
        Err(e) => Err(Refused::Invalid(e.to_string())),
    }
}

/// The caller, or the 401 of the node's own API.
pub fn api_caller(state: &AppState, headers: &HeaderMap) -> Result<Context, ApiError> {
    caller(state, headers)
        .map_err(|r| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", r.message()))
}

/// Loads the operator token from `path`, creating a random one with mode 0600 when missing.
pub fn load_or_create_token(path: &Path) -> std::io::Result<String> {
    let token = crate::secrets::load_or_create(path)?;
    if token.len() < 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no token of at least 16 characters", path.display()),
        ));
    }
    Ok(token)
}

/// Passes only the node's operator (its context): 401 without a token, 403 for anyone else,
/// saying that only the operator `does` what was asked.
pub fn operator_only(state: &AppState, headers: &HeaderMap, does: &str) -> Result<Context, ApiError> {
    let ctx = api_caller(state, headers)?;
    match ctx.actor {
        Actor::Operator => Ok(ctx),
        Actor::Anonymous => {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "the operator token is required"))
        }
        Actor::Wallet(_) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("only the node's operator {does}")))
        }
    }
}
