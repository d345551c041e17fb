//! One module per subcommand.

pub mod convert;
pub mod delete;
pub mod encode;
pub mod encoder;
pub mod eval;
pub mod evaluate;
pub mod get;
pub mod index;
pub mod index_io;
pub mod info;
pub mod mine;
pub mod model_args;
pub mod search;
pub mod train;
