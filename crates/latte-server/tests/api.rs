//! Every endpoint of `latte serve` through a real HTTP client against a server on a loopback port.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{embedding_docs, fixture_model, start, text_docs};
use serde_json::{json, Value};

fn ids_of(hits: &Value) -> Vec<String> {
    hits.as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_openapi_docs_and_metrics() {
    let model = fixture_model();
    let s = start(|c| c.models = vec![model.clone()]).await;
    let (status, body) = s.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["models"], json!([model]));

    let (status, spec) = s.call("GET", "/openapi.json", None).await;
    assert_eq!(status, 200);
    let paths = spec["paths"].as_object().unwrap();
    for (path, method) in [
        ("/health", "get"),
        ("/metrics", "get"),
        ("/indexes", "get"),
        ("/indexes", "post"),
        ("/indexes/{name}", "get"),
        ("/indexes/{name}", "delete"),
        ("/indexes/{name}/documents", "post"),
        ("/indexes/{name}/documents", "delete"),
        ("/indexes/{name}/documents/{id}", "get"),
        ("/indexes/{name}/search", "post"),
        ("/encode", "post"),
        ("/rerank", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    assert!(
        spec["components"]["schemas"]["SearchRequest"]["properties"]["query_embeddings"]
            .is_object()
    );

    // The docs page and its assets come from the server itself.
    let page = s.client.get(s.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "the docs page loads nothing from the network"
    );
    let js = s
        .client
        .get(s.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status().as_u16(), 200);

    let res = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let res = s.client.get(s.url("/health")).send().await.unwrap();
    assert!(res.headers().contains_key("x-request-id"));

    let (status, _) = s
        .call(
            "POST",
            "/encode",
            Some(json!({"texts": ["a b c"], "is_query": true})),
        )
        .await;
    assert_eq!(status, 200);
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            "latte_http_requests_total{route=\"/health\",method=\"GET\",status=\"200\"} 3"
        ),
        "{text}"
    );
    assert!(text.contains("latte_http_request_duration_seconds_bucket{route=\"/encode\",method=\"POST\",le=\"+Inf\"} 1"), "{text}");
    assert!(
        text.contains(&format!("latte_encode_texts_total{{model=\"{model}\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("latte_encode_queue_depth{{model=\"{model}\"}} 0")),
        "{text}"
    );
    assert!(
        text.contains("# TYPE latte_index_documents gauge"),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_index_lifecycle() {
    let model = fixture_model();
    let s = start(|_| {}).await;
    let (status, body) = s
        .call(
            "POST",
            "/indexes",
            Some(json!({"name": "books", "model": model, "nbits": 4})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["nbits"], 4);
    // The pending settings survive a restart of the listing.
    let (_, list) = s.call("GET", "/indexes", None).await;
    assert_eq!(list["indexes"][0]["name"], "books");
    assert_eq!(list["indexes"][0]["status"], "pending");
    let (status, body) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({"queries": ["rust"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("index_empty"))
    );

    let (status, body) = s
        .call("POST", "/indexes/books/documents", Some(text_docs(30)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["added"], 30);
    assert_eq!(body["created"], true);
    assert_eq!(body["documents"], 30);
    let (status, info) = s.call("GET", "/indexes/books", None).await;
    assert_eq!(status, 200);
    assert_eq!(info["status"], "ready");
    assert_eq!(info["documents"], 30);
    assert_eq!(info["dim"], 16);
    assert_eq!(info["nbits"], 4);
    assert_eq!(info["model"], model);
    assert!(info["num_centroids"].as_u64().unwrap() > 0);
    assert!(info["disk_bytes"].as_u64().unwrap() > 0);

    // Search by text, and by the same query's embeddings from /encode: the same hits.
    let (status, by_text) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({"queries": ["tokio async tasks", "sqlite metadata"], "k": 5})),
        )
        .await;
    assert_eq!(status, 200, "{by_text}");
    assert_eq!(by_text["results"].as_array().unwrap().len(), 2);
    assert_eq!(by_text["results"][0].as_array().unwrap().len(), 5);
    let (status, enc) = s
        .call(
            "POST",
            "/encode",
            Some(json!({"model": model, "texts": ["tokio async tasks"], "is_query": true})),
        )
        .await;
    assert_eq!(status, 200, "{enc}");
    let (status, by_emb) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({"query_embeddings": [enc["embeddings"][0]], "k": 5})),
        )
        .await;
    assert_eq!(status, 200, "{by_emb}");
    assert_eq!(
        ids_of(&by_emb["results"][0]),
        ids_of(&by_text["results"][0])
    );
    let scores = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["score"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (
        scores(&by_emb["results"][0]),
        scores(&by_text["results"][0]),
    );
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5),
        "{a:?} vs {b:?}"
    );
    assert!(a.windows(2).all(|w| w[0] >= w[1]), "best first: {a:?}");

    let (status, doc) = s.call("GET", "/indexes/books/documents/t-3", None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["id"], "t-3");
    assert_eq!(
        doc["text"],
        "sqlite stores documents and metadata (passage 3)"
    );
    assert_eq!(doc["title"], "title 0");
    assert_eq!(doc["metadata"], json!({"topic": 3, "even": false}));

    // Filters: only matching documents, with the stored fields asked for.
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({
                "queries": ["rust"], "k": 30,
                "filter": {"topic": 1},
                "return": ["text", "metadata"],
            })),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    let hits0 = hits["results"][0].as_array().unwrap();
    assert_eq!(hits0.len(), 5, "topic 1 holds t-1, t-7, t-13, t-19, t-25");
    for h in hits0 {
        assert_eq!(h["metadata"]["topic"], 1, "{h}");
        assert!(
            h["text"].as_str().unwrap().starts_with("the tokio runtime"),
            "{h}"
        );
        assert!(h.get("title").is_none(), "title was not asked for: {h}");
    }
    let filter = json!({"even": true, "topic": {"$in": [3, 4]}});
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({"queries": ["sqlite"], "k": 30, "filter": filter})),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    let mut got = ids_of(&hits["results"][0]);
    got.sort();
    assert_eq!(got, vec!["t-10", "t-16", "t-22", "t-28", "t-4"]);

    // Hybrid: BM25 over the stored text beside MaxSim.
    for hybrid in [json!(true), json!({"fusion": "linear", "alpha": 0.0})] {
        let body = json!({"queries": ["sqlite"], "k": 5, "hybrid": hybrid, "return": ["title"]});
        let (status, hits) = s.call("POST", "/indexes/books/search", Some(body)).await;
        assert_eq!(status, 200, "{hits}");
        let hs = hits["results"][0].as_array().unwrap();
        assert_eq!(hs.len(), 5);
        assert!(hs.iter().all(|h| h["title"].is_string()), "{hits}");
        // With alpha 0 the order is BM25's: the five passages that contain "sqlite" (topic 3).
        if hybrid.is_object() {
            for h in hs {
                let id: usize = h["id"].as_str().unwrap()[2..].parse().unwrap();
                assert_eq!(id % 6, 3, "{hits}");
            }
        }
    }
    let (status, doc) = s.call("GET", "/indexes/books/documents/nope", None).await;
    assert_eq!(
        (status, doc["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // More documents, then a delete by id.
    let more = json!({"documents": [
        {"id": "x-1", "text": "an added passage about rust"},
        {"id": "t-2", "text": "a replaced passage", "metadata": {"topic": 99}},
    ]});
    let (status, body) = s.call("POST", "/indexes/books/documents", Some(more)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["added"].as_u64(),
            body["created"].as_bool(),
            body["documents"].as_u64()
        ),
        (Some(2), Some(false), Some(31))
    );
    assert_eq!(body["replaced"], json!(["t-2"]));
    let (_, doc) = s.call("GET", "/indexes/books/documents/t-2", None).await;
    assert_eq!(doc["text"], "a replaced passage");
    assert_eq!(doc["metadata"]["topic"], 99);
    let (status, body) = s
        .call(
            "DELETE",
            "/indexes/books/documents",
            Some(json!({"ids": ["t-0", "t-1", "ghost"]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2);
    assert_eq!(body["remaining"], 29);
    assert_eq!(body["not_found"], json!(["ghost"]));
    let (_, info) = s.call("GET", "/indexes/books", None).await;
    assert_eq!(info["documents"], 29);
    // Delete by filter: topic 5 holds t-5, t-11, t-17, t-23, t-29.
    let (status, body) = s
        .call(
            "DELETE",
            "/indexes/books/documents",
            Some(json!({"filter": {"topic": 5}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 5);
    assert_eq!(body["remaining"], 24);
    let (status, _) = s.call("GET", "/indexes/books/documents/t-11", None).await;
    assert_eq!(status, 404);
    let (_, hits) = s
        .call(
            "POST",
            "/indexes/books/search",
            Some(json!({"queries": ["rust"], "k": 30})),
        )
        .await;
    let got: HashSet<String> = ids_of(&hits["results"][0]).into_iter().collect();
    assert_eq!(got.len(), 24);
    for gone in ["t-0", "t-1", "t-5"] {
        assert!(!got.contains(gone), "deleted document {gone} is not found");
    }
    assert_eq!(
        s.metric("latte_index_documents{index=\"books\"}").await,
        Some(24.0)
    );

    // Delete the index: gone from the listing and from disk.
    let (status, body) = s.call("DELETE", "/indexes/books", None).await;
    assert_eq!((status, body["deleted"].as_str()), (200, Some("books")));
    let (status, _) = s.call("GET", "/indexes/books", None).await;
    assert_eq!(status, 404);
    assert!(!s.data.join("books").exists());
    let (_, list) = s.call("GET", "/indexes", None).await;
    assert_eq!(list["indexes"], json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_are_served_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = fixture_model();
    let s = common::start_on(data.clone(), |_| {}).await;
    let (status, _) = s
        .call(
            "POST",
            "/indexes",
            Some(json!({"name": "a", "model": model})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call("POST", "/indexes", Some(json!({"name": "pending-one"})))
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call("POST", "/indexes/a/documents", Some(text_docs(12)))
        .await;
    assert_eq!(status, 200);
    s.stop().await;

    let s = common::start_on(data, |_| {}).await;
    let (_, list) = s.call("GET", "/indexes", None).await;
    let names: Vec<(String, String)> = list["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("a".into(), "ready".into()),
            ("pending-one".into(), "pending".into())
        ]
    );
    // The index's model was loaded from what the index records.
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/a/search",
            Some(json!({"queries": ["rust"], "k": 3})),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    assert_eq!(hits["results"][0].as_array().unwrap().len(), 3);
    let (_, health) = s.call("GET", "/health", None).await;
    assert_eq!(health["models"], json!([model]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_and_rerank_match_maxsim() {
    let model = fixture_model();
    let s = start(|c| c.models = vec![model.clone()]).await;
    let (status, enc) = s
        .call(
            "POST",
            "/encode",
            Some(json!({"texts": ["what is rust"], "is_query": true})),
        )
        .await;
    assert_eq!(status, 200, "{enc}");
    assert_eq!(enc["model"], model);
    let q = &enc["embeddings"][0];
    assert_eq!(
        q.as_array().unwrap().len(),
        32,
        "query expansion to query_length"
    );
    assert_eq!(q[0].as_array().unwrap().len(), 16);

    let docs = [
        "rust is a language",
        "tokio runs tasks",
        "what is rust really",
        "metrics",
    ];
    let (status, denc) = s
        .call(
            "POST",
            "/encode",
            Some(json!({"texts": docs, "is_query": false})),
        )
        .await;
    assert_eq!(status, 200);
    let maxsim = |q: &Value, d: &Value| -> f64 {
        q.as_array()
            .unwrap()
            .iter()
            .map(|qt| {
                d.as_array()
                    .unwrap()
                    .iter()
                    .map(|dt| {
                        qt.as_array()
                            .unwrap()
                            .iter()
                            .zip(dt.as_array().unwrap())
                            .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
                            .sum::<f64>()
                    })
                    .fold(f64::NEG_INFINITY, f64::max)
                    .max(0.0)
            })
            .sum()
    };
    let (status, rr) = s
        .call(
            "POST",
            "/rerank",
            Some(json!({"query": "what is rust", "documents": docs})),
        )
        .await;
    assert_eq!(status, 200, "{rr}");
    let results = rr["results"].as_array().unwrap();
    let order: Vec<usize> = results
        .iter()
        .map(|r| r["index"].as_u64().unwrap() as usize)
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3], "a permutation of the documents");
    for r in results {
        let i = r["index"].as_u64().unwrap() as usize;
        let expected = maxsim(q, &denc["embeddings"][i]);
        let got = r["score"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-3,
            "document {i}: {got} vs {expected}"
        );
    }
    let scores: Vec<f64> = results
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_index_without_a_model() {
    let s = start(|_| {}).await;
    let (status, _) = s
        .call("POST", "/indexes", Some(json!({"name": "vec"})))
        .await;
    assert_eq!(status, 201);
    let (status, body) = s
        .call(
            "POST",
            "/indexes/vec/documents",
            Some(embedding_docs("d", 0..40, 32, 1)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"], 40);
    let (status, body) = s
        .call(
            "POST",
            "/indexes/vec/search",
            Some(json!({"queries": ["text"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no model"),
        "{body}"
    );
    let q = embedding_docs("q", 0..1, 32, 9)["documents"][0]["embeddings"].clone();
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/vec/search",
            Some(json!({"query_embeddings": [q], "k": 7})),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    assert_eq!(hits["results"][0].as_array().unwrap().len(), 7);
    s.stop().await;
}

/// A request and what it must get: method, path, body, status, error code, a part of the message.
type Case = (
    &'static str,
    &'static str,
    Option<Value>,
    u16,
    &'static str,
    &'static str,
);

/// Every bad request is a 4xx with `{"error": {"code", "message"}}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_a_json_error() {
    let model = fixture_model();
    let s = start(|c| {
        c.models = vec![model.clone()];
        c.limits.body_bytes = 64 << 10;
        c.limits.max_k = 50;
        c.limits.max_batch = 8;
        c.limits.max_text_chars = 100;
        c.limits.json_depth = 10;
    })
    .await;
    let (status, _) = s
        .call(
            "POST",
            "/indexes",
            Some(json!({"name": "i", "model": model})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call("POST", "/indexes/i/documents", Some(text_docs(8)))
        .await;
    assert_eq!(status, 200);
    let q16 = json!([vec![0.25f32; 16]]);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "k": 0})),
            400,
            "invalid_request",
            "k must be between 1 and 50",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "k": 51})),
            400,
            "invalid_request",
            "got 51",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": vec!["a"; 9]})),
            400,
            "invalid_request",
            "at most 8",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["x".repeat(101)]})),
            400,
            "invalid_request",
            "queries[0] is 101 characters",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": []})),
            400,
            "invalid_request",
            "queries is empty",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({})),
            400,
            "invalid_request",
            "give \"queries\"",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "query_embeddings": [q16]})),
            400,
            "invalid_request",
            "one of",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"query_embeddings": [[vec![0.5f32; 8]]]})),
            400,
            "invalid_request",
            "query_embeddings[0][0] has 8 values; expected 16",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"query_embeddings": [[]]})),
            400,
            "invalid_request",
            "no token embeddings",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "kk": 3})),
            400,
            "invalid_request",
            "unknown field `kk`",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": "a"})),
            400,
            "invalid_request",
            "at queries",
        ),
        (
            "POST",
            "/indexes/nope/search",
            Some(json!({"queries": ["a"]})),
            404,
            "not_found",
            "no index named \"nope\"",
        ),
        (
            "POST",
            "/indexes/bad..name/search",
            Some(json!({"queries": ["a"]})),
            400,
            "invalid_request",
            "invalid index name",
        ),
        (
            "GET",
            "/indexes/..%2F..%2Fetc",
            None,
            400,
            "invalid_request",
            "invalid index name",
        ),
        (
            "GET",
            "/indexes/.pending",
            None,
            400,
            "invalid_request",
            "invalid index name",
        ),
        (
            "POST",
            "/indexes",
            Some(json!({"name": "../escape"})),
            400,
            "invalid_request",
            "invalid index name",
        ),
        (
            "POST",
            "/indexes",
            Some(json!({"name": "i"})),
            409,
            "index_exists",
            "already exists",
        ),
        (
            "POST",
            "/indexes",
            Some(json!({"name": "j", "nbits": 3})),
            400,
            "invalid_request",
            "nbits must be 1, 2 or 4, got 3",
        ),
        (
            "POST",
            "/indexes",
            Some(json!({"name": "j", "model": "/no/such/model"})),
            400,
            "model_unavailable",
            "cannot load model",
        ),
        (
            "POST",
            "/indexes",
            Some(json!({"name": "j", "model": model, "model_options": {"dtype": "fp8"}})),
            400,
            "invalid_request",
            "model_options",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": []})),
            400,
            "invalid_request",
            "documents is empty",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]})),
            400,
            "invalid_request",
            "appears twice",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": [{"id": "", "text": "x"}]})),
            400,
            "invalid_request",
            "documents[0].id is empty",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": [{"id": "a"}]})),
            400,
            "invalid_request",
            "neither text nor embeddings",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(
                json!({"documents": [{"id": "a", "embeddings": [vec![1.0f32; 16]]}, {"id": "b", "text": "x"}]}),
            ),
            400,
            "invalid_request",
            "documents[1]: give embeddings for every document",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "filter": {"topic": {"$near": 1}}})),
            400,
            "invalid_request",
            "filter: /topic",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "hybrid": {"fusion": "max"}})),
            400,
            "invalid_request",
            "hybrid.fusion must be",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "hybrid": {"fusion": "linear", "alpha": 2.0}})),
            400,
            "invalid_request",
            "hybrid.alpha must be in [0, 1], got 2",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"query_embeddings": [q16], "hybrid": true})),
            400,
            "invalid_request",
            "hybrid search needs \"queries\"",
        ),
        (
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "return": ["vectors"]})),
            400,
            "invalid_request",
            "return[0] must be",
        ),
        (
            "DELETE",
            "/indexes/i/documents",
            Some(json!({"filter": {"$bad": 1}})),
            400,
            "invalid_request",
            "filter:",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": [{"id": "a", "embeddings": [vec![1.0f32; 8]]}]})),
            400,
            "invalid_request",
            "documents[0].embeddings[0] has 8 values; expected 16",
        ),
        (
            "POST",
            "/indexes/i/documents",
            Some(json!({"documents": [{"id": "a", "text": "x".repeat(101)}]})),
            400,
            "invalid_request",
            "documents[0].text is 101 characters",
        ),
        (
            "DELETE",
            "/indexes/i/documents",
            Some(json!({})),
            400,
            "invalid_request",
            "exactly one of",
        ),
        (
            "DELETE",
            "/indexes/i/documents",
            Some(json!({"ids": ["a"], "filter": {}})),
            400,
            "invalid_request",
            "exactly one of",
        ),
        (
            "POST",
            "/encode",
            Some(json!({"texts": ["a"], "is_query": true, "model": "other"})),
            404,
            "not_found",
            "not loaded",
        ),
        (
            "POST",
            "/encode",
            Some(json!({"texts": ["a"]})),
            400,
            "invalid_request",
            "missing field `is_query`",
        ),
        (
            "POST",
            "/rerank",
            Some(json!({"query": "a", "documents": []})),
            400,
            "invalid_request",
            "documents is empty",
        ),
        (
            "GET",
            "/no/such/route",
            None,
            404,
            "not_found",
            "no such route",
        ),
        (
            "PUT",
            "/indexes",
            None,
            405,
            "method_not_allowed",
            "Method Not Allowed",
        ),
    ];
    for (method, path, body, status, code, needle) in cases {
        let (got, answer) = s.call(method, path, body.clone()).await;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {answer}"
        );
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
    }
    // Raw bodies: not JSON, empty, nested too deep, too large.
    let raw_cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid JSON body"),
        (Vec::new(), 400, "empty"),
        (
            format!("{{\"queries\": {}\"a\"{}}}", "[".repeat(12), "]".repeat(12)).into_bytes(),
            400,
            "nested 13 levels",
        ),
        (
            format!("{{\"queries\": [\"{}\"]}}", "a".repeat(70 << 10)).into_bytes(),
            413,
            "larger than the limit of 65536 bytes",
        ),
        (b"{\"queries\": [\"a\"]} trailing".to_vec(), 400, "trailing"),
    ];
    for (body, status, needle) in raw_cases {
        let (got, answer) = s.raw("POST", "/indexes/i/search", body).await;
        assert_eq!(got, status, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    // The index is unharmed by all of it.
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/i/search",
            Some(json!({"queries": ["a"], "k": 3})),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    s.stop().await;
}

/// A full encoding queue answers 503 with Retry-After at once, while searches by embeddings and /health
/// go on without waiting for the encoder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_encoding_queue_is_a_503_and_embeddings_search_does_not_wait() {
    let model = fixture_model();
    let s = start(|c| {
        c.models = vec![model.clone()];
        c.encode.queue = 1;
        c.encode.max_batch = 1000;
        // The worker holds the first request this long, waiting for others to share its forward pass.
        c.encode.max_wait = Duration::from_secs(3);
        c.encode.wait_when_idle = true;
    })
    .await;
    let (status, _) = s.call("POST", "/indexes", Some(json!({"name": "v"}))).await;
    assert_eq!(status, 201);
    let (status, _) = s
        .call(
            "POST",
            "/indexes/v/documents",
            Some(embedding_docs("d", 0..20, 16, 2)),
        )
        .await;
    assert_eq!(status, 200);

    let client = s.client.clone();
    let url = s.url("/encode");
    let first = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"texts": ["held"], "is_query": true}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let depth = format!("latte_encode_queue_depth{{model=\"{model}\"}}");
    s.wait_metric(&depth, |v| v == 1.0).await;

    let res = s
        .client
        .post(s.url("/encode"))
        .json(&json!({"texts": ["refused"], "is_query": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");

    let (status, _) = s.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    let q = embedding_docs("q", 0..1, 16, 5)["documents"][0]["embeddings"].clone();
    let (status, hits) = s
        .call(
            "POST",
            "/indexes/v/search",
            Some(json!({"query_embeddings": [q], "k": 3})),
        )
        .await;
    assert_eq!(status, 200, "{hits}");
    // Both were answered while the first encode was still held in the pool.
    assert_eq!(s.metric(&depth).await, Some(1.0));
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(s.metric(&depth).await, Some(0.0));
    assert_eq!(
        s.metric(&format!("latte_encode_rejected_total{{model=\"{model}\"}}"))
            .await,
        Some(1.0)
    );
    s.stop().await;
}

/// Requests that arrive together share a forward pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_encodes_share_forward_passes() {
    let model = fixture_model();
    let s = start(|c| {
        c.models = vec![model.clone()];
        c.encode.max_batch = 1000;
        c.encode.max_wait = Duration::from_millis(500);
    })
    .await;
    let n = 16;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, url) = (s.client.clone(), s.url("/encode"));
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .json(&json!({"texts": [format!("query number {i}")], "is_query": true}))
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap();
            (status, body["embeddings"][0].as_array().map(|a| a.len()))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, Some(32)));
    }
    let batches = s
        .metric(&format!("latte_encode_batches_total{{model=\"{model}\"}}"))
        .await
        .unwrap();
    let texts = s
        .metric(&format!("latte_encode_texts_total{{model=\"{model}\"}}"))
        .await
        .unwrap();
    assert_eq!(texts, n as f64);
    assert!(
        batches < n as f64,
        "{n} requests in {batches} forward passes"
    );
    s.stop().await;
}

