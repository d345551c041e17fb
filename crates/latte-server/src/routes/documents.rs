//! `/indexes/{name}/documents`: add (text encoded on the server, or embeddings), delete (by ids or by a
//! metadata filter) and read documents.
//!
//! Writes to one index run one at a time (its mutex), off the async runtime: the writer takes the index's
//! lock, writes, commits, and the reopened index replaces the served one. Searches running meanwhile keep
//! the state they started on. A write whose client disconnects still completes, and shutdown waits for it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use latte_index::{Doc, DocumentSource, Filter, IndexConfig, PlaidIndex, VecSource};
use latte_models::ModelOptions;

use crate::api::{AddDocuments, AddResult, DeleteDocuments, DeleteResult, DocumentOut};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::routes::models::{check_count, check_text, matrix};
use crate::state::{AppState, IndexEntry};

/// Add documents.
#[utoipa::path(post, path = "/indexes/{name}/documents", tag = "documents",
    params(("name" = String, Path, description = "Index name")),
    request_body = AddDocuments,
    responses(
        (status = 200, description = "Added", body = AddResult),
        (status = 400, description = "Invalid documents", body = ErrorBody),
        (status = 404, description = "No such index", body = ErrorBody),
        (status = 409, description = "Another process holds the index's writer lock", body = ErrorBody),
        (status = 503, description = "Encoding queue full (see Retry-After)", body = ErrorBody),
    ))]
pub async fn add(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AddDocuments>,
) -> Result<Json<AddResult>, ApiError> {
    let entry = state.indexes.get(&name)?;
    let limits = &state.config.limits;
    let docs = req.documents;
    if docs.is_empty() {
        return Err(ApiError::invalid("documents is empty; give at least one"));
    }
    check_count(docs.len(), "documents", limits)?;
    let mut seen = std::collections::HashSet::new();
    for (i, d) in docs.iter().enumerate() {
        if d.id.is_empty() {
            return Err(ApiError::invalid(format!("documents[{i}].id is empty")));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(ApiError::invalid(format!(
                "documents[{i}].id {:?} appears twice in the request",
                d.id
            )));
        }
        if let Some(t) = &d.text {
            check_text(t, &format!("documents[{i}].text"), limits)?;
        }
        if let Some(t) = &d.title {
            check_text(t, &format!("documents[{i}].title"), limits)?;
        }
    }
    let with_embeddings = docs[0].embeddings.is_some();
    for (i, d) in docs.iter().enumerate() {
        match (d.embeddings.is_some(), d.text.is_some()) {
            (false, false) => {
                return Err(ApiError::invalid(format!(
                    "documents[{i}] has neither text nor embeddings"
                )))
            }
            (e, _) if e != with_embeddings => {
                return Err(ApiError::invalid(format!(
                    "documents[{i}]: give embeddings for every document of a request or for none"
                )))
            }
            _ => {}
        }
    }
    // The dimension documents must have: the index's, else its model's.
    let encoder = if with_embeddings {
        entry.encoder().ok()
    } else {
        Some(entry.encoder()?)
    };
    let dim = entry
        .current
        .load_full()
        .map(|i| i.dim())
        .or(encoder.as_ref().map(|e| e.dim));
    let source = if with_embeddings {
        let mut dim = dim;
        let mut source: Option<VecSource> = None;
        for (i, d) in docs.iter().enumerate() {
            let rows = d.embeddings.as_deref().unwrap_or_default();
            let (flat, got) = matrix(rows, dim, &format!("documents[{i}].embeddings"), limits)?;
            dim = Some(got);
            source
                .get_or_insert_with(|| VecSource::new(got))
                .push(d.id.clone(), flat)?;
        }
        source.expect("at least one document")
    } else {
        let encoder = encoder.expect("checked above");
        let texts: Vec<String> = docs
            .iter()
            .map(|d| d.text.clone().unwrap_or_default())
            .collect();
        let encoded = encoder.encode(texts, false).await?;
        let mut source = VecSource::new(encoder.dim);
        for (d, e) in docs.iter().zip(encoded) {
            source.push(d.id.clone(), e.data)?;
        }
        source
    };
    let stored: Vec<Doc> = docs
        .into_iter()
        .map(|d| Doc {
            id: d.id,
            title: d.title,
            text: d.text,
            metadata: d.metadata,
        })
        .collect();
    let _write = entry.write.lock().await;
    let guard = state.writes.begin();
    let e = Arc::clone(&entry);
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        write_add(&st, &e, source, &stored)
    })
    .await??;
    Ok(Json(result))
}

