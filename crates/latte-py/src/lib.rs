//! `latte._latte`: the native module behind the `latte` Python package (PyLate's API on latte's engine).
//!
//! This module is thin: it exposes latte's models, scoring, indexes and evaluation with plain arguments
//! (lists, numpy arrays, strings); the pure-Python package in `python/latte/` gives them PyLate's names,
//! keywords and return types. Every long computation runs with the GIL released (`Python::detach`), and
//! every object here is safe to use from several Python threads at once (models and indexes sit behind
//! read-write locks: encoding and searching share them, mutations take them alone).
//!
//! Arrays cross without copies where the layout allows: inputs are read in place from C-contiguous float32
//! numpy arrays (the Python layer converts other layouts once), outputs hand their Rust buffer to numpy.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use latte_index::{
    Doc, DocStore, EmbRef, ExactIndex, Filter, Fusion, IndexCodec, IndexConfig, PlaidIndex,
    SearchParams, VecSource,
};
use latte_models::{
    ColBERT, Dense, DenseConfig, Dtype, EncodeOptions, HubOptions, LoadOptions, PartialSettings,
};
use numpy::ndarray::{Array2, Array3};
use numpy::{PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyIndexError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _latte,
    LatteError,
    PyException,
    "Base class of the errors latte raises that are neither FileNotFoundError nor ValueError."
);

fn latte_error(msg: String) -> PyErr {
    LatteError::new_err(msg)
}

fn lock_poisoned<T>(_: PoisonError<T>) -> PyErr {
    latte_error("a previous call panicked while holding this object; recreate it".into())
}

/// Maps a model error to the Python exception a PyLate user expects.
fn model_err(e: latte_models::Error) -> PyErr {
    use latte_models::Error as E;
    let msg = e.to_string();
    match &e {
        E::MissingFile { .. } => PyFileNotFoundError::new_err(msg),
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        E::Resolve { reason, .. } if reason.starts_with("no such folder") => {
            PyFileNotFoundError::new_err(msg)
        }
        E::Shape { .. } | E::Invalid(_) | E::UnknownActivation(..) => PyValueError::new_err(msg),
        _ => latte_error(msg),
    }
}

/// Maps an index error to a Python exception.
fn index_err(e: latte_index::Error) -> PyErr {
    use latte_index::Error as E;
    let msg = e.to_string();
    match &e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        E::NotAnIndex(_) => PyFileNotFoundError::new_err(msg),
        E::DimensionMismatch { .. }
        | E::Shape(_)
        | E::InvalidArgument(_)
        | E::EmptyIndex
        | E::UnknownIds(_)
        | E::DuplicateId(_)
        | E::EmptyDocument(_)
        | E::Fusion(_) => PyValueError::new_err(msg),
        E::Store(s) => store_err_kind(s, msg),
        _ => latte_error(msg),
    }
}

/// A document store error: bad filters, queries and documents are `ValueError`s.
fn store_err_kind(e: &latte_index::StoreError, msg: String) -> PyErr {
    use latte_index::StoreError as S;
    match e {
        S::Filter(_) | S::QueryTooLong { .. } | S::InvalidDocument { .. } => {
            PyValueError::new_err(msg)
        }
        _ => latte_error(msg),
    }
}

/// Maps an evaluation error to a Python exception.
fn eval_err(e: latte_eval::EvalError) -> PyErr {
    use latte_eval::EvalError as E;
    let msg = e.to_string();
    match &e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        E::MissingSplit { .. } => PyFileNotFoundError::new_err(msg),
        E::InvalidMetric { .. } | E::Invalid { .. } => PyValueError::new_err(msg),
        _ => latte_error(msg),
    }
}

/// A C-contiguous `tokens × dim` float32 matrix as a slice, or a `ValueError` naming `what`.
fn matrix<'a>(a: &'a PyReadonlyArray2<'_, f32>, what: &str) -> PyResult<(&'a [f32], usize)> {
    let dim = a.shape()[1];
    let data = a.as_slice().map_err(|_| {
        PyValueError::new_err(format!(
            "{what}: expected a C-contiguous float32 array, got a strided one"
        ))
    })?;
    Ok((data, dim))
}

fn emb<'a>(data: &'a [f32], dim: usize, what: &str) -> PyResult<EmbRef<'a>> {
    EmbRef::new(data, dim).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// Hands a `rows × cols` buffer to numpy without copying it.
fn to_numpy2(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    data: Vec<f32>,
) -> PyResult<Py<PyArray2<f32>>> {
    let arr = Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| latte_error(format!("internal shape error: {e}")))?;
    Ok(PyArray2::from_owned_array(py, arr).unbind())
}

// ------------------------------------------------------------------------------------------------
// Models

/// The local folder of `model`: a folder path as it is, or a Hugging Face Hub id fetched into (or, with
/// `local_files_only`, only read from) the Hub cache.
#[pyfunction]
#[pyo3(signature = (model, local_files_only=false, cache_folder=None, revision=None, token=None))]
fn resolve_model(
    py: Python<'_>,
    model: String,
    local_files_only: bool,
    cache_folder: Option<PathBuf>,
    revision: Option<String>,
    token: Option<String>,
) -> PyResult<PathBuf> {
    let opts = HubOptions {
        cache_dir: cache_folder,
        revision,
        offline: local_files_only.then_some(true),
        token,
    };
    py.detach(|| latte_models::resolve_model(&model, &opts))
        .map_err(model_err)
}

/// A loaded ColBERT model (latte_models::ColBERT).
#[pyclass(frozen, module = "latte._latte")]
struct Model {
    inner: RwLock<ColBERT>,
}

