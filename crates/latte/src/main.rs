//! The `latte` command-line tool.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(
    name = "latte",
    version,
    about = "Late-interaction (ColBERT) retrieval in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode queries or documents into per-token embeddings (.npz).
    Encode(commands::encode::EncodeArgs),
    /// Write any supported model as a PyLate folder.
    Convert(commands::convert::ConvertArgs),
    /// Evaluate a TREC run against qrels (nDCG, MRR, recall, ... as ranx computes them).
    Eval(commands::eval::Args),
    /// Encode a BEIR dataset, index it, search it and report IR metrics, in one command.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Index a corpus or precomputed embeddings (adds to an existing index).
    Index(commands::index::IndexArgs),
    /// Search an index and write a TREC run.
    Search(commands::search::SearchArgs),
    /// Delete documents by id.
    Delete(commands::delete::DeleteArgs),
    /// Print stored documents (text and metadata) by id, as JSONL.
    Get(commands::get::GetArgs),
    /// Show what an index holds: model, dimension, counts, bytes on disk, format version.
    Info(commands::info::InfoArgs),
    /// Fine-tune a model with PyLate's losses (contrastive, cached-contrastive, distillation).
    Train(Box<commands::train::TrainArgs>),
    /// Mine hard negatives from a BEIR folder into training triplets (JSONL).
    Mine(commands::mine::MineArgs),
}

fn main() -> ExitCode {
    latte_kernels::alloc::keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LATTE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Train(_)) && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        // candle runs element-wise ops on its own spin-waiting thread pool; in training those ops are
        // short and many, and on a busy machine the spinning costs more than it saves (the heavy ops
        // run on rayon). Set before the first tensor op, while no other thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let result: anyhow::Result<()> = match cli.command {
        Command::Encode(a) => commands::encode::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Eval(args) => commands::eval::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Index(args) => commands::index::run(args),
        Command::Search(args) => commands::search::run(args),
        Command::Delete(args) => commands::delete::run(args),
        Command::Get(args) => commands::get::run(args),
        Command::Info(args) => commands::info::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::Mine(args) => commands::mine::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (unique argument names across the flattened flag groups, …) for every
    /// subcommand.
    #[test]
    fn command_line_definition_is_valid() {
        super::Cli::command().debug_assert();
    }
}
