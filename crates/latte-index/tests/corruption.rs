//! Fault injection on the files of a PLAID index: every file of a built index gets bytes flipped at several
//! offsets and is truncated or removed; each case must make `PlaidIndex::open` (or the first search) return an
//! error that names the file — never a panic, never silently different results. A second group forges a
//! `meta.lt` with a valid checksum but inconsistent contents (what a buggy writer could leave).
//!
//! Every case runs in-process under `catch_unwind`, so a panic is reported as a failure with the case's name.

mod fault;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use fault::{config, corpus, Docs, Rng, DIM};
use latte_index::{EmbRef, Hit, PlaidIndex, SearchParams};

/// Files in an index folder whose bytes do not matter to a reader, with the reason.
const EXEMPT: &[(&str, &str)] = &[
    (
        "LOCK",
        "the writer lock: readers never read it (it holds no index data, only who writes)",
    ),
    (
        "documents.sqlite",
        "latte-store's document store, checked by latte-store's own tests; PlaidIndex never reads it",
    ),
];

/// The file kinds FORMAT.md lists, by name pattern.
fn is_index_file(name: &str) -> bool {
    let chunk = name.strip_prefix('c').and_then(|r| r.split_once('.'));
    name == "meta.lt"
        || name == "codec.lt"
        || chunk.is_some_and(|(id, ext)| {
            id.parse::<u64>().is_ok() && ["docs.lt", "codes.lt", "res.lt", "f16.lt"].contains(&ext)
        })
        || name
            .strip_prefix("ivf.")
            .and_then(|r| r.strip_suffix(".lt"))
            .is_some_and(|g| g.parse::<u64>().is_ok())
}

/// An index with two chunks, deletions and a second IVF generation, so every kind of file is present.
fn build(dir: &Path) -> (Docs, Vec<Vec<f32>>) {
    let base = corpus(60, 11, "d");
    let more = corpus(20, 12, "e");
    PlaidIndex::create(dir, &base.source(), &config()).unwrap();
    PlaidIndex::add(dir, &more.source()).unwrap();
    PlaidIndex::delete(dir, &["d3".into(), "e5".into()]).unwrap();
    let mut all = base.clone();
    all.ids.extend(more.ids);
    all.embs.extend(more.embs);
    let queries = [0usize, 17, 42, 65, 79]
        .iter()
        .map(|&i| all.embs[i][..3 * DIM].to_vec())
        .collect();
    (all, queries)
}

/// Opens the index and runs every query through the PLAID pipeline and exhaustively; the first answer is a
/// pseudo-hit holding the live document count (`len` and `info`).
fn answers(dir: &Path, queries: &[Vec<f32>]) -> latte_index::Result<Vec<Vec<Hit>>> {
    let index = PlaidIndex::open(dir)?;
    let counts = Hit {
        id: format!("len {} info {}", index.len(), index.info().documents),
        score: 0.0,
    };
    let mut out = vec![vec![counts]];
    for q in queries {
        let q = EmbRef::new(q, index.dim())?;
        out.push(index.search(q, &SearchParams::for_k(5), None)?);
        out.push(index.search_exact(q, 5, None)?);
    }
    Ok(out)
}

/// What one case did, or `None` when it behaved.
fn judge(
    case: &str,
    name: &str,
    dir: &Path,
    queries: &[Vec<f32>],
    good: &[Vec<Hit>],
    accept_unchanged: bool,
) -> Option<String> {
    match catch_unwind(AssertUnwindSafe(|| answers(dir, queries))) {
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("{case}: PANIC {msg}"))
        }
        Ok(Err(e)) if e.to_string().contains(name) => None,
        Ok(Err(e)) => Some(format!("{case}: the error does not name {name}: {e}")),
        Ok(Ok(got)) if accept_unchanged && got == good => None,
        Ok(Ok(got)) if got == good => Some(format!(
            "{case}: accepted silently (same answers as the intact index)"
        )),
        Ok(Ok(_)) => Some(format!("{case}: accepted silently with DIFFERENT answers")),
    }
}

type Overwrite = fn(&mut Vec<u8>);

/// Corruptions today's code mishandles: none left (a payload length near `u64::MAX` is refused with
/// checked arithmetic).
const KNOWN_FILE_DEFECTS: &[&str] = &[];

#[test]
fn every_file_flipped_truncated_or_removed_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, queries) = build(tmp.path());
    corrupt_every_file(tmp.path(), &queries);
}

/// The same on a copy of the committed format-version-1 index (f32 centroids, u32 inverted lists).
#[test]
fn every_file_of_a_version_1_index_corrupted_is_an_error_naming_it() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/index_v1");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&fixture).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let dim = PlaidIndex::open(tmp.path()).unwrap().dim();
    let mut rng = Rng(99);
    let queries: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..2 * dim).map(|_| rng.sym()).collect())
        .collect();
    corrupt_every_file(tmp.path(), &queries);
}

