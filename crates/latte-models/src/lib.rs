//! ColBERT models for latte: load PyLate / sentence-transformers folders, stanford-nlp checkpoints and
//! bare Hugging Face encoders (locally or from the Hub), build models from modules, encode queries and
//! documents exactly as PyLate 1.6.0 does, and save folders PyLate loads back.
//!
//! Model code is written against candle's `VarBuilder`, so the same layers run frozen weights for
//! inference and trainable `Var`s for training (see [`Transformer::to_trainable`]).

#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod backbone;
pub mod dense;
mod error;
pub mod fused;
pub mod hub;
pub mod io;
pub mod model;
pub mod nn;
pub mod save;
pub mod settings;
pub mod tokenize;
pub mod train_layer;
pub mod train_ops;
pub mod trainable;
pub mod transformer;

pub use dense::{Activation, Dense, DenseConfig};
pub use error::{Error, Result};
pub use hub::HubOptions;
pub use model::{ColBERT, Embedding, EncodeOptions, LoadOptions, Origin};
pub use nn::Mode;
pub use settings::{PartialSettings, Settings};
pub use transformer::Transformer;
