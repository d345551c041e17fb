//! `latte index`, `latte search` and `latte delete` end to end on small precomputed embeddings.

use std::path::Path;
use std::process::{Command, Output};

use latte::npz::{write_npz, Matrix};

const DIM: usize = 16;

fn latte(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(args)
        .output()
        .expect("run latte")
}

fn ok(args: &[&str]) -> String {
    let out = latte(args);
    assert!(
        out.status.success(),
        "latte {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(args: &[&str], needle: &str) {
    let out = latte(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "latte {args:?} should fail");
    assert!(
        err.contains(needle),
        "latte {args:?}: expected {needle:?} in {err}"
    );
}

fn unit_rows(rows: usize, dim: usize, seed: u64) -> Matrix {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut data = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let mut row: Vec<f32> = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
        data.extend(row);
    }
    Matrix {
        rows,
        cols: dim,
        data,
    }
}

fn write_set(
    dir: &Path,
    name: &str,
    n: usize,
    dim: usize,
    seed: u64,
    prefix: &str,
) -> (String, String) {
    let arrays: Vec<Matrix> = (0..n)
        .map(|i| unit_rows(3 + i % 5, dim, seed + i as u64))
        .collect();
    let npz = dir.join(format!("{name}.npz"));
    write_npz(&npz, &arrays).unwrap();
    let ids = dir.join(format!("{name}.txt"));
    let lines: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    std::fs::write(&ids, lines.join("\n") + "\n").unwrap();
    (npz.to_string_lossy().into(), ids.to_string_lossy().into())
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn index_search_add_delete_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let index = t.join("idx");
    let index_s = index.to_string_lossy().to_string();
    let (docs, ids) = write_set(t, "docs", 40, DIM, 1, "d");
    let (queries, qids) = write_set(t, "queries", 4, DIM, 100, "q");
    let run = t.join("run.trec").to_string_lossy().to_string();

    ok(&[
        "index",
        "--index",
        &index_s,
        "--embeddings",
        &docs,
        "--ids",
        &ids,
        "--centroids",
        "8",
    ]);
    ok(&[
        "search",
        "--index",
        &index_s,
        "--query-embeddings",
        &queries,
        "--query-ids",
        &qids,
        "--k",
        "3",
        "--output",
        &run,
    ]);
    let text = std::fs::read_to_string(&run).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 12);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.len(), 6, "{l:?}");
        assert_eq!(l[0], format!("q{}", i / 3));
        assert_eq!(l[1], "Q0");
        assert!(l[2].starts_with('d'));
        assert_eq!(l[3], (i % 3 + 1).to_string());
        assert!(l[4].parse::<f32>().is_ok());
        assert_eq!(l[5], "latte");
    }
    // Exhaustive search returns the same top document here (the PLAID pass keeps every candidate at this size).
    let exact = ok(&[
        "search",
        "--index",
        &index_s,
        "--query-embeddings",
        &queries,
        "--query-ids",
        &qids,
        "--k",
        "3",
        "--exact",
    ]);
    assert_eq!(
        exact.lines().next().unwrap().split(' ').nth(2),
        lines[0].get(2).copied()
    );

    // A subset restricts the results.
    let subset = t.join("subset.txt");
    std::fs::write(&subset, "d5\nd6\n").unwrap();
    let sub = ok(&[
        "search",
        "--index",
        &index_s,
        "--query-embeddings",
        &queries,
        "--query-ids",
        &qids,
        "--k",
        "3",
        "--subset",
        &subset.to_string_lossy(),
    ]);
    assert_eq!(sub.lines().count(), 8);
    assert!(
        sub.lines()
            .all(|l| matches!(l.split(' ').nth(2), Some("d5") | Some("d6"))),
        "{sub}"
    );

    // Bad input: each a clear error, the index unchanged.
    let before = snapshot(&index);
    fails(
        &[
            "search",
            "--index",
            &index_s,
            "--query-embeddings",
            &queries,
            "--query-ids",
            &qids,
            "--k",
            "0",
        ],
        "k",
    );
    let (wrong, wrong_ids) = write_set(t, "wrong", 2, 8, 7, "w");
    fails(
        &[
            "search",
            "--index",
            &index_s,
            "--query-embeddings",
            &wrong,
            "--query-ids",
            &wrong_ids,
        ],
        "dimension",
    );
    fails(
        &[
            "index",
            "--index",
            &index_s,
            "--embeddings",
            &wrong,
            "--ids",
            &wrong_ids,
        ],
        "dimension",
    );
    fails(
        &[
            "index",
            "--index",
            &index_s,
            "--embeddings",
            &docs,
            "--ids",
            &qids,
        ],
        "ids",
    );
    let unknown = t.join("unknown.txt");
    std::fs::write(&unknown, "d1\nnot-there\n").unwrap();
    fails(
        &[
            "delete",
            "--index",
            &index_s,
            "--ids",
            &unknown.to_string_lossy(),
        ],
        "not-there",
    );
    assert_eq!(snapshot(&index), before);
    let not_index = t.join("empty");
    std::fs::create_dir(&not_index).unwrap();
    fails(
        &[
            "search",
            "--index",
            &not_index.to_string_lossy(),
            "--query-embeddings",
            &queries,
            "--query-ids",
            &qids,
        ],
        "not a latte index",
    );
    fails(
        &["search", "--index", &index_s, "--queries", &qids],
        "model",
    );

    // Add, then delete: deleted documents never come back.
    let (more, more_ids) = write_set(t, "more", 5, DIM, 500, "m");
    ok(&[
        "index",
        "--index",
        &index_s,
        "--embeddings",
        &more,
        "--ids",
        &more_ids,
    ]);
    let del = t.join("del.txt");
    std::fs::write(&del, "m0\nd3\n").unwrap();
    ok(&[
        "delete",
        "--index",
        &index_s,
        "--ids",
        &del.to_string_lossy(),
    ]);
    let out = ok(&[
        "search",
        "--index",
        &index_s,
        "--query-embeddings",
        &more,
        "--query-ids",
        &more_ids,
        "--k",
        "45",
        "--exact",
    ]);
    assert!(!out
        .lines()
        .any(|l| matches!(l.split(' ').nth(2), Some("m0") | Some("d3"))));
    assert_eq!(out.lines().filter(|l| l.starts_with("m1 ")).count(), 43);
    assert!(
        out.lines().any(|l| l.starts_with("m1 Q0 m1 1 ")),
        "an added document is its own best match"
    );
}