/// A request slower than the timeout is answered 503 `timeout` with Retry-After; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_with_a_503() {
    let model = fixture_model();
    let s = start(|c| {
        c.models = vec![model.clone()];
        c.limits.request_timeout = Duration::from_millis(100);
        c.encode.max_batch = 1000;
        // The pool holds a lone request this long, far past the request timeout.
        c.encode.max_wait = Duration::from_secs(2);
        c.encode.wait_when_idle = true;
    })
    .await;
    let res = s
        .client
        .post(s.url("/encode"))
        .json(&json!({"texts": ["slow"], "is_query": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    let (status, _) = s.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    // The abandoned request leaves the pool once its batch is gathered; it is not encoded.
    let depth = format!("latte_encode_queue_depth{{model=\"{model}\"}}");
    s.wait_metric(&depth, |v| v == 0.0).await;
    let texts = format!("latte_encode_texts_total{{model=\"{model}\"}}");
    assert_eq!(s.metric(&texts).await, Some(0.0));
    s.stop().await;
}

/// `latte serve --dtype` (`Config::dtype`): the `--model`s, the models of indexes created over the API (which
/// record it) and `/health` all use it; a request asking for another precision is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dtype_applies_to_every_model() {
    use latte_models::{ColBERT, Dtype, EncodeOptions, LoadOptions};
    let model = fixture_model();
    let text = "rust is a language for systems and for the web";
    // The library's int8 and f32 embeddings of the same document.
    let library = |dtype: Dtype| {
        let m = ColBERT::load(
            &model,
            &LoadOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let opts = EncodeOptions {
            batch_size: 8,
            normalize: true,
            ..Default::default()
        };
        m.encode(&[text.to_string()], false, &opts)
            .unwrap()
            .remove(0)
    };
    let (want, f32_emb) = (library(Dtype::Int8), library(Dtype::F32));
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        diff(&want.data, &f32_emb.data) > 1e-5,
        "int8 and f32 differ, so the test can tell them apart"
    );

    let s = start(|c| {
        c.models = vec![model.clone()];
        c.dtype = Some(Dtype::Int8);
    })
    .await;
    let (status, health) = s.call("GET", "/health", None).await;
    assert_eq!(status, 200);
    assert_eq!(health["models"], json!([model]));
    assert_eq!(health["dtypes"], json!(["int8"]));
    let (status, enc) = s
        .call(
            "POST",
            "/encode",
            Some(json!({"texts": [text], "is_query": false})),
        )
        .await;
    assert_eq!(status, 200, "{enc}");
    let got: Vec<f32> = enc["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.data.len());
    assert!(diff(&got, &want.data) < 1e-6, "/encode runs the int8 model");

    // An index created over the API records the server's precision and shares the loaded model.
    let (status, body) = s
        .call(
            "POST",
            "/indexes",
            Some(json!({"name": "books", "model": model})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s
        .call("POST", "/indexes/books/documents", Some(text_docs(12)))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, info) = s.call("GET", "/indexes/books", None).await;
    assert_eq!(info["model_options"]["dtype"], "int8", "{info}");
    let (_, health) = s.call("GET", "/health", None).await;
    assert_eq!(health["dtypes"], json!(["int8"]), "one model, loaded once");

    // Asking for another precision than the server's is refused, and nothing is created.
    let (status, body) = s
        .call(
            "POST",
            "/indexes",
            Some(json!({"name": "other", "model": model, "model_options": {"dtype": "bf16"}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("bf16") && message.contains("--dtype int8"),
        "{message}"
    );
    let (status, _) = s.call("GET", "/indexes/other", None).await;
    assert_eq!(status, 404);
    s.stop().await;
}
