//! The handlers, one module per group of routes.

pub mod documents;
pub mod indexes;
pub mod models;
pub mod ops;
pub mod search;
