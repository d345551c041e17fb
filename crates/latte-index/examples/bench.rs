//! Index benchmark (see BENCHMARKS.md). Not part of CI.
//!
//! ```text
//! bench truth  DOCS.npz QUERIES.npz TRUTH.txt [--nq N] [--k K]   exact top-K (10) per query (ground truth)
//! bench build  DOCS.npz IDS.txt DIR [--nbits N] [--centroids K] [--ppc P] [--pool F] [--no-full]
//! bench search DIR QUERIES.npz TRUTH.txt [--nq N] [--k K] [--probe P] [--thr T] [--ndocs N]
//!                                        [--resid N] [--rerank N] [--margin M|-1] [--no-full] [--exact]
//!
//! Synthetic corpus (SyntheticSource, generated on the fly; the same --docs/--tokens/--topics/--seed must be
//! given to every command of a run, and so must --rank/--spread/--noise/--iso when changed from the defaults):
//! bench synth-build  DIR --docs N [--tokens T] [--topics N] [--seed S] [--nbits 2] [--centroids K]
//!                        [--probe P] [--ppc P] [--no-full]
//! bench synth-truth  OUT.txt --docs N --queries Q [--tokens T] [--topics N] [--seed S]
//! bench synth-search DIR TRUTH.txt --docs N --queries Q [search flags as above]
//!
//! Filtered search on an index with a document store whose metadata has an integer field (default `bucket`,
//! uniform in 0..1000): for each selectivity (per mille), the filter `{FIELD: {"$lt": S}}`; recall@k of
//! `search_filtered` against exact MaxSim over the matching documents, and single-query p50/p95 (the filter's
//! matching ids kept by the index after its first use; the store scan of that first use is printed beside):
//! bench filtered DIR QUERIES.npz [--nq N] [--k K] [--field bucket] [--per-mille 1,10,100,500]
//!
//! Two-level vs brute-force nearest-centroid assignment (centroids trained on a sample of the corpus):
//! bench assign (DOCS.npz | --synth N) [--centroids K] [--probe P] [--ppc P] [--iters I] [--test T] [--skip-brute]
//!                        [--two-level-min K]
//! ```
//! `--probe` is the IVF probe for searches and the assignment probe (`assign_probe`) for builds and `assign`.
//! Set the thread count with `RAYON_NUM_THREADS`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latte_index::kmeans::{self, Assigner};
use latte_index::{
    DocumentSource, EmbRef, ExactIndex, Hit, IndexConfig, NpzSource, PlaidIndex, SearchParams,
    SynthConfig, SyntheticSource,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

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
            let truth = read_truth(&args[3]);
            let refs: Vec<EmbRef> = qs
                .iter()
                .map(|(q, d)| EmbRef::new(q, *d).unwrap())
                .collect();
            measure_search(&index, &refs, &truth, &args);
        }
        "synth-build" => synth_build(&args),
        "synth-truth" => synth_truth(&args),
        "synth-search" => {
            let index = PlaidIndex::open(&args[1]).unwrap();
            let truth = read_truth(&args[2]);
            let src = synth_source(&args);
            let nq: usize = flag(&args, "--queries").unwrap_or(truth.len());
            let qs: Vec<Vec<f32>> = (0..nq).map(|q| src.query(q, QUERY_TOKENS).0).collect();
            let dim = src.config().dim;
            let refs: Vec<EmbRef> = qs.iter().map(|q| EmbRef::new(q, dim).unwrap()).collect();
            measure_search(&index, &refs, &truth, &args);
        }
        "assign" => assign_bench(&args),
        "filtered" => filtered_bench(&args, nq),
        other => panic!("unknown command {other}"),
    }
}

/// Query length of the synthetic benchmarks.
const QUERY_TOKENS: usize = 32;

fn read_truth(path: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}

