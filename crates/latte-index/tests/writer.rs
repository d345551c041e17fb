//! The index writer: its OS lock (exclusive, named by pid, released when the holder dies, not blocked by a
//! stale lock file), batched commits, readers' consistent views, re-creating an interrupted creation, and
//! deletes that report unknown ids.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use latte_index::{EmbRef, Error, IndexConfig, PlaidIndex, SearchParams, VecSource};

const DIM: usize = 16;
/// Set in the child process of `a_killed_writer_does_not_block_the_next`: the index it locks.
const CHILD_ENV: &str = "LATTE_INDEX_TEST_LOCK_CHILD";
const HELD: &str = "LATTE-TEST-LOCK-HELD";

/// `n` documents of 3–8 unit tokens around 8 directions, ids `{prefix}{i}`.
fn corpus(n: usize, seed: u64, prefix: &str) -> VecSource {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut src = VecSource::new(DIM);
    for i in 0..n {
        let len = 3 + i % 6;
        let mut d = Vec::with_capacity(len * DIM);
        for _ in 0..len {
            let topic = i % 8;
            let mut t: Vec<f32> = (0..DIM)
                .map(|j| if j == topic { 1.0 } else { 0.0 } + 0.3 * next())
                .collect();
            let n = t.iter().map(|x| x * x).sum::<f32>().sqrt();
            t.iter_mut().for_each(|x| *x /= n);
            d.extend_from_slice(&t);
        }
        src.push(format!("{prefix}{i}"), d).unwrap();
    }
    src
}

fn config() -> IndexConfig {
    IndexConfig {
        num_centroids: Some(16),
        ..IndexConfig::default()
    }
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_second_writer_in_the_same_process_gets_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 1, "d"), &config()).unwrap();
    let first = PlaidIndex::writer(dir.path()).unwrap();
    let err = PlaidIndex::writer(dir.path()).unwrap_err();
    let me = std::process::id();
    assert!(
        matches!(err, Error::Locked { pid: Some(p), .. } if p == me),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("pid {me}")), "{err}");
    // The convenience functions go through a writer too.
    let err = PlaidIndex::delete(dir.path(), &ids(&["d1"])).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    drop(first);
    PlaidIndex::writer(dir.path()).unwrap();
}

/// Not a test of its own: run as a child process by `a_killed_writer_does_not_block_the_next`, it takes the
/// writer lock of the index named by `CHILD_ENV`, says so, and waits on stdin until it is killed.
#[test]
fn lock_holder_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let _writer = PlaidIndex::writer(&dir).unwrap();
    println!("{HELD}");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

#[test]
fn a_killed_writer_does_not_block_the_next() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 2, "d"), &config()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains(HELD) {
            break;
        }
    }
    assert!(seen.contains(HELD), "the child never took the lock: {seen}");
    let err = PlaidIndex::writer(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::Locked { pid: Some(p), .. } if p == child.id()),
        "{err}"
    );
    child.kill().unwrap(); // SIGKILL: the child cleans nothing up.
    child.wait().unwrap();
    let left = std::fs::read_to_string(dir.path().join("LOCK")).unwrap();
    assert_eq!(left.trim(), format!("pid {}", child.id()));
    // Only the OS lock counts: the next writer proceeds.
    let mut w = PlaidIndex::writer(dir.path()).unwrap();
    w.add(&corpus(3, 3, "new")).unwrap();
    w.commit().unwrap();
    drop(w);
    assert_eq!(PlaidIndex::open(dir.path()).unwrap().len(), 33);
}

#[test]
fn a_stale_pid_lock_file_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 4, "d"), &config()).unwrap();
    // What an older latte (or a writer killed before this version) leaves behind.
    std::fs::write(dir.path().join("LOCK"), "pid 4294967\n").unwrap();
    let r = PlaidIndex::delete(dir.path(), &ids(&["d3"])).unwrap();
    assert_eq!((r.deleted, r.remaining), (1, 29));
    assert!(!dir.path().join("LOCK").exists());
}

#[test]
fn an_interrupted_creation_can_be_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let src = corpus(30, 5, "d");
    PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    // Simulate a creation killed before its commit: every file but meta.lt, a half-written temporary, and
    // the killed process's lock file.
    std::fs::remove_file(dir.path().join("meta.lt")).unwrap();
    std::fs::write(dir.path().join("meta.lt.tmp"), b"half").unwrap();
    std::fs::write(dir.path().join("c0.res.lt.tmp"), b"half").unwrap();
    std::fs::write(dir.path().join("LOCK"), "pid 4294967\n").unwrap();
    assert!(matches!(
        PlaidIndex::open(dir.path()),
        Err(Error::NotAnIndex(_))
    ));
    let r = PlaidIndex::create(dir.path(), &src, &config()).unwrap();
    assert_eq!(r.documents, 30);
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.len(), 30);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp") || n == "LOCK"),
        "{names:?}"
    );
    // A committed index is still refused.
    assert!(PlaidIndex::create(dir.path(), &src, &config()).is_err());
}

