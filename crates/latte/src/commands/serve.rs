//! `latte serve`: the HTTP API over every index under a data folder (crate `latte-server`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use latte_models::Dtype;
use latte_server::{ApiKeys, Config, EncodeConfig, Limits, SearchConfig};

use super::model_args::HubArgs;

/// Serve the indexes under a folder over HTTP (JSON; OpenAPI at /openapi.json, docs at /docs).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Folder holding one folder per index (created if missing).
    #[arg(long)]
    pub data: PathBuf,
    /// Model to load at start (repeatable); the first is the default of /encode and /rerank. Each index's
    /// own model (with its recorded options) is loaded as well.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// API keys: one `key scope` per line, scopes read, write, admin. Without it the server only binds a
    /// loopback address unless --insecure is given.
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// Serve a non-loopback address without API keys.
    #[arg(long)]
    pub insecure: bool,
    /// Largest request body, in MB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Largest k of a search.
    #[arg(long, default_value_t = 1000)]
    pub max_k: usize,
    /// Most queries, texts or documents in one request.
    #[arg(long, default_value_t = 1000)]
    pub max_batch: usize,
    /// Longest text, in characters.
    #[arg(long, default_value_t = 50_000)]
    pub max_text_chars: usize,
    /// Seconds a request may take before it is answered 503.
    #[arg(long, default_value_t = 60)]
    pub request_timeout: u64,
    /// Encoding worker threads per model.
    #[arg(long, default_value_t = 1)]
    pub encode_workers: usize,
    /// Most texts in one forward pass of the encoding pool.
    #[arg(long, default_value_t = 64)]
    pub encode_batch: usize,
    /// Milliseconds a worker waits for more requests to join a forward pass under load (when the request it
    /// took arrived while the pool was busy; one reaching an idle pool is encoded at once unless
    /// --encode-wait-when-idle).
    #[arg(long, default_value_t = 3)]
    pub encode_wait_ms: u64,
    /// Make a request reaching an idle pool wait --encode-wait-ms for others too.
    #[arg(long)]
    pub encode_wait_when_idle: bool,
    /// Encoding requests queued per model before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub encode_queue: usize,
    /// Searches running at once (default: the number of CPUs).
    #[arg(long)]
    pub search_workers: Option<usize>,
    /// Searches waiting for a turn before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub search_queue: usize,
    /// Precision of the linear layers of every model the server loads: f32, bf16 (bf16 weights and
    /// activations, f32 accumulation) or int8 (dynamically quantised). Applies to the --models, to each
    /// index's model (in place of the precision the index recorded, as `latte search --dtype` does) and to
    /// indexes created over the API (which record it). Default: f32 for the --models, each index its
    /// recorded precision. CPU only.
    #[arg(long, value_name = "f32|bf16|int8")]
    pub dtype: Option<Dtype>,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating the data folder {}", args.data.display()))?;
    let api_keys = args
        .api_keys
        .as_deref()
        .map(ApiKeys::from_file)
        .transpose()?;
    let config = Config {
        data: args.data.clone(),
        models: args.models.clone(),
        hub: args.hub.options(),
        dtype: args.dtype,
        api_keys,
        insecure: args.insecure,
        limits: Limits {
            body_bytes: args.max_body_mb << 20,
            max_k: args.max_k,
            max_batch: args.max_batch,
            max_text_chars: args.max_text_chars,
            request_timeout: Duration::from_secs(args.request_timeout),
            ..Limits::default()
        },
        encode: EncodeConfig {
            workers: args.encode_workers,
            max_batch: args.encode_batch,
            max_wait: Duration::from_millis(args.encode_wait_ms),
            wait_when_idle: args.encode_wait_when_idle,
            queue: args.encode_queue,
        },
        search: SearchConfig {
            workers: args
                .search_workers
                .unwrap_or_else(|| SearchConfig::default().workers),
            queue: args.search_queue,
        },
    };
    // Refuse an exposed open server before loading anything.
    config.check_bind(args.host)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("latte-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let t = std::time::Instant::now();
        let server =
            latte_server::Server::bind(config, SocketAddr::new(args.host, args.port)).await?;
        eprintln!(
            "latte serve: listening on http://{} ({} data, started in {:.1?}; docs at /docs)",
            server.local_addr(),
            args.data.display(),
            t.elapsed()
        );
        server.run(latte_server::shutdown_signal()).await?;
        Ok(())
    })
}
