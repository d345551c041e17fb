//! What the handlers share: the settings, the loaded models ([`Models`]), the indexes under the data folder
//! ([`Indexes`]), the metrics and the count of writes in progress.
//!
//! Each index is an [`IndexEntry`]: the open index behind an atomic pointer (searches load it and keep
//! their `Arc` for the whole search, so a commit never changes an index under a search), the model that
//! encodes its texts, and a mutex that serialises its writes. A write commits, reopens the index and swaps
//! the pointer; searches started before the swap finish on the old state.
//!
//! An index needs documents before it exists on disk (its centroids are trained on them): `POST /indexes`
//! records the requested settings in `DATA/.pending/NAME.json`, and the first `POST .../documents` builds the
//! index with them and removes the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwapOption;
use axum::http::StatusCode;
use latte_index::PlaidIndex;
use latte_models::{ColBERT, ModelOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, SearchConfig};
use crate::encoder::Encoder;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// The folder (under the data folder) holding the settings of indexes created but not yet built.
pub const PENDING_DIR: &str = ".pending";

/// Longest index name.
pub const MAX_NAME_LEN: usize = 128;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The settings.
    pub config: Arc<Config>,
    /// Loaded models.
    pub models: Arc<Models>,
    /// The indexes.
    pub indexes: Arc<Indexes>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Writes in progress (shutdown waits for them).
    pub writes: Arc<Writes>,
    /// Search admission: a bounded number run, a bounded number wait, the rest get 503.
    pub searches: Arc<SearchGate>,
}

/// Loaded models with their encoding pools, each loaded once per (name, options).
pub struct Models {
    config: Arc<Config>,
    loaded: RwLock<Vec<Arc<Encoder>>>,
    /// Serialises loading, so a model asked for twice at once loads once.
    loading: Mutex<()>,
}

impl Models {
    /// No model loaded yet.
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            loaded: RwLock::new(Vec::new()),
            loading: Mutex::new(()),
        }
    }

    fn find_loaded(&self, name: &str, options: &ModelOptions) -> Option<Arc<Encoder>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| e.name == name && &e.options == options)
            .cloned()
    }

    /// The model `name` loaded with `options` (the options that change the embeddings; pooling is not one of
    /// them), loading it on first use. Blocking: call it off the async runtime.
    pub fn get_or_load(
        &self,
        name: &str,
        options: &ModelOptions,
    ) -> Result<Arc<Encoder>, ApiError> {
        let mut options = options.clone();
        options.pool_factor = None;
        if let Some(d) = self.config.dtype {
            options.dtype = Some(d);
        }
        if let Some(e) = self.find_loaded(name, &options) {
            return Ok(e);
        }
        let _guard = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.find_loaded(name, &options) {
            return Ok(e);
        }
        let t = std::time::Instant::now();
        let model = ColBERT::load(name, &options.load_options(&self.config.hub)).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "model_unavailable",
                format!("cannot load model {name}: {e}"),
            )
        })?;
        tracing::info!("loaded model {name} in {:.2?}", t.elapsed());
        let encoder = Arc::new(Encoder::start(
            name.to_string(),
            options,
            model,
            &self.config.encode,
        ));
        self.loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(encoder.clone());
        Ok(encoder)
    }

    /// The model `/encode` and `/rerank` use: the one named (among the loaded ones; its first loaded
    /// variant), else the first `--model`, else the only loaded model.
    pub fn pick(&self, name: Option<&str>) -> Result<Arc<Encoder>, ApiError> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let wanted = name.or(self.config.models.first().map(String::as_str));
        let found = match wanted {
            Some(n) => loaded.iter().find(|e| e.name == n),
            None if loaded.len() == 1 => loaded.first(),
            None => None,
        };
        found.cloned().ok_or_else(|| {
            let names: Vec<&str> = loaded.iter().map(|e| e.name.as_str()).collect();
            match wanted {
                Some(n) => ApiError::not_found(format!(
                    "model {n:?} is not loaded; loaded models: {names:?} (start the server with --model {n})"
                )),
                None => ApiError::invalid(format!(
                    "name a model with \"model\": the server has {} loaded ({names:?}) and no default \
                     (start it with --model)",
                    names.len()
                )),
            }
        })
    }

    /// Every loaded model.
    pub fn all(&self) -> Vec<Arc<Encoder>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Settings of an index created by `POST /indexes` and built by its first documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingSpec {
    /// The model that encodes its texts, if any.
    pub model: Option<String>,
    /// The model's options.
    #[serde(default)]
    pub model_options: ModelOptions,
    /// Residual bits per dimension.
    pub nbits: usize,
}

