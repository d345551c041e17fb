//! The document store of a latte index: passage text, titles and metadata beside the vectors, MongoDB-style
//! metadata filters, BM25 keyword search and rank fusion, all in one SQLite file (`documents.sqlite`).
//!
//! ```no_run
//! use latte_store::{Doc, DocStore, Filter, fuse_rrf, RRF_K};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut store = DocStore::create("index/documents.sqlite")?;
//! let meta = json!({"lang": "rust", "year": 2023}).as_object().cloned();
//! let doc = Doc { id: "d1".into(), title: Some("Ownership".into()), text: Some("Borrowing rules".into()), metadata: meta };
//! store.upsert(&[doc], 1)?;
//! let filter: Filter = r#"{"year": {"$gte": 2020}}"#.parse()?;
//! let sparse = store.bm25("borrowing", 10, Some(&filter))?;
//! let dense = vec![("d1".to_string(), 0.9)];
//! let fused = fuse_rrf(&[dense, sparse], RRF_K)?;
//! # Ok(()) }
//! ```
//!
//! See FORMAT.md for the tables and the generation protocol that keeps the store and the vector files in
//! step, and [`filter`] for the filter language and its type semantics.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod filter;
mod fusion;
mod store;

pub use error::{FusionError, StoreError};
pub use filter::{Filter, FilterError};
pub use fusion::{fuse_linear, fuse_rrf, RRF_K};
pub use store::{
    DeleteReport, Doc, DocStore, Reconciled, UpsertReport, APPLICATION_ID, FILE_NAME,
    MAX_QUERY_TERMS, SCHEMA_VERSION,
};
