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

pub mod backbone;
pub mod dense;
mod error;
pub mod hub;
pub mod io;
pub(crate) mod layers;
pub mod model;
pub(crate) mod ops;
pub mod save;
pub mod settings;
pub mod tokenize;
pub mod trainable;
pub mod transformer;

pub use layers::nn;
pub use ops::train::with_fused_layers;

pub use dense::{Activation, Dense, DenseConfig};
pub use error::{Error, Result};
pub use hub::HubOptions;
pub use model::{ColBERT, Embedding, EncodeOptions, LoadOptions, Origin};
pub use nn::Mode;
pub use settings::{PartialSettings, Settings};
pub use transformer::Transformer;