#[pymethods]
impl Model {
    /// Loads a model from a folder or a Hugging Face Hub id; explicit settings win over the model's config.
    #[staticmethod]
    #[pyo3(signature = (model, query_prefix=None, document_prefix=None, query_length=None,
        document_length=None, attend_to_expansion_tokens=None, do_query_expansion=None,
        skiplist_words=None, truncate_dim=None, embedding_size=None, bias=false,
        local_files_only=false, cache_folder=None, revision=None, token=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        model: String,
        query_prefix: Option<String>,
        document_prefix: Option<String>,
        query_length: Option<usize>,
        document_length: Option<usize>,
        attend_to_expansion_tokens: Option<bool>,
        do_query_expansion: Option<bool>,
        skiplist_words: Option<Vec<String>>,
        truncate_dim: Option<usize>,
        embedding_size: Option<usize>,
        bias: bool,
        local_files_only: bool,
        cache_folder: Option<PathBuf>,
        revision: Option<String>,
        token: Option<String>,
    ) -> PyResult<Self> {
        let mut opts = LoadOptions {
            settings: PartialSettings {
                query_prefix,
                document_prefix,
                query_length,
                document_length,
                do_query_expansion,
                attend_to_expansion_tokens,
                skiplist_words,
            },
            embedding_size,
            bias,
            truncate_dim,
            ..LoadOptions::default()
        };
        opts.hub.cache_dir = cache_folder;
        opts.hub.revision = revision;
        opts.hub.token = token;
        if local_files_only {
            opts.hub.offline = Some(true);
        }
        let inner = py
            .detach(|| ColBERT::load(&model, &opts))
            .map_err(model_err)?;
        Ok(Self {
            inner: RwLock::new(inner),
        })
    }

    /// Encodes texts; returns one float32 `tokens × dim` array per text, in input order.
    #[pyo3(signature = (texts, is_query, batch_size=32, show_progress=None, prompt_name=None,
        prompt=None, normalize=true, pool_factor=1, protected_tokens=1))]
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        is_query: bool,
        batch_size: usize,
        show_progress: Option<bool>,
        prompt_name: Option<String>,
        prompt: Option<String>,
        normalize: bool,
        pool_factor: usize,
        protected_tokens: usize,
    ) -> PyResult<Vec<Py<PyArray2<f32>>>> {
        if pool_factor == 0 {
            return Err(PyValueError::new_err("pool_factor must be at least 1"));
        }
        let opts = EncodeOptions {
            batch_size,
            normalize,
            prompt,
            prompt_name,
            show_progress,
        };
        let out = py.detach(|| -> PyResult<Vec<(usize, usize, Vec<f32>)>> {
            let model = self.inner.read().map_err(lock_poisoned)?;
            let embs = model.encode(&texts, is_query, &opts).map_err(model_err)?;
            embs.into_iter()
                .map(|e| {
                    if pool_factor > 1 && !is_query {
                        let pooled = latte_index::pool::pool_embeddings_hierarchical(
                            &e.data,
                            e.cols,
                            pool_factor,
                            protected_tokens,
                        )
                        .map_err(index_err)?;
                        Ok((pooled.len() / e.cols.max(1), e.cols, pooled))
                    } else {
                        Ok((e.rows, e.cols, e.data))
                    }
                })
                .collect()
        })?;
        out.into_iter()
            .map(|(r, c, d)| to_numpy2(py, r, c, d))
            .collect()
    }

    /// Saves the model as a PyLate folder.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| {
            let model = self.inner.read().map_err(lock_poisoned)?;
            model.save(&path).map_err(model_err)
        })
    }

    /// Number of modules (the Transformer counts as one).
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.inner.read().map_err(lock_poisoned)?.len())
    }

    /// PyLate's module listing.
    fn __str__(&self) -> PyResult<String> {
        Ok(self.inner.read().map_err(lock_poisoned)?.to_string())
    }

    /// Removes module `index` (1 is the first Dense; the Transformer cannot be removed).
    fn remove_module(&self, index: usize) -> PyResult<()> {
        let mut model = self.inner.write().map_err(lock_poisoned)?;
        if index >= model.len() {
            return Err(PyIndexError::new_err(format!(
                "module index {index} out of range: the model has {} modules",
                model.len()
            )));
        }
        model.remove_module(index).map(|_| ()).map_err(model_err)
    }

    /// Builds a model from a local Transformer folder and Dense modules (PyLate's modular syntax);
    /// explicit settings win over PyLate's defaults.
    #[staticmethod]
    #[pyo3(signature = (transformer, denses, query_prefix=None, document_prefix=None,
        query_length=None, document_length=None, attend_to_expansion_tokens=None,
        do_query_expansion=None, skiplist_words=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_modules(
        py: Python<'_>,
        transformer: PathBuf,
        denses: Vec<Py<DenseModule>>,
        query_prefix: Option<String>,
        document_prefix: Option<String>,
        query_length: Option<usize>,
        document_length: Option<usize>,
        attend_to_expansion_tokens: Option<bool>,
        do_query_expansion: Option<bool>,
        skiplist_words: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let denses: Vec<Dense> = denses.iter().map(|d| d.get().inner.clone()).collect();
        let settings = PartialSettings {
            query_prefix,
            document_prefix,
            query_length,
            document_length,
            do_query_expansion,
            attend_to_expansion_tokens,
            skiplist_words,
        };
        let inner = py
            .detach(|| {
                let t = latte_models::Transformer::load(&transformer, &candle_core::Device::Cpu)?;
                ColBERT::from_modules(t, denses, settings)
            })
            .map_err(model_err)?;
        Ok(Self {
            inner: RwLock::new(inner),
        })
    }

    /// Appends a Dense module (its input must match the current output dimension).
    fn push_dense(&self, dense: PyRef<'_, DenseModule>) -> PyResult<()> {
        let mut model = self.inner.write().map_err(lock_poisoned)?;
        model.push_dense(dense.inner.clone()).map_err(model_err)
    }

    /// Sets the precision of the encoder's linear layers in inference: `f32`, `bf16` or `int8`.
    fn set_dtype(&self, dtype: &str) -> PyResult<()> {
        let d: Dtype = dtype
            .parse()
            .map_err(|e: latte_models::ParseDtypeError| PyValueError::new_err(e.to_string()))?;
        self.inner.write().map_err(lock_poisoned)?.set_dtype(d);
        Ok(())
    }

    /// The precision of the encoder's linear layers in inference: `f32`, `bf16` or `int8`.
    fn dtype(&self) -> PyResult<String> {
        Ok(self
            .inner
            .read()
            .map_err(lock_poisoned)?
            .dtype()
            .as_str()
            .to_string())
    }

    /// Output dimension of the token embeddings.
    fn output_dim(&self) -> PyResult<usize> {
        Ok(self.inner.read().map_err(lock_poisoned)?.output_dim())
    }

    /// The resolved ColBERT settings as a dict.
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let model = self.inner.read().map_err(lock_poisoned)?;
        let s = model.settings();
        let d = pyo3::types::PyDict::new(py);
        d.set_item("query_prefix", &s.query_prefix)?;
        d.set_item("document_prefix", &s.document_prefix)?;
        d.set_item("query_length", s.query_length)?;
        d.set_item("document_length", s.document_length)?;
        d.set_item("do_query_expansion", s.do_query_expansion)?;
        d.set_item("attend_to_expansion_tokens", s.attend_to_expansion_tokens)?;
        d.set_item("skiplist_words", &s.skiplist_words)?;
        d.set_item("truncate_dim", model.truncate_dim())?;
        Ok(d)
    }
}

/// A Dense module (latte_models::Dense): a linear projection, an activation and an optional residual.
#[pyclass(frozen, module = "latte._latte")]
struct DenseModule {
    inner: Dense,
}

#[pymethods]
impl DenseModule {
    /// A new Dense with weights drawn like `torch.nn.Linear`'s default init, from `seed`.
    /// `activation_function` is a torch class path or class name (`torch.nn.modules.activation.GELU`).
    #[new]
    #[pyo3(signature = (in_features, out_features, bias=true, activation_function="torch.nn.modules.linear.Identity".to_string(), use_residual=false, seed=42))]
    fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        activation_function: String,
        use_residual: bool,
        seed: u64,
    ) -> PyResult<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(PyValueError::new_err(format!(
                "Dense: in_features and out_features must be positive, got {in_features} and {out_features}"
            )));
        }
        let activation =
            latte_models::Activation::from_torch_name(&activation_function).map_err(model_err)?;
        let config = DenseConfig {
            in_features,
            out_features,
            bias,
            activation_function: activation.torch_name().to_string(),
            use_residual,
        };
        let inner = Dense::random(&config, seed, &candle_core::Device::Cpu).map_err(model_err)?;
        Ok(Self { inner })
    }

    /// The configuration as PyLate stores it (`in_features`, `out_features`, `bias`,
    /// `activation_function`, `use_residual`).
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let c = self.inner.config();
        let d = pyo3::types::PyDict::new(py);
        d.set_item("in_features", c.in_features)?;
        d.set_item("out_features", c.out_features)?;
        d.set_item("bias", c.bias)?;
        d.set_item("activation_function", c.activation_function)?;
        d.set_item("use_residual", c.use_residual)?;
        Ok(d)
    }
}

