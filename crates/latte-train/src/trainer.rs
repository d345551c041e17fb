//! The training loop: shuffled batches, gradient accumulation, clipping, AdamW with a warm-up schedule,
//! evaluation every N steps, checkpoints in PyLate format (with optimizer state, to resume), logs to the
//! console and to `metrics.jsonl`.
//!
//! Layout of the output folder (`output_dir`):
//! - the trained model itself (a PyLate folder: `latte encode --model output_dir` loads it);
//! - `checkpoints/checkpoint-<step>/`: a PyLate model folder plus `optimizer.safetensors` and
//!   `trainer_state.json` (written last: a checkpoint without it is incomplete and refused);
//! - `metrics.jsonl`: one JSON object per logging step and per evaluation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use candle_nn::VarMap;
use latte_models::{ColBERT, Dtype, LoadOptions};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::TrainingData;
use crate::evaluate::Evaluator;
use crate::loss::{CachedContrastive, Contrastive, Distillation, Loss, Param};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig, Schedule};
use crate::{Error, Result};

/// Which loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// [`Contrastive`].
    #[default]
    Contrastive,
    /// [`CachedContrastive`].
    CachedContrastive,
    /// [`Distillation`].
    Distillation,
}

impl std::str::FromStr for LossKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "contrastive" => Ok(Self::Contrastive),
            "cached-contrastive" | "cached_contrastive" => Ok(Self::CachedContrastive),
            "distillation" => Ok(Self::Distillation),
            o => Err(Error::Invalid(format!(
                "unknown loss {o:?} (expected contrastive, cached-contrastive or distillation)"
            ))),
        }
    }
}

/// Every training hyper-parameter. Defaults follow sentence-transformers' / the Hugging Face Trainer's
/// and PyLate's. Read from TOML with [`TrainConfig::from_toml`]; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Where the trained model, checkpoints and metrics go.
    pub output_dir: PathBuf,
    /// The loss.
    pub loss: LossKind,
    /// Contrastive temperature.
    pub temperature: f64,
    /// CachedContrastive: texts per forward pass.
    pub mini_batch_size: usize,
    /// Distillation: min-max normalise student scores.
    pub normalize_scores: bool,
    /// Mean (true) or sum over the batch.
    pub size_average: bool,
    /// Distillation (PyLate layout): documents per query.
    pub n_ways: usize,
    /// Rows per forward/backward pass.
    pub batch_size: usize,
    /// Passes whose gradients are summed (averaged) before each optimisation step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Warm-up as a fraction of all steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up.
    pub lr_scheduler: Schedule,
    /// Gradient clipping by global norm (0 = off).
    pub max_grad_norm: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Stop after this many optimisation steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Log the mean loss every N steps.
    pub logging_steps: u64,
    /// Run the evaluators every N steps (and at the end).
    pub eval_steps: Option<u64>,
    /// Write a checkpoint every N steps.
    pub save_steps: Option<u64>,
    /// Keep only the newest N checkpoints.
    pub save_total_limit: Option<usize>,
    /// Drop the last incomplete batch of each epoch.
    pub drop_last: bool,
    /// Show a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Apply the dropout of the model's config in training, as PyTorch's `model.train()` does
    /// (`hidden_dropout_prob`, `attention_probs_dropout_prob`, ModernBERT's dropouts).
    pub dropout: bool,
    /// Precision of the encoder's products in training: `f32`, or `bf16` (forward and backward products in
    /// bf16 with f32 accumulation, f32 master weights and optimiser state; PyLate's `bf16=True`). `None`
    /// (the default) keeps the model's own dtype (`latte train --dtype`, [`ColBERT::set_dtype`]); int8
    /// cannot train.
    pub dtype: Option<Dtype>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("latte-model"),
            loss: LossKind::Contrastive,
            temperature: 1.0,
            mini_batch_size: 32,
            normalize_scores: true,
            size_average: true,
            n_ways: 32,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler: Schedule::Linear,
            max_grad_norm: 1.0,
            epochs: 1,
            max_steps: None,
            seed: 42,
            logging_steps: 10,
            eval_steps: None,
            save_steps: None,
            save_total_limit: None,
            drop_last: false,
            progress: true,
            dropout: true,
            dtype: None,
        }
    }
}

