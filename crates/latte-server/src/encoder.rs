//! The encoding pool of one model: worker threads outside the async runtime that take requests from a
//! bounded queue and encode the texts of the requests that arrived within a few milliseconds of each other
//! in one forward pass (queries and documents apart: their lengths differ). The wait for more requests is
//! paid only under load (a request that was already queued when a worker came for it, i.e. it arrived while
//! the pool was busy): a request reaching an idle pool is encoded at once, with whatever else is queued. At
//! most `queue` requests per model wait or are being encoded; one more is a 503 with `Retry-After` at once,
//! never a wait. A request whose client has gone is skipped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use latte_models::{ColBERT, Embedding, EncodeOptions, ModelOptions};
use tokio::sync::oneshot;

use crate::config::EncodeConfig;
use crate::error::ApiError;

type Reply = oneshot::Sender<Result<Vec<Embedding>, ApiError>>;

struct Job {
    texts: Vec<String>,
    is_query: bool,
    reply: Reply,
    _pending: Pending,
}

impl Job {
    /// Answers the request (it stops counting as pending first, so a client that sends its next request at
    /// once finds the slot free).
    fn answer(self, result: Result<Vec<Embedding>, ApiError>) {
        let Job {
            reply, _pending, ..
        } = self;
        drop(_pending);
        let _ = reply.send(result);
    }
}

/// Counts a request from its admission until it is answered (or dropped).
struct Pending(Arc<PoolStats>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counters of one pool, for `/metrics`.
#[derive(Default)]
pub struct PoolStats {
    /// Requests admitted and not yet answered (queued, or in a batch being gathered or encoded).
    pub pending: AtomicUsize,
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Texts encoded.
    pub texts: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
}

/// A loaded model and its encoding pool. Dropping the last handle stops the workers once the queue is
/// drained.
pub struct Encoder {
    /// The model's name (folder or Hub id).
    pub name: String,
    /// The options it was loaded with.
    pub options: ModelOptions,
    /// Dimension of its token embeddings.
    pub dim: usize,
    /// Counters.
    pub stats: Arc<PoolStats>,
    tx: Sender<Job>,
    queue: usize,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("name", &self.name)
            .field("dim", &self.dim)
            .finish()
    }
}

impl Encoder {
    /// Starts the pool of `model`.
    pub fn start(name: String, options: ModelOptions, model: ColBERT, cfg: &EncodeConfig) -> Self {
        // Unbounded channel; admission is bounded by `pending` (see `encode`).
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let model = Arc::new(model);
        let stats = Arc::new(PoolStats::default());
        let dim = model.output_dim();
        for w in 0..cfg.workers.max(1) {
            let (rx, model, stats, cfg) = (rx.clone(), model.clone(), stats.clone(), cfg.clone());
            std::thread::Builder::new()
                .name(format!("latte-encode-{w}"))
                .spawn(move || worker(&rx, &model, &stats, &cfg))
                .expect("spawning an encoding thread");
        }
        Self {
            name,
            options,
            dim,
            stats,
            tx,
            queue: cfg.queue.max(1),
        }
    }

    /// Encodes `texts` (queries when `is_query`), sharing a forward pass with other requests.
    pub async fn encode(
        &self,
        texts: Vec<String>,
        is_query: bool,
    ) -> Result<Vec<Embedding>, ApiError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        // Admission: at most `queue` requests waiting or being encoded; beyond, 503 at once.
        if self.stats.pending.fetch_add(1, Ordering::SeqCst) >= self.queue {
            self.stats.pending.fetch_sub(1, Ordering::SeqCst);
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::unavailable(
                "overloaded",
                format!(
                    "the encoding queue of model {} is full ({} requests); retry shortly",
                    self.name, self.queue
                ),
                1,
            ));
        }
        let job = Job {
            texts,
            is_query,
            reply,
            _pending: Pending(self.stats.clone()),
        };
        if self.tx.send(job).is_err() {
            return Err(ApiError::unavailable(
                "shutting_down",
                "the encoding pool has stopped",
                1,
            ));
        }
        rx.await
            .map_err(|_| ApiError::internal("the encoding worker stopped before answering"))?
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, model: &ColBERT, stats: &PoolStats, cfg: &EncodeConfig) {
    loop {
        // One worker at a time gathers a batch; the others wait for the receiver.
        let batch = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            // A request already queued arrived while the pool was busy (encoding, or another worker
            // gathering): that is load, and the batching window is worth its wait. A request that wakes an
            // idle worker is alone (a lone client's next request comes only after its previous answer).
            let (first, queued) = match rx.try_recv() {
                Ok(job) => (job, true),
                Err(_) => match rx.recv() {
                    Ok(job) => (job, false),
                    Err(_) => return,
                },
            };
            let start = Instant::now();
            let mut n = first.texts.len();
            let mut batch = vec![first];
            // What is queued already joins at once.
            while n < cfg.max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        n += job.texts.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            // Then wait for more only under load (or when asked to always wait).
            let busy = queued || batch.len() > 1;
            if busy || cfg.wait_when_idle {
                let deadline = start + cfg.max_wait;
                while n < cfg.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(job) => {
                            n += job.texts.len();
                            batch.push(job);
                        }
                        Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                            break
                        }
                    }
                }
            }
            batch
        };
        let (queries, documents): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|j| j.is_query);
        for group in [queries, documents] {
            run(group, model, stats, cfg);
        }
    }
}

/// Encodes the texts of `jobs` (all queries or all documents) together and hands each job its share.
fn run(jobs: Vec<Job>, model: &ColBERT, stats: &PoolStats, cfg: &EncodeConfig) {
    // A client that gave up (timeout, closed connection) needs no answer.
    let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
    let Some(is_query) = jobs.first().map(|j| j.is_query) else {
        return;
    };
    let texts: Vec<String> = jobs.iter().flat_map(|j| j.texts.iter().cloned()).collect();
    let opts = EncodeOptions {
        batch_size: cfg.max_batch.max(1),
        show_progress: Some(false),
        ..Default::default()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.encode(&texts, is_query, &opts)
    }));
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
    match result {
        Ok(Ok(embeddings)) => {
            let mut it = embeddings.into_iter();
            for job in jobs {
                let mine: Vec<Embedding> = it.by_ref().take(job.texts.len()).collect();
                job.answer(Ok(mine));
            }
        }
        Ok(Err(e)) => {
            let e = ApiError::from(e);
            for job in jobs {
                job.answer(Err(e.clone()));
            }
        }
        Err(_) => {
            tracing::error!("encoding panicked; the requests of this batch get 500");
            for job in jobs {
                job.answer(Err(ApiError::internal("encoding failed unexpectedly")));
            }
        }
    }
}
