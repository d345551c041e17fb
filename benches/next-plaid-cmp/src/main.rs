//! Runs the `next-plaid` crate (1.8.5, default features: pure ndarray, no BLAS) on the same
//! `.npz` embeddings and ground truth as latte's index benchmark, so both can be measured in
//! one run. See README.md for the commands and what every flag means.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ndarray::Array2;
use ndarray_npy::NpzReader;
use next_plaid::index::create_index_with_kmeans_files;
use next_plaid::{IndexConfig, MmapIndex, SearchParameters};

const USAGE: &str = "usage:
  next-plaid-cmp build DOCS.npz OUT_DIR [--nbits 2|4]
  next-plaid-cmp search OUT_DIR QUERIES.npz TRUTH.txt [--nq 500] [--k 10] [--probe N]
      [--full N] [--threshold X|none] [--no-rescore] [--float-rescore]";

/// Number of queries searched (untimed) before the timed loop.
const WARMUP: usize = 20;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (pos, flags) = parse_args(&args)?;
    match pos.first().map(String::as_str) {
        Some("build") if pos.len() == 3 => build(&pos[1], &pos[2], &flags),
        Some("search") if pos.len() == 4 => search(&pos[1], &pos[2], &pos[3], &flags),
        _ => bail!("{USAGE}"),
    }
}

/// Command-line flags: `--name value`, or `--name` alone (stored as "") for switches.
type Flags = HashMap<String, String>;

const SWITCHES: [&str; 2] = ["no-rescore", "float-rescore"];

fn parse_args(args: &[String]) -> Result<(Vec<String>, Flags)> {
    let (mut pos, mut flags) = (Vec::new(), Flags::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(name) if SWITCHES.contains(&name) => {
                flags.insert(name.to_string(), String::new());
            }
            Some(name) => {
                let v = it
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                flags.insert(name.to_string(), v.clone());
            }
            None => pos.push(a.clone()),
        }
    }
    Ok((pos, flags))
}

/// The value of `--name`, parsed, or `default` when absent.
fn flag<T: std::str::FromStr>(flags: &Flags, name: &str, default: T) -> Result<T> {
    match flags.get(name) {
        None => Ok(default),
        Some(v) => v.parse().ok().with_context(|| format!("bad --{name} {v}")),
    }
}

/// Reads every `arr_i` (tokens × dim, float32) of an `.npz`, in index order.
fn read_npz(path: &str) -> Result<Vec<Array2<f32>>> {
    let mut npz = NpzReader::new(File::open(path).with_context(|| path.to_string())?)?;
    let n = npz
        .names()?
        .iter()
        .filter(|s| s.starts_with("arr_"))
        .count();
    (0..n)
        .map(|i| Ok(npz.by_name(&format!("arr_{i}"))?))
        .collect()
}

/// Peak resident set size (VmHWM) of this process, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kb / 1024.0
}

/// CPU time (user + system, all threads) this process has used so far, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" closing the command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / ticks
}

/// (total bytes, bytes of the `merged_*` files that `MmapIndex::load` writes) in `dir`.
fn dir_bytes(dir: &str) -> Result<(u64, u64)> {
    let (mut total, mut merged) = (0, 0);
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let len = e.metadata()?.len();
        total += len;
        if e.file_name().to_string_lossy().starts_with("merged_") {
            merged += len;
        }
    }
    Ok((total, merged))
}

fn build(docs_path: &str, out_dir: &str, flags: &Flags) -> Result<()> {
    let nbits: usize = flag(flags, "nbits", 4)?;
    ensure!(nbits == 2 || nbits == 4, "--nbits must be 2 or 4");
    ensure!(
        !Path::new(out_dir).exists(),
        "{out_dir} exists; remove it first (next-plaid would update it, not rebuild)"
    );

    // next-plaid takes the whole collection in memory as one Array2 per document.
    let t = Instant::now();
    let docs = read_npz(docs_path)?;
    let tokens: usize = docs.iter().map(|d| d.nrows()).sum();
    println!(
        "read {} docs, {tokens} tokens, dim {} in {:.1} s",
        docs.len(),
        docs[0].ncols(),
        t.elapsed().as_secs_f64()
    );

    // Defaults apart from nbits. Document ids are the positions in `docs`.
    let config = IndexConfig {
        nbits,
        ..Default::default()
    };
    let t = Instant::now();
    let meta = create_index_with_kmeans_files(&docs, out_dir, &config)?;
    let build_s = t.elapsed().as_secs_f64();
    drop(docs);

    // The first load merges the per-chunk files into `merged_*` copies and writes the
    // inverse-norm sidecar; time it apart from the build.
    let t = Instant::now();
    let index = MmapIndex::load(out_dir)?;
    let load_s = t.elapsed().as_secs_f64();
    ensure!(index.num_documents() == meta.num_documents);

    let (total, merged) = dir_bytes(out_dir)?;
    println!(
        "nbits {nbits}  partitions {}  build {build_s:.1} s  first load {load_s:.1} s  \
         threads {}  peak RSS {:.0} MiB",
        meta.num_partitions,
        rayon::current_num_threads(),
        peak_rss_mib()
    );
    println!(
        "size {:.2} B/token in all, {:.2} B/token without the merged_* copies ({total} bytes)",
        total as f64 / tokens as f64,
        (total - merged) as f64 / tokens as f64,
    );
    Ok(())
}

