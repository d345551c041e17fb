//! The server's settings: where the indexes live, which models to load, the limits every request is held
//! to, and the encoding pool's batching.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use latte_models::{Dtype, HubOptions};

use crate::auth::ApiKeys;

/// Limits on requests; exceeding one is a 4xx (or 503 for the timeout) with a JSON error.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub body_bytes: usize,
    /// Deepest JSON nesting of a body.
    pub json_depth: usize,
    /// Largest `k` of a search.
    pub max_k: usize,
    /// Most queries, texts or documents in one request.
    pub max_batch: usize,
    /// Longest text (query, document, title), in characters.
    pub max_text_chars: usize,
    /// Most token vectors of one document or query given as embeddings.
    pub max_tokens: usize,
    /// Time a request may take before it is answered with 503 `timeout`.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 32 << 20,
            json_depth: 64,
            max_k: 1000,
            max_batch: 1000,
            max_text_chars: 50_000,
            max_tokens: 8192,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// The encoding pool: worker threads (outside the async runtime) that batch texts from concurrent
/// requests into shared forward passes.
#[derive(Debug, Clone)]
pub struct EncodeConfig {
    /// Worker threads per model.
    pub workers: usize,
    /// Most texts in one forward pass.
    pub max_batch: usize,
    /// How long a worker waits for more requests once it holds one, while the pool is busy (see
    /// `wait_when_idle`).
    pub max_wait: Duration,
    /// Whether a request reaching an idle pool also waits `max_wait` for others. When false (the default)
    /// the window is used only under load — the request was already queued when a worker came for it (it
    /// arrived while the pool was busy), or more are — so a lone client pays no batching delay.
    pub wait_when_idle: bool,
    /// Requests waiting or being encoded per model; one more gets 503 with `Retry-After`.
    pub queue: usize,
}

impl Default for EncodeConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            max_batch: 64,
            max_wait: Duration::from_millis(3),
            wait_when_idle: false,
            queue: 256,
        }
    }
}

/// Searches: how many run at once on the blocking pool, and how many more may wait for a turn.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Searches running at once (each on a blocking thread; a search uses one core).
    pub workers: usize,
    /// Searches admitted beyond those running, waiting for a turn; one more gets 503 with `Retry-After`.
    pub queue: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: 256,
        }
    }
}

/// Everything `latte serve` is given.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The folder holding one folder per index.
    pub data: PathBuf,
    /// Models to load at start (`--model`); the first is the default of `/encode` and `/rerank`.
    pub models: Vec<String>,
    /// Where Hub models come from.
    pub hub: HubOptions,
    /// Precision of the linear layers of every model the server loads (`--dtype`): the `--model`s, each
    /// index's model (in place of the one the index recorded, as `latte search --dtype` does) and the model
    /// of an index created over the API (which records it). `None`: f32 for the `--model`s, and each index
    /// its recorded precision.
    pub dtype: Option<Dtype>,
    /// API keys; `None` leaves every route open (and the server on loopback unless `insecure`).
    pub api_keys: Option<ApiKeys>,
    /// Allow binding a non-loopback address without API keys.
    pub insecure: bool,
    /// Request limits.
    pub limits: Limits,
    /// Encoding pool.
    pub encode: EncodeConfig,
    /// Search admission.
    pub search: SearchConfig,
}

impl Config {
    /// Refuses to expose an open server: without API keys only a loopback address may be bound, unless
    /// `insecure` is set.
    pub fn check_bind(&self, host: IpAddr) -> Result<(), crate::ServeError> {
        if self.api_keys.is_none() && !self.insecure && !host.is_loopback() {
            return Err(crate::ServeError::Exposed(host));
        }
        Ok(())
    }
}