// ------------------------------------------------------------------------------------------------
// Training

/// Maps a training error to a Python exception.
fn train_err(e: latte_train::Error) -> PyErr {
    use latte_train::Error as E;
    let msg = e.to_string();
    match e {
        E::Model(m) => model_err(m),
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        E::Invalid(_) | E::Data { .. } => PyValueError::new_err(msg),
        _ => latte_error(msg),
    }
}

/// Runs `latte train`'s trainer. `config` is a JSON object of TrainConfig keys (unknown keys are an
/// error); returns the output folder. The GIL is released while training.
#[pyfunction]
#[pyo3(name = "train", signature = (model, train, config, queries=None, documents=None, eval_triplets=None,
    eval_distillation=None, eval_beir=None, eval_split="dev".to_string(), resume=None))]
#[allow(clippy::too_many_arguments)]
fn train_model(
    py: Python<'_>,
    model: PyRef<'_, Model>,
    train: PathBuf,
    config: String,
    queries: Option<PathBuf>,
    documents: Option<PathBuf>,
    eval_triplets: Option<PathBuf>,
    eval_distillation: Option<PathBuf>,
    eval_beir: Option<PathBuf>,
    eval_split: String,
    resume: Option<PathBuf>,
) -> PyResult<PathBuf> {
    use latte_train::data::{Table, TrainingData};
    use latte_train::evaluate::{DistillationEvaluator, Evaluator, IrEvaluator, TripletEvaluator};
    use latte_train::{LossKind, TrainConfig, Trainer};
    let cfg: TrainConfig = serde_json::from_str(&config)
        .map_err(|e| PyValueError::new_err(format!("training hyper-parameters: {e}")))?;
    let model = &*model;
    py.detach(|| -> PyResult<PathBuf> {
        let data = match (&queries, &documents) {
            (Some(q), Some(d)) => TrainingData::distillation(
                &Table::read(&train).map_err(train_err)?,
                &Table::read(q).map_err(train_err)?,
                &Table::read(d).map_err(train_err)?,
                cfg.n_ways,
            )
            .map_err(train_err)?,
            (None, None) => TrainingData::load(&train).map_err(train_err)?,
            _ => {
                return Err(PyValueError::new_err(
                    "queries and documents go together (distillation in PyLate's layout)",
                ))
            }
        };
        match cfg.loss {
            LossKind::Distillation if data.label_column.is_none() => {
                return Err(PyValueError::new_err(format!(
                    "{}: the distillation loss needs teacher scores (a `scores` column); columns: {:?}",
                    train.display(),
                    data.text_columns
                )))
            }
            LossKind::Contrastive | LossKind::CachedContrastive
                if data.list_columns.iter().any(|&l| l) =>
            {
                return Err(PyValueError::new_err(format!(
                    "{}: the contrastive losses need one text per column (query, positive, negatives); a list-valued column is distillation data (use loss=\"distillation\")",
                    train.display()
                )))
            }
            _ => {}
        }
        let mut evaluators: Vec<Box<dyn Evaluator>> = Vec::new();
        if let Some(p) = &eval_triplets {
            let d = TrainingData::load(p).map_err(train_err)?;
            evaluators.push(Box::new(
                TripletEvaluator::from_data("triplets", &d).map_err(train_err)?,
            ));
        }
        if let Some(p) = &eval_distillation {
            let d = TrainingData::load(p).map_err(train_err)?;
            evaluators.push(Box::new(
                DistillationEvaluator::from_data("distillation", &d).map_err(train_err)?,
            ));
        }
        if let Some(p) = &eval_beir {
            let ds = latte_eval::BeirDataset::load(p, &eval_split).map_err(eval_err)?;
            evaluators.push(Box::new(IrEvaluator::new("ir", ds).map_err(train_err)?));
        }
        let trainer = Trainer {
            config: cfg,
            evaluators,
        };
        let out = match &resume {
            Some(dir) => {
                let base = ColBERT::load_dir(dir, &Default::default()).map_err(model_err)?;
                trainer.train(&base, &data, Some(dir.as_path()))
            }
            None => {
                let base = model.inner.read().map_err(lock_poisoned)?;
                trainer.train(&base, &data, None)
            }
        }
        .map_err(train_err)?;
        Ok(out.model_dir)
    })
}

// ------------------------------------------------------------------------------------------------
// Scores and reranking

/// PyLate `colbert_scores`: `[n_q, l_q, h]` × `[n_d, l_d, h]` → `[n_q, n_d]`, with optional multiplicative masks.
#[pyfunction]
#[pyo3(signature = (queries, documents, queries_mask=None, documents_mask=None))]
fn colbert_scores(
    py: Python<'_>,
    queries: PyReadonlyArray3<'_, f32>,
    documents: PyReadonlyArray3<'_, f32>,
    queries_mask: Option<PyReadonlyArray2<'_, f32>>,
    documents_mask: Option<PyReadonlyArray2<'_, f32>>,
) -> PyResult<Py<PyArray2<f32>>> {
    let contiguous = |what: &str| {
        PyValueError::new_err(format!("{what}: expected a C-contiguous float32 array"))
    };
    let qs = queries.shape();
    let q_shape = [qs[0], qs[1], qs[2]];
    let ds = documents.shape();
    let d_shape = [ds[0], ds[1], ds[2]];
    let q = queries.as_slice().map_err(|_| contiguous("queries"))?;
    let d = documents.as_slice().map_err(|_| contiguous("documents"))?;
    let qm = match &queries_mask {
        Some(m) => Some(m.as_slice().map_err(|_| contiguous("queries_mask"))?),
        None => None,
    };
    let dm = match &documents_mask {
        Some(m) => Some(m.as_slice().map_err(|_| contiguous("documents_mask"))?),
        None => None,
    };
    let scores = py
        .detach(|| latte_index::scores::colbert_scores(q, q_shape, d, d_shape, qm, dm))
        .map_err(index_err)?;
    to_numpy2(py, q_shape[0], d_shape[0], scores)
}

