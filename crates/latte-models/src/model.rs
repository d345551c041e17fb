//! The ColBERT model: a [`Transformer`] followed by a chain of [`Dense`] layers, with PyLate's settings.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use crate::dense::{Dense, DenseConfig};
use crate::hub::{self, HubOptions};
use crate::io::read_json;
use crate::nn::Mode;
use crate::settings::{PartialSettings, Settings};
use crate::tokenize::{ColbertTokenizer, Tokenized};
use crate::transformer::Transformer;
use crate::{Dtype, Error, Result};

/// How to load a model: explicit settings (they win over the model's config) and where to find it.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Explicit ColBERT settings.
    pub settings: PartialSettings,
    /// Output dimension: size of the Dense added to a base model (default 128), or of a Dense appended
    /// when the model's last layer has another size.
    pub embedding_size: Option<usize>,
    /// Whether a Dense that latte adds has a bias.
    pub bias: bool,
    /// Seed of the weights of any Dense that latte adds.
    pub seed: u64,
    /// Hub lookup (cache folder, revision, offline).
    pub hub: HubOptions,
    /// Device; `None` is the CPU.
    pub device: Option<Device>,
    /// Matryoshka truncation of every token embedding (see [`ColBERT::set_truncate_dim`]).
    pub truncate_dim: Option<usize>,
    /// Precision of the encoder's linear layers in inference (see [`ColBERT::set_dtype`]); f32 by default.
    pub dtype: Dtype,
}

/// How a model was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A PyLate or sentence-transformers folder (`modules.json`).
    Modules,
    /// A stanford-nlp ColBERT checkpoint (`HF_ColBERT`).
    Stanford,
    /// A bare Hugging Face encoder; a projection was added.
    BaseModel,
    /// Built in code.
    Built,
}

/// The token embeddings of one text: `rows` tokens × `cols` dimensions, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Number of tokens.
    pub rows: usize,
    /// Embedding dimension.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl Embedding {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// Options of [`ColBERT::encode`].
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// L2-normalise every token embedding (PyLate's default).
    pub normalize: bool,
    /// Text prepended to every input (a sentence-transformers prompt). Wins over `prompt_name`.
    pub prompt: Option<String>,
    /// Name of a prompt in the model's `prompts` (`config_sentence_transformers.json`); when neither this
    /// nor `prompt` is set, the model's `default_prompt_name` applies, as in PyLate.
    pub prompt_name: Option<String>,
    /// Show a progress bar: `None` shows one on a terminal for more than one batch.
    pub show_progress: Option<bool>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            normalize: true,
            prompt: None,
            prompt_name: None,
            show_progress: None,
        }
    }
}

/// A ColBERT model.
#[derive(Debug, Clone)]
pub struct ColBERT {
    /// The backbone with its tokenizer.
    pub transformer: Transformer,
    /// Projections applied to every token, in order.
    pub denses: Vec<Dense>,
    settings: Settings,
    tokenizer: ColbertTokenizer,
    query_prefix_id: Option<u32>,
    document_prefix_id: Option<u32>,
    skiplist: HashSet<u32>,
    /// The rest of `config_sentence_transformers.json` (prompts …), written back on save.
    pub extra_config: serde_json::Map<String, serde_json::Value>,
    /// How the model was loaded.
    pub origin: Origin,
    truncate_dim: Option<usize>,
    dtype: Dtype,
}

const COLBERT_KEYS: &[&str] = &[
    "query_prefix",
    "document_prefix",
    "query_length",
    "document_length",
    "attend_to_expansion_tokens",
    "skiplist_words",
    "do_query_expansion",
];

