//! ColBERT models for latte: load PyLate / sentence-transformers folders, stanford-nlp checkpoints and
//! bare Hugging Face encoders (locally or from the Hub), build models from modules, encode queries and
//! documents exactly as PyLate 1.6.0 does, and save folders PyLate loads back.
//!
//! Model code is written against candle's `VarBuilder`, so the same layers run frozen weights for
//! inference and trainable `Var`s for training (see [`Transformer::to_trainable`]).

//!
//! Layering (imports point one way): the model (`model`, `settings`, `tokenize`, `hub`, `io`, `save`,
//! `transformer`, `trainable`) → the layers (`backbone`, `dense`, `layers::nn`) → the ops (`ops::infer`,
//! `ops::train`: candle custom ops) → the kernels of `latte_kernels`. This crate has no `unsafe` code.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backbone;
mod dense;
mod dtype;
mod error;
mod hub;
mod io;
mod layers;
mod model;
mod ops;
mod recorded;
mod save;
mod settings;
mod tokenize;
mod trainable;
mod transformer;

pub(crate) use layers::nn;

pub use dense::{Activation, Dense, DenseConfig};
pub use dtype::{Dtype, ParseDtypeError};
pub use error::{Error, Result};
pub use hub::{resolve as resolve_model, HubOptions};
pub use model::{ColBERT, Embedding, EncodeOptions, LoadOptions, Origin};
pub use nn::Mode;
pub use recorded::ModelOptions;
pub use settings::{PartialSettings, Settings};
pub use transformer::Transformer;

pub use io::atomic_write;
pub use layers::nn::dropout;
pub use ops::dropout::{dropout_seed, with_dropout};
pub use ops::train::with_fused_layers;
pub use tokenize::{py_strip, ColbertTokenizer, Tokenized};