/// PyLate `rank.rerank` on positions: per query, `(candidate position, score)` best first.
#[pyfunction]
fn rerank(
    py: Python<'_>,
    queries: Vec<PyReadonlyArray2<'_, f32>>,
    documents: Vec<Vec<PyReadonlyArray2<'_, f32>>>,
) -> PyResult<Vec<Vec<(usize, f32)>>> {
    let q: Vec<EmbRef<'_>> = queries
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let what = format!("queries_embeddings[{i}]");
            let (data, dim) = matrix(a, &what)?;
            emb(data, dim, &what)
        })
        .collect::<PyResult<_>>()?;
    let d: Vec<Vec<EmbRef<'_>>> = documents
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            docs.iter()
                .enumerate()
                .map(|(j, a)| {
                    let what = format!("documents_embeddings[{i}][{j}]");
                    let (data, dim) = matrix(a, &what)?;
                    emb(data, dim, &what)
                })
                .collect::<PyResult<Vec<_>>>()
        })
        .collect::<PyResult<_>>()?;
    let ids: Vec<Vec<usize>> = d.iter().map(|docs| (0..docs.len()).collect()).collect();
    let out = py
        .detach(|| latte_index::rerank(&ids, &q, &d))
        .map_err(index_err)?;
    Ok(out
        .into_iter()
        .map(|r| r.into_iter().map(|x| (x.id, x.score)).collect())
        .collect())
}

// ------------------------------------------------------------------------------------------------
// Indexes

/// The build settings the Python keyword arguments of `plaid_create` and `Codec.train` give.
fn build_config(
    nbits: usize,
    kmeans_niters: usize,
    kmeans_points_per_centroid: usize,
    seed: u64,
    num_centroids: Option<usize>,
    pool_factor: usize,
) -> IndexConfig {
    IndexConfig {
        nbits,
        num_centroids,
        kmeans_iters: kmeans_niters,
        kmeans_points_per_centroid,
        seed,
        pool_factor,
        ..IndexConfig::default()
    }
}

fn vec_source(ids: Vec<String>, embeddings: &[PyReadonlyArray2<'_, f32>]) -> PyResult<VecSource> {
    if ids.len() != embeddings.len() {
        return Err(PyValueError::new_err(format!(
            "documents_ids has {} ids but documents_embeddings has {} documents: they must match",
            ids.len(),
            embeddings.len()
        )));
    }
    let dim = embeddings.first().map_or(0, |a| a.shape()[1]);
    let mut source = VecSource::new(dim);
    for (i, (id, a)) in ids.into_iter().zip(embeddings).enumerate() {
        let what = format!("documents_embeddings[{i}]");
        let (data, d) = matrix(a, &what)?;
        if d != dim {
            return Err(PyValueError::new_err(format!(
                "{what}: expected dimension {dim} (that of the first document), got {d}"
            )));
        }
        source.push(id, data.to_vec()).map_err(index_err)?;
    }
    Ok(source)
}

/// Creates a PLAID index in `path` from documents (fails if one exists there); with `codec`, built with
/// that codec's centroids and residual codec instead of training them.
#[pyfunction]
#[pyo3(signature = (path, ids, embeddings, nbits=2, kmeans_niters=4, kmeans_points_per_centroid=32,
    seed=42, num_centroids=None, pool_factor=1, titles=None, texts=None, metadata=None, codec=None))]
#[allow(clippy::too_many_arguments)]
fn plaid_create(
    py: Python<'_>,
    path: PathBuf,
    ids: Vec<String>,
    embeddings: Vec<PyReadonlyArray2<'_, f32>>,
    nbits: usize,
    kmeans_niters: usize,
    kmeans_points_per_centroid: usize,
    seed: u64,
    num_centroids: Option<usize>,
    pool_factor: usize,
    titles: Option<Vec<Option<String>>>,
    texts: Option<Vec<Option<String>>>,
    metadata: Option<Vec<Option<String>>>,
    codec: Option<PyRef<'_, Codec>>,
) -> PyResult<usize> {
    let docs = stored_documents(&ids, titles, texts, metadata)?;
    let source = vec_source(ids, &embeddings)?;
    let config = build_config(
        nbits,
        kmeans_niters,
        kmeans_points_per_centroid,
        seed,
        num_centroids,
        pool_factor,
    );
    let codec = codec.map(|c| c.codec.clone());
    let report = py
        .detach(|| match &codec {
            Some(c) => PlaidIndex::create_with_codec(&path, &source, &docs, c, &config),
            None => PlaidIndex::create_with_documents(&path, &source, &docs, &config),
        })
        .map_err(index_err)?;
    Ok(report.documents)
}

/// A PLAID index's trained centroids and residual codec, to build several indexes (the shards of one
/// collection) with the same one. Pickles through its arrays (so it crosses Ray's object store).
#[pyclass(frozen, eq, module = "latte._latte")]
#[derive(PartialEq)]
struct Codec {
    codec: IndexCodec,
}

#[pymethods]
impl Codec {
    /// A codec from its arrays: `centroids` (`k × dim` float32, rounded to half precision), the
    /// `2^nbits − 1` ascending `cutoffs`, the `2^nbits` `weights` and the `cluster_threshold`.
    #[new]
    #[pyo3(signature = (centroids, cutoffs, weights, cluster_threshold, nbits))]
    fn new(
        centroids: PyReadonlyArray2<'_, f32>,
        cutoffs: Vec<f32>,
        weights: Vec<f32>,
        cluster_threshold: f32,
        nbits: usize,
    ) -> PyResult<Self> {
        let (data, dim) = matrix(&centroids, "centroids")?;
        let codec = IndexCodec::new(dim, nbits, data, cutoffs, weights, cluster_threshold)
            .map_err(index_err)?;
        Ok(Self { codec })
    }

    /// Trains a codec on `embeddings` (documents, or a sample of them: then give `num_centroids` for the
    /// whole collection) exactly as `plaid_create` with these settings would.
    #[staticmethod]
    #[pyo3(signature = (embeddings, nbits=2, kmeans_niters=4, kmeans_points_per_centroid=32, seed=42,
        num_centroids=None, pool_factor=1))]
    #[allow(clippy::too_many_arguments)]
    fn train(
        py: Python<'_>,
        embeddings: Vec<PyReadonlyArray2<'_, f32>>,
        nbits: usize,
        kmeans_niters: usize,
        kmeans_points_per_centroid: usize,
        seed: u64,
        num_centroids: Option<usize>,
        pool_factor: usize,
    ) -> PyResult<Self> {
        let ids = (0..embeddings.len()).map(|i| i.to_string()).collect();
        let source = vec_source(ids, &embeddings)?;
        let config = build_config(
            nbits,
            kmeans_niters,
            kmeans_points_per_centroid,
            seed,
            num_centroids,
            pool_factor,
        );
        let codec = py
            .detach(|| PlaidIndex::train_codec(&source, &config))
            .map_err(index_err)?;
        Ok(Self { codec })
    }

    /// The codec of the PLAID index in `path`.
    #[staticmethod]
    fn from_index(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let codec = py
            .detach(|| IndexCodec::from_index(&path))
            .map_err(index_err)?;
        Ok(Self { codec })
    }

    /// Reads a codec file written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let codec = py.detach(|| IndexCodec::load(&path)).map_err(index_err)?;
        Ok(Self { codec })
    }

    /// Writes the codec to the file `path` (`latte index --codec-from` reads it).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.codec.save(&path)).map_err(index_err)
    }

    #[getter]
    fn dim(&self) -> usize {
        self.codec.dim()
    }

    #[getter]
    fn nbits(&self) -> usize {
        self.codec.nbits()
    }

    #[getter]
    fn num_centroids(&self) -> usize {
        self.codec.num_centroids()
    }

    /// The centroids, `num_centroids × dim` float32.
    #[getter]
    fn centroids(&self, py: Python<'_>) -> PyResult<Py<PyArray2<f32>>> {
        let c = &self.codec;
        to_numpy2(py, c.num_centroids(), c.dim(), c.centroids())
    }

    #[getter]
    fn cutoffs(&self) -> Vec<f32> {
        self.codec.cutoffs().to_vec()
    }

    #[getter]
    fn weights(&self) -> Vec<f32> {
        self.codec.weights().to_vec()
    }

    #[getter]
    fn cluster_threshold(&self) -> f32 {
        self.codec.cluster_threshold()
    }

    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(
        Bound<'py, pyo3::types::PyType>,
        (Py<PyArray2<f32>>, Vec<f32>, Vec<f32>, f32, usize),
    )> {
        let me = slf.get();
        Ok((
            slf.get_type(),
            (
                me.centroids(slf.py())?,
                me.cutoffs(),
                me.weights(),
                me.cluster_threshold(),
                me.nbits(),
            ),
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "Codec(dim={}, nbits={}, num_centroids={})",
            self.codec.dim(),
            self.codec.nbits(),
            self.codec.num_centroids()
        )
    }
}