impl ColBERT {
    /// Loads a model from a local folder or a Hugging Face Hub id, following PyLate's rules: a
    /// PyLate/sentence-transformers folder keeps its Transformer and Dense modules; a stanford-nlp
    /// checkpoint gets its `linear` projection and `artifact.metadata`; a bare encoder gets a new
    /// Dense(hidden → `embedding_size` or 128).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = hub::resolve(model, &opts.hub)?;
        Self::load_dir(&dir, opts)
    }

    /// [`ColBERT::load`] from a local folder.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let device = opts.device.clone().unwrap_or(Device::Cpu);
        let mut from_config = PartialSettings::default();
        let mut extra_config = serde_json::Map::new();
        let modules_path = dir.join("modules.json");
        let (transformer, mut denses, mut origin) = if modules_path.is_file() {
            let modules: Vec<serde_json::Value> = read_json(&modules_path, "the module list")?;
            let st_cfg = dir.join("config_sentence_transformers.json");
            if st_cfg.is_file() {
                let v: serde_json::Map<String, serde_json::Value> =
                    read_json(&st_cfg, "the sentence-transformers configuration")?;
                from_config = serde_json::from_value(serde_json::Value::Object(v.clone()))
                    .map_err(|e| Error::bad(&st_cfg, e))?;
                extra_config = v
                    .into_iter()
                    .filter(|(k, _)| !COLBERT_KEYS.contains(&k.as_str()) && k != "__version__")
                    .collect();
            }
            let mut transformer = None;
            let mut denses = Vec::new();
            for m in &modules {
                let ty = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
                let sub = m.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let mdir = dir.join(sub);
                let short = ty.rsplit('.').next().unwrap_or(ty);
                match short {
                    "Transformer" if transformer.is_none() => {
                        transformer = Some(Transformer::load(&mdir, &device)?)
                    }
                    "Dense" => denses.push(Dense::from_folder(&mdir, &device)?),
                    _ => tracing::debug!("dropping module {ty} ({sub}) as PyLate does"),
                }
            }
            let transformer = transformer.ok_or_else(|| {
                Error::bad(
                    &modules_path,
                    "no sentence_transformers.models.Transformer module",
                )
            })?;
            (transformer, denses, Origin::Modules)
        } else {
            refuse_modules_without_list(dir)?;
            (
                Transformer::load(dir, &device)?,
                Vec::new(),
                Origin::BaseModel,
            )
        };
        if denses.is_empty() {
            let stanford = transformer
                .config
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                == Some("HF_ColBERT");
            if stanford {
                origin = Origin::Stanford;
                denses.push(stanford_linear(dir, &device)?);
                from_config = stanford_metadata(dir)?;
            } else {
                let out = opts.embedding_size.unwrap_or(128);
                let cfg = DenseConfig {
                    in_features: transformer.backbone.hidden_size(),
                    out_features: out,
                    bias: opts.bias,
                    activation_function: crate::dense::Activation::Identity.torch_name().into(),
                    use_residual: false,
                };
                tracing::info!(
                    "{} has no projection: adding Dense({} -> {out}), seeded {}",
                    dir.display(),
                    cfg.in_features,
                    opts.seed
                );
                denses.push(Dense::random(&cfg, opts.seed, &device)?);
                if origin == Origin::Modules {
                    origin = Origin::BaseModel;
                }
            }
        }
        let mut model = Self::assemble(
            transformer,
            denses,
            opts.settings.clone().or(&from_config),
            origin,
        )?;
        model.extra_config = extra_config;
        if let Some(size) = opts.embedding_size {
            if model.embedding_dim() != size {
                let cfg = DenseConfig {
                    in_features: model.embedding_dim(),
                    out_features: size,
                    bias: opts.bias,
                    activation_function: crate::dense::Activation::Identity.torch_name().into(),
                    use_residual: false,
                };
                let dense = Dense::random(&cfg, opts.seed.wrapping_add(1), &device)?;
                model.push_dense(dense)?;
            }
        }
        model.set_truncate_dim(opts.truncate_dim)?;
        model.set_dtype(opts.dtype);
        Ok(model)
    }

    /// Builds a model from modules, resolving `settings` against PyLate's defaults, adding the prefix
    /// tokens to the vocabulary when missing, and choosing the padding token (mask, else EOS, else pad).
    pub fn from_modules(
        transformer: Transformer,
        denses: Vec<Dense>,
        settings: PartialSettings,
    ) -> Result<Self> {
        Self::assemble(transformer, denses, settings, Origin::Built)
    }

    fn assemble(
        mut transformer: Transformer,
        denses: Vec<Dense>,
        settings: PartialSettings,
        origin: Origin,
    ) -> Result<Self> {
        let settings = settings.resolve();
        if settings.query_length == 0 || settings.document_length == 0 {
            return Err(Error::Invalid(
                "query_length and document_length must be positive".into(),
            ));
        }
        let mut prev = transformer.backbone.hidden_size();
        for (i, d) in denses.iter().enumerate() {
            if d.in_features() != prev {
                return Err(Error::Shape {
                    what: format!("input of Dense module {}", i + 1),
                    expected: prev.to_string(),
                    got: d.in_features().to_string(),
                });
            }
            prev = d.out_features();
        }
        let prefixes: Vec<String> = [&settings.query_prefix, &settings.document_prefix]
            .into_iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect();
        if !prefixes.is_empty() {
            transformer.add_tokens(&prefixes)?;
        }
        let sp = transformer.special.clone();
        let id = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| transformer.tokenizer.token_to_id(t))
        };
        let pad_id = id(&sp.mask)
            .or_else(|| id(&sp.eos))
            .or_else(|| id(&sp.pad))
            .ok_or_else(|| {
                let config = transformer.source.join("tokenizer_config.json");
                if config.is_file() {
                    Error::bad(
                        config,
                        "the tokenizer has no mask, EOS or pad token to pad and expand queries with",
                    )
                } else {
                    Error::MissingFile {
                        path: config,
                        expected: format!(
                            "the tokenizer's special tokens (mask_token, eos_token or pad_token) to pad and \
                             expand queries with: {} has no tokenizer_config.json and its model type has no \
                             default ones",
                            transformer.source.display()
                        ),
                    }
                }
            })?;
        let tokenizer = ColbertTokenizer::new(
            transformer.tokenizer.clone(),
            transformer.do_lower_case,
            pad_id,
        );
        let unk = sp.unk.as_deref();
        let prefix_id = |p: &str| {
            (!p.is_empty())
                .then(|| tokenizer.token_id(p, unk))
                .flatten()
        };
        let query_prefix_id = prefix_id(&settings.query_prefix);
        let document_prefix_id = prefix_id(&settings.document_prefix);
        let skiplist = settings
            .skiplist_words
            .iter()
            .filter_map(|w| tokenizer.token_id(w, unk))
            .collect();
        Ok(Self {
            transformer,
            denses,
            settings,
            tokenizer,
            query_prefix_id,
            document_prefix_id,
            skiplist,
            extra_config: serde_json::Map::new(),
            origin,
            truncate_dim: None,
            dtype: Dtype::F32,
        })
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Id of the query prefix token (`None` when the prefix is empty).
    pub fn query_prefix_id(&self) -> Option<u32> {
        self.query_prefix_id
    }

    /// Id of the document prefix token (`None` when the prefix is empty).
    pub fn document_prefix_id(&self) -> Option<u32> {
        self.document_prefix_id
    }

    /// Token ids removed from document embeddings.
    pub fn skiplist(&self) -> &HashSet<u32> {
        &self.skiplist
    }

    /// The id used for padding and query expansion.
    pub fn pad_id(&self) -> u32 {
        self.tokenizer.pad_id
    }

    /// The ColBERT tokenizer.
    pub fn tokenizer(&self) -> &ColbertTokenizer {
        &self.tokenizer
    }

    /// Output dimension of the token embeddings.
    pub fn embedding_dim(&self) -> usize {
        self.denses
            .last()
            .map(|d| d.out_features())
            .unwrap_or_else(|| self.transformer.backbone.hidden_size())
    }

    /// The Matryoshka truncation in effect, if any.
    pub fn truncate_dim(&self) -> Option<usize> {
        self.truncate_dim
    }

    /// Keeps only the first `dim` dimensions of every token embedding that [`ColBERT::encode`] returns,
    /// re-normalised afterwards when normalising (Matryoshka models such as jina-colbert-v2: 128, 96, 64).
    /// `None` keeps them all. PyLate 1.6.0 accepts `truncate_dim` but ignores it for ColBERT models.
    pub fn set_truncate_dim(&mut self, dim: Option<usize>) -> Result<()> {
        if let Some(d) = dim {
            if d == 0 || d > self.embedding_dim() {
                return Err(Error::Invalid(format!(
                    "truncate_dim {d} must be between 1 and the embedding dimension {}",
                    self.embedding_dim()
                )));
            }
        }
        self.truncate_dim = dim;
        Ok(())
    }

    /// Precision of the encoder's linear layers in inference.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Runs the encoder's linear layers (q/k/v, attention output, MLP) at `dtype` in [`Mode::Infer`]
    /// forward passes on the CPU: bf16 weights and activations with f32 accumulation, or int8 with
    /// per-channel weight and per-row activation scales. Embeddings, normalisation, attention and the
    /// Dense projections stay f32. The weights are packed once per layer, on first use. In training
    /// forward passes ([`Mode::Train`]) bf16 runs the encoder layers' products forward and backward in
    /// bf16 with f32 accumulation and f32 weights (`latte train --dtype bf16`); int8 is refused there.
    pub fn set_dtype(&mut self, dtype: Dtype) {
        self.dtype = dtype;
    }

    /// Dimension of the vectors [`ColBERT::encode`] returns: `truncate_dim`, else [`ColBERT::embedding_dim`].
    pub fn output_dim(&self) -> usize {
        let full = self.embedding_dim();
        self.truncate_dim.map_or(full, |t| t.min(full))
    }

    /// The text of the prompt named `name` in the model's `prompts`.
    pub fn prompt(&self, name: &str) -> Result<String> {
        let prompts = self.extra_config.get("prompts").and_then(|p| p.as_object());
        prompts
            .and_then(|p| p.get(name))
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                let known: Vec<&str> = prompts
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                Error::Invalid(format!(
                    "the model has no prompt named {name:?} (its prompts: {known:?})"
                ))
            })
    }

    /// The prompt `encode` applies for these options: `prompt`, else the prompt named `prompt_name`, else
    /// the model's `default_prompt_name` prompt, else none.
    pub fn resolve_prompt(&self, opts: &EncodeOptions) -> Result<Option<String>> {
        if let Some(p) = &opts.prompt {
            return Ok(Some(p.clone()));
        }
        if let Some(name) = &opts.prompt_name {
            return self.prompt(name).map(Some);
        }
        match self
            .extra_config
            .get("default_prompt_name")
            .and_then(|n| n.as_str())
        {
            Some(name) => self.prompt(name).map(Some),
            None => Ok(None),
        }
    }

    /// Number of modules (the Transformer counts as one).
    pub fn len(&self) -> usize {
        1 + self.denses.len()
    }

    /// Always false: a model has at least its Transformer.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends a Dense module; its input must match the current output dimension.
    pub fn push_dense(&mut self, dense: Dense) -> Result<()> {
        if dense.in_features() != self.embedding_dim() {
            return Err(Error::Shape {
                what: "input of the appended Dense".into(),
                expected: self.embedding_dim().to_string(),
                got: dense.in_features().to_string(),
            });
        }
        self.denses.push(dense);
        Ok(())
    }

    /// Removes the module at `index` (1 is the first Dense; the Transformer, 0, cannot be removed) and
    /// returns it. The remaining chain must still fit together.
    pub fn remove_module(&mut self, index: usize) -> Result<Dense> {
        if index == 0 {
            return Err(Error::Invalid(
                "module 0 is the Transformer and cannot be removed".into(),
            ));
        }
        if index > self.denses.len() {
            return Err(Error::Invalid(format!(
                "no module {index}: the model has modules 0..={}",
                self.denses.len()
            )));
        }
        let removed = self.denses.remove(index - 1);
        let mut prev = self.transformer.backbone.hidden_size();
        let mut broken = None;
        for d in &self.denses {
            if d.in_features() != prev {
                broken = Some((prev, d.in_features()));
                break;
            }
            prev = d.out_features();
        }
        if let Some((expected, got)) = broken {
            self.denses.insert(index - 1, removed);
            return Err(Error::Shape {
                what: format!("input of the Dense after module {index} once it is removed"),
                expected: expected.to_string(),
                got: got.to_string(),
            });
        }
        Ok(removed)
    }

    /// Tokenises texts as PyLate's `tokenize(texts, is_query)`: prefix inserted, queries padded to
    /// `query_length` when expanding. Documents are not padded here.
    pub fn tokenize(&self, texts: &[String], is_query: bool) -> Result<Vec<Tokenized>> {
        let s = &self.settings;
        let (len, prefix) = if is_query {
            (s.query_length, self.query_prefix_id)
        } else {
            (s.document_length, self.document_prefix_id)
        };
        let max = if prefix.is_some() { len - 1 } else { len };
        let max = max.max(1);
        let mut out = self.tokenizer.encode(texts, max, prefix)?;
        if is_query && s.do_query_expansion {
            for t in &mut out {
                while t.ids.len() < len {
                    t.ids.push(self.tokenizer.pad_id);
                    t.mask.push(0);
                }
            }
        }
        if is_query && s.attend_to_expansion_tokens {
            for t in &mut out {
                t.mask.iter_mut().for_each(|m| *m = 1);
            }
        }
        Ok(out)
    }

    /// Pads tokenised texts to the longest and runs the model: `[batch, len, dim]` token embeddings
    /// (not normalised), with the `[batch, len]` ids and mask tensors used.
    pub fn forward_tokens(
        &self,
        batch: &[Tokenized],
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (ids, mask) = self.pad_batch(batch)?;
        let x = self.forward(&ids, &mask, mode)?;
        Ok((x, ids, mask))
    }

    /// The `[batch, len]` ids and mask tensors of tokenised texts padded to the longest.
    fn pad_batch(&self, batch: &[Tokenized]) -> Result<(Tensor, Tensor)> {
        let dev = self.transformer.device().clone();
        let len = batch.iter().map(|t| t.ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        for t in batch {
            ids.extend_from_slice(&t.ids);
            mask.extend_from_slice(&t.mask);
            for _ in t.ids.len()..len {
                ids.push(self.tokenizer.pad_id);
                mask.push(0);
            }
        }
        let ids = Tensor::from_vec(ids, (batch.len(), len), &dev)?;
        let mask = Tensor::from_vec(mask, (batch.len(), len), &dev)?;
        Ok((ids, mask))
    }

    /// [`Self::forward_tokens`] for a caller that discards the rows at mask 0: `[batch, len, dim]` with
    /// those rows unspecified, so that the encoder may skip the padding (see
    /// [`Transformer::forward_attended`] and [`Self::skips_padding`]).
    pub fn forward_tokens_attended(&self, batch: &[Tokenized], mode: Mode) -> Result<Tensor> {
        let (ids, mask) = self.pad_batch(batch)?;
        self.forward_with(&ids, &mask, mode, true)
    }

    /// Whether [`Self::forward_tokens_attended`] skips the padding: padded positions then cost nothing,
    /// and a caller may batch texts of any lengths together.
    pub fn skips_padding(&self) -> bool {
        self.transformer.device().is_cpu() && self.transformer.skips_padding()
    }

    /// Transformer then every Dense: `[batch, len]` → `[batch, len, dim]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        self.forward_with(input_ids, attention_mask, mode, false)
    }

    /// [`Self::forward`], through [`Transformer::forward_attended`] when `attended`.
    fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
        attended: bool,
    ) -> Result<Tensor> {
        let run = || {
            if attended {
                self.transformer
                    .forward_attended(input_ids, attention_mask, mode)
            } else {
                self.transformer.forward(input_ids, attention_mask, mode)
            }
        };
        let mut x = match mode {
            Mode::Infer => crate::dtype::with_dtype(self.dtype, run)?,
            Mode::Train if self.dtype == Dtype::Int8 => {
                return Err(Error::Invalid(format!(
                    "dtype {}: training runs in f32 or bf16; load the model with dtype f32 or bf16",
                    self.dtype
                )))
            }
            // bf16: the training ops built in this forward pass keep bf16 products for their backward
            // pass too; the weights (and the optimiser's state) stay f32.
            Mode::Train => crate::dtype::with_dtype(self.dtype, run)?,
        };
        for d in &self.denses {
            x = d.forward(&x)?;
        }
        Ok(x)
    }

    /// Encodes texts into per-token embeddings exactly as PyLate's `encode` does: documents lose their
    /// padding and skiplist tokens; queries keep all `query_length` tokens when expanding, else their
    /// attended tokens; every kept vector is L2-normalised (unless disabled). Output is in input order.
    pub fn encode(
        &self,
        texts: &[String],
        is_query: bool,
        opts: &EncodeOptions,
    ) -> Result<Vec<Embedding>> {
        if opts.batch_size == 0 {
            return Err(Error::Invalid("batch_size must be at least 1".into()));
        }
        let texts: Vec<String> = match self.resolve_prompt(opts)? {
            Some(p) => texts.iter().map(|t| format!("{p}{t}")).collect(),
            None => texts.to_vec(),
        };
        let out_dim = self.output_dim();
        let toks = self.tokenize(&texts, is_query)?;
        let mut order: Vec<usize> = (0..toks.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(toks[i].ids.len()));
        let n_batches = order.len().div_ceil(opts.batch_size);
        let show = opts.show_progress.unwrap_or_else(|| {
            n_batches > 1 && std::io::IsTerminal::is_terminal(&std::io::stderr())
        });
        let bar = if show {
            let b = indicatif::ProgressBar::new(texts.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
                )
                .unwrap(),
            );
            b.set_message(if is_query { "queries" } else { "documents" });
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let chunks: Vec<&[usize]> = order.chunks(opts.batch_size).collect();
        let run_batch = |chunk: &[usize]| -> Result<Vec<Embedding>> {
            let batch: Vec<Tokenized> = chunk.iter().map(|&i| toks[i].clone()).collect();
            // Only rows whose mask is 1 are kept, unless queries keep their expansion tokens.
            let x = if is_query && self.settings.do_query_expansion {
                self.forward_tokens(&batch, Mode::Infer)?.0
            } else {
                self.forward_tokens_attended(&batch, Mode::Infer)?
            };
            let (_, len, dim) = x.dims3()?;
            let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let embs = chunk
                .iter()
                .enumerate()
                .map(|(b, &i)| {
                    let t = &toks[i];
                    let keep: Vec<usize> = (0..t.ids.len())
                        .filter(|&p| self.keep_token(t, p, is_query))
                        .collect();
                    let mut data = Vec::with_capacity(keep.len() * out_dim);
                    for p in keep.iter().copied() {
                        let start = (b * len + p) * dim;
                        let row = &flat[start..start + out_dim];
                        if opts.normalize {
                            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                            data.extend(row.iter().map(|v| v / norm));
                        } else {
                            data.extend_from_slice(row);
                        }
                    }
                    Embedding {
                        rows: keep.len(),
                        cols: out_dim,
                        data,
                    }
                })
                .collect();
            bar.inc(chunk.len() as u64);
            Ok(embs)
        };
        // Batches run concurrently on the CPU (each matmul is itself multi-threaded); on an accelerator
        // they run one after the other.
        let results: Vec<Result<Vec<Embedding>>> =
            if self.transformer.device().is_cpu() && chunks.len() > 1 {
                use rayon::prelude::*;
                chunks.par_iter().map(|c| run_batch(c)).collect()
            } else {
                chunks.iter().map(|c| run_batch(c)).collect()
            };
        let mut out: Vec<Option<Embedding>> = vec![None; toks.len()];
        for (chunk, embs) in chunks.iter().zip(results) {
            for (&i, e) in chunk.iter().zip(embs?) {
                out[i] = Some(e);
            }
        }
        bar.finish_and_clear();
        Ok(out
            .into_iter()
            .map(|e| e.expect("every text encoded"))
            .collect())
    }

    fn keep_token(&self, t: &Tokenized, p: usize, is_query: bool) -> bool {
        if is_query {
            self.settings.do_query_expansion || t.mask[p] == 1
        } else {
            t.mask[p] == 1 && !self.skiplist.contains(&t.ids[p])
        }
    }

    /// A mask over `[batch, len]` ids for training: documents drop padding and skiplist tokens; queries
    /// keep their attention mask.
    pub fn skiplist_mask(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let v: Vec<Vec<u32>> = ids.to_vec2()?;
        let m: Vec<Vec<u32>> = attention_mask.to_vec2()?;
        let data: Vec<f32> = v
            .iter()
            .zip(&m)
            .flat_map(|(r, mr)| {
                r.iter()
                    .zip(mr)
                    .map(|(id, a)| {
                        if *a == 1 && !self.skiplist.contains(id) {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Tensor::from_vec(data, ids.dims(), ids.device())?)
    }

    /// L2-normalises the last dimension (as `torch.nn.functional.normalize`, eps 1e-12), differentiably.
    pub fn normalize(x: &Tensor) -> Result<Tensor> {
        let norm = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        Ok(x.broadcast_div(&norm)?)
    }

    /// Where the model was read from.
    pub fn source(&self) -> &PathBuf {
        &self.transformer.source
    }
}

fn stanford_linear(dir: &Path, device: &Device) -> Result<Dense> {
    let mut tensors = std::collections::HashMap::new();
    let st = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    let file = if st.is_file() {
        st
    } else if bin.is_file() {
        bin
    } else {
        return Err(Error::MissingFile {
            path: st,
            expected: "the stanford-nlp ColBERT weights with the \"linear.weight\" projection (or pytorch_model.bin)"
                .into(),
        });
    };
    crate::io::load_weight_file(&file, device, &mut tensors)?;
    let w = tensors
        .remove("linear.weight")
        .ok_or_else(|| Error::MissingWeight {
            name: "linear.weight".into(),
            path: file.clone(),
        })?;
    let (out, inp) = w.dims2()?;
    let mut map = std::collections::HashMap::new();
    map.insert("linear.weight".to_string(), w);
    let cfg = DenseConfig {
        in_features: inp,
        out_features: out,
        bias: false,
        activation_function: crate::dense::Activation::Identity.torch_name().into(),
        use_residual: false,
    };
    Dense::load(crate::backbone::var_builder(map, device), &cfg)
}

/// A folder without `modules.json` is loaded as a bare encoder with a new random projection; refuses that
/// when the folder holds what only a sentence-transformers / PyLate folder has (`config_sentence_transformers.json`,
/// an `N_Dense/` module folder), since its `modules.json` was most likely lost and the result would silently
/// be another model.
fn refuse_modules_without_list(dir: &Path) -> Result<()> {
    let mut found: Vec<String> = Vec::new();
    if dir.join("config_sentence_transformers.json").is_file() {
        found.push("config_sentence_transformers.json".into());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut dense: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| {
                n.split_once('_').is_some_and(|(i, rest)| {
                    rest == "Dense" && !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .map(|n| format!("{n}/"))
            .collect();
        dense.sort();
        found.extend(dense);
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::MissingFile {
        path: dir.join("modules.json"),
        expected: format!(
            "the module list of a sentence-transformers / PyLate folder, since {} holds {}; without it the \
             folder would load as a bare encoder with a new random projection (restore modules.json, or \
             remove those files to use the bare encoder)",
            dir.display(),
            found.join(" and ")
        ),
    })
}

/// Reads `artifact.metadata` of a stanford-nlp checkpoint; without it the prefixes are `[unused0]` and
/// `[unused1]` and the lengths fall to the defaults.
fn stanford_metadata(dir: &Path) -> Result<PartialSettings> {
    let path = dir.join("artifact.metadata");
    let mut s = PartialSettings {
        query_prefix: Some("[unused0]".into()),
        document_prefix: Some("[unused1]".into()),
        ..Default::default()
    };
    if !path.is_file() {
        tracing::warn!("{} not found: using stanford defaults", path.display());
        return Ok(s);
    }
    let v: serde_json::Value = read_json(&path, "the stanford-nlp ColBERT metadata")?;
    if let Some(q) = v.get("query_token_id").and_then(|x| x.as_str()) {
        s.query_prefix = Some(q.into());
    }
    if let Some(d) = v.get("doc_token_id").and_then(|x| x.as_str()) {
        s.document_prefix = Some(d.into());
    }
    s.query_length = v
        .get("query_maxlen")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    s.document_length = v
        .get("doc_maxlen")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    s.attend_to_expansion_tokens = v.get("attend_to_mask_tokens").and_then(|x| x.as_bool());
    Ok(s)
}

impl fmt::Display for ColBERT {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ColBERT(")?;
        let max = self
            .transformer
            .max_seq_length
            .map(|m| m.to_string())
            .unwrap_or_else(|| "None".into());
        writeln!(
            f,
            "  (0): Transformer({{'max_seq_length': {max}, 'do_lower_case': {}, 'architecture': '{}'}})",
            if self.transformer.do_lower_case { "True" } else { "False" },
            self.transformer.architecture()
        )?;
        for (i, d) in self.denses.iter().enumerate() {
            writeln!(f, "  ({}): {d}", i + 1)?;
        }
        write!(f, ")")
    }
}
