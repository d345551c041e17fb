//! `/indexes`: list, create (pending until its first documents), describe and delete indexes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use latte_models::ModelOptions;

use crate::api::{CreateIndex, IndexDeleted, IndexList, IndexSummary};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::state::{validate_name, AppState, IndexEntry, Indexes, PendingSpec};

/// The summary of an index (the `latte info` fields).
pub fn summary(entry: &IndexEntry) -> IndexSummary {
    match entry.current.load_full() {
        Some(index) => {
            let info = index.info();
            IndexSummary {
                name: entry.name.clone(),
                status: "ready".into(),
                model: index.model().map(str::to_string),
                model_options: index.model_options().cloned(),
                documents: info.documents,
                deleted: info.deleted,
                tokens: info.tokens,
                dim: info.dim,
                nbits: info.nbits,
                num_centroids: info.num_centroids,
                disk_bytes: info.disk_bytes,
                resident_bytes: info.resident_bytes,
                config: serde_json::to_value(&info.config).ok(),
            }
        }
        None => {
            let spec = entry.pending.as_ref();
            IndexSummary {
                name: entry.name.clone(),
                status: "pending".into(),
                model: spec.and_then(|s| s.model.clone()),
                model_options: spec.map(|s| s.model_options.to_json()),
                documents: 0,
                deleted: 0,
                tokens: 0,
                dim: 0,
                nbits: spec.map_or(0, |s| s.nbits),
                num_centroids: 0,
                disk_bytes: 0,
                resident_bytes: 0,
                config: None,
            }
        }
    }
}

/// List the indexes.
#[utoipa::path(get, path = "/indexes", tag = "indexes",
    responses((status = 200, description = "Every index", body = IndexList)))]
pub async fn list(State(state): State<AppState>) -> Json<IndexList> {
    Json(IndexList {
        indexes: state.indexes.list().iter().map(|e| summary(e)).collect(),
    })
}

/// Describe an index.
#[utoipa::path(get, path = "/indexes/{name}", tag = "indexes",
    params(("name" = String, Path, description = "Index name")),
    responses(
        (status = 200, description = "The index", body = IndexSummary),
        (status = 404, description = "No such index", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<IndexSummary>, ApiError> {
    let entry = state.indexes.get(&name)?;
    Ok(Json(summary(&entry)))
}

/// Create an index. It is built, with these settings, by its first `POST /indexes/{name}/documents` (its
/// centroids are trained on those documents); until then its status is `pending`.
#[utoipa::path(post, path = "/indexes", tag = "indexes",
    request_body = CreateIndex,
    responses(
        (status = 201, description = "Created (pending)", body = IndexSummary),
        (status = 400, description = "Invalid name, nbits or model", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateIndex>,
) -> Result<(StatusCode, Json<IndexSummary>), ApiError> {
    validate_name(&req.name)?;
    let nbits = req.nbits.unwrap_or(2);
    if !matches!(nbits, 1 | 2 | 4) {
        return Err(ApiError::invalid(format!(
            "nbits must be 1, 2 or 4, got {nbits}"
        )));
    }
    let mut model_options = match &req.model_options {
        None => ModelOptions::default(),
        Some(v) => serde_json::from_value::<ModelOptions>(v.clone())
            .map_err(|e| ApiError::invalid(format!("model_options: {e}")))?,
    };
    if req.model.is_none() && req.model_options.is_some() {
        return Err(ApiError::invalid("model_options are given without a model"));
    }
    if let Some(m) = &req.model {
        if m.is_empty() {
            return Err(ApiError::invalid("model is empty"));
        }
    }
    // A server started with --dtype runs every model at that precision; the index records it.
    if let (Some(d), Some(_)) = (state.config.dtype, &req.model) {
        match model_options.dtype {
            Some(asked) if asked != d => {
                return Err(ApiError::invalid(format!(
                    "model_options.dtype is {asked}, but this server runs every model at {d} (latte serve --dtype {d})"
                )))
            }
            _ => model_options.dtype = Some(d),
        }
    }
    if state.indexes.get(&req.name).is_ok() {
        return Err(ApiError::conflict(
            "index_exists",
            format!("an index named {:?} already exists", req.name),
        ));
    }
    let spec = PendingSpec {
        model: req.model,
        model_options,
        nbits,
    };
    let st = state.clone();
    let name = req.name.clone();
    // Loads the model (once) before the index is announced, so a model that cannot load is a 400 now.
    let entry = tokio::task::spawn_blocking(move || {
        if let Some(m) = &spec.model {
            st.models.get_or_load(m, &spec.model_options)?;
        }
        let entry = Indexes::entry_for(st.indexes.root(), &name, None, Some(spec), &st.models);
        st.indexes.insert_pending(entry)
    })
    .await??;
    tracing::info!("index {} created (pending)", entry.name);
    Ok((StatusCode::CREATED, Json(summary(&entry))))
}

/// Delete an index and its files.
#[utoipa::path(delete, path = "/indexes/{name}", tag = "indexes",
    params(("name" = String, Path, description = "Index name")),
    responses(
        (status = 200, description = "Deleted", body = IndexDeleted),
        (status = 404, description = "No such index", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<IndexDeleted>, ApiError> {
    let entry = state.indexes.get(&name)?;
    let _write = entry.write.lock().await;
    if entry.removed.swap(true, Ordering::SeqCst) {
        return Err(ApiError::not_found(format!("no index named {name:?}")));
    }
    state.indexes.remove(&name);
    let guard = state.writes.begin();
    let (st, e) = (state.clone(), Arc::clone(&entry));
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        let _guard = guard;
        let pending = st.indexes.pending_file(&e.name);
        if pending.exists() {
            std::fs::remove_file(&pending).map_err(|err| {
                ApiError::internal(format!("cannot remove {}: {err}", pending.display()))
            })?;
        }
        if e.dir.exists() {
            std::fs::remove_dir_all(&e.dir).map_err(|err| {
                ApiError::internal(format!("cannot remove {}: {err}", e.dir.display()))
            })?;
        }
        Ok(())
    })
    .await??;
    tracing::info!("index {name} deleted");
    Ok(Json(IndexDeleted { deleted: name }))
}