impl TrainConfig {
    /// Parses a TOML document of [`TrainConfig`] keys (any subset; the rest keep their defaults).
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Invalid(format!("training configuration: {e}")))
    }

    /// The loss this configuration describes.
    pub fn make_loss(&self) -> Result<Box<dyn Loss>> {
        let contrastive = Contrastive {
            temperature: self.temperature,
            size_average: self.size_average,
        };
        if self.temperature <= 0.0 {
            return Err(Error::Invalid("temperature must be positive".into()));
        }
        Ok(match self.loss {
            LossKind::Contrastive => Box::new(contrastive),
            LossKind::CachedContrastive => {
                if self.mini_batch_size == 0 {
                    return Err(Error::Invalid("mini_batch_size must be at least 1".into()));
                }
                Box::new(CachedContrastive {
                    contrastive,
                    mini_batch_size: self.mini_batch_size,
                })
            }
            LossKind::Distillation => Box::new(Distillation {
                normalize_scores: self.normalize_scores,
                size_average: self.size_average,
            }),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::Invalid("batch_size must be at least 1".into()));
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(Error::Invalid(
                "gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(Error::Invalid(
                "learning_rate must be a non-negative number".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::Invalid("warmup_ratio must be within [0, 1]".into()));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::Invalid(
                "epochs must be at least 1 (or set max_steps)".into(),
            ));
        }
        if self.max_steps == Some(0) {
            return Err(Error::Invalid("max_steps must be at least 1".into()));
        }
        if self.dtype == Some(Dtype::Int8) {
            return Err(Error::Invalid(
                "dtype int8: training runs in f32 or bf16".into(),
            ));
        }
        Ok(())
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

/// Where a run stands; written to `trainer_state.json` in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimisation steps done.
    pub global_step: u64,
    /// All optimisation steps of the run.
    pub total_steps: u64,
    /// The epoch in progress (0-based).
    pub epoch: usize,
    /// Batches of that epoch already consumed.
    pub batches_done_in_epoch: usize,
    /// Examples seen so far.
    pub examples_seen: u64,
    /// The configuration the run was started with.
    pub config: TrainConfig,
    /// Number of training examples (a resumed run must use the same data).
    pub num_examples: usize,
    /// latte version that wrote it.
    pub latte_version: String,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimisation steps taken (in this and earlier, resumed, runs).
    pub global_step: u64,
    /// The mean loss of the last logging window.
    pub last_loss: f64,
    /// Training examples per second over this run's steps (evaluation and saving excluded).
    pub examples_per_second: f64,
    /// The last evaluation, if any.
    pub last_eval: Vec<(String, f64)>,
    /// Where the trained model was written.
    pub model_dir: PathBuf,
}

/// Runs training.
pub struct Trainer {
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Evaluators run every `eval_steps` and at the end.
    pub evaluators: Vec<Box<dyn Evaluator>>,
}

struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self { file })
    }
    fn write(&mut self, v: serde_json::Value) {
        let _ = writeln!(self.file, "{v}");
        let _ = self.file.flush();
    }
}

/// The sorted trainable parameters of `varmap`.
pub fn params_of(varmap: &VarMap) -> Vec<Param> {
    let mut p: Vec<Param> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p
}

fn checkpoint_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint under `output_dir/checkpoints`, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    checkpoint_dirs(&output_dir.join("checkpoints"))
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join("trainer_state.json").is_file())
}

impl Trainer {
    /// A trainer without evaluators.
    pub fn new(config: TrainConfig) -> Self {
        Self {
            config,
            evaluators: Vec::new(),
        }
    }

    fn total_steps(&self, n: usize) -> u64 {
        let c = &self.config;
        if let Some(m) = c.max_steps {
            return m;
        }
        let batches = if c.drop_last {
            n / c.batch_size
        } else {
            n.div_ceil(c.batch_size)
        };
        let per_epoch = batches.div_ceil(c.gradient_accumulation_steps).max(1);
        per_epoch as u64 * c.epochs as u64
    }

    fn run_evaluators(&self, model: &ColBERT) -> Result<Vec<(String, f64)>> {
        if self.evaluators.is_empty() {
            return Ok(Vec::new());
        }
        let snap = model.snapshot()?;
        let mut out = Vec::new();
        for e in &self.evaluators {
            for (k, v) in e.evaluate(&snap)? {
                out.push((format!("{}_{k}", e.name()), v));
            }
        }
        Ok(out)
    }

    fn save_checkpoint(
        &self,
        model: &ColBERT,
        opt: &AdamW,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let root = self.config.output_dir.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let dir = root.join(format!("checkpoint-{}", state.global_step));
        model.snapshot()?.save(&dir)?;
        opt.save(&dir.join("optimizer.safetensors"))?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        latte_models::atomic_write(&dir.join("trainer_state.json"), &json)?;
        if let Some(limit) = self.config.save_total_limit {
            let all = checkpoint_dirs(&root);
            if all.len() > limit.max(1) {
                for (_, p) in &all[..all.len() - limit.max(1)] {
                    let _ = std::fs::remove_dir_all(p);
                }
            }
        }
        Ok(dir)
    }