/// The default number of centroids of an index of `tokens` token vectors: `2^floor(log2(16·sqrt(tokens)))`.
#[pyfunction]
fn default_num_centroids(tokens: u64) -> usize {
    latte_index::default_num_centroids(tokens)
}

/// Adds documents to the PLAID index in `path` (its centroids are kept), with their optional titles,
/// texts and metadata (JSON objects as strings), one entry per id. An id the index holds is replaced
/// (vectors, text and metadata together). Returns the number of documents written and the replaced ids.
#[pyfunction]
#[pyo3(signature = (path, ids, embeddings, titles=None, texts=None, metadata=None))]
fn plaid_add(
    py: Python<'_>,
    path: PathBuf,
    ids: Vec<String>,
    embeddings: Vec<PyReadonlyArray2<'_, f32>>,
    titles: Option<Vec<Option<String>>>,
    texts: Option<Vec<Option<String>>>,
    metadata: Option<Vec<Option<String>>>,
) -> PyResult<(usize, Vec<String>)> {
    let docs = stored_documents(&ids, titles, texts, metadata)?;
    let source = vec_source(ids, &embeddings)?;
    let report = py
        .detach(|| -> latte_index::Result<_> {
            let mut writer = PlaidIndex::writer(&path)?;
            let report = writer.add_documents(&source, &docs)?;
            writer.commit()?;
            Ok(report)
        })
        .map_err(index_err)?;
    Ok((report.documents, report.replaced))
}

/// Deletes the documents of the PLAID index in `path` whose metadata matches `filter` (a JSON string).
/// Returns the number deleted and the number of live documents left.
#[pyfunction]
fn plaid_delete_matching(py: Python<'_>, path: PathBuf, filter: &str) -> PyResult<(usize, usize)> {
    let filter = parse_filter(filter)?;
    let report = py
        .detach(|| -> latte_index::Result<_> {
            let mut writer = PlaidIndex::writer(&path)?;
            let report = writer.delete_matching(&filter)?;
            writer.commit()?;
            Ok(report)
        })
        .map_err(index_err)?;
    Ok((report.deleted, report.remaining))
}

/// Checks a metadata filter (JSON text): a `ValueError` naming the position of what is wrong.
#[pyfunction]
fn check_filter(filter: &str) -> PyResult<()> {
    parse_filter(filter).map(|_| ())
}

/// A filter given as a JSON string (`{"lang": "rust", "year": {"$gte": 2020}}`), or a `ValueError` naming
/// the position of what is wrong.
fn parse_filter(filter: &str) -> PyResult<Filter> {
    let value: serde_json::Value = serde_json::from_str(filter)
        .map_err(|e| PyValueError::new_err(format!("filter: not valid JSON: {e}")))?;
    Filter::parse(&value).map_err(|e| PyValueError::new_err(format!("filter: {e}")))
}

/// The store rows of documents `ids`: `titles`, `texts` and `metadata` are each absent or one entry per id
/// (`None` for a document without that field); metadata entries are JSON objects as strings.
fn stored_documents(
    ids: &[String],
    titles: Option<Vec<Option<String>>>,
    texts: Option<Vec<Option<String>>>,
    metadata: Option<Vec<Option<String>>>,
) -> PyResult<Vec<Doc>> {
    fn aligned<T>(what: &str, v: Option<Vec<Option<T>>>, n: usize) -> PyResult<Vec<Option<T>>> {
        match v {
            None => Ok((0..n).map(|_| None).collect()),
            Some(v) if v.len() == n => Ok(v),
            Some(v) => Err(PyValueError::new_err(format!(
                "{what} has {} entries for {n} documents: give one per document (None for none)",
                v.len()
            ))),
        }
    }
    if titles.is_none() && texts.is_none() && metadata.is_none() {
        return Ok(Vec::new());
    }
    let n = ids.len();
    let titles = aligned("documents_titles", titles, n)?;
    let texts = aligned("documents_texts", texts, n)?;
    let metadata = aligned("metadata", metadata, n)?;
    ids.iter()
        .zip(titles)
        .zip(texts)
        .zip(metadata)
        .enumerate()
        .map(|(i, (((id, title), text), meta))| {
            let metadata = match meta {
                None => None,
                Some(json) => match serde_json::from_str::<serde_json::Value>(&json) {
                    Ok(serde_json::Value::Object(map)) => Some(map),
                    Ok(other) => {
                        return Err(PyValueError::new_err(format!(
                            "metadata[{i}] (document {id:?}): expected a JSON object, got {}",
                            latte_core::beir::type_name(&other)
                        )))
                    }
                    Err(e) => {
                        return Err(PyValueError::new_err(format!(
                            "metadata[{i}] (document {id:?}): not valid JSON: {e}"
                        )))
                    }
                },
            };
            Ok(Doc {
                id: id.clone(),
                title,
                text,
                metadata,
            })
        })
        .collect()
}

/// Deletes documents by id from the PLAID index in `path` (fails, deleting nothing, on an unknown id).
#[pyfunction]
fn plaid_delete(py: Python<'_>, path: PathBuf, ids: Vec<String>) -> PyResult<usize> {
    let report = py
        .detach(|| PlaidIndex::delete(&path, &ids))
        .map_err(index_err)?;
    Ok(report.deleted)
}

/// Rewrites the PLAID index in `path` without its deleted documents (their ids become free again).
#[pyfunction]
fn plaid_compact(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| PlaidIndex::compact(&path)).map_err(index_err)
}

/// Whether `path` holds a latte index.
#[pyfunction]
fn plaid_exists(path: PathBuf) -> bool {
    Path::new(&path).join("meta.lt").exists()
}

/// A PLAID index opened for search (a snapshot: reopen after writes).
#[pyclass(frozen, module = "latte._latte")]
struct Plaid {
    index: PlaidIndex,
}

