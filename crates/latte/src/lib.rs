//! latte: late-interaction (ColBERT) retrieval in Rust.
//!
//! The facade re-exports the workspace crates: [`models`] (load, build, encode and save ColBERT models),
//! [`index`] (MaxSim scoring, exact and PLAID indexes) and [`eval`] (BEIR data and IR metrics).

pub use latte_eval as eval;
pub use latte_index as index;
pub use latte_models as models;

pub mod npz;
