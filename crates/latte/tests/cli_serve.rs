//! `latte serve` as a process: it refuses an open non-loopback address, serves an index built by
//! `latte index` with the model the index records, and stops on SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use common::{fails, model, ok, s};

#[test]
fn serve_refuses_an_open_public_address() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        &[
            "serve",
            "--data",
            s(dir.path()),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        &[
            "refusing to serve on 0.0.0.0 without API keys",
            "--insecure",
        ],
    );
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "short read\n").unwrap();
    fails(
        &[
            "serve",
            "--data",
            s(dir.path()),
            "--api-keys",
            s(&keys),
            "--port",
            "0",
        ],
        &["keys.txt, line 1", "at least 16"],
    );
}

/// One HTTP/1.1 request on a fresh connection; the status line and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer.lines().next().unwrap_or_default().to_string();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Starts `latte serve --port 0 ARGS`: the process, the address it listens on, and a thread collecting the
/// rest of its log (read in the background so the server never blocks on a full pipe).
fn spawn_serve(args: &[&str]) -> (Child, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_latte"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_string);
            break;
        }
        line.clear();
    }
    let addr = addr.expect("the server says where it listens");
    let log = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    (child, addr, log)
}

/// `latte serve --dtype int8`: the `--model` runs at int8 (`/health` says so), and a bad value is refused
/// with the accepted ones named.
#[test]
fn serve_dtype_flag() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("bert_pylate");
    fails(
        &["serve", "--data", s(dir.path()), "--dtype", "fp8"],
        &["fp8", "f32", "bf16", "int8"],
    );
    let (mut child, addr, _log) =
        spawn_serve(&["--data", s(dir.path()), "--model", &m, "--dtype", "int8"]);
    let (status, body) = http(&addr, "GET", "/health", "");
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dtypes"], serde_json::json!(["int8"]), "{body}");
}

#[test]
fn serve_searches_an_index_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let corpus = dir.path().join("corpus.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            format!(r#"{{"_id": "d{i}", "text": "passage {i} about rust and tokio", "n": {i}}}"#)
        })
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let m = model("bert_pylate");
    ok(&[
        "index",
        "--index",
        s(&data.join("books")),
        "--model",
        &m,
        "--corpus",
        s(&corpus),
        "--dtype",
        "bf16",
    ]);

    let (mut child, addr, log) = spawn_serve(&["--data", s(&data)]);

    // The index's recorded precision (`latte index --dtype bf16`) is the one its model is served at.
    let (status, body) = http(&addr, "GET", "/health", "");
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dtypes"], serde_json::json!(["bf16"]), "{body}");
    let (status, body) = http(&addr, "GET", "/indexes/books", "");
    assert!(status.contains("200"), "{status} {body}");
    assert!(body.contains("\"documents\":12"), "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        "/indexes/books/search",
        r#"{"queries": ["rust"], "k": 3, "filter": {"n": {"$lt": 6}}, "return": ["metadata"]}"#,
    );
    assert!(status.contains("200"), "{status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hits = v["results"][0].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert!(
        hits.iter()
            .all(|h| h["metadata"]["n"].as_u64().unwrap() < 6),
        "{body}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGTERM is a clean stop: {exit:?}");
    let log = log.join().unwrap();
    assert!(
        log.contains("POST /indexes/books/search 200"),
        "one line per request: {log}"
    );
    assert!(log.contains("server stopped"), "{log}");
}
