//! `latte delete`: remove documents by id.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use latte_index::PlaidIndex;

use super::index_io::read_ids;

/// Delete documents from an index. Unknown ids are an error and nothing is deleted.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Index directory.
    #[arg(long)]
    pub index: PathBuf,
    /// Ids to delete, one per line.
    #[arg(long)]
    pub ids: PathBuf,
    /// Compact afterwards (reclaim the space of every deleted document now).
    #[arg(long)]
    pub compact: bool,
}

pub fn run(args: DeleteArgs) -> Result<()> {
    let ids = read_ids(&args.ids)?;
    let report = PlaidIndex::delete(&args.index, &ids)
        .with_context(|| format!("deleting from the index at {}", args.index.display()))?;
    if args.compact && !report.compacted {
        PlaidIndex::compact(&args.index)?;
    }
    eprintln!(
        "deleted {} documents, {} remain",
        report.deleted, report.remaining
    );
    Ok(())
}
