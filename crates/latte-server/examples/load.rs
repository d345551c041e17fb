//! Load benchmark of `latte serve` on loopback: search by text and by embeddings with 1, 8 and 64 concurrent
//! clients (queries/s, p50/p95/p99, errors), beside the same searches through the library (one thread).
//!
//! ```sh
//! latte index --index data/rustbooks --model MODEL --corpus ../shared/data/rustbooks/corpus.jsonl
//! cargo run --release -p latte-server --example load -- --data data --index rustbooks \
//!     --queries ../shared/data/rustbooks/queries.jsonl --clients 1,8,64 --requests 2000 --seconds 30
//! ```
//!
//! The server runs in this process on 127.0.0.1 (port 0), with the default settings of `latte serve`; each
//! level stops after `--requests` requests or `--seconds`, whichever comes first. With `--rounds R`, the overhead
//! at one client is then measured R times in alternation (every query through the library, then over HTTP, by
//! text and by embeddings), and the median is printed: single runs drift by ±10 % on a shared host.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latte_index::{EmbRef, PlaidIndex, SearchParams};
use latte_models::{ColBERT, Embedding, EncodeOptions, ModelOptions};
use latte_server::{Config, Server};
use serde_json::{json, Value};

struct Args {
    data: PathBuf,
    index: String,
    queries: PathBuf,
    clients: Vec<usize>,
    requests: usize,
    seconds: u64,
    k: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        data: PathBuf::new(),
        index: String::new(),
        queries: PathBuf::new(),
        clients: vec![1, 8, 64],
        requests: 2000,
        seconds: 30,
        k: 10,
        rounds: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data" => a.data = value.into(),
            "--index" => a.index = value,
            "--queries" => a.queries = value.into(),
            "--clients" => {
                a.clients = value
                    .split(',')
                    .map(|c| c.parse().map_err(|e| format!("--clients {c}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--requests" => a.requests = value.parse().map_err(|e| format!("--requests: {e}"))?,
            "--seconds" => a.seconds = value.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--k" => a.k = value.parse().map_err(|e| format!("--k: {e}"))?,
            "--rounds" => a.rounds = value.parse().map_err(|e| format!("--rounds: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.index.is_empty() || a.queries.as_os_str().is_empty() || a.data.as_os_str().is_empty() {
        return Err("usage: load --data DIR --index NAME --queries FILE [--clients 1,8,64] [--requests N] [--seconds S] [--k K] [--rounds R]".into());
    }
    Ok(a)
}

/// Query texts: JSONL (`text`) or one per line.
fn read_queries(path: &PathBuf) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
            out.push(v["text"].as_str().unwrap_or_default().to_string());
        } else {
            out.push(line.to_string());
        }
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(label: &str, clients: usize, wall: Duration, mut lat: Vec<f64>, errors: usize) {
    lat.sort_by(f64::total_cmp);
    println!(
        "| {label} | {clients} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {errors} |",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.95),
        percentile(&lat, 0.99),
    );
}

/// `clients` tasks sending the bodies round-robin until `requests` or `seconds`.
async fn run_level(
    url: &str,
    bodies: Arc<Vec<String>>,
    clients: usize,
    requests: usize,
    seconds: u64,
) -> (Duration, Vec<f64>, usize) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, bodies, next) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() > deadline {
                    break;
                }
                let t = Instant::now();
                let ok = match client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await
                {
                    Ok(res) => res.status().is_success() && res.bytes().await.is_ok(),
                    Err(_) => false,
                };
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                if !ok {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    (start.elapsed(), lat, errors)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let queries = read_queries(&args.queries)?;
    let dir = args.data.join(&args.index);
    let index = PlaidIndex::open(&dir).map_err(|e| e.to_string())?;
    let model_name = index
        .model()
        .ok_or("the index records no model")?
        .to_string();
    let options = ModelOptions::from_json(index.model_options()).map_err(|e| e.to_string())?;
    let model = ColBERT::load(&model_name, &options.load_options(&Default::default()))
        .map_err(|e| e.to_string())?;
    let n = queries.len().min(args.requests);
    let qs = &queries[..n];

    // The library: encode one query and search it, one at a time (what one client asks of the server).
    let params = SearchParams::for_k(args.k);
    let opts = EncodeOptions {
        show_progress: Some(false),
        ..Default::default()
    };
    let encode_one = |q: &String| -> Result<_, String> {
        model
            .encode(std::slice::from_ref(q), true, &opts)
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| "the model returned no embedding".to_string())
    };
    let search_one = |e: &Embedding| -> Result<(), String> {
        let q = EmbRef::new(&e.data, e.cols).map_err(|e| e.to_string())?;
        index.search(q, &params, None).map_err(|e| e.to_string())?;
        Ok(())
    };
    let (mut lib_text, mut lib_emb, mut embs) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for q in qs {
        let t = Instant::now();
        let e = encode_one(q)?;
        let t_search = Instant::now();
        search_one(&e)?;
        lib_emb.push(t_search.elapsed().as_secs_f64() * 1e3);
        lib_text.push(t.elapsed().as_secs_f64() * 1e3);
        embs.push(e);
    }
    let lib_wall = start.elapsed();
    let emb_wall: f64 = lib_emb.iter().sum::<f64>() / 1e3;

    let config = Config {
        data: args.data.clone(),
        ..Config::default()
    };
    let server = Server::bind(config, "127.0.0.1:0".parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}/indexes/{}/search",
        server.local_addr(),
        args.index
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    // Bodies are serialised once, before the clock starts: a real client runs in its own process, so its JSON
    // work is not billed to the server here (the client still runs in this process and shares its cores).
    let text_bodies: Arc<Vec<String>> = Arc::new(
        qs.iter()
            .map(|q| json!({"queries": [q], "k": args.k}).to_string())
            .collect(),
    );
    let emb_bodies: Arc<Vec<String>> = Arc::new(
        embs.iter()
            .map(|e| {
                let rows: Vec<&[f32]> = (0..e.rows).map(|i| e.row(i)).collect();
                json!({"query_embeddings": [rows], "k": args.k}).to_string()
            })
            .collect(),
    );
    println!("model {model_name}, {n} queries, k = {}", args.k);
    println!("| mode | clients | requests | queries/s | p50 ms | p95 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    report("library, text (encode + search)", 1, lib_wall, lib_text, 0);
    report(
        "library, embeddings (search)",
        1,
        Duration::from_secs_f64(emb_wall),
        lib_emb,
        0,
    );
    for (label, bodies) in [
        ("HTTP, text", &text_bodies),
        ("HTTP, embeddings", &emb_bodies),
    ] {
        for &c in &args.clients {
            let (wall, lat, errors) = run_level(&url, bodies.clone(), c, n, args.seconds).await;
            report(label, c, wall, lat, errors);
        }
    }
    // The overhead at one client, measured in alternation (library, HTTP, library, HTTP, ...) so that the
    // host's drift between the two falls on both sides; each pass sends every query once, one at a time.
    if args.rounds > 0 {
        println!();
        println!("| round | library text q/s | HTTP text q/s | overhead | library embeddings q/s | HTTP embeddings q/s | overhead |");
        println!("|---|---|---|---|---|---|---|");
        let (mut over_text, mut over_emb) = (Vec::new(), Vec::new());
        for r in 1..=args.rounds {
            let t = Instant::now();
            for q in qs {
                search_one(&encode_one(q)?)?;
            }
            let lib_t = n as f64 / t.elapsed().as_secs_f64();
            let (wall, _, errors) = run_level(&url, text_bodies.clone(), 1, n, 86_400).await;
            let http_t = n as f64 / wall.as_secs_f64();
            let t = Instant::now();
            for e in &embs {
                search_one(e)?;
            }
            let lib_e = n as f64 / t.elapsed().as_secs_f64();
            let (wall, _, errors_e) = run_level(&url, emb_bodies.clone(), 1, n, 86_400).await;
            let http_e = n as f64 / wall.as_secs_f64();
            if errors + errors_e > 0 {
                return Err(format!("round {r}: {} errors", errors + errors_e));
            }
            let (ot, oe) = (1.0 - http_t / lib_t, 1.0 - http_e / lib_e);
            over_text.push(ot);
            over_emb.push(oe);
            println!(
                "| {r} | {lib_t:.1} | {http_t:.1} | {:.1} % | {lib_e:.1} | {http_e:.1} | {:.1} % |",
                100.0 * ot,
                100.0 * oe
            );
        }
        over_text.sort_by(f64::total_cmp);
        over_emb.sort_by(f64::total_cmp);
        println!(
            "median overhead at 1 client over {} rounds: text {:.1} %, embeddings {:.1} %",
            args.rounds,
            100.0 * over_text[over_text.len() / 2],
            100.0 * over_emb[over_emb.len() / 2]
        );
    }
    let _ = stop.send(());
    handle
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