/// Line i: the true top-10 document positions of query i.
fn read_truth(path: &str) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_string())?;
    text.lines()
        .map(|l| {
            Ok(l.split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()?)
        })
        .collect()
}

/// Fraction of `truth` found among the first 10 of `got`.
fn recall10(got: &[i64], truth: &[i64]) -> f64 {
    let top = &got[..got.len().min(10)];
    truth.iter().filter(|t| top.contains(t)).count() as f64 / truth.len() as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn search(index_dir: &str, queries_path: &str, truth_path: &str, flags: &Flags) -> Result<()> {
    if flags.contains_key("float-rescore") {
        // Undocumented next-plaid switch, read on every search: re-score by decompressing
        // documents to f32 instead of the default int8-query × residual-LUT kernel.
        // Set before any search thread exists.
        std::env::set_var("NEXT_PLAID_FLOAT_RESCORE", "1");
    }
    let defaults = SearchParameters::default();
    let top_k = flag(flags, "k", defaults.top_k)?;
    let mut params = SearchParameters {
        top_k,
        n_ivf_probe: flag(flags, "probe", defaults.n_ivf_probe)?,
        n_full_scores: flag(flags, "full", defaults.n_full_scores)?,
        ..defaults
    };
    if flags.contains_key("no-rescore") {
        // next-plaid always re-scores max(n_full_scores / 4, top_k) documents exactly; with
        // n_full_scores = top_k that is only the approximate top k, so the result set (and
        // recall) is that of the centroid-only approximate scores.
        params.n_full_scores = top_k;
    }
    params.centroid_score_threshold = match flags.get("threshold").map(String::as_str) {
        None => params.centroid_score_threshold,
        Some("none") => None,
        Some(v) => Some(v.parse().context("bad --threshold")?),
    };
    let nq: usize = flag(flags, "nq", 500)?;

    let t = Instant::now();
    let index = MmapIndex::load(index_dir)?;
    let load_s = t.elapsed().as_secs_f64();
    let queries = read_npz(queries_path)?;
    let truth = read_truth(truth_path)?;
    ensure!(
        nq <= queries.len() && nq <= truth.len(),
        "--nq {nq} exceeds the {} queries / {} truth lines",
        queries.len(),
        truth.len()
    );
    println!(
        "index: {} docs, {} tokens, {} partitions, nbits {}; loaded in {load_s:.2} s",
        index.num_documents(),
        index.num_embeddings(),
        index.num_partitions(),
        index.metadata.nbits
    );
    println!(
        "params: top_k {} n_ivf_probe {} n_full_scores {} (exact re-score of {}) \
         centroid_score_threshold {:?} float_rescore {}",
        params.top_k,
        params.n_ivf_probe,
        params.n_full_scores,
        (params.n_full_scores / 4).max(params.top_k),
        params.centroid_score_threshold,
        flags.contains_key("float-rescore")
    );

    for q in queries.iter().take(WARMUP) {
        index.search(q, &params, None)?;
    }

    // Each query alone; next-plaid parallelises inside one query over candidates.
    let mut ms = Vec::with_capacity(nq);
    let mut recall = 0.0;
    let cpu0 = cpu_seconds();
    for (q, truth) in queries.iter().zip(&truth).take(nq) {
        let t = Instant::now();
        let r = index.search(q, &params, None)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        recall += recall10(&r.passage_ids, truth);
    }
    let cpu_ms = (cpu_seconds() - cpu0) * 1e3 / nq as f64;
    ms.sort_by(f64::total_cmp);
    println!(
        "single: {nq} queries  p50 {:.2} ms  p95 {:.2} ms  mean {:.2} ms  CPU {cpu_ms:.2} ms/query  \
         recall@10 {:.4}",
        percentile(&ms, 0.5),
        percentile(&ms, 0.95),
        ms.iter().sum::<f64>() / nq as f64,
        recall / nq as f64
    );

    // All queries in one call, parallel over queries.
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let results = index.search_batch(&queries, &params, true, None)?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_ms = (cpu_seconds() - cpu0) * 1e3 / queries.len() as f64;
    let batch_recall: f64 = results
        .iter()
        .zip(&truth)
        .take(nq)
        .map(|(r, t)| recall10(&r.passage_ids, t))
        .sum::<f64>()
        / nq as f64;
    println!(
        "batch: {} queries in {secs:.2} s  {:.1} queries/s  CPU {cpu_ms:.2} ms/query  \
         recall@10 (first {nq}) {batch_recall:.4}",
        queries.len(),
        queries.len() as f64 / secs
    );
    println!(
        "threads {}  peak RSS {:.0} MiB",
        rayon::current_num_threads(),
        peak_rss_mib()
    );
    Ok(())
}
