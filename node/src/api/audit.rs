//! `GET /api/v1/audit/log`: the audit log, paged by sequence number.

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
};
use serde::Serialize;

use super::{
    AppState,
    error::ApiError,
    params::{self, Params},
};
use crate::audit::{self, EntryView};

#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<EntryView>,
    /// `from` of the next page; absent on the last.
    pub next_from: Option<u64>,
}

/// Entries of the hash-chained audit log from sequence number `from` on.
#[utoipa::path(
    get,
    path = "/api/v1/audit/log",
    tag = "audit",
    params(
        ("from" = Option<u64>, Query, description = "first sequence number, default 0"),
        ("limit" = Option<usize>, Query, description = "1 to 1000, default 100"),
    ),
    responses((status = 200, body = AuditPage), (status = 400, body = super::error::ErrorBody))
)]
pub async fn log(
    State(state): State<AppState>,
    Query(q): Query<Params>,
) -> Result<Json<AuditPage>, ApiError> {
    params::only(&q, &["from", "limit"])?;
    let from = params::u64(&q, "from")?.unwrap_or(0);
    let limit = params::limit(&q, 100, 1000)?;
    let store = state.store.clone();
    let entries = tokio::task::spawn_blocking(move || audit::list(&store, from, limit + 1))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let next_from = (entries.len() > limit).then(|| entries[limit].seq);
    Ok(Json(AuditPage { entries: entries.into_iter().take(limit).collect(), next_from }))
}

/// Traces per actor per minute.
const TRACES_PER_MINUTE: usize = 10;

/// Who traced when, for the rate limit.
#[derive(Clone, Default)]
pub struct TraceLimiter(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<std::time::Instant>>>,
    >,
);

impl TraceLimiter {
    fn admit(&self, actor: &str) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let recent = map.entry(actor.to_owned()).or_default();
        while recent.front().is_some_and(|t| now.duration_since(*t) > std::time::Duration::from_secs(60)) {
            recent.pop_front();
        }
        if recent.len() >= TRACES_PER_MINUTE {
            return false;
        }
        recent.push_back(now);
        true
    }
}

/// Identifies a suspect file (the raw request body) by its owner mark and traces its
/// fingerprint among the model's licenses. Only the model's on-chain owner or an operator
/// learns the answer; every trace is logged and limited to ten a minute per caller.
#[utoipa::path(
    post,
    path = "/api/v1/audit/trace",
    tag = "audit",
    request_body(content_type = "application/octet-stream", description = "the suspect .safetensors file"),
    responses(
        (status = 200, body = crate::market::forensics::Report),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 429, body = super::error::ErrorBody),
    )
)]
pub async fn trace(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<crate::market::forensics::Report>, ApiError> {
    use crate::{market::forensics, registry::Actor};
    let ctx = super::auth::api_caller(&state, &headers)?;
    if ctx.actor == Actor::Anonymous {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "tracing needs the model owner's sign-in or the operator token",
        ));
    }
    if !state.trace_limiter.admit(&ctx.actor.id()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("at most {TRACES_PER_MINUTE} traces a minute"),
        ));
    }
    super::transfer::check_length(&headers, state.max_upload, 0)?;
    let tmp = state.data_dir.join("tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string()))?;
    let suspect = tempfile::Builder::new()
        .prefix("suspect-")
        .tempfile_in(&tmp)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string()))?;
    {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut out = tokio::fs::File::create(suspect.path())
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string()))?;
        let mut stream = body.into_data_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "upload_failed", e.to_string()))?;
            written += chunk.len() as u64;
            if written > state.max_upload {
                return Err(super::transfer::too_large(state.max_upload));
            }
            out.write_all(&chunk).await.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string())
            })?;
        }
        out.flush()
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string()))?;
    }
    let (store, artifacts, master) =
        (state.store.clone(), state.delivery.artifacts().clone(), state.watermark_key.clone());
    let audit = crate::audit::Audit::new(state.store.clone());
    let actor = ctx.actor.clone();
    let report = tokio::task::spawn_blocking(move || {
        let fail = |e: forensics::ForensicsError| match e {
            forensics::ForensicsError::Suspect(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_artifact", e.to_string())
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "trace_failed", other.to_string()),
        };
        let suspect_hash = {
            let mut hasher = blake3::Hasher::new();
            hasher.update_mmap(suspect.path()).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", e.to_string())
            })?;
            hasher.finalize().to_hex().to_string()
        };
        let outcome = forensics::identify(&store, &artifacts, &master, suspect.path(), &tmp).map_err(fail)?;
        let report = match outcome {
            Err(candidates) => forensics::Report::unidentified(candidates),
            Ok(found) => {
                let allowed = match &actor {
                    Actor::Operator => true,
                    Actor::Wallet(a) => *a == found.owner,
                    Actor::Anonymous => false,
                };
                if !allowed {
                    audit.record(
                        &actor.id(),
                        "audit.trace refused (not the owner)",
                        &format!("file:{suspect_hash}"),
                        ctx.request_id.as_deref(),
                    )?;
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "only the model's owner or an operator may trace copies of it",
                    ));
                }
                let candidates = 1;
                forensics::trace(&store, &master, suspect.path(), found, candidates).map_err(fail)?
            }
        };
        let accused: Vec<&str> = report.accused.iter().map(|a| a.license_id.as_str()).collect();
        audit.record(
            &actor.id(),
            &format!(
                "audit.trace token={} accused=[{}]",
                report.token_id.as_deref().unwrap_or("none"),
                accused.join(",")
            ),
            &format!("file:{suspect_hash}"),
            ctx.request_id.as_deref(),
        )?;
        Ok::<_, ApiError>(report)
    })
    .await??;
    Ok(Json(report))
}