    /// Saves the trained model into `output_dir` without losing `checkpoints/` and `metrics.jsonl`: the
    /// model is written to a staging folder, those are moved in, and the folders are swapped.
    fn save_final(&self, model: &ColBERT) -> Result<PathBuf> {
        let out = &self.config.output_dir;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let staging = parent.join(format!(".latte-final-{name}"));
        let _ = std::fs::remove_dir_all(&staging);
        model.snapshot()?.save(&staging)?;
        for keep in ["checkpoints", "metrics.jsonl"] {
            let src = out.join(keep);
            if src.exists() {
                std::fs::rename(&src, staging.join(keep)).map_err(|e| Error::io(&src, e))?;
            }
        }
        let old = parent.join(format!(".latte-old-{name}"));
        let _ = std::fs::remove_dir_all(&old);
        if out.exists() {
            std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(out.clone())
    }

    /// Trains `model` on `data`. With `resume`, the model, optimizer and position in the data come from
    /// that checkpoint folder instead (the data must be the same).
    pub fn train(
        &self,
        model: &ColBERT,
        data: &TrainingData,
        resume: Option<&Path>,
    ) -> Result<TrainOutcome> {
        let c = &self.config;
        c.validate()?;
        if data.is_empty() {
            return Err(Error::Invalid("no training examples".into()));
        }
        let loss_fn = c.make_loss()?;
        std::fs::create_dir_all(&c.output_dir).map_err(|e| Error::io(&c.output_dir, e))?;
        let total = self.total_steps(data.len());
        let warmup = if c.warmup_steps > 0 {
            c.warmup_steps
        } else {
            (c.warmup_ratio * total as f64).ceil() as u64
        };

        let (base, mut opt, mut state) = match resume {
            Some(dir) => {
                let state_path = dir.join("trainer_state.json");
                let text = std::fs::read_to_string(&state_path).map_err(|_| Error::Checkpoint {
                    path: dir.to_path_buf(),
                    message: "trainer_state.json is missing: not a checkpoint, or one whose write was interrupted".into(),
                })?;
                let state: TrainerState =
                    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                        path: dir.to_path_buf(),
                        message: format!("trainer_state.json: {e}"),
                    })?;
                if state.num_examples != data.len() {
                    return Err(Error::Checkpoint {
                        path: dir.to_path_buf(),
                        message: format!(
                            "it was trained on {} examples, this data has {}",
                            state.num_examples,
                            data.len()
                        ),
                    });
                }
                let mut m = ColBERT::load_dir(dir, &LoadOptions::default())?;
                // A checkpoint folder records no dtype: the run goes on at the one it was asked for.
                m.set_dtype(model.dtype());
                let device = m.transformer.device().clone();
                let opt = AdamW::load(c.adamw(), &dir.join("optimizer.safetensors"), &device)?;
                (m, opt, state)
            }
            None => (
                model.clone(),
                AdamW::new(c.adamw()),
                TrainerState {
                    global_step: 0,
                    total_steps: total,
                    epoch: 0,
                    batches_done_in_epoch: 0,
                    examples_seen: 0,
                    config: c.clone(),
                    num_examples: data.len(),
                    latte_version: env!("CARGO_PKG_VERSION").into(),
                },
            ),
        };
        state.total_steps = total;
        let mut base = base;
        if let Some(d) = c.dtype {
            base.set_dtype(d);
        }
        if base.dtype() == Dtype::Int8 {
            return Err(Error::Invalid(
                "dtype int8: training runs in f32 or bf16; load the model with dtype f32 or bf16"
                    .into(),
            ));
        }

        let varmap = VarMap::new();
        let trainable = base.to_trainable(&varmap)?;
        let params = params_of(&varmap);
        let mut metrics = Metrics::open(&c.output_dir.join("metrics.jsonl"))?;

