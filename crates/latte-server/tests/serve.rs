//! API keys, graceful shutdown with requests in flight, and a writer racing readers.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{embedding_docs, fixture_model, start};
use latte_server::{ApiKeys, Config};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const READ: &str = "read-key-0123456789abcdef";
const WRITE: &str = "write-key-0123456789abcdef";
const ADMIN: &str = "admin-key-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_scopes() {
    let keys = ApiKeys::parse(
        &format!("# keys\n{READ} read\n{WRITE} write\n{ADMIN} admin\n"),
        "keys",
    )
    .unwrap();
    let model = fixture_model();
    let s = start(|c| {
        c.api_keys = Some(keys);
        c.models = vec![model.clone()];
    })
    .await;
    // /health is open.
    let (status, _) = s.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    // Everything else needs a key.
    for (method, path) in [
        ("GET", "/indexes"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("POST", "/encode"),
    ] {
        let res = s
            .client
            .request(method.parse().unwrap(), s.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 401, "{method} {path}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, body) = s
        .call_with("GET", "/indexes", None, Some("wrong-key-0123456789abcdef"))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert!(
        !body.to_string().contains("wrong-key"),
        "the key is never echoed"
    );
    let res = s
        .client
        .get(s.url("/indexes"))
        .header("authorization", format!("Basic {READ}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);

    // read < write < admin.
    let create = json!({"name": "k", "model": model});
    let (status, body) = s
        .call_with("POST", "/indexes", Some(create.clone()), Some(READ))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scope admin"),
        "{body}"
    );
    let (status, _) = s
        .call_with("POST", "/indexes", Some(create.clone()), Some(WRITE))
        .await;
    assert_eq!(status, 403);
    let (status, _) = s
        .call_with("POST", "/indexes", Some(create), Some(ADMIN))
        .await;
    assert_eq!(status, 201);
    let docs = common::text_docs(10);
    let (status, _) = s
        .call_with(
            "POST",
            "/indexes/k/documents",
            Some(docs.clone()),
            Some(READ),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = s
        .call_with("POST", "/indexes/k/documents", Some(docs), Some(WRITE))
        .await;
    assert_eq!(status, 200);
    let search = json!({"queries": ["rust"], "k": 2});
    let (status, hits) = s
        .call_with("POST", "/indexes/k/search", Some(search), Some(READ))
        .await;
    assert_eq!(status, 200, "{hits}");
    let (status, _) = s
        .call_with(
            "DELETE",
            "/indexes/k/documents",
            Some(json!({"ids": ["t-1"]})),
            Some(READ),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = s.call_with("DELETE", "/indexes/k", None, Some(WRITE)).await;
    assert_eq!(status, 403);
    let (status, _) = s.call_with("DELETE", "/indexes/k", None, Some(ADMIN)).await;
    assert_eq!(status, 200);
    let (status, _) = s.call_with("GET", "/metrics", None, Some(READ)).await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[test]
fn an_open_server_binds_only_loopback() {
    let open = Config::default();
    assert!(open.check_bind("127.0.0.1".parse().unwrap()).is_ok());
    assert!(open.check_bind("::1".parse().unwrap()).is_ok());
    let err = open
        .check_bind("0.0.0.0".parse().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--api-keys") && err.contains("--insecure"),
        "{err}"
    );
    let insecure = Config {
        insecure: true,
        ..Config::default()
    };
    assert!(insecure.check_bind("0.0.0.0".parse().unwrap()).is_ok());
    let keyed = Config {
        api_keys: Some(ApiKeys::parse(&format!("{READ} read"), "k").unwrap()),
        ..Config::default()
    };
    assert!(keyed.check_bind("0.0.0.0".parse().unwrap()).is_ok());
}

/// A request in flight when shutdown starts is answered in full; the write it carries is committed; the
/// server then stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let mut s = start(|_| {}).await;
    let (status, _) = s.call("POST", "/indexes", Some(json!({"name": "g"}))).await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call(
            "POST",
            "/indexes/g/documents",
            Some(embedding_docs("a", 0..30, 16, 3)),
        )
        .await;
    assert_eq!(status, 200);

    // A write whose body is only half sent when shutdown starts.
    let body = serde_json::to_vec(&embedding_docs("b", 0..10, 16, 4)).unwrap();
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /indexes/g/documents HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    conn.write_all(&body[..half]).await.unwrap();
    conn.flush().await.unwrap();
    // In flight: that request and the /metrics request asking.
    s.wait_metric("latte_http_requests_in_flight", |v| v >= 2.0)
        .await;

    s.trigger_shutdown();
    // New connections are refused once the server stops accepting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(s.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting connections"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.write_all(&body[half..]).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json_start = answer.find("\r\n\r\n").unwrap() + 4;
    let result: Value = serde_json::from_str(&answer[json_start..]).unwrap();
    assert_eq!(result["added"], 10);
    assert_eq!(result["documents"], 40);
    s.stopped().await.expect("a clean stop");

    // The commit is on disk, whole.
    let index = latte_index::PlaidIndex::open(s.data.join("g")).unwrap();
    assert_eq!(index.len(), 40);
    assert!(index.contains("b-9"));
}

/// One writer adding and deleting batches while readers search: no reader sees an error, every answer
/// holds k hits from documents that existed, and the final counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_and_concurrent_readers() {
    let s = start(|_| {}).await;
    let (status, _) = s
        .call("POST", "/indexes", Some(json!({"name": "rw", "nbits": 2})))
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call(
            "POST",
            "/indexes/rw/documents",
            Some(embedding_docs("base", 0..40, 16, 10)),
        )
        .await;
    assert_eq!(status, 200);

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let (client, url, done) = (s.client.clone(), s.url("/indexes/rw/search"), done.clone());
        readers.push(tokio::spawn(async move {
            let q = embedding_docs("q", 0..1, 16, 100 + r)["documents"][0]["embeddings"].clone();
            // Half the readers filter on metadata; all read the stored metadata back.
            let body = if r % 2 == 0 {
                json!({"query_embeddings": [q], "k": 5, "return": ["metadata"]})
            } else {
                json!({"query_embeddings": [q], "k": 5, "return": ["metadata"], "filter": {"n": {"$lt": 1000}}})
            };
            let (mut ok, mut errors) = (0u64, Vec::new());
            // At least a few searches, then until the writer is done.
            while ok < 5 || !done.load(std::sync::atomic::Ordering::SeqCst) {
                let res = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap();
                let hits = body["results"][0].as_array().map_or(0, |h| h.len());
                let valid = body["results"][0].as_array().is_some_and(|h| {
                    h.iter().all(|x| {
                        let id = x["id"].as_str().unwrap_or_default();
                        (id.starts_with("base-") || id.starts_with("new-"))
                            && x["metadata"]["n"].is_u64()
                    })
                });
                if status == 200 && hits == 5 && valid {
                    ok += 1;
                } else {
                    errors.push(format!("{status} {body}"));
                }
            }
            (ok, errors)
        }));
    }
    let mut added = 0;
    for batch in 0..8 {
        let docs = embedding_docs("new", batch * 5..batch * 5 + 5, 16, 200 + batch as u64);
        let (status, body) = s.call("POST", "/indexes/rw/documents", Some(docs)).await;
        assert_eq!(status, 200, "{body}");
        added += 5;
        assert_eq!(body["documents"], 40 + added);
    }
    let gone: Vec<String> = (0..6).map(|i| format!("base-{i}")).collect();
    let (status, body) = s
        .call(
            "DELETE",
            "/indexes/rw/documents",
            Some(json!({ "ids": gone })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 6);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for r in readers {
        let (ok, errors) = r.await.unwrap();
        assert!(errors.is_empty(), "reader errors: {errors:?}");
        total += ok;
    }
    assert!(total >= 20);
    let (_, info) = s.call("GET", "/indexes/rw", None).await;
    assert_eq!(info["documents"], 40 + 40 - 6);
    // Every document is findable by its own embeddings' neighbourhood: the whole index is searchable.
    let q = embedding_docs("q", 0..1, 16, 7)["documents"][0]["embeddings"].clone();
    let (_, hits) = s
        .call(
            "POST",
            "/indexes/rw/search",
            Some(json!({"query_embeddings": [q], "k": 74})),
        )
        .await;
    let ids: HashSet<String> = hits["results"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids
        .iter()
        .all(|i| !(0..6).any(|d| i == &format!("base-{d}"))));
    s.stop().await;
}
