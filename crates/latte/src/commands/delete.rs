//! `latte delete`: remove documents by id, or every document whose stored metadata matches a filter.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use latte_index::PlaidIndex;

use super::index_io::{read_filter, read_ids};

/// Delete documents from an index: by id (unknown ids are an error and nothing is deleted) or by a metadata
/// filter (every matching document; none matching deletes nothing).
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "filter", "filter_file"])))]
pub struct DeleteArgs {
    /// Index directory.
    #[arg(long)]
    pub index: PathBuf,
    /// Ids to delete, one per line.
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Delete every document whose stored metadata matches this filter (JSON, as `latte search --filter`,
    /// e.g. `{"source": "book"}`). Needs an index that stores metadata.
    #[arg(long)]
    pub filter: Option<String>,
    /// The `--filter` read from a file.
    #[arg(long)]
    pub filter_file: Option<PathBuf>,
    /// Compact afterwards (reclaim the space of every deleted document now).
    #[arg(long)]
    pub compact: bool,
}

pub fn run(args: DeleteArgs) -> Result<()> {
    let context = || format!("deleting from the index at {}", args.index.display());
    let filter = read_filter(args.filter.as_deref(), args.filter_file.as_deref())?;
    let report = match (filter, &args.ids) {
        (Some(filter), _) => {
            let mut writer = PlaidIndex::writer(&args.index).with_context(context)?;
            let report = writer.delete_matching(&filter).with_context(context)?;
            writer.commit().with_context(context)?;
            report
        }
        (None, Some(ids)) => {
            let ids = read_ids(ids)?;
            PlaidIndex::delete(&args.index, &ids).with_context(context)?
        }
        (None, None) => unreachable!("clap requires --ids, --filter or --filter-file"),
    };
    if args.compact && !report.compacted {
        PlaidIndex::compact(&args.index)?;
    }
    eprintln!(
        "deleted {} documents, {} remain",
        report.deleted, report.remaining
    );
    Ok(())
}
