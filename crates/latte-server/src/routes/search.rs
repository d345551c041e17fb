//! `POST /indexes/{name}/search`: queries as text (encoded by the index's model in the shared pool) or as
//! embeddings (never waiting on the pool), optionally filtered by metadata and fused with BM25.

use axum::extract::{Path, State};
use axum::Json;
use latte_index::{DocStore, EmbRef, Filter, Fusion, Hit, PlaidIndex, SearchParams};

use crate::api::{HybridOption, SearchHit, SearchRequest, SearchResponse};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::routes::documents::{is_stale_view, parse_filter, RETRIES};
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
        (status = 503, description = "Encoding queue or search queue full (see Retry-After)", body = ErrorBody),
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
    let filter = req.filter.as_ref().map(parse_filter).transpose()?;
    let fusion = req.hybrid.as_ref().map(parse_hybrid).transpose()?.flatten();
    let fields = Fields::parse(req.return_fields.as_deref())?;
    if fusion.is_some() && req.queries.is_none() {
        return Err(ApiError::invalid(
            "hybrid search needs \"queries\": the text BM25 matches (with \"query_embeddings\" for MaxSim, \
             or encoded on the server)",
        ));
    }
    // The index as it is now: the search runs on this state even if a write commits meanwhile.
    let index = entry.index()?;
    let dim = index.dim();
    let texts = if fusion.is_some() {
        req.queries.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    let queries: Vec<(Vec<f32>, usize)> =
        match (req.queries, req.query_embeddings) {
            (None, None) => {
                return Err(ApiError::invalid(
                    "give \"queries\" (texts) or \"query_embeddings\"",
                ))
            }
            (Some(_), Some(_)) if fusion.is_none() => return Err(ApiError::invalid(
                "give one of \"queries\" and \"query_embeddings\" (both only for hybrid search)",
            )),
            (Some(texts), None) => {
                check_texts(&texts, "queries", limits)?;
                let encoder = entry.encoder()?;
                let encoded = encoder.encode(texts, true).await?;
                encoded.into_iter().map(|e| (e.data, e.cols)).collect()
            }
            (texts, Some(embs)) => {
                if let Some(t) = &texts {
                    check_texts(t, "queries", limits)?;
                    if t.len() != embs.len() {
                        return Err(ApiError::invalid(format!(
                            "{} queries but {} query_embeddings: give one text per embedded query",
                            t.len(),
                            embs.len()
                        )));
                    }
                }
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
    let request = Query {
        k,
        filter,
        fusion,
        fields,
        texts,
        queries,
    };
    // Admission (503 when too many searches are in flight), then a turn among the running searches; the
    // permit moves onto the blocking thread, so a search abandoned by a timed-out request still holds it.
    let permit = state.searches.enter().await?;
    if !request.needs_store() {
        // Vectors only (no filter, no BM25, no stored fields): pure computation, started on the search
        // thread pool itself rather than on a blocking thread that would hand it to that pool and wait.
        let (tx, rx) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            let _permit = permit;
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.run(&index)));
            let _ = tx.send(out);
        });
        let results = match rx.await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(ApiError::internal("the search panicked")),
            Err(_) => return Err(ApiError::internal("the search's worker went away")),
        };
        return Ok(Json(SearchResponse { results }));
    }
    let results = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        // A read of the document store whose view was overtaken by two commits retries on the served index.
        let mut index = index;
        for _ in 0..RETRIES {
            match request.run(&index) {
                Err(e) if is_stale_view(&e) => index = entry.index()?,
                other => return other.map_err(ApiError::from),
            }
        }
        Err(ApiError::unavailable(
            "busy",
            "the index changed during the search; retry",
            1,
        ))
    })
    .await??;
    Ok(Json(SearchResponse { results }))
}