/// One index under the data folder.
pub struct IndexEntry {
    /// Its name (its folder's name).
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// The open index; `None` while it is pending (no documents yet).
    pub current: ArcSwapOption<PlaidIndex>,
    /// The settings of a pending index.
    pub pending: Option<PendingSpec>,
    /// The model that encodes its texts: `Ok(None)` for an index without a model, `Err` when it failed to
    /// load.
    pub encoder: Result<Option<Arc<Encoder>>, String>,
    /// Held by the one write in progress.
    pub write: tokio::sync::Mutex<()>,
    /// Set when the index is deleted; a write that finds it set answers 404.
    pub removed: AtomicBool,
}

impl IndexEntry {
    /// The model for this index's texts, or the error explaining why there is none.
    pub fn encoder(&self) -> Result<Arc<Encoder>, ApiError> {
        match &self.encoder {
            Ok(Some(e)) => Ok(e.clone()),
            Ok(None) => Err(ApiError::invalid(format!(
                "index {} has no model: send embeddings instead of text, or create the index with a \"model\"",
                self.name
            ))),
            Err(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
                format!("the model of index {} could not be loaded: {e}", self.name),
            )),
        }
    }

    /// The open index, or 409 `index_empty` while pending.
    pub fn index(&self) -> Result<Arc<PlaidIndex>, ApiError> {
        self.current.load_full().ok_or_else(|| {
            ApiError::conflict(
                "index_empty",
                format!(
                    "index {} has no documents yet: add some with POST /indexes/{}/documents",
                    self.name, self.name
                ),
            )
        })
    }

    /// The model name recorded (or requested for a pending index).
    pub fn model_name(&self) -> Option<String> {
        match self.current.load_full() {
            Some(i) => i.model().map(str::to_string),
            None => self.pending.as_ref().and_then(|p| p.model.clone()),
        }
    }
}

/// Checks an index name: 1 to 128 characters of `A-Z a-z 0-9 _ - .`, starting with a letter or digit, no
/// `..` (so a name is always one plain folder under the data folder).
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !first_ok || name.contains("..")
    {
        return Err(ApiError::invalid(format!(
            "invalid index name {name:?}: expected 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '_', \
             '-' and '.', starting with a letter or digit, without '..'"
        )));
    }
    Ok(())
}

/// The indexes under the data folder.
pub struct Indexes {
    root: PathBuf,
    map: RwLock<BTreeMap<String, Arc<IndexEntry>>>,
}

impl Indexes {
    /// Opens every index (and pending index) under `root`, loading each one's model through `models`.
    /// An index that fails to open is logged and left out; one whose model fails to load still answers
    /// searches by embeddings.
    pub fn open(root: &Path, models: &Models) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join(PENDING_DIR))?;
        let mut map = BTreeMap::new();
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !entry.file_type()?.is_dir() || validate_name(&name).is_err() {
                continue;
            }
            match PlaidIndex::open(entry.path()) {
                Ok(index) => {
                    let e = Self::entry_for(root, &name, Some(index), None, models);
                    map.insert(name, Arc::new(e));
                }
                Err(latte_index::Error::NotAnIndex(_)) => {}
                Err(e) => tracing::error!("index {name} cannot be opened and is not served: {e}"),
            }
        }
        for entry in std::fs::read_dir(root.join(PENDING_DIR))? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().to_string();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if validate_name(name).is_err() || map.contains_key(name) {
                continue;
            }
            let spec = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<PendingSpec>(&b).ok());
            match spec {
                Some(spec) => {
                    let e = Self::entry_for(root, name, None, Some(spec), models);
                    map.insert(name.to_string(), Arc::new(e));
                }
                None => tracing::error!(
                    "{} is not a pending index's settings; ignored",
                    entry.path().display()
                ),
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            map: RwLock::new(map),
        })
    }

    /// An entry for `name`: its index (or pending settings) and its model, loaded now.
    pub fn entry_for(
        root: &Path,
        name: &str,
        index: Option<PlaidIndex>,
        pending: Option<PendingSpec>,
        models: &Models,
    ) -> IndexEntry {
        let (model, options) = match (&index, &pending) {
            (Some(i), _) => (
                i.model().map(str::to_string),
                ModelOptions::from_json(i.model_options()).map_err(|e| e.to_string()),
            ),
            (None, Some(p)) => (p.model.clone(), Ok(p.model_options.clone())),
            (None, None) => (None, Ok(ModelOptions::default())),
        };
        let encoder = match (model, options) {
            (None, _) => Ok(None),
            (Some(_), Err(e)) => Err(e),
            (Some(m), Ok(o)) => models.get_or_load(&m, &o).map(Some).map_err(|e| {
                tracing::error!("index {name}: {}", e.message);
                e.message
            }),
        };
        IndexEntry {
            name: name.to_string(),
            dir: root.join(name),
            current: ArcSwapOption::new(index.map(Arc::new)),
            pending,
            encoder,
            write: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
        }
    }

    /// The data folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding a pending index's settings.
    pub fn pending_file(&self, name: &str) -> PathBuf {
        self.root.join(PENDING_DIR).join(format!("{name}.json"))
    }

    /// The entry named `name` (validated), or 404.
    pub fn get(&self, name: &str) -> Result<Arc<IndexEntry>, ApiError> {
        validate_name(name)?;
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no index named {name:?}")))
    }

    /// Every entry, by name.
    pub fn list(&self) -> Vec<Arc<IndexEntry>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Adds a pending index: 409 when the name is taken (served, or a folder already there).
    pub fn insert_pending(&self, entry: IndexEntry) -> Result<Arc<IndexEntry>, ApiError> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&entry.name) || entry.dir.exists() {
            return Err(ApiError::conflict(
                "index_exists",
                format!("an index named {:?} already exists", entry.name),
            ));
        }
        let spec = entry.pending.as_ref().expect("a pending entry");
        let file = self.pending_file(&entry.name);
        let bytes = serde_json::to_vec_pretty(spec).expect("plain fields serialise");
        latte_models::atomic_write(&file, &bytes)
            .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", file.display())))?;
        let entry = Arc::new(entry);
        map.insert(entry.name.clone(), entry.clone());
        Ok(entry)
    }

    /// Removes `name` from the served indexes (the caller deletes its files).
    pub fn remove(&self, name: &str) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// Writes in progress: each holds a [`WriteGuard`]; shutdown waits until none is left.
