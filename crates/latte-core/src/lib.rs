//! Plumbing shared by the latte crates, written once:
//!
//! * [`matrix`]: the row-major matrix view [`EmbRef`] and its owned counterpart [`Matrix`];
//! * [`npz`]: `.npy` / `.npz` reading (whole, or lazily one array at a time with [`npz::NpzArchive`]) and
//!   writing;
//! * [`atomic`]: replacing a file atomically (temporary file in the same folder, fsync, rename, fsync of the
//!   folder);
//! * [`beir`]: the one reader of corpus and query files (BEIR JSONL or one text per line), streaming, with one
//!   id rule.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod atomic;
pub mod beir;
mod error;
pub mod matrix;
pub mod npz;

pub use error::{short_id, Error, Result};
pub use matrix::{EmbRef, Matrix};
