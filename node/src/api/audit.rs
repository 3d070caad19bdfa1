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
