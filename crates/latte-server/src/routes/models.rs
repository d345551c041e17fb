//! `POST /encode` and `POST /rerank` (PyLate's `encode` and `rank.rerank`), and the checks on texts and
//! embeddings every route shares.

use axum::extract::State;
use axum::Json;
use latte_index::EmbRef;
use latte_models::Embedding;

use crate::api::{EncodeRequest, EncodeResponse, RerankRequest, RerankResponse, Reranked};
use crate::config::Limits;
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::state::AppState;

/// Checks a list of texts (`field` names it in errors): at least one, at most `max_batch`, each at most
/// `max_text_chars` characters.
pub fn check_texts(texts: &[String], field: &str, limits: &Limits) -> Result<(), ApiError> {
    if texts.is_empty() {
        return Err(ApiError::invalid(format!(
            "{field} is empty; give at least one"
        )));
    }
    check_count(texts.len(), field, limits)?;
    for (i, t) in texts.iter().enumerate() {
        check_text(t, &format!("{field}[{i}]"), limits)?;
    }
    Ok(())
}

/// Fails when a request holds more than `max_batch` items.
pub fn check_count(n: usize, field: &str, limits: &Limits) -> Result<(), ApiError> {
    if n > limits.max_batch {
        return Err(ApiError::invalid(format!(
            "{field} has {n} items; at most {} are allowed per request",
            limits.max_batch
        )));
    }
    Ok(())
}

/// Fails when a text is longer than `max_text_chars` characters.
pub fn check_text(text: &str, field: &str, limits: &Limits) -> Result<(), ApiError> {
    let n = text.chars().count();
    if n > limits.max_text_chars {
        return Err(ApiError::invalid(format!(
            "{field} is {n} characters long; at most {} are allowed",
            limits.max_text_chars
        )));
    }
    Ok(())
}

/// A `tokens × dim` matrix given as JSON rows, checked (every row `dim` finite values, 1 to `max_tokens`
/// rows) and flattened row-major. `dim` `None` takes the first row's length.
pub fn matrix(
    rows: &[Vec<f32>],
    dim: Option<usize>,
    field: &str,
    limits: &Limits,
) -> Result<(Vec<f32>, usize), ApiError> {
    if rows.is_empty() {
        return Err(ApiError::invalid(format!(
            "{field} has no token embeddings; give at least one row"
        )));
    }
    if rows.len() > limits.max_tokens {
        return Err(ApiError::invalid(format!(
            "{field} has {} token embeddings; at most {} are allowed",
            rows.len(),
            limits.max_tokens
        )));
    }
    let dim = dim.unwrap_or(rows[0].len());
    if dim == 0 {
        return Err(ApiError::invalid(format!("{field}[0] is empty")));
    }
    let mut out = Vec::with_capacity(rows.len() * dim);
    for (i, row) in rows.iter().enumerate() {
        if row.len() != dim {
            return Err(ApiError::invalid(format!(
                "{field}[{i}] has {} values; expected {dim} (the embedding dimension)",
                row.len()
            )));
        }
        if let Some(j) = row.iter().position(|x| !x.is_finite()) {
            return Err(ApiError::invalid(format!(
                "{field}[{i}][{j}] is not a finite number"
            )));
        }
        out.extend_from_slice(row);
    }
    Ok((out, dim))
}

/// Token embeddings as JSON rows.
pub fn rows(e: &Embedding) -> Vec<Vec<f32>> {
    (0..e.rows).map(|i| e.row(i).to_vec()).collect()
}

/// Encode texts with a loaded model.
#[utoipa::path(
    post, path = "/encode", tag = "models",
    request_body = EncodeRequest,
    responses(
        (status = 200, description = "Per text its token embeddings", body = EncodeResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 404, description = "Model not loaded", body = ErrorBody),
        (status = 503, description = "Encoding queue full (see Retry-After)", body = ErrorBody),
    )
)]
pub async fn encode(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EncodeRequest>,
) -> Result<Json<EncodeResponse>, ApiError> {
    check_texts(&req.texts, "texts", &state.config.limits)?;
    let encoder = state.models.pick(req.model.as_deref())?;
    let out = encoder.encode(req.texts, req.is_query).await?;
    Ok(Json(EncodeResponse {
        model: encoder.name.clone(),
        embeddings: out.iter().map(rows).collect(),
    }))
}

/// Sort documents by MaxSim against a query.
#[utoipa::path(
    post, path = "/rerank", tag = "models",
    request_body = RerankRequest,
    responses(
        (status = 200, description = "The documents, best first", body = RerankResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 404, description = "Model not loaded", body = ErrorBody),
        (status = 503, description = "Encoding queue full (see Retry-After)", body = ErrorBody),
    )
)]
pub async fn rerank(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RerankRequest>,
) -> Result<Json<RerankResponse>, ApiError> {
    let limits = &state.config.limits;
    check_text(&req.query, "query", limits)?;
    check_texts(&req.documents, "documents", limits)?;
    let encoder = state.models.pick(req.model.as_deref())?;
    let (q, docs) = tokio::try_join!(
        encoder.encode(vec![req.query], true),
        encoder.encode(req.documents, false)
    )?;
    let results = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let q = &q[0];
        let qref = EmbRef::new(&q.data, q.cols)?;
        let drefs = docs
            .iter()
            .map(|d| EmbRef::new(&d.data, d.cols))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<usize> = (0..docs.len()).collect();
        Ok(latte_index::rerank(&[ids], &[qref], &[drefs])?)
    })
    .await??;
    Ok(Json(RerankResponse {
        model: encoder.name.clone(),
        results: results
            .into_iter()
            .next()
            .unwrap_or_default()
            .into_iter()
            .map(|r| Reranked {
                index: r.id,
                score: r.score,
            })
            .collect(),
    }))
}
