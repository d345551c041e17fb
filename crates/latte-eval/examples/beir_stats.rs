//! Loads one split of a BEIR folder and prints its size and the load time.
//!
//! `cargo run --release -p latte-eval --example beir_stats -- <beir-folder> [split]`

use std::time::Instant;

fn main() -> Result<(), latte_eval::EvalError> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: beir_stats <beir-folder> [split]");
        std::process::exit(2);
    };
    let split = args.next().unwrap_or_else(|| "test".to_string());
    let start = Instant::now();
    let ds = latte_eval::BeirDataset::load(&dir, &split)?;
    let elapsed = start.elapsed();
    let chars: usize = ds.corpus.iter().map(|d| d.text.len()).sum();
    println!(
        "{dir} [{split}]: {} documents ({chars} bytes of text), {} queries, {} judgments over {} queries; loaded in {:.1} ms",
        ds.corpus.len(),
        ds.queries.len(),
        ds.qrels.num_judgments(),
        ds.qrels.len(),
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