#[test]
fn npz_written_by_latte_is_read_lazily() {
    use latte_index::DocumentSource;
    let tmp = tempfile::tempdir().unwrap();
    let arrays: Vec<Matrix> = (0..3)
        .map(|i| unit_rows(2 + i, DIM, 9 + i as u64))
        .collect();
    let path = tmp.path().join("x.npz");
    write_npz(&path, &arrays).unwrap();
    let src = latte_index::NpzSource::open(&path).unwrap();
    assert_eq!((src.len(), src.dim()), (3, DIM));
    for (i, m) in arrays.iter().enumerate() {
        assert_eq!(src.embeddings(i).unwrap().as_ref(), m.data.as_slice());
    }
    let err = src.with_ids(vec!["a".into()]).unwrap_err();
    assert!(err.to_string().contains("3 arrays but 1 ids"), "{err}");
    std::fs::write(&path, b"not a zip").unwrap();
    assert!(latte_index::NpzSource::open(&path).is_err());
}

#[test]
fn compressed_npz_falls_back_to_a_full_read() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Like numpy.savez_compressed: deflated entries, which the lazy reader refuses.
    let path = t.join("docs.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for i in 0..12 {
        let m = unit_rows(3 + i % 4, DIM, 70 + i as u64);
        zip.start_file(format!("arr_{i}.npy"), opts).unwrap();
        zip.write_all(&latte::npz::npy_bytes(&[m.rows, m.cols], &m.data))
            .unwrap();
    }
    zip.finish().unwrap();
    assert!(latte_index::NpzSource::open(&path).is_err());
    let ids = t.join("ids.txt");
    std::fs::write(&ids, (0..12).map(|i| format!("z{i}\n")).collect::<String>()).unwrap();
    let index = t.join("idx").to_string_lossy().to_string();
    let (p, i) = (
        path.to_string_lossy().to_string(),
        ids.to_string_lossy().to_string(),
    );
    ok(&[
        "index",
        "--index",
        &index,
        "--embeddings",
        &p,
        "--ids",
        &i,
        "--centroids",
        "4",
    ]);
    let out = ok(&[
        "search",
        "--index",
        &index,
        "--query-embeddings",
        &p,
        "--query-ids",
        &i,
        "--k",
        "1",
    ]);
    assert_eq!(out.lines().count(), 12);
    assert!(
        out.lines().all(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f[0] == f[2]
        }),
        "each document is its own best match:\n{out}"
    );
}

