//! latte: late-interaction (ColBERT) retrieval in Rust.
//!
//! The facade re-exports the workspace crates: [`core`] (matrices, npz, atomic writes, the corpus/queries
//! reader), [`models`] (load, build, encode and save ColBERT models),
//! [`index`] (MaxSim scoring, exact and PLAID indexes) [`eval`] (BEIR data and IR metrics) and [`train`] (losses, optimiser, trainer, evaluators).

#![forbid(unsafe_code)]

pub use latte_core as core;
pub use latte_eval as eval;
pub use latte_index as index;
pub use latte_models as models;
pub use latte_train as train;

pub mod npz;
