//! A real server on a loopback port (port 0), driven with a real HTTP client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use latte_server::{Config, ServeError, Server};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The tiny random-weight PyLate model of latte-models' tests (16-dimensional embeddings).
pub fn fixture_model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../latte-models/tests/fixtures/models/bert_pylate")
        .canonicalize()
        .expect("the fixture model exists")
        .display()
        .to_string()
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub data: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: Option<tempfile::TempDir>,
}

/// Starts a server on a fresh data folder; `edit` adjusts the configuration.
pub async fn start(edit: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = start_on(data, edit).await;
    s._dir = Some(dir);
    s
}

/// Starts a server on `data`.
pub async fn start_on(data: PathBuf, edit: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config {
        data: data.clone(),
        ..Config::default()
    };
    edit(&mut config);
    let server = Server::bind(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("the server starts");
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        data,
        shutdown: Some(tx),
        handle: Some(handle),
        _dir: None,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `method path` with an optional JSON body; the status and the JSON answer (`Null` if not JSON).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(method, path, body, None).await
    }

    /// As [`call`], with `Authorization: Bearer key`.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let res = req.send().await.expect("the server answers");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sends raw bytes as the body.
    pub async fn raw(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = self
            .client
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the server answers");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The value of a metric line `name{labels}` (exact prefix up to the value).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Polls the metric until `pred` holds (at most 20 s); panics otherwise.
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.metric(series).await.is_some_and(&pred) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {series} never reached the expected value"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Triggers a graceful shutdown (the server finishes in-flight requests).
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server to stop.
    pub async fn stopped(&mut self) -> Result<(), ServeError> {
        let h = self.handle.take().expect("running");
        h.await.expect("the server task does not panic")
    }

    /// Shuts down and waits.
    pub async fn stop(mut self) {
        self.trigger_shutdown();
        self.stopped().await.expect("clean shutdown");
    }
}

/// `n` random unit-norm-ish token vectors of dimension `dim`, as JSON rows.
pub fn random_rows(rng: &mut impl Rng, n: usize, dim: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() - 0.5).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// Documents `{"id": prefix-i, "embeddings": ..., "metadata": {"n": i}}` for ids `range`.
pub fn embedding_docs(prefix: &str, range: std::ops::Range<usize>, dim: usize, seed: u64) -> Value {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let docs: Vec<Value> = range
        .map(|i| {
            let rows = random_rows(&mut rng, 4 + i % 5, dim);
            json!({"id": format!("{prefix}-{i}"), "embeddings": rows, "metadata": {"n": i}})
        })
        .collect();
    json!({ "documents": docs })
}

/// A few short English passages with ids `t-0..`.
pub fn text_docs(n: usize) -> Value {
    let topics = [
        "ownership and borrowing in rust",
        "the tokio runtime schedules async tasks",
        "late interaction retrieval scores every query token",
        "sqlite stores documents and metadata",
        "prometheus scrapes metrics over http",
        "graceful shutdown lets requests finish",
    ];
    let docs: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": format!("t-{i}"),
                "text": format!("{} (passage {i})", topics[i % topics.len()]),
                "title": format!("title {}", i % 3),
                "metadata": {"topic": i % topics.len(), "even": i % 2 == 0},
            })
        })
        .collect();
    json!({ "documents": docs })
}
