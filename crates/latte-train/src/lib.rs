//! Fine-tuning ColBERT models in Rust with PyLate's losses.
//!
//! The model code is the inference code of `latte-models`, run over trainable candle variables
//! ([`ColBERT::to_trainable`](latte_models::ColBERT::to_trainable)) in
//! [`Mode::Train`](latte_models::Mode), where every op has a backward pass.
//!
//! - [`loss`]: [`Contrastive`], [`CachedContrastive`], [`Distillation`] with PyLate's masks and scores.
//! - [`optim`]: AdamW, learning-rate schedules, gradient clipping.
//! - [`data`]: JSONL / Parquet training files with sentence-transformers column conventions, PyLate's
//!   distillation layout.
//! - [`trainer`]: the training loop, checkpoints in PyLate format, resume, metrics.
//! - [`evaluate`]: triplet accuracy, distillation KL divergence, IR metrics on a BEIR folder.
#![forbid(unsafe_code)]

pub mod batch;
pub mod data;
mod error;
pub mod evaluate;
pub mod loss;
pub mod optim;
pub mod scores;
pub mod trainer;

pub use batch::{Batch, Column};
pub use error::{Error, Result};
pub use loss::{CachedContrastive, Contrastive, Distillation, Loss, LossOutput};
pub use optim::{AdamW, AdamWConfig, Schedule};
pub use trainer::{LossKind, TrainConfig, TrainOutcome, Trainer};