/// Every corruption case on every file of the index in `dir` (restored after each case).
fn corrupt_every_file(dir: &Path, queries: &[Vec<f32>]) {
    let queries = queries.to_vec();
    let good = answers(dir, &queries).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !EXEMPT.iter().any(|(x, _)| n == x))
        .collect();
    names.sort();
    for n in &names {
        assert!(
            is_index_file(n),
            "{n}: a file FORMAT.md does not list; classify it here (or in EXEMPT with a reason)"
        );
    }
    for kind in [
        "meta.lt",
        "codec.lt",
        "ivf.",
        ".docs.lt",
        ".codes.lt",
        ".res.lt",
        ".f16.lt",
    ] {
        assert!(
            names.iter().any(|n| n.contains(kind)),
            "no {kind} file in {names:?}"
        );
    }

    let mut failures = Vec::new();
    let mut cases = 0;
    for name in &names {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        assert!(len >= 40, "{name} is {len} bytes");
        let payload_mid = 32 + (len - 40) / 2;
        // (what, offset): magic, version, kind, payload length, reserved header bytes, first payload byte,
        // middle of the payload, last payload byte, checksum, end marker.
        let flips = [
            ("magic", 0),
            ("version", 8),
            ("kind", 12),
            ("payload length", 16),
            ("reserved header byte", 24),
            ("first payload byte", 32),
            ("middle payload byte", payload_mid),
            ("last payload byte", len - 9),
            ("checksum", len - 8),
            ("last byte (end marker)", len - 1),
        ];
        for (what, at) in flips {
            let mut bad = bytes.clone();
            bad[at] ^= 0xFF;
            std::fs::write(&path, &bad).unwrap();
            let case = format!("{name}: byte {at} ({what}) flipped");
            // FORMAT.md calls bytes 24..32 reserved (zero), but readers do not check them; a flip there changes
            // nothing a reader uses, so identical answers are accepted (an error naming the file is too).
            let reserved = what == "reserved header byte";
            failures.extend(judge(&case, name, dir, &queries, &good, reserved));
            cases += 1;
        }
        // Whole regions overwritten, as failing media and crashed file systems leave them: an all-ones length
        // field (erased flash), a zeroed header, a zero-filled tail (delayed allocation lost on a crash), a
        // file of zeros, and same-length garbage.
        let overwrites: [(&str, Overwrite); 5] = [
            ("length field all 0xFF", |b| b[16..24].fill(0xFF)),
            ("header zeroed", |b| b[..32].fill(0)),
            ("last 4 KiB zeroed", |b| {
                let n = b.len();
                b[n.saturating_sub(4096)..].fill(0)
            }),
            ("all zeros", |b| b.fill(0)),
            ("same-length garbage", |b| {
                let mut rng = Rng(b.len() as u64 | 1);
                b.iter_mut().for_each(|x| *x = rng.next_u64() as u8)
            }),
        ];
        for (what, overwrite) in overwrites {
            let mut bad = bytes.clone();
            overwrite(&mut bad);
            std::fs::write(&path, &bad).unwrap();
            let case = format!("{name}: {what}");
            failures.extend(judge(&case, name, dir, &queries, &good, false));
            cases += 1;
        }
        for (what, keep) in [
            ("to 0 bytes", 0),
            ("to half", len / 2),
            ("by one byte", len - 1),
        ] {
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let case = format!("{name}: truncated {what} ({keep} of {len} bytes)");
            failures.extend(judge(&case, name, dir, &queries, &good, false));
            cases += 1;
        }
        std::fs::remove_file(&path).unwrap();
        let case = format!("{name}: removed");
        failures.extend(judge(&case, name, dir, &queries, &good, false));
        cases += 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(answers(dir, &queries).unwrap(), good, "restoring {name}");
    }
    println!("{cases} corruption cases over {} files", names.len());
    let (known, failures): (Vec<String>, Vec<String>) = failures
        .into_iter()
        .partition(|f| KNOWN_FILE_DEFECTS.iter().any(|k| f.contains(k)));
    for k in &known {
        println!("known defect: {k}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rewrites `meta.lt` with a valid envelope and checksum around `json`.
fn write_meta(dir: &Path, version: &[u8], json: &[u8]) {
    let mut out = Vec::new();
    out.extend_from_slice(b"LATTEIX\0");
    out.extend_from_slice(version);
    out.extend_from_slice(b"META");
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(json);
    out.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
    out.extend_from_slice(b"LEND");
    std::fs::write(dir.join("meta.lt"), out).unwrap();
}

type Forge = fn(&mut serde_json::Value);

/// Forged `meta.lt` contents a reader must refuse. Known defects of today's code are listed in
/// `KNOWN_DEFECTS` below (reported, not asserted, so that fixing one does not break this test).
const FORGED: &[(&str, Forge)] = &[
    ("not JSON", |m| *m = serde_json::Value::String("x".into())),
    ("format_version 99", |m| m["format_version"] = 99.into()),
    ("dim 16", |m| m["dim"] = 16.into()),
    ("dim 33", |m| m["dim"] = 33.into()),
    ("dim 0", |m| m["dim"] = 0.into()),
    ("num_centroids 31", |m| m["num_centroids"] = 31.into()),
    ("num_centroids 0", |m| m["num_centroids"] = 0.into()),
    ("num_centroids 70000", |m| m["num_centroids"] = 70000.into()),
    ("nbits 3", |m| m["config"]["nbits"] = 3.into()),
    ("nbits 4", |m| m["config"]["nbits"] = 4.into()),
    ("store_full false→true mismatch", |m| {
        m["config"]["store_full"] = true.into();
        m["chunks"][0]["id"] = 7.into();
    }),
    ("generation 999 (no such ivf)", |m| {
        m["generation"] = 999.into()
    }),
    ("chunk docs +1", |m| {
        let d = m["chunks"][0]["docs"].as_u64().unwrap();
        m["chunks"][0]["docs"] = (d + 1).into();
    }),
    ("chunk tokens +1", |m| {
        let t = m["chunks"][0]["tokens"].as_u64().unwrap();
        m["chunks"][0]["tokens"] = (t + 1).into();
    }),
    ("chunk missing", |m| {
        m["chunks"].as_array_mut().unwrap().pop();
    }),
    ("chunk listed twice", |m| {
        let c = m["chunks"][0].clone();
        m["chunks"].as_array_mut().unwrap().push(c);
    }),
    ("deleted id out of range", |m| {
        m["deleted"] = vec![100_000u32].into()
    }),
    ("deleted id listed twice", |m| {
        let first = m["deleted"][0].clone();
        m["deleted"].as_array_mut().unwrap().push(first);
    }),
    ("more deleted ids than documents", |m| {
        let first = m["deleted"][0].clone();
        m["deleted"] = vec![first; 200].into();
    }),
];

/// Forged cases that change nothing a reader uses, so accepting them with unchanged answers is fine.
const HARMLESS: &[(&str, Forge)] = &[
    ("deleted not ascending", |m| {
        m["deleted"].as_array_mut().unwrap().reverse()
    }),
    ("next_chunk 0", |m| m["next_chunk"] = 0.into()),
];

/// Forged cases today's code accepts or panics on: none left (a chunk listed twice, a deleted id listed
/// twice and more deleted ids than documents are now refused as corrupt).
const KNOWN_DEFECTS: &[&str] = &[];

#[test]
fn checksum_valid_but_inconsistent_meta_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, queries) = build(dir);
    let good = answers(dir, &queries).unwrap();
    let raw = std::fs::read(dir.join("meta.lt")).unwrap();
    let version = raw[8..12].to_vec();
    let json = &raw[32..raw.len() - 8];
    let meta: serde_json::Value = serde_json::from_slice(json).unwrap();
    // The forging itself is faithful: re-writing the unchanged metadata gives the same answers.
    write_meta(dir, &version, &serde_json::to_vec(&meta).unwrap());
    assert_eq!(answers(dir, &queries).unwrap(), good);

    let mut failures = Vec::new();
    let mut known = Vec::new();
    let all = FORGED
        .iter()
        .map(|c| (c, false))
        .chain(HARMLESS.iter().map(|c| (c, true)));
    for ((what, forge), harmless) in all {
        let mut m = meta.clone();
        forge(&mut m);
        write_meta(dir, &version, &serde_json::to_vec(&m).unwrap());
        // The error may name meta.lt or the file that disagrees with it; either names a file of the index.
        let res = catch_unwind(AssertUnwindSafe(|| answers(dir, &queries)));
        let verdict = match res {
            Err(_) => Some(format!("{what}: PANIC")),
            Ok(Err(e)) if e.to_string().contains(dir.to_str().unwrap()) => None,
            Ok(Err(e)) => Some(format!("{what}: the error names no file: {e}")),
            Ok(Ok(got)) if got == good && harmless => None,
            Ok(Ok(got)) if got == good => Some(format!("{what}: accepted (same answers)")),
            Ok(Ok(_)) => Some(format!("{what}: accepted with DIFFERENT answers")),
        };
        match verdict {
            Some(v) if KNOWN_DEFECTS.contains(what) => known.push(v),
            Some(v) => failures.push(v),
            None if KNOWN_DEFECTS.contains(what) => {
                println!("known defect fixed, remove it from KNOWN_DEFECTS: {what}")
            }
            None => {}
        }
    }
    write_meta(dir, &version, json);
    assert_eq!(answers(dir, &queries).unwrap(), good);
    for k in &known {
        println!("known defect: {k}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