/// `hybrid`: `None` for `false`.
fn parse_hybrid(h: &HybridOption) -> Result<Option<Fusion>, ApiError> {
    let s = match h {
        HybridOption::Flag(false) => return Ok(None),
        HybridOption::Flag(true) => return Ok(Some(Fusion::default())),
        HybridOption::Settings(s) => s,
    };
    match s.fusion.as_deref().unwrap_or("rrf") {
        "rrf" => {
            if s.alpha.is_some() {
                return Err(ApiError::invalid(
                    "hybrid.alpha applies to \"fusion\": \"linear\"",
                ));
            }
            let k = s.rrf_k.unwrap_or(latte_index::RRF_K);
            if !(k.is_finite() && k >= 0.0) {
                return Err(ApiError::invalid(format!(
                    "hybrid.rrf_k must be a finite number of at least 0, got {k}"
                )));
            }
            Ok(Some(Fusion::Rrf { k }))
        }
        "linear" => {
            if s.rrf_k.is_some() {
                return Err(ApiError::invalid(
                    "hybrid.rrf_k applies to \"fusion\": \"rrf\"",
                ));
            }
            let alpha = s.alpha.unwrap_or(0.5);
            if !(0.0..=1.0).contains(&alpha) {
                return Err(ApiError::invalid(format!(
                    "hybrid.alpha must be in [0, 1], got {alpha}"
                )));
            }
            Ok(Some(Fusion::Linear { alpha }))
        }
        other => Err(ApiError::invalid(format!(
            "hybrid.fusion must be \"rrf\" or \"linear\", got {other:?}"
        ))),
    }
}

/// The stored fields a search returns with each hit.
#[derive(Debug, Clone, Copy, Default)]
struct Fields {
    title: bool,
    text: bool,
    metadata: bool,
}

impl Fields {
    fn parse(names: Option<&[String]>) -> Result<Fields, ApiError> {
        let mut f = Fields::default();
        for (i, n) in names.unwrap_or_default().iter().enumerate() {
            match n.as_str() {
                "title" => f.title = true,
                "text" => f.text = true,
                "metadata" => f.metadata = true,
                other => {
                    return Err(ApiError::invalid(format!(
                        "return[{i}] must be \"text\", \"title\" or \"metadata\", got {other:?}"
                    )))
                }
            }
        }
        Ok(f)
    }

    fn any(self) -> bool {
        self.title || self.text || self.metadata
    }
}

/// A checked search, run off the async runtime.
struct Query {
    k: usize,
    filter: Option<Filter>,
    fusion: Option<Fusion>,
    fields: Fields,
    /// Query texts (hybrid search only).
    texts: Vec<String>,
    /// Query embeddings and their dimension.
    queries: Vec<(Vec<f32>, usize)>,
}

impl Query {
    /// Whether the search reads the document store (a filter, BM25 or stored fields to return).
    fn needs_store(&self) -> bool {
        self.filter.is_some() || self.fusion.is_some() || self.fields.any()
    }

    fn run(&self, index: &PlaidIndex) -> latte_index::Result<Vec<Vec<SearchHit>>> {
        let refs = self
            .queries
            .iter()
            .map(|(q, d)| EmbRef::new(q, *d))
            .collect::<Result<Vec<_>, _>>()?;
        let params = SearchParams::for_k(self.k);
        let store: Option<DocStore> = if self.needs_store() {
            Some(index.open_store()?)
        } else {
            None
        };
        let hits: Vec<Vec<Hit>> = match (&store, self.fusion) {
            (Some(store), Some(fusion)) => refs
                .iter()
                .zip(&self.texts)
                .map(|(q, t)| {
                    index.search_hybrid(store, *q, t, &params, self.filter.as_ref(), fusion)
                })
                .collect::<latte_index::Result<_>>()?,
            (Some(store), None) if self.filter.is_some() => {
                let filter = self.filter.as_ref().expect("checked");
                let ids = index.ids_matching(store, filter)?;
                refs.iter()
                    .map(|q| index.search_subset(*q, &params, &ids))
                    .collect::<latte_index::Result<_>>()?
            }
            _ => index.search_batch(&refs, &params, None)?,
        };
        let mut out = Vec::with_capacity(hits.len());
        for hs in hits {
            let docs = match (&store, self.fields.any()) {
                (Some(store), true) => {
                    let ids: Vec<&str> = hs.iter().map(|h| h.id.as_str()).collect();
                    store.get(&ids)?
                }
                _ => vec![None; hs.len()],
            };
            out.push(
                hs.into_iter()
                    .zip(docs)
                    .map(|(h, d)| {
                        let d = d.unwrap_or_default();
                        SearchHit {
                            id: h.id,
                            score: h.score,
                            title: d.title.filter(|_| self.fields.title),
                            text: d.text.filter(|_| self.fields.text),
                            metadata: d.metadata.filter(|_| self.fields.metadata),
                        }
                    })
                    .collect(),
            );
        }
        Ok(out)
    }
}