/// Adds `source` (vectors) and `docs` (their stored fields) to the index, building it when pending; an id
/// already there is replaced. Commits, and serves the new state.
fn write_add(
    state: &AppState,
    entry: &IndexEntry,
    source: VecSource,
    docs: &[Doc],
) -> Result<AddResult, ApiError> {
    if entry.removed.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::not_found(format!(
            "no index named {:?}",
            entry.name
        )));
    }
    let current = entry.current.load_full();
    let options = match &current {
        Some(i) => ModelOptions::from_json(i.model_options())?,
        None => entry
            .pending
            .as_ref()
            .map(|p| p.model_options.clone())
            .unwrap_or_default(),
    };
    let pool = options.pool_factor.unwrap_or(1);
    let pooled;
    let source: &dyn DocumentSource = if pool > 1 {
        pooled = latte_index::pool::pool_source(&source, pool)?;
        &pooled
    } else {
        &source
    };
    let created = current.is_none();
    let report = match &current {
        None => {
            let spec = entry.pending.clone().unwrap_or(crate::state::PendingSpec {
                model: None,
                model_options: ModelOptions::default(),
                nbits: 2,
            });
            let config = IndexConfig {
                nbits: spec.nbits,
                model_options: spec.model.as_ref().map(|_| spec.model_options.to_json()),
                model: spec.model.clone(),
                ..IndexConfig::default()
            };
            let report = PlaidIndex::create_with_documents(&entry.dir, source, docs, &config)?;
            let pending = state.indexes.pending_file(&entry.name);
            if let Err(e) = std::fs::remove_file(&pending) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", pending.display());
                }
            }
            report
        }
        Some(_) => {
            let mut writer = PlaidIndex::writer(&entry.dir)?;
            let report = writer.add_documents(source, docs)?;
            writer.commit()?;
            report
        }
    };
    let fresh = Arc::new(PlaidIndex::open(&entry.dir)?);
    let documents = fresh.len();
    entry.current.store(Some(fresh));
    tracing::info!(
        "index {}: added {} documents ({} tokens), {documents} live",
        entry.name,
        report.documents,
        report.tokens
    );
    Ok(AddResult {
        added: report.documents,
        replaced: report.replaced,
        created,
        documents,
    })
}

/// Delete documents by id or by metadata filter.
#[utoipa::path(delete, path = "/indexes/{name}/documents", tag = "documents",
    params(("name" = String, Path, description = "Index name")),
    request_body = DeleteDocuments,
    responses(
        (status = 200, description = "Deleted", body = DeleteResult),
        (status = 400, description = "Neither or both of ids and filter, or an invalid filter", body = ErrorBody),
        (status = 404, description = "No such index", body = ErrorBody),
        (status = 409, description = "The index has no documents, or another process holds its lock", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<DeleteDocuments>,
) -> Result<Json<DeleteResult>, ApiError> {
    let entry = state.indexes.get(&name)?;
    enum Which {
        Ids(Vec<String>),
        Matching(Filter),
    }
    let which = match (req.ids, req.filter) {
        (Some(ids), None) => {
            check_count(ids.len(), "ids", &state.config.limits)?;
            Which::Ids(ids)
        }
        (None, Some(f)) => Which::Matching(parse_filter(&f)?),
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of \"ids\" and \"filter\"",
            ))
        }
    };
    entry.index()?;
    let _write = entry.write.lock().await;
    let guard = state.writes.begin();
    let e = Arc::clone(&entry);
    let result = tokio::task::spawn_blocking(move || -> Result<DeleteResult, ApiError> {
        let _guard = guard;
        if e.removed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::not_found(format!("no index named {:?}", e.name)));
        }
        let mut writer = PlaidIndex::writer(&e.dir)?;
        let report = match &which {
            Which::Ids(ids) => writer.delete(ids)?,
            Which::Matching(f) => writer.delete_matching(f)?,
        };
        writer.commit()?;
        e.current.store(Some(Arc::new(PlaidIndex::open(&e.dir)?)));
        Ok(DeleteResult {
            deleted: report.deleted,
            remaining: report.remaining,
            compacted: report.compacted,
            not_found: report.not_found,
        })
    })
    .await??;
    Ok(Json(result))
}

/// Read one document.
#[utoipa::path(get, path = "/indexes/{name}/documents/{id}", tag = "documents",
    params(
        ("name" = String, Path, description = "Index name"),
        ("id" = String, Path, description = "Document id"),
    ),
    responses(
        (status = 200, description = "The document", body = DocumentOut),
        (status = 404, description = "No such index or document", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<DocumentOut>, ApiError> {
    let entry = state.indexes.get(&name)?;
    let index = entry.index()?;
    let doc = tokio::task::spawn_blocking(move || -> Result<Option<Doc>, ApiError> {
        let mut index = index;
        for _ in 0..RETRIES {
            match index.get_documents(std::slice::from_ref(&id)) {
                Ok(mut docs) => return Ok(docs.pop().flatten()),
                Err(e) if is_stale_view(&e) => index = entry.index()?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::unavailable(
            "busy",
            "the index changed during the read; retry",
            1,
        ))
    })
    .await??;
    let doc = doc.ok_or_else(|| {
        ApiError::not_found(format!("index {name:?} holds no document with this id"))
    })?;
    Ok(Json(DocumentOut {
        id: doc.id,
        title: doc.title,
        text: doc.text,
        metadata: doc.metadata,
    }))
}

/// Reads of the document store are retried this many times on a newer index when the reader's view has
/// been overtaken by commits.
pub const RETRIES: usize = 4;

/// Whether a read failed only because the index it started on was committed over twice since: reopen
/// (take the served index again) and retry.
pub fn is_stale_view(e: &latte_index::Error) -> bool {
    matches!(
        e,
        latte_index::Error::Store(latte_index::StoreError::ViewUnavailable { .. })
    )
}

/// Parses a metadata filter, naming the offending part.
pub fn parse_filter(value: &serde_json::Value) -> Result<Filter, ApiError> {
    Filter::parse(value).map_err(|e| ApiError::invalid(format!("filter: {e}")))
}