#[pymethods]
impl Plaid {
    /// Opens the index in `path`.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let index = py.detach(|| PlaidIndex::open(&path)).map_err(index_err)?;
        Ok(Self { index })
    }

    /// Number of live documents.
    fn __len__(&self) -> usize {
        self.index.len()
    }

    /// Whether the index holds document `id`.
    fn __contains__(&self, id: &str) -> bool {
        self.index.contains(id)
    }

    /// Embedding dimension.
    fn dim(&self) -> usize {
        self.index.dim()
    }

    /// Searches queries; `subset` is one id list for all queries or one per query. Returns, per query,
    /// `(id, score)` pairs best first.
    #[pyo3(signature = (queries, k=10, subset=None, n_ivf_probe=None, n_full_scores=None, exact=false))]
    #[allow(clippy::too_many_arguments)]
    fn search(
        &self,
        py: Python<'_>,
        queries: Vec<PyReadonlyArray2<'_, f32>>,
        k: usize,
        subset: Option<Vec<Vec<String>>>,
        n_ivf_probe: Option<usize>,
        n_full_scores: Option<usize>,
        exact: bool,
    ) -> PyResult<Vec<Vec<(String, f32)>>> {
        let q: Vec<EmbRef<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let what = format!("queries_embeddings[{i}]");
                let (data, dim) = matrix(a, &what)?;
                emb(data, dim, &what)
            })
            .collect::<PyResult<_>>()?;
        if let Some(s) = &subset {
            if s.len() != 1 && s.len() != q.len() {
                return Err(PyValueError::new_err(format!(
                    "subset: expected one id list for all queries or one per query ({}), got {}",
                    q.len(),
                    s.len()
                )));
            }
        }
        let mut params = SearchParams::for_k(k);
        if let Some(p) = n_ivf_probe {
            params.n_ivf_probe = p;
        }
        if let Some(n) = n_full_scores {
            params.ndocs = n;
        }
        let index = &self.index;
        let hits = py
            .detach(|| -> latte_index::Result<Vec<Vec<latte_index::Hit>>> {
                match &subset {
                    Some(s) if s.len() == q.len() && (s.len() > 1 || exact) => q
                        .iter()
                        .zip(s)
                        .map(|(query, ids)| {
                            if exact {
                                index.search_exact(*query, k, Some(ids))
                            } else {
                                index.search(*query, &params, Some(ids))
                            }
                        })
                        .collect(),
                    _ => {
                        let one = subset.as_ref().map(|s| s[0].as_slice());
                        if exact {
                            q.iter()
                                .map(|query| index.search_exact(*query, k, one))
                                .collect()
                        } else {
                            index.search_batch(&q, &params, one)
                        }
                    }
                }
            })
            .map_err(index_err)?;
        Ok(hits
            .into_iter()
            .map(|h| h.into_iter().map(|x| (x.id, x.score)).collect())
            .collect())
    }

    /// Whether the index has a document store (`documents.sqlite`: text, metadata, filters, BM25).
    fn has_store(&self) -> bool {
        self.index.has_store()
    }

    /// Ids of the live documents whose metadata matches `filter` (a JSON string), in store order.
    fn ids_matching(&self, py: Python<'_>, filter: &str) -> PyResult<Vec<String>> {
        let filter = parse_filter(filter)?;
        py.detach(|| self.with_store(|_, store| Ok(store.ids_matching(&filter)?)))
            .map_err(index_err)
    }

    /// The stored documents with these ids: per id `(id, title, text, metadata as JSON)`, or `None` for an
    /// id the index holds no live document for.
    fn get_documents(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<Vec<Option<StoredDoc>>> {
        let docs = py
            .detach(|| -> latte_index::Result<Vec<Option<Doc>>> {
                if !self.index.has_store() {
                    return self.index.get_documents(&ids);
                }
                self.with_store(|_, store| Ok(store.get(&ids)?))
            })
            .map_err(index_err)?;
        Ok(docs
            .into_iter()
            .map(|d| {
                d.map(|d| {
                    let meta = d.metadata.map(|m| serde_json::Value::Object(m).to_string());
                    (d.id, d.title, d.text, meta)
                })
            })
            .collect())
    }

    /// Filtered and hybrid search. `filter` (a JSON string) keeps the documents whose metadata matches (the
    /// strategy chosen by selectivity, as `latte search --filter`); `subset` (one id list for all queries or
    /// one per query) further restricts them. With `texts` (one per query), BM25 over the stored text runs
    /// beside MaxSim and the two lists are fused: `fusion` `rrf` (default, rank offset `rrf_k`, default 60)
    /// or `linear` (weight `alpha` of MaxSim, default 0.5). Returns, per query, `(id, score)` best first.
    #[pyo3(signature = (queries, k=10, filter=None, subset=None, texts=None, fusion=None, alpha=None,
        rrf_k=None, n_ivf_probe=None, n_full_scores=None))]
    #[allow(clippy::too_many_arguments)]
    fn search_documents(
        &self,
        py: Python<'_>,
        queries: Vec<PyReadonlyArray2<'_, f32>>,
        k: usize,
        filter: Option<&str>,
        subset: Option<Vec<Vec<String>>>,
        texts: Option<Vec<String>>,
        fusion: Option<&str>,
        alpha: Option<f64>,
        rrf_k: Option<f64>,
        n_ivf_probe: Option<usize>,
        n_full_scores: Option<usize>,
    ) -> PyResult<Vec<Vec<(String, f32)>>> {
        let q: Vec<EmbRef<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let what = format!("queries_embeddings[{i}]");
                let (data, dim) = matrix(a, &what)?;
                emb(data, dim, &what)
            })
            .collect::<PyResult<_>>()?;
        if let Some(s) = &subset {
            if s.len() != 1 && s.len() != q.len() {
                return Err(PyValueError::new_err(format!(
                    "subset: expected one id list for all queries or one per query ({}), got {}",
                    q.len(),
                    s.len()
                )));
            }
        }
        let filter = filter.map(parse_filter).transpose()?;
        let fusion = match &texts {
            Some(t) => {
                if t.len() != q.len() {
                    return Err(PyValueError::new_err(format!(
                        "queries_texts has {} texts for {} queries_embeddings: give one text per query",
                        t.len(),
                        q.len()
                    )));
                }
                if subset.is_some() {
                    return Err(PyValueError::new_err(
                        "subset cannot be combined with hybrid search (queries_texts); restrict the \
                         documents with filter instead",
                    ));
                }
                Some(parse_fusion(fusion, alpha, rrf_k)?)
            }
            None if fusion.is_some() || alpha.is_some() || rrf_k.is_some() => {
                return Err(PyValueError::new_err(
                    "fusion, alpha and rrf_k apply to hybrid search: give queries_texts too",
                ))
            }
            None => None,
        };
        if filter.is_none() && fusion.is_none() {
            return Err(PyValueError::new_err(
                "search_documents needs a filter or query texts (use search otherwise)",
            ));
        }
        let mut params = SearchParams::for_k(k);
        if let Some(p) = n_ivf_probe {
            params.n_ivf_probe = p;
        }
        if let Some(n) = n_full_scores {
            params.ndocs = n;
        }
        let hits: Vec<Vec<latte_index::Hit>> = py
            .detach(|| {
                self.with_store(|index, store| match (fusion, &texts) {
                    (Some(fusion), Some(texts)) => q
                        .iter()
                        .zip(texts)
                        .map(|(query, text)| {
                            index.search_hybrid(
                                store,
                                *query,
                                text,
                                &params,
                                filter.as_ref(),
                                fusion,
                            )
                        })
                        .collect(),
                    _ => {
                        let filter = filter.as_ref().expect("checked: a filter or texts");
                        let ids = index.ids_matching(store, filter)?;
                        q.iter()
                            .enumerate()
                            .map(|(i, query)| match &subset {
                                None => index.search_subset(*query, &params, &ids),
                                Some(s) => {
                                    let keep: std::collections::HashSet<&str> = s
                                        [if s.len() == 1 { 0 } else { i }]
                                    .iter()
                                    .map(String::as_str)
                                    .collect();
                                    let both: Vec<String> = ids
                                        .iter()
                                        .filter(|id| keep.contains(id.as_str()))
                                        .cloned()
                                        .collect();
                                    index.search_subset(*query, &params, &both)
                                }
                            })
                            .collect()
                    }
                })
            })
            .map_err(index_err)?;
        Ok(hits
            .into_iter()
            .map(|h| h.into_iter().map(|x| (x.id, x.score)).collect())
            .collect())
    }

    /// BM25 alone over the stored title and text: per query text, the `k` best documents matching
    /// `filter` (a JSON string), as `(id, score)` pairs best first.
    #[pyo3(signature = (texts, k=10, filter=None))]
    fn bm25(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        k: usize,
        filter: Option<&str>,
    ) -> PyResult<Vec<Vec<(String, f32)>>> {
        let filter = filter.map(parse_filter).transpose()?;
        let hits = py
            .detach(|| {
                self.with_store(|_, store| {
                    texts
                        .iter()
                        .map(|t| latte_index::search_bm25(store, t, k, filter.as_ref()))
                        .collect::<latte_index::Result<Vec<_>>>()
                })
            })
            .map_err(index_err)?;
        Ok(hits
            .into_iter()
            .map(|h| h.into_iter().map(|x| (x.id, x.score)).collect())
            .collect())
    }
}

