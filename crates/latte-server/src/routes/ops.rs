//! `GET /health` and `GET /metrics`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::api::Health;
use crate::metrics::render_family;
use crate::state::AppState;

/// Liveness: answers at once, whatever the encoding pool or the writers are doing.
#[utoipa::path(get, path = "/health", tag = "ops",
    responses((status = 200, description = "The server is up", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let models = state.models.all();
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        indexes: state.indexes.list().len(),
        models: models.iter().map(|e| e.name.clone()).collect(),
        dtypes: models
            .iter()
            .map(|e| e.options.dtype.unwrap_or_default().to_string())
            .collect(),
    })
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    state.metrics.render_requests(&mut out);
    let models = state.models.all();
    let per_model = |f: &dyn Fn(&crate::encoder::PoolStats) -> f64| -> Vec<(String, f64)> {
        models
            .iter()
            .map(|e| (e.name.clone(), f(&e.stats)))
            .collect()
    };
    render_family(
        &mut out,
        "latte_encode_queue_depth",
        "gauge",
        "Encoding requests waiting or being encoded, by model.",
        "model",
        &per_model(&|s| s.pending.load(Ordering::Relaxed) as f64),
    );
    render_family(
        &mut out,
        "latte_encode_batches_total",
        "counter",
        "Forward passes run by the encoding pool, by model.",
        "model",
        &per_model(&|s| s.batches.load(Ordering::Relaxed) as f64),
    );
    render_family(
        &mut out,
        "latte_encode_texts_total",
        "counter",
        "Texts encoded by the encoding pool, by model.",
        "model",
        &per_model(&|s| s.texts.load(Ordering::Relaxed) as f64),
    );
    render_family(
        &mut out,
        "latte_encode_rejected_total",
        "counter",
        "Encoding requests refused with 503 because the queue was full, by model.",
        "model",
        &per_model(&|s| s.rejected.load(Ordering::Relaxed) as f64),
    );
    let docs: Vec<(String, f64)> = state
        .indexes
        .list()
        .iter()
        .map(|e| {
            let n = e.current.load().as_ref().map_or(0, |i| i.len());
            (e.name.clone(), n as f64)
        })
        .collect();
    render_family(
        &mut out,
        "latte_index_documents",
        "gauge",
        "Live documents, by index.",
        "index",
        &docs,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
