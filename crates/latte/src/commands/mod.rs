//! One module per subcommand.

pub mod convert;
pub mod encode;
pub mod eval;
pub mod model_args;
pub mod texts;
