//! `GET /api/v1/licenses/{license_id}/download`: the holder's fingerprinted copy.

use axum::{
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::Response,
};

use super::{AppState, auth, error::ApiError, params, transfer};
use crate::{
    market::{
        MarketView,
        delivery::{Copy, DeliveryError},
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
/// (made on the first request, then cached). `Range` resumes. Headers: `Agora-Content-Blake3`
/// (the served file), `Agora-Token-Id`, `Agora-Version`, `Agora-Delivery-Signature` (ed25519 by
/// `Agora-Node-Key` over "agora-delivery-v1", license id, token id, version, file hash).
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
    let ctx = auth::api_caller(&state, &headers)?;
    let Actor::Wallet(caller) = ctx.actor else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "downloads need the license holder's sign-in token",
        ));
    };
    let license_id = params::path_id("license id", &raw)?;
    let delivery = state.delivery.clone();
    let store = state.store.clone();
    let index = state.index.borrow().clone();
    let audit = crate::audit::Audit::new(state.store.clone());
    let copy: Copy = tokio::task::spawn_blocking(move || {
        let now = MarketView::new(&store, index).chain_now()?;
        let copy = delivery.prepare(license_id, caller, now)?;
        audit.record(
            &ctx.actor.id(),
            &format!("license.download {}", crate::artifacts::hex(&copy.blake3)),
            &format!("license:{license_id}"),
            ctx.request_id.as_deref(),
        )?;
        Ok::<_, DeliveryError>(copy)
    })
    .await??;
    let name = format!("token-{}-v{}-license-{}.safetensors", copy.token_id, copy.version, copy.license_id);
    let mut response =
        transfer::serve_blob(state.delivery.artifacts(), copy.blake3, copy.size, &headers, Some(&name))?;
    let h = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set("agora-content-blake3", crate::artifacts::hex(&copy.blake3));
    set("agora-token-id", copy.token_id.to_string());
    set("agora-version", copy.version.to_string());
    set("agora-license-id", copy.license_id.to_string());
    set("agora-delivery-signature", crate::artifacts::hex(&copy.signature));
    set("agora-node-key", state.delivery.public_key());
    Ok(response)
}