        let show = c.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if show {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "train [{elapsed_precise}] {wide_bar} {pos}/{len} steps (eta {eta}) {msg}",
                )
                .unwrap(),
            );
            b.set_position(state.global_step);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };

        let mut train_secs = 0f64;
        let mut examples_this_run = 0u64;
        let mut window_loss = 0f64;
        let mut window_n = 0u64;
        let mut last_loss = f64::NAN;
        let mut last_eval = Vec::new();
        let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut acc_n = 0usize;
        let mut acc_examples = 0u64;
        let mut step_start = Instant::now();

        'epochs: for epoch in state.epoch.. {
            if c.max_steps.is_none() && epoch >= c.epochs {
                break;
            }
            let mut order: Vec<usize> = (0..data.len()).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed.wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
            let batches: Vec<&[usize]> = order
                .chunks(c.batch_size)
                .filter(|b| !c.drop_last || b.len() == c.batch_size)
                .collect();
            if batches.is_empty() {
                return Err(Error::Invalid(format!(
                    "{} examples make no complete batch of {} (drop_last)",
                    data.len(),
                    c.batch_size
                )));
            }
            let skip = if epoch == state.epoch {
                state.batches_done_in_epoch
            } else {
                0
            };
            state.epoch = epoch;
            for (bi, idx) in batches.iter().enumerate().skip(skip) {
                if acc_n == 0 {
                    step_start = Instant::now();
                }
                let batch = data.batch(idx);
                let seed = c.dropout.then(|| {
                    c.seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(((epoch as u64) << 32) ^ bi as u64)
                });
                let out = latte_models::with_dropout(seed, || {
                    loss_fn.forward_backward(&trainable, &batch, &params)
                })?;
                if !out.loss.is_finite() {
                    return Err(Error::Invalid(format!(
                        "the loss became {} at step {} (epoch {epoch}, batch {bi}); lower the learning rate",
                        out.loss, state.global_step
                    )));
                }
                for (a, g) in acc.iter_mut().zip(out.grads) {
                    if let Some(g) = g {
                        *a = Some(match a.take() {
                            Some(x) => (x + g)?,
                            None => g,
                        });
                    }
                }
                acc_n += 1;
                acc_examples += idx.len() as u64;
                window_loss += out.loss as f64;
                window_n += 1;
                state.batches_done_in_epoch = bi + 1;
                let last_of_epoch = bi + 1 == batches.len();
                if acc_n < c.gradient_accumulation_steps && !last_of_epoch {
                    continue;
                }
                let mut grads: Vec<Option<Tensor>> =
                    std::mem::replace(&mut acc, vec![None; params.len()]);
                if acc_n > 1 {
                    for g in grads.iter_mut().flatten() {
                        *g = (&*g / acc_n as f64)?;
                    }
                }
                let norm = clip_grad_norm(&mut grads, c.max_grad_norm)?;
                let lr = learning_rate(
                    c.learning_rate,
                    c.lr_scheduler,
                    state.global_step,
                    warmup,
                    total,
                );
                opt.step(&params, &grads, lr)?;
                state.global_step += 1;
                state.examples_seen += acc_examples;
                examples_this_run += acc_examples;
                train_secs += step_start.elapsed().as_secs_f64();
                acc_n = 0;
                acc_examples = 0;
                bar.inc(1);
                let step = state.global_step;
                if step % c.logging_steps.max(1) == 0 || step == total {
                    last_loss = window_loss / window_n.max(1) as f64;
                    let eps = examples_this_run as f64 / train_secs.max(1e-9);
                    let epoch_f = epoch as f64 + (bi + 1) as f64 / batches.len() as f64;
                    metrics.write(serde_json::json!({
                        "step": step, "epoch": epoch_f, "loss": last_loss, "learning_rate": lr,
                        "grad_norm": norm, "examples_per_second": eps,
                    }));
                    bar.set_message(format!("loss {last_loss:.4} lr {lr:.2e} {eps:.1} ex/s"));
                    if !show {
                        tracing::info!(
                            step,
                            loss = last_loss,
                            lr,
                            examples_per_second = eps,
                            "train"
                        );
                    }
                    window_loss = 0.0;
                    window_n = 0;
                }
                if let Some(e) = c.eval_steps {
                    if step % e.max(1) == 0 && step != total {
                        last_eval = self.run_evaluators(&trainable)?;
                        self.log_eval(&mut metrics, &bar, step, &last_eval);
                    }
                }
                if let Some(s) = c.save_steps {
                    if step % s.max(1) == 0 {
                        let mut st = state.clone();
                        if last_of_epoch {
                            st.epoch += 1;
                            st.batches_done_in_epoch = 0;
                        }
                        self.save_checkpoint(&trainable, &opt, &st)?;
                    }
                }
                if step >= total {
                    break 'epochs;
                }
            }
            state.batches_done_in_epoch = 0;
        }
        bar.finish_and_clear();
        if !self.evaluators.is_empty() {
            last_eval = self.run_evaluators(&trainable)?;
            self.log_eval(&mut metrics, &bar, state.global_step, &last_eval);
        }
        drop(metrics);
        let model_dir = self.save_final(&trainable)?;
        Ok(TrainOutcome {
            global_step: state.global_step,
            last_loss,
            examples_per_second: examples_this_run as f64 / train_secs.max(1e-9),
            last_eval,
            model_dir,
        })
    }

    fn log_eval(
        &self,
        metrics: &mut Metrics,
        bar: &indicatif::ProgressBar,
        step: u64,
        values: &[(String, f64)],
    ) {
        let map: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        metrics.write(serde_json::json!({"step": step, "eval": map}));
        let text = values
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        bar.suspend(|| eprintln!("step {step}: {text}"));
    }
}