/// A stored document as it crosses to Python: id, title, text, metadata as a JSON string.
type StoredDoc = (String, Option<String>, Option<String>, Option<String>);

/// How many times a store read is retried on a freshly opened index when writers moved past this reader's
/// view (the store keeps the rows of the last two generations).
const STALE_VIEW_RETRIES: usize = 3;

impl Plaid {
    /// Runs `f` with the index and a read view of its document store. When writers moved the index on by
    /// more than one generation since this object opened it (its store view is gone), `f` runs again on the
    /// index opened afresh.
    fn with_store<T>(
        &self,
        f: impl Fn(&PlaidIndex, &DocStore) -> latte_index::Result<T>,
    ) -> latte_index::Result<T> {
        let stale = |e: &latte_index::Error| {
            matches!(
                e,
                latte_index::Error::Store(latte_index::StoreError::ViewUnavailable { .. })
            )
        };
        let first = self.index.open_store().and_then(|s| f(&self.index, &s));
        match first {
            Err(e) if stale(&e) => {
                let mut last = e;
                for _ in 0..STALE_VIEW_RETRIES {
                    let fresh = PlaidIndex::open(self.index.dir())?;
                    match fresh.open_store().and_then(|s| f(&fresh, &s)) {
                        Err(e) if stale(&e) => last = e,
                        other => return other,
                    }
                }
                Err(last)
            }
            other => other,
        }
    }
}

/// The fusion of hybrid search: `rrf` (default; rank offset `rrf_k`, default 60) or `linear` (MaxSim weight
/// `alpha` in [0, 1], default 0.5).
fn parse_fusion(fusion: Option<&str>, alpha: Option<f64>, rrf_k: Option<f64>) -> PyResult<Fusion> {
    match fusion.unwrap_or("rrf") {
        "rrf" => {
            if alpha.is_some() {
                return Err(PyValueError::new_err(
                    "alpha applies to fusion=\"linear\", not \"rrf\"",
                ));
            }
            let k = rrf_k.unwrap_or(latte_index::RRF_K);
            if !(k.is_finite() && k >= 0.0) {
                return Err(PyValueError::new_err(format!(
                    "rrf_k must be a finite number of at least 0, got {k}"
                )));
            }
            Ok(Fusion::Rrf { k })
        }
        "linear" => {
            if rrf_k.is_some() {
                return Err(PyValueError::new_err(
                    "rrf_k applies to fusion=\"rrf\", not \"linear\"",
                ));
            }
            let alpha = alpha.unwrap_or(0.5);
            if !(0.0..=1.0).contains(&alpha) {
                return Err(PyValueError::new_err(format!(
                    "alpha must be in [0, 1], got {alpha}"
                )));
            }
            Ok(Fusion::Linear { alpha })
        }
        other => Err(PyValueError::new_err(format!(
            "fusion must be \"rrf\" or \"linear\", got {other:?}"
        ))),
    }
}

/// An in-memory exact (brute-force MaxSim) index.
#[pyclass(frozen, module = "latte._latte")]
struct Exact {
    inner: RwLock<Option<ExactIndex>>,
}

#[pymethods]
impl Exact {
    /// An empty index (its dimension is set by the first documents).
    #[new]
    fn new() -> Self {
        Self {
            inner: RwLock::new(None),
        }
    }

