//! The node's peers: status, peers, and the blobs it shares with and fetches from them.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use serde::Serialize;

use super::{AppState, auth, error::ApiError};
use crate::{
    p2p::{P2p, P2pStatus, blob, net::PeerInfo},
    store::tables::SharedBlobs,
};

fn p2p(state: &AppState) -> Result<&P2p, ApiError> {
    state.p2p.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "p2p_disabled",
            "this node runs without the peer-to-peer network (AGORA_P2P=false)",
        )
    })
}

fn operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    auth::operator_only(state, headers, "shares and fetches blobs").map(drop)
}

fn blob_hash(raw: &str) -> Result<[u8; 32], ApiError> {
    raw.parse::<alloy::primitives::B256>().map(|h| h.0).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("blob hash `{raw}` is not 32 bytes of hex (blake3)"),
        )
    })
}

/// This node's peer id, addresses, gossip counters, held orders and peers' index roots.
#[utoipa::path(get, path = "/api/v1/p2p/status", tag = "p2p", responses((status = 200, body = P2pStatus), (status = 503, body = super::error::ErrorBody)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<P2pStatus>, ApiError> {
    Ok(Json(p2p(&state)?.status()))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Peers {
    pub peers: Vec<PeerInfo>,
}

/// Peers this node knows: id, addresses, agent, latency, gossip score.
#[utoipa::path(get, path = "/api/v1/p2p/peers", tag = "p2p", responses((status = 200, body = Peers), (status = 503, body = super::error::ErrorBody)))]
pub async fn peers(State(state): State<AppState>) -> Result<Json<Peers>, ApiError> {
    Ok(Json(Peers { peers: p2p(&state)?.peers() }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SharedBlobView {
    pub blake3: String,
    pub size: u64,
    pub chunks: u64,
    pub shared_ms: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SharedBlobList {
    pub blobs: Vec<SharedBlobView>,
}

fn view(hash: &[u8], shared: &crate::store::tables::SharedBlob) -> SharedBlobView {
    SharedBlobView {
        blake3: crate::artifacts::hex(hash),
        size: shared.size,
        chunks: shared.size.div_ceil(blob::CHUNK).max(1),
        shared_ms: shared.shared_ms,
    }
}

/// Blobs this node serves to peers.
#[utoipa::path(get, path = "/api/v1/p2p/blobs", tag = "p2p", responses((status = 200, body = SharedBlobList)))]
pub async fn blobs(State(state): State<AppState>) -> Result<Json<SharedBlobList>, ApiError> {
    let mut blobs = Vec::new();
    for item in state.store.iter::<SharedBlobs>() {
        let (key, shared) = item?;
        blobs.push(view(&key, &shared));
    }
    Ok(Json(SharedBlobList { blobs }))
}

/// Shares a blob of the artifact store with peers (operator). Originals of registered models
/// and buyers' copies are refused (422).
#[utoipa::path(
    post,
    path = "/api/v1/p2p/blobs/{hash}/share",
    tag = "p2p",
    params(("hash" = String, Path, description = "blake3 of the blob, hex")),
    responses((status = 200, body = SharedBlobView), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody))
)]
pub async fn share(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Json<SharedBlobView>, ApiError> {
    operator(&state, &headers)?;
    let hash = blob_hash(&hash)?;
    let shared = p2p(&state)?.share(hash).await.map_err(|e| match e {
        blob::ShareError::NotFound(_) => ApiError::not_found(e.to_string()),
        blob::ShareError::Private(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "private_blob", e.to_string())
        }
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
    })?;
    Ok(Json(view(&hash, &shared)))
}

/// Stops sharing a blob (operator).
#[utoipa::path(
    delete,
    path = "/api/v1/p2p/blobs/{hash}",
    tag = "p2p",
    params(("hash" = String, Path, description = "blake3 of the blob, hex")),
    responses((status = 204), (status = 404, body = super::error::ErrorBody))
)]
pub async fn unshare(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<StatusCode, ApiError> {
    operator(&state, &headers)?;
    let hash = blob_hash(&hash)?;
    if p2p(&state)?.unshare(hash).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("this node does not share that blob"))
    }
}

/// Fetches a blob from peers into this node's artifact store (operator), every chunk checked
/// against the blob's hash; resumes an interrupted fetch.
#[utoipa::path(
    post,
    path = "/api/v1/p2p/blobs/{hash}/fetch",
    tag = "p2p",
    params(("hash" = String, Path, description = "blake3 of the blob, hex")),
    responses((status = 200, body = blob::FetchReport), (status = 404, body = super::error::ErrorBody), (status = 502, body = super::error::ErrorBody))
)]
pub async fn fetch(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Json<blob::FetchReport>, ApiError> {
    operator(&state, &headers)?;
    let hash = blob_hash(&hash)?;
    let report = p2p(&state)?.fetch(hash).await.map_err(|e| match e {
        blob::FetchError::NoProvider(_) => ApiError::not_found(e.to_string()),
        blob::FetchError::Exhausted { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "providers_failed", e.to_string())
        }
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
    })?;
    Ok(Json(report))
}