#[derive(Default)]
pub struct Writes {
    active: AtomicUsize,
    idle: Notify,
}

/// One write in progress.
pub struct WriteGuard(Arc<Writes>);

impl Writes {
    /// Starts a write.
    pub fn begin(self: &Arc<Self>) -> WriteGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        WriteGuard(self.clone())
    }

    /// Waits until no write is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Admission of searches. A search first takes one of `workers + queue` admission permits without waiting
/// (none left: 503 `overloaded` with `Retry-After`), then waits for one of `workers` run permits, which it
/// holds on the blocking thread until the search ends — even when the request itself timed out meanwhile, so
/// abandoned searches still count against the bound.
pub struct SearchGate {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

/// A search's admission and its turn to run.
pub struct SearchPermit {
    _admitted: OwnedSemaphorePermit,
    _running: OwnedSemaphorePermit,
}

impl SearchGate {
    /// A gate with the given bounds (each at least 1 worker).
    pub fn new(config: &SearchConfig) -> Self {
        let workers = config.workers.max(1);
        Self {
            admitted: Arc::new(Semaphore::new(workers + config.queue)),
            running: Arc::new(Semaphore::new(workers)),
        }
    }

    /// Admits a search, or answers 503 when `workers + queue` are already admitted; then waits for its turn.
    pub async fn enter(&self) -> Result<SearchPermit, ApiError> {
        let admitted = self.admitted.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable(
                "overloaded",
                "too many searches in flight; retry after the time in Retry-After",
                1,
            )
        })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("search gate closed"))?;
        Ok(SearchPermit {
            _admitted: admitted,
            _running: running,
        })
    }

    /// Searches admitted now (running or waiting).
    pub fn in_flight(&self, config: &SearchConfig) -> usize {
        (config.workers.max(1) + config.queue).saturating_sub(self.admitted.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn search_gate_bounds_running_and_waiting_searches() {
        let config = SearchConfig {
            workers: 1,
            queue: 1,
        };
        let gate = SearchGate::new(&config);
        let first = gate.enter().await.expect("a free gate admits");
        assert_eq!(gate.in_flight(&config), 1);
        // The second is admitted but waits for the one running search.
        let mut second = pin!(gate.enter());
        assert!(poll_once(second.as_mut()).is_pending());
        assert_eq!(gate.in_flight(&config), 2);
        // The third finds workers + queue admitted: 503 with Retry-After, at once.
        let err = gate.enter().await.err().expect("a full gate refuses");
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after, Some(1));
        // The running search ends: the waiting one runs.
        drop(first);
        let Poll::Ready(second) = poll_once(second.as_mut()) else {
            panic!("the waiting search runs once the running one ends");
        };
        let second = second.expect("admitted");
        assert_eq!(gate.in_flight(&config), 1);
        drop(second);
        assert_eq!(gate.in_flight(&config), 0);
    }
}
