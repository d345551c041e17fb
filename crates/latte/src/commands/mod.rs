//! One module per subcommand.

pub mod convert;
pub mod encode;
pub mod model_args;
pub mod texts;
