//! The HTTP API of latte, run as `latte serve`: indexes, documents, search (text, embeddings, filters,
//! hybrid), encode and rerank over JSON, with OpenAPI, Prometheus metrics and API keys.
//!
//! * `state`: what handlers share (models, indexes, metrics, writes in progress).
//! * `encoder`: the encoding pool of each model (batching worker threads off the async runtime).
//! * `routes`: the handlers; `api`: their JSON bodies; `extract`: the body parser with limits.
//! * `auth`: API keys and scopes; `metrics`: the Prometheus exposition; `error`: the JSON errors.
//!
//! ```no_run
//! # async fn run() -> Result<(), latte_server::ServeError> {
//! let config = latte_server::Config {
//!     data: "indexes".into(),
//!     models: vec!["lightonai/GTE-ModernColBERT-v1".into()],
//!     ..Default::default()
//! };
//! let server = latte_server::Server::bind(config, "127.0.0.1:8080".parse().unwrap()).await?;
//! server.run(latte_server::shutdown_signal()).await
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod config;
pub mod encoder;
pub mod error;
pub mod extract;
pub mod metrics;
mod routes;
pub mod state;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use latte_models::ModelOptions;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use auth::{ApiKeys, KeyFileError, Scope};
pub use config::{Config, EncodeConfig, Limits, SearchConfig};
pub use error::ApiError;

use state::{AppState, Indexes, Models, SearchGate, Writes};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// An open server (no API keys) on a non-loopback address.
    #[error(
        "refusing to serve on {0} without API keys: pass --api-keys FILE, bind 127.0.0.1, or pass \
         --insecure to serve every index to anyone who can reach {0}"
    )]
    Exposed(IpAddr),
    /// A `--model` failed to load.
    #[error("{0}")]
    Model(String),
    /// The data folder cannot be read.
    #[error("data folder {path}: {source}")]
    Data {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Binding or serving failed.
    #[error("cannot serve on {addr}: {source}")]
    Io {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The OpenAPI description of every route.
#[derive(OpenApi)]
#[openapi(
    info(title = "latte", description = "Late-interaction (ColBERT) retrieval: indexes, documents, search, encode, rerank."),
    paths(
        routes::ops::health,
        routes::ops::metrics,
        routes::indexes::list,
        routes::indexes::create,
        routes::indexes::get,
        routes::indexes::delete,
        routes::documents::add,
        routes::documents::delete,
        routes::documents::get,
        routes::search::search,
        routes::models::encode,
        routes::models::rerank,
    ),
    tags(
        (name = "ops", description = "Health and metrics"),
        (name = "indexes", description = "Create, list, describe and delete indexes"),
        (name = "documents", description = "Add, delete and read documents"),
        (name = "search", description = "Search an index"),
        (name = "models", description = "Encode and rerank with a loaded model"),
    )
)]
struct ApiDoc;

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The routes with every layer: request id and access log, metrics, JSON errors, API keys, panic catching,
/// request timeout and body limit.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(routes::ops::health))
        .route("/metrics", get(routes::ops::metrics))
        .route(
            "/indexes",
            get(routes::indexes::list).post(routes::indexes::create),
        )
        .route(
            "/indexes/{name}",
            get(routes::indexes::get).delete(routes::indexes::delete),
        )
        .route(
            "/indexes/{name}/documents",
            post(routes::documents::add).delete(routes::documents::delete),
        )
        .route(
            "/indexes/{name}/documents/{id}",
            get(routes::documents::get),
        )
        .route("/indexes/{name}/search", post(routes::search::search))
        .route("/encode", post(routes::models::encode))
        .route("/rerank", post(routes::models::rerank))
        .with_state(state.clone())
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .fallback(|| async { ApiError::not_found("no such route") });
    api.layer(DefaultBodyLimit::max(state.config.limits.body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), timeout))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a handler panicked");
                ApiError::internal("the server failed while answering this request").into_response()
            },
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state, access))
}

/// A bound server, ready to run.
pub struct Server {
    state: AppState,
    listener: tokio::net::TcpListener,
}

impl Server {
    /// Loads the `--model`s, opens every index under the data folder (loading each one's model once) and
    /// binds `addr`. Refuses a non-loopback address without API keys unless `insecure`.
    pub async fn bind(config: Config, addr: SocketAddr) -> Result<Server, ServeError> {
        config.check_bind(addr.ip())?;
        let config = Arc::new(config);
        let c = config.clone();
        let (models, indexes) = tokio::task::spawn_blocking(move || {
            let models = Models::new(c.clone());
            for m in &c.models {
                models
                    .get_or_load(m, &ModelOptions::default())
                    .map_err(|e| ServeError::Model(e.message))?;
            }
            let indexes = Indexes::open(&c.data, &models).map_err(|source| ServeError::Data {
                path: c.data.display().to_string(),
                source,
            })?;
            Ok::<_, ServeError>((models, indexes))
        })
        .await
        .map_err(|e| ServeError::Model(format!("loading failed: {e}")))??;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Io {
                addr: addr.to_string(),
                source,
            })?;
        let searches = Arc::new(SearchGate::new(&config.search));
        let state = AppState {
            config,
            models: Arc::new(models),
            indexes: Arc::new(indexes),
            metrics: Default::default(),
            writes: Arc::new(Writes::default()),
            searches,
        };
        Ok(Server { state, listener })
    }

    /// The address bound (its port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then stops accepting connections, lets the requests in flight
    /// finish, and waits for any write still running (a write whose client went away still commits).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.local_addr();
        let app = router(self.state.clone());
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Io {
                addr: addr.to_string(),
                source,
            })?;
        self.state.writes.wait_idle().await;
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

/// Answers 503 `timeout` when a request takes longer than the limit.
async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.config.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => ApiError::unavailable(
            "timeout",
            format!("the request took longer than the limit of {limit:?}"),
            1,
        )
        .into_response(),
    }
}

/// Turns every error response that is not already JSON (unknown route, wrong method, a rejected path) into
/// the JSON error body, keeping its status and headers.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, ApiError::code_for(status), message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// A request id from the client's `x-request-id` (up to 64 characters of `A-Z a-z 0-9 - _ .`), else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
        .map(str::to_string)
        .unwrap_or_else(|| format!("r{:08}", REQUEST_SEQ.fetch_add(1, Ordering::Relaxed)))
}

struct InFlight(Arc<metrics::Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives each request an id (echoed in `x-request-id`), counts it in the metrics and logs one line for it:
/// id, method, path (without the query string), status and time. Headers (and so API keys) are never
/// logged.
async fn access(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(state.metrics.clone());
    let start = Instant::now();
    let mut res = next.run(req).await;
    let elapsed = start.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    let status = res.status().as_u16();
    state
        .metrics
        .record(&route, method.as_str(), status, elapsed);
    tracing::info!(
        target: "latte_server::access",
        "{id} {method} {path} {status} {:.1}ms",
        elapsed.as_secs_f64() * 1e3
    );
    res
}
