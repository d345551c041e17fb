//! `POST /indexes/{name}/search`: queries as text (encoded by the index's model in the shared pool) or as
//! embeddings (never waiting on the pool), optionally filtered by metadata and fused with BM25.

use axum::extract::{Path, State};
use axum::Json;
use latte_index::{EmbRef, Hit, SearchParams};

use crate::api::{SearchHit, SearchRequest, SearchResponse};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::routes::models::{check_count, check_texts, matrix};
use crate::state::AppState;

/// Default `k`.
pub const DEFAULT_K: usize = 10;

/// Search an index.
#[utoipa::path(post, path = "/indexes/{name}/search", tag = "search",
    params(("name" = String, Path, description = "Index name")),
    request_body = SearchRequest,
    responses(
        (status = 200, description = "Per query its hits, best first", body = SearchResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 404, description = "No such index", body = ErrorBody),
        (status = 409, description = "The index has no documents yet", body = ErrorBody),
        (status = 503, description = "Encoding queue full (see Retry-After)", body = ErrorBody),
    ))]
pub async fn search(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<SearchResponse>, ApiError> {
    let entry = state.indexes.get(&name)?;
    let limits = &state.config.limits;
    let k = req.k.unwrap_or(DEFAULT_K);
    if k == 0 || k > limits.max_k {
        return Err(ApiError::invalid(format!(
            "k must be between 1 and {}, got {k}",
            limits.max_k
        )));
    }
    if req.filter.is_some() || req.hybrid.is_some() || req.return_fields.is_some() {
        return Err(ApiError::invalid(
            "filter, hybrid and return need the document store",
        ));
    }
    // The index as it is now: the search runs on this state even if a write commits meanwhile.
    let index = entry.index()?;
    let dim = index.dim();
    let queries: Vec<(Vec<f32>, usize)> = match (req.queries, req.query_embeddings) {
        (None, None) => {
            return Err(ApiError::invalid(
                "give \"queries\" (texts) or \"query_embeddings\"",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give one of \"queries\" and \"query_embeddings\"",
            ))
        }
        (Some(texts), None) => {
            check_texts(&texts, "queries", limits)?;
            let encoder = entry.encoder()?;
            let encoded = encoder.encode(texts, true).await?;
            encoded.into_iter().map(|e| (e.data, e.cols)).collect()
        }
        (None, Some(embs)) => {
            if embs.is_empty() {
                return Err(ApiError::invalid(
                    "query_embeddings is empty; give at least one query",
                ));
            }
            check_count(embs.len(), "query_embeddings", limits)?;
            embs.iter()
                .enumerate()
                .map(|(i, q)| matrix(q, Some(dim), &format!("query_embeddings[{i}]"), limits))
                .collect::<Result<_, _>>()?
        }
    };
    let hits = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<Hit>>, ApiError> {
        let refs = queries
            .iter()
            .map(|(q, d)| EmbRef::new(q, *d))
            .collect::<Result<Vec<_>, _>>()?;
        let params = SearchParams::for_k(k);
        Ok(index.search_batch(&refs, &params, None)?)
    })
    .await??;
    Ok(Json(SearchResponse {
        results: hits
            .into_iter()
            .map(|hs| {
                hs.into_iter()
                    .map(|h| SearchHit {
                        id: h.id,
                        score: h.score,
                        title: None,
                        text: None,
                        metadata: None,
                    })
                    .collect()
            })
            .collect(),
    }))
}
