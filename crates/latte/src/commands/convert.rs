//! `latte convert`: load any supported model and write it as a PyLate folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::model_args::ModelArgs;

/// Convert a model (stanford-nlp checkpoint, sentence-transformers folder, base encoder …) to a PyLate folder.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (replaced atomically if it exists).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let model = args.model.load()?;
    model
        .save(&args.output)
        .with_context(|| format!("saving to {}", args.output.display()))?;
    eprintln!("{model}\nsaved to {}", args.output.display());
    Ok(())
}
