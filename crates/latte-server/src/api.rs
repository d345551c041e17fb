//! The JSON bodies of every route (their schemas make `/openapi.json`). Unknown fields are refused, so a
//! misspelt option is an error rather than silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// `GET /health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the server answers.
    pub status: String,
    /// The server's version.
    pub version: String,
    /// Indexes served (built or pending).
    pub indexes: usize,
    /// Models loaded.
    pub models: Vec<String>,
    /// The precision each loaded model runs at (`f32`, `bf16` or `int8`), in the order of `models`.
    pub dtypes: Vec<String>,
}

/// `POST /indexes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIndex {
    /// The index's name: 1 to 128 characters of A-Z a-z 0-9 `_` `-` `.`, starting with a letter or digit.
    pub name: String,
    /// The model (folder or Hub id) that encodes its texts; leave it out for an index fed embeddings only.
    pub model: Option<String>,
    /// Residual bits per dimension: 1, 2 or 4 (default 2).
    pub nbits: Option<usize>,
    /// Options that change the model's embeddings, as `latte index` records them (`query_length`,
    /// `document_length`, `truncate_dim`, `dtype`, ...).
    #[schema(value_type = Option<Object>)]
    pub model_options: Option<Value>,
}

/// An index, as `GET /indexes/{name}` and `latte info` describe it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IndexSummary {
    /// Its name.
    pub name: String,
    /// `ready`, or `pending` until its first documents are added.
    pub status: String,
    /// The model recorded (or requested, when pending).
    pub model: Option<String>,
    /// The model options recorded.
    #[schema(value_type = Option<Object>)]
    pub model_options: Option<Value>,
    /// Live documents.
    pub documents: usize,
    /// Deleted documents not yet compacted away.
    pub deleted: usize,
    /// Token vectors stored.
    pub tokens: u64,
    /// Embedding dimension (0 when pending).
    pub dim: usize,
    /// Residual bits per dimension.
    pub nbits: usize,
    /// Centroids.
    pub num_centroids: usize,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Bytes search keeps hot.
    pub resident_bytes: u64,
    /// The full build configuration (absent when pending).
    #[schema(value_type = Option<Object>)]
    pub config: Option<Value>,
}

/// `GET /indexes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IndexList {
    /// Every index, by name.
    pub indexes: Vec<IndexSummary>,
}

/// `DELETE /indexes/{name}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IndexDeleted {
    /// The index deleted.
    pub deleted: String,
}

/// One document of `POST /indexes/{name}/documents`: text (encoded on the server) or embeddings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentIn {
    /// External id, unique in the index; adding an id again replaces the document.
    pub id: String,
    /// The passage: stored (returned by search, matched by BM25) and, without `embeddings`, encoded by the
    /// index's model.
    pub text: Option<String>,
    /// Title, stored and searched by BM25 beside the text.
    pub title: Option<String>,
    /// Token embeddings, `tokens × dim`, used instead of encoding (any text is then only stored).
    pub embeddings: Option<Vec<Vec<f32>>>,
    /// A JSON object for filters.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// `POST /indexes/{name}/documents`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDocuments {
    /// The documents: all with `embeddings`, or all with `text` to encode.
    pub documents: Vec<DocumentIn>,
}

/// What an add did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddResult {
    /// Documents written.
    pub added: usize,
    /// Ids that replaced documents already in the index.
    pub replaced: Vec<String>,
    /// Whether this add built the index (its first documents).
    pub created: bool,
    /// Live documents now.
    pub documents: usize,
}

/// `DELETE /indexes/{name}/documents`: ids or a metadata filter, not both.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteDocuments {
    /// Ids to delete.
    pub ids: Option<Vec<String>>,
    /// Delete every document whose metadata matches.
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Value>,
}

/// What a delete did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeleteResult {
    /// Documents deleted.
    pub deleted: usize,
    /// Live documents left.
    pub remaining: usize,
    /// Whether the index was compacted.
    pub compacted: bool,
    /// Ids asked for that the index does not hold.
    pub not_found: Vec<String>,
}

/// A stored document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DocumentOut {
    /// Its id.
    pub id: String,
    /// Its title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Its text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Its metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// How hybrid search fuses MaxSim and BM25.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hybrid {
    /// `rrf` (reciprocal rank fusion, default) or `linear`.
    pub fusion: Option<String>,
    /// The rank offset of RRF (default 60).
    pub rrf_k: Option<f64>,
    /// The weight of MaxSim in linear fusion, in [0, 1] (default 0.5).
    pub alpha: Option<f64>,
}

/// `hybrid`: `true` (RRF) or the fusion settings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum HybridOption {
    /// `true`: RRF; `false`: no hybrid search.
    Flag(bool),
    /// Fusion settings.
    Settings(Hybrid),
}

/// `POST /indexes/{name}/search`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Query texts, encoded on the server (and matched by BM25 in hybrid search).
    pub queries: Option<Vec<String>>,
    /// Query token embeddings, one `tokens × dim` matrix per query, instead of (or, for hybrid search,
    /// beside) `queries`.
    pub query_embeddings: Option<Vec<Vec<Vec<f32>>>>,
    /// Results per query (default 10).
    pub k: Option<usize>,
    /// Only documents whose metadata matches this filter.
    #[schema(value_type = Option<Object>)]
    pub filter: Option<Value>,
    /// Fuse MaxSim with BM25 over the stored text.
    pub hybrid: Option<HybridOption>,
    /// Stored fields to return with each hit: `text`, `title`, `metadata`.
    #[serde(rename = "return")]
    pub return_fields: Option<Vec<String>>,
}

/// One search result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    /// Document id.
    pub id: String,
    /// MaxSim score (the fused score in hybrid search).
    pub score: f32,
    /// The stored title, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The stored text, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The stored metadata, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// The answer of a search: one list per query, best first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// Per query, its hits.
    pub results: Vec<Vec<SearchHit>>,
}

/// `POST /encode`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    /// A loaded model (default: the first `--model`).
    pub model: Option<String>,
    /// The texts.
    pub texts: Vec<String>,
    /// Queries (`true`) or documents (`false`).
    pub is_query: bool,
}

/// The answer of `/encode`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EncodeResponse {
    /// The model used.
    pub model: String,
    /// Per text, its token embeddings (`tokens × dim`).
    pub embeddings: Vec<Vec<Vec<f32>>>,
}

/// `POST /rerank`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RerankRequest {
    /// A loaded model (default: the first `--model`).
    pub model: Option<String>,
    /// The query.
    pub query: String,
    /// The candidate documents.
    pub documents: Vec<String>,
}

/// One reranked document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Reranked {
    /// Its position in the request's `documents`.
    pub index: usize,
    /// Its MaxSim score against the query.
    pub score: f32,
}

/// The answer of `/rerank`: the documents, best first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RerankResponse {
    /// The model used.
    pub model: String,
    /// The documents, best first.
    pub results: Vec<Reranked>,
}
