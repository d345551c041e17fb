//! One module per subcommand.

pub mod delete;
pub mod encoder;
pub mod index;
pub mod index_io;
pub mod search;
