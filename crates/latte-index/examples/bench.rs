//! Index benchmark (see BENCHMARKS.md). Not part of CI.
//!
//! ```text
//! bench truth  DOCS.npz QUERIES.npz TRUTH.txt [--nq N] [--k K]   exact top-K (10) per query (ground truth)
//! bench build  DOCS.npz IDS.txt DIR [--nbits N] [--centroids K] [--ppc P] [--pool F] [--no-full]
//! bench search DIR QUERIES.npz TRUTH.txt [--nq N] [--k K] [--probe P] [--thr T] [--ndocs N]
//!                                        [--resid N] [--rerank N] [--margin M|-1] [--no-full] [--exact]
//! ```
//! Set the thread count with `RAYON_NUM_THREADS`.

use std::time::Instant;

use latte_index::{
    DocumentSource, EmbRef, ExactIndex, IndexConfig, NpzSource, PlaidIndex, SearchParams,
};

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds used by this process so far (user + system, from /proc/self/stat).
fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

fn load_queries(path: &str, nq: usize) -> Vec<(Vec<f32>, usize)> {
    let src = NpzSource::open(path).expect("queries");
    (0..src.len().min(nq))
        .map(|i| (src.embeddings(i).unwrap().into_owned(), src.dim()))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nq: usize = flag(&args, "--nq").unwrap_or(usize::MAX);
    match args[0].as_str() {
        "truth" => {
            let docs = NpzSource::open(&args[1]).expect("docs");
            let mut ex = ExactIndex::new(docs.dim()).unwrap();
            for i in 0..docs.len() {
                ex.add(
                    i.to_string(),
                    EmbRef::new(&docs.embeddings(i).unwrap(), docs.dim()).unwrap(),
                )
                .unwrap();
            }
            let qs = load_queries(&args[2], nq);
            let t = Instant::now();
            let refs: Vec<EmbRef> = qs
                .iter()
                .map(|(q, d)| EmbRef::new(q, *d).unwrap())
                .collect();
            let hits = ex
                .search_batch(&refs, flag(&args, "--k").unwrap_or(10))
                .unwrap();
            eprintln!(
                "exact: {} queries in {:.1}s",
                qs.len(),
                t.elapsed().as_secs_f64()
            );
            let out: Vec<String> = hits
                .iter()
                .map(|h| h.iter().map(|x| x.id.clone()).collect::<Vec<_>>().join(" "))
                .collect();
            std::fs::write(&args[3], out.join("\n") + "\n").unwrap();
        }
        "build" => {
            let ids: Vec<String> = std::fs::read_to_string(&args[2])
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect();
            // Benchmarks use positions as ids so the ground truth file can refer to them.
            let ids: Vec<String> = (0..ids.len()).map(|i| i.to_string()).collect();
            let src = NpzSource::open(&args[1]).unwrap().with_ids(ids).unwrap();
            let config = IndexConfig {
                nbits: flag(&args, "--nbits").unwrap_or(2),
                num_centroids: flag(&args, "--centroids"),
                kmeans_points_per_centroid: flag(&args, "--ppc")
                    .unwrap_or(IndexConfig::default().kmeans_points_per_centroid),
                pool_factor: flag(&args, "--pool").unwrap_or(1),
                store_full: !args.iter().any(|a| a == "--no-full"),
                ..IndexConfig::default()
            };
            let _ = std::fs::remove_dir_all(&args[3]);
            let t = Instant::now();
            let r = PlaidIndex::create(&args[3], &src, &config).unwrap();
            let secs = t.elapsed().as_secs_f64();
            let info = PlaidIndex::open(&args[3]).unwrap().info();
            println!(
                "build: {secs:.1}s peak_rss {:.0} MB, {} docs {} tokens K={} nbits={} outliers {:.3}; disk {:.1} B/token, resident {:.1} B/token",
                peak_rss_mb(),
                r.documents,
                r.tokens,
                r.num_centroids,
                config.nbits,
                r.outlier_fraction,
                info.disk_bytes as f64 / info.tokens as f64,
                info.resident_bytes as f64 / info.tokens as f64
            );
        }
        "search" => {
            let index = PlaidIndex::open(&args[1]).unwrap();
            let qs = load_queries(&args[2], nq);
            let truth: Vec<Vec<String>> = std::fs::read_to_string(&args[3])
                .unwrap()
                .lines()
                .map(|l| l.split(' ').map(str::to_string).collect())
                .collect();
            let k: usize = flag(&args, "--k").unwrap_or(10);
            let mut p = SearchParams::for_k(k);
            if let Some(v) = flag(&args, "--probe") {
                p.n_ivf_probe = v;
            }
            if let Some(v) = flag::<f32>(&args, "--thr") {
                p.centroid_score_threshold = if v < 0.0 { None } else { Some(v) };
            }
            if let Some(v) = flag(&args, "--ndocs") {
                p.ndocs = v;
            }
            if let Some(v) = flag(&args, "--resid") {
                p.n_residual = v;
            }
            if args.iter().any(|a| a == "--no-full") {
                p.full_precision_rerank = false;
            }
            if let Some(v) = flag::<f32>(&args, "--margin") {
                p.token_margin = if v < 0.0 { None } else { Some(v) };
            }
            if let Some(v) = flag(&args, "--rerank") {
                p.n_rerank = v;
            }
            let exact = args.iter().any(|a| a == "--exact");
            let refs: Vec<EmbRef> = qs
                .iter()
                .map(|(q, d)| EmbRef::new(q, *d).unwrap())
                .collect();
            // Warm-up pass (page cache), then timed single-query latencies.
            for q in refs.iter().take(20) {
                let _ = index.search(*q, &p, None).unwrap();
            }
            let mut lat = Vec::new();
            let mut recall = 0.0;
            let cpu0 = cpu_secs();
            let n = refs.len().min(truth.len());
            for (i, q) in refs.iter().take(n).enumerate() {
                let t = Instant::now();
                let hits = if exact {
                    index.search_exact(*q, k, None).unwrap()
                } else {
                    index.search(*q, &p, None).unwrap()
                };
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                let want = &truth[i][..truth[i].len().min(k)];
                recall +=
                    hits.iter().filter(|h| want.contains(&h.id)).count() as f64 / want.len() as f64;
            }
            let cpu_ms = (cpu_secs() - cpu0) * 1e3 / refs.len().min(truth.len()) as f64;
            lat.sort_by(f64::total_cmp);
            let t = Instant::now();
            let _ = index.search_batch(&refs[..n], &p, None).unwrap();
            let qps = n as f64 / t.elapsed().as_secs_f64();
            println!(
                "search: {n} queries threads={} {:?} recall@{k} {:.4} p50 {:.2} ms p95 {:.2} ms cpu {:.2} ms/query batched {:.0} q/s",
                rayon::current_num_threads(),
                p,
                recall / n as f64,
                lat[n / 2],
                lat[n * 95 / 100],
                cpu_ms,
                qps
            );
        }
        other => panic!("unknown command {other}"),
    }
}