/// Recall@k against `truth`, single-query latencies (after a warm-up), batched throughput and peak RSS.
fn measure_search(index: &PlaidIndex, refs: &[EmbRef], truth: &[Vec<String>], args: &[String]) {
    let k: usize = flag(args, "--k").unwrap_or(10);
    let mut p = SearchParams::for_k(k);
    if let Some(v) = flag(args, "--probe") {
        p.n_ivf_probe = v;
    }
    if let Some(v) = flag::<f32>(args, "--thr") {
        p.centroid_score_threshold = if v < 0.0 { None } else { Some(v) };
    }
    if let Some(v) = flag(args, "--ndocs") {
        p.ndocs = v;
    }
    if let Some(v) = flag(args, "--resid") {
        p.n_residual = v;
    }
    if args.iter().any(|a| a == "--no-full") {
        p.full_precision_rerank = false;
    }
    if let Some(v) = flag::<f32>(args, "--margin") {
        p.token_margin = if v < 0.0 { None } else { Some(v) };
    }
    if let Some(v) = flag(args, "--rerank") {
        p.n_rerank = v;
    }
    let exact = args.iter().any(|a| a == "--exact");
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
        recall += hits.iter().filter(|h| want.contains(&h.id)).count() as f64 / want.len() as f64;
    }
    let cpu_ms = (cpu_secs() - cpu0) * 1e3 / n as f64;
    lat.sort_by(f64::total_cmp);
    let t = Instant::now();
    let _ = index.search_batch(&refs[..n], &p, None).unwrap();
    let qps = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "search: {n} queries threads={} {:?} recall@{k} {:.4} p50 {:.2} ms p95 {:.2} ms cpu {:.2} ms/query batched {:.0} q/s peak_rss {:.0} MB",
        rayon::current_num_threads(),
        p,
        recall / n as f64,
        lat[n / 2],
        lat[n * 95 / 100],
        cpu_ms,
        qps,
        peak_rss_mb()
    );
}

fn synth_source(args: &[String]) -> SyntheticSource {
    let d = SynthConfig::default();
    SyntheticSource::new(SynthConfig {
        docs: flag(args, "--docs").expect("--docs N"),
        mean_tokens: flag(args, "--tokens").unwrap_or(d.mean_tokens),
        topics: flag(args, "--topics").unwrap_or(d.topics),
        seed: flag(args, "--seed").unwrap_or(d.seed),
        topic_rank: flag(args, "--rank").unwrap_or(d.topic_rank),
        doc_spread: flag(args, "--spread").unwrap_or(d.doc_spread),
        token_noise: flag(args, "--noise").unwrap_or(d.token_noise),
        iso_noise: flag(args, "--iso").unwrap_or(d.iso_noise),
        ..d
    })
    .unwrap()
}

