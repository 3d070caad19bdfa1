//! `GET /api/v1/licenses/{license_id}/download`: the holder's fingerprinted copy.

use std::time::Duration;

use alloy::primitives::{Address, U256};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::Response,
};

use super::{AppState, auth, error::ApiError, params, transfer};
use crate::{
    market::{
        MarketView,
        delivery::{DeliveryError, Prepared, RECEIPT_WAIT},
    },
    registry::Actor,
};

impl From<DeliveryError> for ApiError {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::NotFound(_) => ApiError::not_found(e.to_string()),
            DeliveryError::Forbidden(_) | DeliveryError::Expired { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            // The model cannot carry a fingerprint (too few eligible weights): no copy can be
            // made, which is not the server failing.
            DeliveryError::Watermark(agora_watermark::WatermarkError::TooFewWeights {
                eligible,
                needed,
                ..
            }) => ApiError::new(
                StatusCode::CONFLICT,
                "cannot_fingerprint",
                format!(
                    "this model has {eligible} eligible weights; a fingerprint needs at least {needed} \
                         (float matrices of 65,536 elements or more), so no copy can be made"
                ),
            ),
            DeliveryError::Unavailable(_) => {
                ApiError::new(StatusCode::CONFLICT, "unavailable", e.to_string())
            }
            DeliveryError::Artifact(a) => a.into(),
            DeliveryError::Store(s) => s.into(),
            other => {
                tracing::error!(target: "agora::delivery", error = %other, "cannot deliver");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "delivery_failed", other.to_string())
            }
        }
    }
}

/// The license holder's copy of the model's latest version, fingerprinted for this license
/// (made ahead at purchase, or on the first request, then cached). `Range` resumes. Headers:
/// `Agora-Token-Id`, `Agora-Version`, `Agora-License-Id`, `Agora-Node-Key`, and for a copy
/// already whole `Agora-Content-Blake3` (the served file) and `Agora-Delivery-Signature`
/// (ed25519 by `Agora-Node-Key` over "agora-delivery-v1", license id, token id, version, file
/// hash). A copy still being made streams as it is made, with `Agora-Delivery: making` instead
/// of those two: its receipt (`GET /api/v1/licenses/{id}/receipt`) carries them once the last
/// byte is written.
#[utoipa::path(
    get,
    path = "/api/v1/licenses/{license_id}/download",
    tag = "licenses",
    params(("license_id" = String, Path)),
    responses(
        (status = 200, content_type = "application/octet-stream"),
        (status = 206, content_type = "application/octet-stream"),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody),
    )
)]
pub async fn download(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let (caller, license_id, ctx) = holder(&state, &headers, &raw)?;
    let delivery = state.delivery.clone();
    let store = state.store.clone();
    let index = state.index.borrow().clone();
    let audit = crate::audit::Audit::new(state.store.clone());
    let record = move |hash: &[u8; 32]| {
        audit.record(
            &ctx.actor.id(),
            &format!("license.download {}", crate::artifacts::hex(hash)),
            &format!("license:{license_id}"),
            ctx.request_id.as_deref(),
        )
    };
    // A stored copy's delivery is logged here; one being made, once it is whole (below).
    let (prepared, record) = tokio::task::spawn_blocking(move || {
        let now = MarketView::new(&store, index).chain_now()?;
        let prepared = delivery.prepare(license_id, caller, now)?;
        if let Prepared::Ready(copy) = &prepared {
            record(&copy.blake3)?;
        }
        Ok::<_, DeliveryError>((prepared, record))
    })
    .await??;
    let (mut response, signed) = match prepared {
        Prepared::Ready(copy) => {
            let name = file_name(copy.token_id, copy.version, license_id);
            let response = transfer::serve_blob(
                state.delivery.artifacts(),
                copy.blake3,
                copy.size,
                &headers,
                Some(&name),
            )?;
            (response, Some(copy))
        }
        Prepared::Making(making) => {
            let signed = state.delivery.signed(&making);
            let name = file_name(making.token_id, making.version, license_id);
            let follow = making.clone();
            let response = transfer::serve_ranged(
                making.size,
                signed.as_ref().map(|c| &c.blake3),
                &headers,
                Some(&name),
                move |start, end| Ok(follow.follow(start, end)),
            )?;
            // The delivery is logged with the file's hash once the copy is whole.
            tokio::task::spawn_blocking(move || {
                if let Ok(Some(hash)) = making.wait_whole(Duration::MAX)
                    && let Err(e) = record(&hash)
                {
                    tracing::error!(target: "agora::delivery", error = %e, "cannot log a delivery");
                }
            });
            (response, signed)
        }
    };
    let h = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set("agora-license-id", license_id.to_string());
    set("agora-node-key", state.delivery.public_key());
    match signed {
        Some(copy) => {
            set("agora-token-id", copy.token_id.to_string());
            set("agora-version", copy.version.to_string());
            set("agora-content-blake3", crate::artifacts::hex(&copy.blake3));
            set("agora-delivery-signature", crate::artifacts::hex(&copy.signature));
        }
        None => set("agora-delivery", "making".into()),
    }
    Ok(response)
}

fn file_name(token_id: U256, version: u32, license_id: U256) -> String {
    format!("token-{token_id}-v{version}-license-{license_id}.safetensors")
}

/// What a delivery receipt says: the served file's hash and size, and the node's signature
/// over "agora-delivery-v1", license id, token id, version and that hash.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Receipt {
    pub license_id: String,
    pub token_id: String,
    pub version: u32,
    /// blake3 of the served file, hex.
    pub blake3: String,
    pub size: u64,
    /// ed25519, hex.
    pub signature: String,
    pub node_key: String,
}

/// The signed receipt of the holder's copy: at once for a copy already made, or once the copy
/// being made is whole (the request waits up to a minute, then answers 409 `copy_not_ready`
/// with how far it got; ask again).
#[utoipa::path(
    get,
    path = "/api/v1/licenses/{license_id}/receipt",
    tag = "licenses",
    params(("license_id" = String, Path)),
    responses(
        (status = 200, body = Receipt),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody),
    )
)]
pub async fn receipt(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<Receipt>, ApiError> {
    let (caller, license_id, _) = holder(&state, &headers, &raw)?;
    let delivery = state.delivery.clone();
    let store = state.store.clone();
    let index = state.index.borrow().clone();
    let answer = tokio::task::spawn_blocking(move || {
        let now = MarketView::new(&store, index).chain_now()?;
        delivery.receipt(license_id, caller, now, RECEIPT_WAIT)
    })
    .await??;
    match answer {
        Ok(copy) => Ok(Json(Receipt {
            license_id: copy.license_id.to_string(),
            token_id: copy.token_id.to_string(),
            version: copy.version,
            blake3: crate::artifacts::hex(&copy.blake3),
            size: copy.size,
            signature: crate::artifacts::hex(&copy.signature),
            node_key: state.delivery.public_key(),
        })),
        Err(making) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "copy_not_ready",
            format!(
                "the copy of license {license_id} is still being made ({} of {} bytes); ask again",
                making.written(),
                making.size
            ),
        )),
    }
}

/// The signed-in wallet and the license id of a holder's request.
fn holder(
    state: &AppState,
    headers: &HeaderMap,
    raw: &str,
) -> Result<(Address, U256, crate::registry::Context), ApiError> {
    let ctx = auth::api_caller(state, headers)?;
    let Actor::Wallet(caller) = ctx.actor else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "downloads need the license holder's sign-in token",
        ));
    };
    Ok((caller, params::path_id("license id", raw)?, ctx))
}