    /// Adds documents (nothing is added unless all are valid).
    fn add(
        &self,
        py: Python<'_>,
        ids: Vec<String>,
        embeddings: Vec<PyReadonlyArray2<'_, f32>>,
    ) -> PyResult<()> {
        let source = vec_source(ids, &embeddings)?;
        let docs: Vec<(String, &[f32], usize)> = embeddings
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let (data, dim) = matrix(a, "documents_embeddings")?;
                Ok((latte_index::DocumentSource::id(&source, i), data, dim))
            })
            .collect::<PyResult<_>>()?;
        py.detach(|| {
            let mut guard = self.inner.write().map_err(lock_poisoned)?;
            let dim = match (&*guard, docs.first()) {
                (Some(ix), _) => ix.dim(),
                (None, Some(d)) => d.2,
                (None, None) => return Ok(()),
            };
            let mut next = match guard.take() {
                Some(ix) => ix,
                None => ExactIndex::new(dim).map_err(index_err)?,
            };
            let backup = next.clone();
            for (id, data, d) in &docs {
                let r = EmbRef::new(data, *d)
                    .map_err(latte_index::Error::from)
                    .and_then(|e| next.add(id.clone(), e));
                if let Err(e) = r {
                    *guard = (!backup.is_empty()).then_some(backup);
                    return Err(index_err(e));
                }
            }
            *guard = Some(next);
            Ok(())
        })
    }

    /// Removes documents by id (fails, removing nothing, on an unknown id).
    fn remove(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<()> {
        py.detach(|| {
            let mut guard = self.inner.write().map_err(lock_poisoned)?;
            match guard.as_mut() {
                Some(ix) => ix.remove(&ids).map_err(index_err),
                None if ids.is_empty() => Ok(()),
                None => Err(index_err(latte_index::Error::UnknownIds(format!(
                    "{ids:?}"
                )))),
            }
        })
    }

    /// Number of documents.
    fn __len__(&self) -> PyResult<usize> {
        Ok(self
            .inner
            .read()
            .map_err(lock_poisoned)?
            .as_ref()
            .map_or(0, |ix| ix.len()))
    }

    /// Exact MaxSim of each query against every document, in insertion order: `[n_queries, n_documents]`.
    fn scores(
        &self,
        py: Python<'_>,
        queries: Vec<PyReadonlyArray2<'_, f32>>,
    ) -> PyResult<Py<PyArray2<f32>>> {
        let q: Vec<EmbRef<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let what = format!("queries_embeddings[{i}]");
                let (data, dim) = matrix(a, &what)?;
                emb(data, dim, &what)
            })
            .collect::<PyResult<_>>()?;
        let (n, flat) = py.detach(|| -> PyResult<(usize, Vec<f32>)> {
            let guard = self.inner.read().map_err(lock_poisoned)?;
            let ix = guard
                .as_ref()
                .ok_or_else(|| index_err(latte_index::Error::EmptyIndex))?;
            let mut flat = Vec::with_capacity(q.len() * ix.len());
            for query in &q {
                flat.extend(ix.scores(*query).map_err(index_err)?);
            }
            Ok((ix.len(), flat))
        })?;
        to_numpy2(py, q.len(), n, flat)
    }

    /// Top-`k` per query: `(id, score)` pairs best first.
    fn search(
        &self,
        py: Python<'_>,
        queries: Vec<PyReadonlyArray2<'_, f32>>,
        k: usize,
    ) -> PyResult<Vec<Vec<(String, f32)>>> {
        let q: Vec<EmbRef<'_>> = queries
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let what = format!("queries_embeddings[{i}]");
                let (data, dim) = matrix(a, &what)?;
                emb(data, dim, &what)
            })
            .collect::<PyResult<_>>()?;
        let hits = py.detach(|| -> PyResult<Vec<Vec<latte_index::Hit>>> {
            let guard = self.inner.read().map_err(lock_poisoned)?;
            let ix = guard
                .as_ref()
                .ok_or_else(|| index_err(latte_index::Error::EmptyIndex))?;
            ix.search_batch(&q, k).map_err(index_err)
        })?;
        Ok(hits
            .into_iter()
            .map(|h| h.into_iter().map(|x| (x.id, x.score)).collect())
            .collect())
    }
}

// ------------------------------------------------------------------------------------------------
// Evaluation

type Ranked = Vec<(String, Vec<(String, f64)>)>;
type Judged = Vec<(String, Vec<(String, i32)>)>;

/// IR metrics (ranx definitions, `make_comparable=True`): run and qrels as ordered `(query, [(doc, value)])`
/// lists. Returns the mean of each metric, keyed by the metric's name as given.
#[pyfunction]
fn evaluate(
    py: Python<'_>,
    run: Ranked,
    qrels: Judged,
    metrics: Vec<String>,
) -> PyResult<Vec<(String, f64)>> {
    let parsed: Vec<latte_eval::Metric> = metrics
        .iter()
        .map(|m| m.parse::<latte_eval::Metric>().map_err(eval_err))
        .collect::<PyResult<_>>()?;
    py.detach(|| {
        let mut q = latte_eval::Qrels::new();
        for (query, docs) in &qrels {
            for (doc, rel) in docs {
                q.insert(query, doc, *rel).map_err(eval_err)?;
            }
        }
        let mut r = latte_eval::Run::new();
        for (query, docs) in &run {
            if docs.is_empty() {
                r.insert_empty_query(query);
            }
            for (doc, score) in docs {
                r.insert(query, doc, *score).map_err(eval_err)?;
            }
        }
        let report = latte_eval::evaluate(&r, &q, &parsed);
        Ok(metrics
            .iter()
            .zip(&parsed)
            .map(|(name, m)| (name.clone(), report.mean(m).unwrap_or(0.0)))
            .collect())
    })
}

type Beir = (Vec<(String, String)>, Vec<(String, String)>, Judged);

/// Reads one split of a BEIR folder: `(documents, queries, qrels)` as `(id, text)` lists and judgments.
#[pyfunction]
#[pyo3(signature = (path, split="test"))]
fn load_beir(py: Python<'_>, path: PathBuf, split: &str) -> PyResult<Beir> {
    let ds = py
        .detach(|| latte_eval::BeirDataset::load(&path, split))
        .map_err(eval_err)?;
    let documents = ds.corpus.into_iter().map(|d| (d.id, d.text)).collect();
    let queries = ds.queries.into_iter().map(|q| (q.id, q.text)).collect();
    let qrels = ds
        .qrels
        .iter()
        .map(|(q, docs)| {
            (
                q.to_string(),
                docs.iter().map(|(d, r)| (d.clone(), *r)).collect(),
            )
        })
        .collect();
    Ok((documents, queries, qrels))
}

/// Stacks equally shaped matrices into one `[n, rows, dim]` array (used by tests and helpers).
#[pyfunction]
fn stack(py: Python<'_>, arrays: Vec<PyReadonlyArray2<'_, f32>>) -> PyResult<Py<PyArray3<f32>>> {
    let first = arrays
        .first()
        .map(|a| [a.shape()[0], a.shape()[1]])
        .unwrap_or([0, 0]);
    let mut flat = Vec::with_capacity(arrays.len() * first[0] * first[1]);
    for (i, a) in arrays.iter().enumerate() {
        if a.shape() != first {
            return Err(PyValueError::new_err(format!(
                "arrays[{i}]: expected shape {first:?}, got {:?}",
                a.shape()
            )));
        }
        flat.extend_from_slice(matrix(a, "arrays")?.0);
    }
    let arr = Array3::from_shape_vec((arrays.len(), first[0], first[1]), flat)
        .map_err(|e| latte_error(format!("internal shape error: {e}")))?;
    Ok(PyArray3::from_owned_array(py, arr).unbind())
}

/// The native module.
#[pymodule]
fn _latte(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("LatteError", m.py().get_type::<LatteError>())?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(resolve_model, m)?)?;
    m.add_class::<DenseModule>()?;
    m.add_function(wrap_pyfunction!(train_model, m)?)?;
    m.add_class::<Plaid>()?;
    m.add_class::<Codec>()?;
    m.add_function(wrap_pyfunction!(default_num_centroids, m)?)?;
    m.add_class::<Exact>()?;
    m.add_function(wrap_pyfunction!(colbert_scores, m)?)?;
    m.add_function(wrap_pyfunction!(rerank, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_create, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_add, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_delete, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_delete_matching, m)?)?;
    m.add_function(wrap_pyfunction!(check_filter, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_exists, m)?)?;
    m.add_function(wrap_pyfunction!(plaid_compact, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(load_beir, m)?)?;
    m.add_function(wrap_pyfunction!(stack, m)?)?;
    Ok(())
}
