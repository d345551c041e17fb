//! A rough timing of the document store: `cargo run -p latte-store --example store_bench [N]`.
//! Synthetic documents (60 words from a 5,000-word vocabulary, three metadata fields) in a temporary file.
//!
//! One run (dev profile, SQLite built at opt-level 3, 2 shared CPU cores, 20,000 documents, 19.5 MB file):
//! upsert of all in one transaction 2.9 s; replacing 2,000 (with their undo rows) 0.15 s; a three-condition
//! filter over all documents 39 ms; BM25 top 10 for 4 terms 2.8 ms, 3.1 ms with that filter; `get` of 100
//! ids 0.9 ms; rolling the 2,000 replacements back 0.48 s.

use std::time::Instant;

use latte_store::{Doc, DocStore, Filter};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("latte-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("documents.sqlite");
    let mut store = DocStore::create(&path)?;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let docs: Vec<Doc> = (0..n)
        .map(|i| {
            let text: Vec<String> = (0..60).map(|_| format!("w{}", next() % 5000)).collect();
            let lang = ["en", "fr", "de", "rust"][i % 4];
            let meta = json!({"lang": lang, "year": 2000 + (i % 25),
                              "tags": [format!("t{}", i % 50), format!("t{}", i % 7)]});
            Doc::new(format!("doc{i:07}"))
                .with_title(format!("title w{}", i % 5000))
                .with_text(text.join(" "))
                .with_metadata(meta.as_object().cloned().unwrap_or_default())
        })
        .collect();
    let t = Instant::now();
    store.upsert(&docs, 1)?;
    println!(
        "upsert {n} new documents (one transaction): {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    store.upsert(&docs[..n / 10], 2)?;
    println!(
        "replace {} documents (with undo log): {:?}",
        n / 10,
        t.elapsed()
    );
    let filter: Filter =
        r#"{"lang": "rust", "year": {"$gte": 2010}, "tags": {"$in": ["t3", "t4"]}}"#.parse()?;
    let t = Instant::now();
    let ids = store.ids_matching(&filter)?;
    println!(
        "ids_matching (3 conditions): {} ids in {:?}",
        ids.len(),
        t.elapsed()
    );
    let t = Instant::now();
    let hits = store.bm25("w17 w256 w4000 w999", 10, None)?;
    println!(
        "bm25, 4 terms, k = 10: {} hits in {:?}",
        hits.len(),
        t.elapsed()
    );
    let t = Instant::now();
    let hits = store.bm25("w17 w256 w4000 w999", 10, Some(&filter))?;
    println!(
        "bm25 with the filter: {} hits in {:?}",
        hits.len(),
        t.elapsed()
    );
    let some: Vec<String> = (0..100)
        .map(|i| format!("doc{:07}", i * (n / 100)))
        .collect();
    let t = Instant::now();
    store.get(&some)?;
    println!("get 100 documents: {:?}", t.elapsed());
    let t = Instant::now();
    store.rollback_to(1)?;
    println!("rollback_to(1), {} rows: {:?}", n / 10, t.elapsed());
    drop(store);
    println!(
        "file size: {:.1} MB",
        std::fs::metadata(&path)?.len() as f64 / 1e6
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