#[test]
fn codec_from_builds_shards_with_one_codec() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let first = t.join("shard-0");
    let second = t.join("shard-1");
    let (s, f) = (
        first.to_string_lossy().to_string(),
        second.to_string_lossy().to_string(),
    );
    let (docs_a, ids_a) = write_set(t, "a", 40, DIM, 1, "a");
    let (docs_b, ids_b) = write_set(t, "b", 25, DIM, 500, "b");
    ok(&[
        "index",
        "--index",
        &s,
        "--embeddings",
        &docs_a,
        "--ids",
        &ids_a,
        "--centroids",
        "8",
        "--nbits",
        "4",
    ]);
    // The second index takes the first's codec (and its nbits, without --nbits).
    ok(&[
        "index",
        "--index",
        &f,
        "--embeddings",
        &docs_b,
        "--ids",
        &ids_b,
        "--codec-from",
        &s,
    ]);
    let a = latte_index::IndexCodec::from_index(&first).unwrap();
    let b = latte_index::IndexCodec::from_index(&second).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        std::fs::read(first.join("codec.lt")).unwrap(),
        std::fs::read(second.join("codec.lt")).unwrap()
    );
    let info = latte_index::PlaidIndex::open(&second).unwrap().info();
    assert_eq!((info.documents, info.nbits), (25, 4));
    // A codec file works as well as an index folder.
    let file = t.join("shared.codec");
    a.save(&file).unwrap();
    let third = t.join("shard-2").to_string_lossy().to_string();
    ok(&[
        "index",
        "--index",
        &third,
        "--embeddings",
        &docs_b,
        "--ids",
        &ids_b,
        "--codec-from",
        &file.to_string_lossy(),
    ]);
    assert_eq!(latte_index::IndexCodec::from_index(&third).unwrap(), a);
    // Refused: on an existing index, with a path that holds no codec, with a different --nbits.
    fails(
        &[
            "index",
            "--index",
            &f,
            "--embeddings",
            &docs_b,
            "--ids",
            &ids_b,
            "--codec-from",
            &s,
        ],
        "--codec-from: the index at",
    );
    let missing = t.join("nothing-here").to_string_lossy().to_string();
    let fourth = t.join("shard-3").to_string_lossy().to_string();
    fails(
        &[
            "index",
            "--index",
            &fourth,
            "--embeddings",
            &docs_b,
            "--ids",
            &ids_b,
            "--codec-from",
            &missing,
        ],
        "--codec-from",
    );
    fails(
        &[
            "index",
            "--index",
            &fourth,
            "--embeddings",
            &docs_b,
            "--ids",
            &ids_b,
            "--codec-from",
            &s,
            "--nbits",
            "2",
        ],
        "nbits",
    );
    assert!(!t.join("shard-3").join("meta.lt").exists());
}
