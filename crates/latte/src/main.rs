//! The `latte` command-line tool.

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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LATTE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Encode(a) => commands::encode::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Eval(args) => commands::eval::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