fn top(index: &PlaidIndex, q: &[f32]) -> Vec<latte_index::Hit> {
    index
        .search(EmbRef::new(q, DIM).unwrap(), &SearchParams::for_k(5), None)
        .unwrap()
}

#[test]
fn readers_keep_their_view_until_they_reopen() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(40, 6, "d"), &config()).unwrap();
    let reader = PlaidIndex::open(dir.path()).unwrap();
    // The query is a new document's own tokens, so after the add that document wins.
    let extra = corpus(1, 77, "new");
    let q = {
        use latte_index::DocumentSource;
        extra.embeddings(0).unwrap().into_owned()
    };
    let before = top(&reader, &q);

    let mut w = PlaidIndex::writer(dir.path()).unwrap();
    w.add(&extra).unwrap();
    let r = w.delete(&ids(&["d0", "nope", "d0"])).unwrap();
    assert_eq!((r.deleted, r.not_found.clone()), (1, ids(&["nope"])));
    assert!(w.has_uncommitted_changes());
    assert_eq!(w.index().len(), 40);
    // Nothing is visible before the commit.
    assert_eq!(PlaidIndex::open(dir.path()).unwrap().len(), 40);
    assert!(!PlaidIndex::open(dir.path()).unwrap().contains("new0"));
    w.commit().unwrap();
    assert!(!w.has_uncommitted_changes());

    // The old reader: old counts, old answers, although the files it mapped are gone from the folder.
    assert_eq!(reader.len(), 40);
    assert!(reader.contains("d0") && !reader.contains("new0"));
    assert_eq!(top(&reader, &q), before);
    // A reopened reader sees the commit.
    let fresh = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(fresh.len(), 40);
    assert!(!fresh.contains("d0") && fresh.contains("new0"));
    assert_eq!(top(&fresh, &q)[0].id, "new0");
    drop(w);
}

#[test]
fn dropping_a_writer_without_commit_discards_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 8, "d"), &config()).unwrap();
    let files = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = files(dir.path());
    let mut w = PlaidIndex::writer(dir.path()).unwrap();
    w.add(&corpus(4, 9, "x")).unwrap();
    w.compact().unwrap();
    assert_ne!(files(dir.path()), before);
    drop(w);
    assert_eq!(files(dir.path()), before);
    let index = PlaidIndex::open(dir.path()).unwrap();
    assert_eq!(index.len(), 30);
    assert!(!index.contains("x0"));
}

#[test]
fn unknown_ids_are_reported_and_refused_by_the_convenience_delete() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 10, "d"), &config()).unwrap();
    let err = PlaidIndex::delete(dir.path(), &ids(&["d1", "ghost"])).unwrap_err();
    assert!(matches!(err, Error::UnknownIds(_)), "{err}");
    assert!(err.to_string().contains("ghost"), "{err}");
    assert_eq!(PlaidIndex::open(dir.path()).unwrap().len(), 30);
    let mut w = PlaidIndex::writer(dir.path()).unwrap();
    let r = w.delete(&ids(&["ghost", "d1", "d2"])).unwrap();
    assert_eq!(r.deleted, 2);
    assert_eq!(r.remaining, 28);
    assert_eq!(r.not_found, ids(&["ghost"]));
    // Deleting it again: nothing deleted, the id is reported.
    let r = w.delete(&ids(&["d1"])).unwrap();
    assert_eq!((r.deleted, r.not_found), (0, ids(&["d1"])));
    w.commit().unwrap();
    assert_eq!(PlaidIndex::open(dir.path()).unwrap().len(), 28);
}

#[test]
fn impossible_search_params_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create(dir.path(), &corpus(30, 11, "d"), &config()).unwrap();
    let index = PlaidIndex::open(dir.path()).unwrap();
    let q = vec![0.25f32; DIM];
    let q = EmbRef::new(&q, DIM).unwrap();
    for (name, p) in [
        (
            "ndocs",
            SearchParams {
                ndocs: 0,
                ..SearchParams::for_k(5)
            },
        ),
        (
            "n_ivf_probe",
            SearchParams {
                n_ivf_probe: 0,
                ..SearchParams::for_k(5)
            },
        ),
        ("k", SearchParams::for_k(0)),
    ] {
        let err = index.search(q, &p, None).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
        let err = index.search_batch(&[q], &p, None).unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}