/// Builds an index of the synthetic corpus. Phases are timed from outside by watching the files appear: the
/// codec is written when training (sample, k-means, codec) ends, the chunk's document file when encoding ends,
/// the metadata when the inverted lists are written and the index committed.
fn synth_build(args: &[String]) {
    let dir = args[1].clone();
    let src = synth_source(args);
    let config = IndexConfig {
        nbits: flag(args, "--nbits").unwrap_or(2),
        num_centroids: flag(args, "--centroids"),
        kmeans_points_per_centroid: flag(args, "--ppc")
            .unwrap_or(IndexConfig::default().kmeans_points_per_centroid),
        store_full: !args.iter().any(|a| a == "--no-full"),
        assign_probe: flag(args, "--probe"),
        ..IndexConfig::default()
    };
    let _ = std::fs::remove_dir_all(&dir);
    let done = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let watcher = {
        let (dir, done) = (dir.clone(), done.clone());
        std::thread::spawn(move || {
            let marks = ["codec.lt", "c0.docs.lt", "meta.lt"];
            let mut seen = [None; 3];
            while !done.load(Ordering::Relaxed) {
                for (m, s) in marks.iter().zip(seen.iter_mut()) {
                    let p = Path::new(&dir).join(m);
                    if s.is_none() && (p.exists() || p.with_extension("lt.tmp").exists()) {
                        *s = Some(t.elapsed().as_secs_f64());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    let r = PlaidIndex::create(&dir, &src, &config).unwrap();
    let secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    let rss_build = peak_rss_mb();
    let info = PlaidIndex::open(&dir).unwrap().info();
    let (tr, enc) = (seen[0].unwrap_or(0.0), seen[1].unwrap_or(secs));
    println!(
        "synth-build: {secs:.1}s (train {tr:.1}s, encode {:.1}s, ivf+commit {:.1}s) peak_rss {rss_build:.0} MB, {} docs {} tokens K={} nbits={} assign_probe={:?} outliers {:.3}; disk {:.1} B/token, resident {:.1} B/token, threads={}",
        enc - tr,
        secs - enc,
        r.documents,
        r.tokens,
        r.num_centroids,
        config.nbits,
        config.assign_probe,
        r.outlier_fraction,
        info.disk_bytes as f64 / info.tokens as f64,
        info.resident_bytes as f64 / info.tokens as f64,
        rayon::current_num_threads(),
    );
}

/// Exact top-10 (brute-force MaxSim) of the synthetic queries over the synthetic corpus, streamed in parallel
/// blocks of documents (the corpus is never held whole). One line of document ids per query.
fn synth_truth(args: &[String]) {
    let out = &args[1];
    let src = synth_source(args);
    let nq: usize = flag(args, "--queries").expect("--queries Q");
    let dim = src.config().dim;
    let qs: Vec<(Vec<f32>, usize)> = (0..nq).map(|q| src.query(q, QUERY_TOKENS)).collect();
    let n = src.len();
    const BLOCK: usize = 256;
    const K: usize = 10;
    let t = Instant::now();
    let merge = |mut a: Vec<Vec<(f32, usize)>>, b: Vec<Vec<(f32, usize)>>| {
        for (x, y) in a.iter_mut().zip(b) {
            x.extend(y);
            x.sort_by(|p, q| q.0.total_cmp(&p.0).then(p.1.cmp(&q.1)));
            x.truncate(K);
        }
        a
    };
    let best = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut ex = ExactIndex::new(dim).unwrap();
            for d in b * BLOCK..((b + 1) * BLOCK).min(n) {
                ex.add(d.to_string(), EmbRef::new(&src.document(d), dim).unwrap())
                    .unwrap();
            }
            qs.iter()
                .map(|(q, _)| {
                    let hits: Vec<Hit> = ex.search(EmbRef::new(q, dim).unwrap(), K).unwrap();
                    hits.into_iter()
                        .map(|h| (h.score, h.id.parse::<usize>().unwrap()))
                        .collect()
                })
                .collect::<Vec<Vec<(f32, usize)>>>()
        })
        .reduce(|| vec![Vec::new(); nq], merge);
    let own_top1 = best
        .iter()
        .zip(&qs)
        .filter(|(b, (_, d))| b.first().map(|x| x.1) == Some(*d))
        .count();
    let lines: Vec<String> = best
        .iter()
        .map(|b| {
            b.iter()
                .map(|x| x.1.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
    println!(
        "synth-truth: {nq} queries over {n} docs in {:.1}s; source document ranked first for {own_top1}/{nq}; peak_rss {:.0} MB",
        t.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
}

/// Two-level assignment against brute force: centroids trained (k-means with the two-level assignment) on a
/// sample of the corpus, then a disjoint sample of tokens assigned both ways.
fn assign_bench(args: &[String]) {
    let src: Box<dyn DocumentSource> = match flag::<usize>(args, "--synth") {
        Some(docs) => {
            let mut a = args.to_vec();
            a.extend(["--docs".to_string(), docs.to_string()]);
            Box::new(synth_source(&a))
        }
        None => Box::new(NpzSource::open(&args[1]).expect("DOCS.npz")),
    };
    let n = src.len();
    let dim = src.dim();
    let probe: usize = flag(args, "--probe").unwrap_or(kmeans::DEFAULT_PROBE);
    let ppc: usize = flag(args, "--ppc").unwrap_or(32);
    let iters: usize = flag(args, "--iters").unwrap_or(4);
    let n_test: usize = flag(args, "--test").unwrap_or(100_000);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let probe_docs = &order[..n.min(512)];
    let avg = probe_docs
        .iter()
        .map(|&i| src.embeddings(i).unwrap().len() / dim)
        .sum::<usize>() as f64
        / probe_docs.len() as f64;
    let est = avg * n as f64;
    let k: usize =
        flag(args, "--centroids").unwrap_or(1usize << (16.0 * est.sqrt()).log2().floor() as u32);
    let want_train = k * ppc;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let t = Instant::now();
    for chunk in order.chunks(1024) {
        if test.len() >= n_test * dim {
            break;
        }
        let docs: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|&i| src.embeddings(i).unwrap().into_owned())
            .collect();
        for d in docs {
            if train.len() < want_train * dim {
                train.extend_from_slice(&d);
            } else if test.len() < n_test * dim {
                test.extend_from_slice(&d);
            }
        }
    }
    train.truncate(want_train * dim);
    test.truncate(n_test * dim);
    let (n_train, n_test) = (train.len() / dim, test.len() / dim);
    assert!(n_test > 0, "not enough tokens for a test sample");
    eprintln!(
        "~{est:.0} tokens; K={k}; {n_train} training and {n_test} test tokens read in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let min_k: usize = flag(args, "--two-level-min").unwrap_or(kmeans::TWO_LEVEL_MIN_CENTROIDS);
    let centroids =
        kmeans::train_with_min_centroids(&train, dim, k.min(n_train), iters, 42, probe, min_k);
    let train_s = t.elapsed().as_secs_f64();
    drop(train);
    let k = centroids.len() / dim;
    let t = Instant::now();
    let assigner = Assigner::with_min_centroids(&centroids, dim, probe, min_k);
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let two = assigner.assign(&test);
    let two_s = t.elapsed().as_secs_f64();
    if args.iter().any(|a| a == "--skip-brute") {
        println!(
            "assign: K={k} groups={:?} probe={probe} dim={dim} threads={}: two-level {:.0} tok/s (groups built in {build_s:.1}s); k-means {iters} iters on {n_train} tokens {train_s:.1}s; peak_rss {:.0} MB",
            assigner.groups(),
            rayon::current_num_threads(),
            n_test as f64 / two_s,
            peak_rss_mb()
        );
        return;
    }
    let t = Instant::now();
    let brute = kmeans::assign(&test, &centroids, dim);
    let brute_s = t.elapsed().as_secs_f64();
    let agree = two.iter().zip(&brute).filter(|(a, b)| a == b).count() as f64 / n_test as f64;
    let dot = |i: usize, c: u32| -> f32 {
        let c = c as usize;
        test[i * dim..(i + 1) * dim]
            .iter()
            .zip(&centroids[c * dim..(c + 1) * dim])
            .map(|(a, b)| a * b)
            .sum()
    };
    let loss: f64 = (0..n_test)
        .map(|i| (dot(i, brute[i]) - dot(i, two[i])) as f64)
        .sum::<f64>()
        / n_test as f64;
    let best_mean: f64 = (0..n_test).map(|i| dot(i, brute[i]) as f64).sum::<f64>() / n_test as f64;
    println!(
        "assign: K={k} groups={:?} probe={probe} dim={dim} threads={}: agreement {agree:.4} (mean best score {best_mean:.4}, mean loss {loss:.5}); brute {:.0} tok/s, two-level {:.0} tok/s ({:.1}x; groups built in {build_s:.1}s); k-means {iters} iters on {n_train} tokens {train_s:.1}s; peak_rss {:.0} MB",
        assigner.groups(),
        rayon::current_num_threads(),
        n_test as f64 / brute_s,
        n_test as f64 / two_s,
        brute_s / two_s,
        peak_rss_mb()
    );
}

/// `bench filtered`: recall and latency of filtered search at several selectivities (see the header).
fn filtered_bench(args: &[String], nq: usize) {
    let index = PlaidIndex::open(&args[1]).unwrap();
    let store = index.open_store().unwrap();
    let qs = load_queries(&args[2], nq);
    let refs: Vec<EmbRef> = qs
        .iter()
        .map(|(q, d)| EmbRef::new(q, *d).unwrap())
        .collect();
    let k: usize = flag(args, "--k").unwrap_or(10);
    let field: String = flag(args, "--field").unwrap_or_else(|| "bucket".to_string());
    let levels: String = flag(args, "--per-mille").unwrap_or_else(|| "1,10,100,500".to_string());
    let p = SearchParams::for_k(k);
    let total = store.count().unwrap() as f64;
    for q in refs.iter().take(20) {
        let _ = index.search(*q, &p, None).unwrap();
    }
    for level in levels.split(',') {
        let level: u32 = level.parse().expect("--per-mille: integers");
        let filter =
            latte_store::Filter::parse(&serde_json::json!({ field.as_str(): { "$lt": level } }))
                .unwrap();
        // The filter's evaluation in the store (a scan), as the first search with a new filter pays it; the
        // searches below find its answer kept by the index for this generation (`PlaidIndex::ids_matching`).
        let t = Instant::now();
        let matching = store.ids_matching(&filter).unwrap();
        let scan_ms = t.elapsed().as_secs_f64() * 1e3;
        let (mut found, mut wanted) = (0usize, 0usize);
        let mut lat = Vec::with_capacity(refs.len());
        let mut exact_lat = Vec::with_capacity(refs.len());
        for q in &refs {
            let t = Instant::now();
            let hits = index.search_filtered(*q, &p, &store, &filter).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let exact = index.search_exact(*q, k, Some(&matching)).unwrap();
            exact_lat.push(t.elapsed().as_secs_f64() * 1e3);
            let got: std::collections::HashSet<&str> = hits.iter().map(|h| h.id.as_str()).collect();
            wanted += exact.len();
            found += exact.iter().filter(|h| got.contains(h.id.as_str())).count();
        }
        lat.sort_by(f64::total_cmp);
        exact_lat.sort_by(f64::total_cmp);
        let n = lat.len();
        println!(
            "filtered: {field} < {level} ({} matching, {:.2} %), {n} queries threads={}: recall@{k} {:.4} p50 {:.2} ms p95 {:.2} ms (filter evaluated once in the store: {scan_ms:.2} ms); exact over the matching set p50 {:.2} ms",
            matching.len(),
            100.0 * matching.len() as f64 / total,
            rayon::current_num_threads(),
            found as f64 / wanted.max(1) as f64,
            lat[n / 2],
            lat[n * 95 / 100],
            exact_lat[n / 2],
        );
    }
}
