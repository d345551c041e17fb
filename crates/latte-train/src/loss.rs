//! PyLate's training losses: [`Contrastive`], [`CachedContrastive`] and [`Distillation`].
//!
//! A loss runs the forward pass of a trainable model on a [`Batch`], back-propagates and returns the
//! loss value with the gradient of every parameter.

use candle_core::{Tensor, Var};
use latte_models::{dropout_seed, with_dropout};
use latte_models::{ColBERT, Mode};

use crate::batch::Batch;
use crate::scores::{colbert_scores, embed, kd_scores, log_softmax, masks, Masks, Tokens};
use crate::{Error, Result};

/// A named trainable parameter.
pub type Param = (String, Var);

/// The loss value of a batch and the gradient of each parameter (`None` when it got none).
#[derive(Debug)]
pub struct LossOutput {
    /// The loss.
    pub loss: f32,
    /// One entry per parameter, in the order given.
    pub grads: Vec<Option<Tensor>>,
}

/// A training objective.
pub trait Loss: Send + Sync {
    /// A short name (`contrastive`, ...).
    fn name(&self) -> &'static str;

    /// Forward and backward on `batch`: the loss and the gradient of every parameter in `params`.
    fn forward_backward(
        &self,
        model: &ColBERT,
        batch: &Batch,
        params: &[Param],
    ) -> Result<LossOutput>;

    /// The loss of `batch` without gradients.
    fn loss(&self, model: &ColBERT, batch: &Batch) -> Result<f32>;
}

fn grads_of(loss: &Tensor, params: &[Param]) -> Result<Vec<Option<Tensor>>> {
    let store = loss.backward()?;
    Ok(params
        .iter()
        .map(|(_, v)| store.get(v.as_tensor()).cloned())
        .collect())
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}

fn check_columns(batch: &Batch, min: usize, loss: &str) -> Result<()> {
    if batch.columns.len() < min {
        return Err(Error::Invalid(format!(
            "the {loss} loss needs a query column and at least {} document column(s); the batch has columns {:?}",
            min - 1,
            batch.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()
        )));
    }
    if batch.is_empty() {
        return Err(Error::Invalid("empty batch".into()));
    }
    Ok(())
}

/// In-batch contrastive loss (PyLate `losses.Contrastive`): every query is scored against the positive
/// and hard negatives of every query in the batch (query-major columns: group `j`, slot `k` at `j·N + k`),
/// and the cross-entropy of `scores / temperature` with the query's own positive as the target.
#[derive(Debug, Clone)]
pub struct Contrastive {
    /// Divides the scores before the softmax (PyLate default 1.0).
    pub temperature: f64,
    /// Mean over queries (true) or sum.
    pub size_average: bool,
}

impl Default for Contrastive {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            size_average: true,
        }
    }
}

/// The contrastive loss from query embeddings and each document column's embeddings.
fn contrastive_loss(
    queries: &Tensor,
    query_mask: Option<&Tensor>,
    docs: &[(Tensor, Masks)],
    temperature: f64,
    size_average: bool,
) -> Result<Tensor> {
    let a = queries.dim(0)?;
    let n = docs.len();
    let per_slot: Vec<Tensor> = docs
        .iter()
        .map(|(d, m)| colbert_scores(queries, query_mask, d, m))
        .collect::<Result<_>>()?; // each [a, b]
    let b = per_slot[0].dim(1)?;
    let scores = Tensor::stack(&per_slot, 2)?.reshape((a, b * n))?; // query-major
    let logp = log_softmax(&(scores / temperature)?)?;
    let mut target = vec![0f32; a * b * n];
    for i in 0..a {
        target[i * b * n + i * n] = 1.0;
    }
    let target = Tensor::from_vec(target, (a, b * n), queries.device())?;
    let nll = (logp * target)?.sum_all()?.neg()?;
    Ok(if size_average { (nll / a as f64)? } else { nll })
}

fn query_mask<'a>(model: &ColBERT, m: &'a Masks) -> Option<&'a Tensor> {
    (!model.settings().do_query_expansion).then_some(&m.mask)
}

impl Contrastive {
    fn forward(&self, model: &ColBERT, batch: &Batch, mode: Mode) -> Result<Tensor> {
        check_columns(batch, 2, "contrastive")?;
        let mut cols = Vec::with_capacity(batch.columns.len());
        for c in &batch.columns {
            let t = Tokens::new(model, &c.texts, c.is_query)?;
            let m = masks(model, &t)?;
            cols.push((embed(model, &t, mode)?, m));
        }
        let (q, qm) = cols.remove(0);
        contrastive_loss(
            &q,
            query_mask(model, &qm),
            &cols,
            self.temperature,
            self.size_average,
        )
    }
}

impl Loss for Contrastive {
    fn name(&self) -> &'static str {
        "contrastive"
    }

    fn forward_backward(
        &self,
        model: &ColBERT,
        batch: &Batch,
        params: &[Param],
    ) -> Result<LossOutput> {
        let loss = self.forward(model, batch, Mode::Train)?;
        Ok(LossOutput {
            loss: scalar(&loss)?,
            grads: grads_of(&loss, params)?,
        })
    }

    fn loss(&self, model: &ColBERT, batch: &Batch) -> Result<f32> {
        scalar(&self.forward(model, batch, Mode::Train)?.detach())
    }
}

/// The dropout seed of one mini-batch of one column, derived from the enclosing step's seed (`None`
/// when dropout is off), so that both passes of [`CachedContrastive`] draw the same masks.
fn minibatch_seed(column: usize, start: usize) -> Option<u64> {
    dropout_seed().map(|s| {
        s ^ (column as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (start as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
    })
}

/// [`Contrastive`] computed GradCache-style (PyLate `losses.CachedContrastive`): embeddings are computed
/// without a graph in mini-batches, the loss is back-propagated to the embeddings only, then each
/// mini-batch is run again with a graph and back-propagated with those cached gradients. Same loss and
/// gradients as [`Contrastive`], with memory bounded by `mini_batch_size` instead of the batch size.
///
/// PyLate's version never divides the cached gradients by the batch size (only the reported loss), so
/// its gradients are `batch_size ×` Contrastive's; latte's equal Contrastive's. After gradient clipping
/// (or with Adam's scale invariance) the two take the same steps.
#[derive(Debug, Clone)]
pub struct CachedContrastive {
    /// The loss computed on the cached embeddings.
    pub contrastive: Contrastive,
    /// Texts per forward pass (PyLate default 32).
    pub mini_batch_size: usize,
}

impl Default for CachedContrastive {
    fn default() -> Self {
        Self {
            contrastive: Contrastive::default(),
            mini_batch_size: 32,
        }
    }
}

impl CachedContrastive {
    fn embed_no_grad(&self, model: &ColBERT, tokens: &Tokens, column: usize) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mbs = self.mini_batch_size.max(1);
        for start in (0..tokens.len()).step_by(mbs) {
            let end = (start + mbs).min(tokens.len());
            let e = with_dropout(minibatch_seed(column, start), || {
                embed(model, &tokens.slice(start, end), Mode::Train)
            })?;
            parts.push(e.detach());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The first pass: every column tokenised, its masks, and its embeddings computed without a graph.
    fn first_pass(
        &self,
        model: &ColBERT,
        batch: &Batch,
    ) -> Result<(Vec<Tokens>, Vec<Tensor>, Vec<Masks>)> {
        check_columns(batch, 2, "cached-contrastive")?;
        if self.mini_batch_size == 0 {
            return Err(Error::Invalid("mini_batch_size must be at least 1".into()));
        }
        let (mut tokens, mut reps, mut col_masks) = (Vec::new(), Vec::new(), Vec::new());
        for (column, c) in batch.columns.iter().enumerate() {
            let t = Tokens::new(model, &c.texts, c.is_query)?;
            col_masks.push(masks(model, &t)?);
            reps.push(self.embed_no_grad(model, &t, column)?);
            tokens.push(t);
        }
        Ok((tokens, reps, col_masks))
    }

    /// The contrastive loss of the cached embeddings (`reps[0]` the queries).
    fn loss_of(&self, model: &ColBERT, reps: &[Tensor], col_masks: &[Masks]) -> Result<Tensor> {
        let docs: Vec<(Tensor, Masks)> = reps[1..]
            .iter()
            .cloned()
            .zip(col_masks[1..].iter().cloned())
            .collect();
        contrastive_loss(
            &reps[0],
            query_mask(model, &col_masks[0]),
            &docs,
            self.contrastive.temperature,
            self.contrastive.size_average,
        )
    }

    /// The loss of `batch` computed exactly as [`Loss::forward_backward`] computes it (same mini-batches,
    /// same dropout masks under the same seed), without gradients.
    pub fn loss_with_replay(&self, model: &ColBERT, batch: &Batch) -> Result<f32> {
        let (_, reps, col_masks) = self.first_pass(model, batch)?;
        scalar(&self.loss_of(model, &reps, &col_masks)?)
    }
}

impl Loss for CachedContrastive {
    fn name(&self) -> &'static str {
        "cached-contrastive"
    }

    fn forward_backward(
        &self,
        model: &ColBERT,
        batch: &Batch,
        params: &[Param],
    ) -> Result<LossOutput> {
        let (tokens, reps, col_masks) = self.first_pass(model, batch)?;
        let reps: Vec<Var> = reps
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let tensors: Vec<Tensor> = reps.iter().map(|r| r.as_tensor().clone()).collect();
        let loss = self.loss_of(model, &tensors, &col_masks)?;
        let value = scalar(&loss)?;
        let store = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mbs = self.mini_batch_size;
        for (column, (t, rep)) in tokens.iter().zip(&reps).enumerate() {
            let Some(cached) = store.get(rep.as_tensor()) else {
                continue;
            };
            for start in (0..t.len()).step_by(mbs) {
                let end = (start + mbs).min(t.len());
                // The same dropout masks as the first pass (PyLate's RandContext).
                let e = with_dropout(minibatch_seed(column, start), || {
                    embed(model, &t.slice(start, end), Mode::Train)
                })?;
                let g = cached.narrow(0, start, end - start)?.detach();
                let surrogate = (e * g)?.sum_all()?;
                for (acc, g) in grads.iter_mut().zip(grads_of(&surrogate, params)?) {
                    if let Some(g) = g {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g,
                        });
                    }
                }
            }
        }
        Ok(LossOutput { loss: value, grads })
    }

    fn loss(&self, model: &ColBERT, batch: &Batch) -> Result<f32> {
        self.contrastive.loss(model, batch)
    }
}

/// Knowledge distillation (PyLate `losses.Distillation`): the student's MaxSim scores of each query's
/// `n_ways` documents, min-max normalised per query, against the teacher's scores, by KL divergence of
/// the log-softmaxes (`batchmean`).
#[derive(Debug, Clone)]
pub struct Distillation {
    /// Min-max normalise student scores per query (PyLate default true).
    pub normalize_scores: bool,
    /// `batchmean` (true) or `sum`.
    pub size_average: bool,
}

impl Default for Distillation {
    fn default() -> Self {
        Self {
            normalize_scores: true,
            size_average: true,
        }
    }
}

impl Distillation {
    fn forward(&self, model: &ColBERT, batch: &Batch, mode: Mode) -> Result<Tensor> {
        check_columns(batch, 2, "distillation")?;
        let labels = batch.labels.as_ref().ok_or_else(|| {
            Error::Invalid("the distillation loss needs teacher scores (a `scores` column)".into())
        })?;
        let a = batch.len();
        let n = labels.first().map(|l| l.len()).unwrap_or(0);
        if labels.len() != a || labels.iter().any(|l| l.len() != n) || n == 0 {
            return Err(Error::Invalid(format!(
                "teacher scores must be {a} rows of the same non-zero length"
            )));
        }
        let dcol = &batch.columns[1];
        if dcol.texts.len() != a * n {
            return Err(Error::Invalid(format!(
                "column {:?}: expected {n} documents per query ({} in all) to match the scores, got {}",
                dcol.name,
                a * n,
                dcol.texts.len()
            )));
        }
        let qt = Tokens::new(model, &batch.columns[0].texts, true)?;
        let dt = Tokens::new(model, &dcol.texts, false)?;
        let qm = masks(model, &qt)?;
        let dm = masks(model, &dt)?;
        let q = embed(model, &qt, mode)?;
        let d = embed(model, &dt, mode)?;
        let mut scores = kd_scores(&q, query_mask(model, &qm), &d, &dm)?;
        if self.normalize_scores {
            let max = scores.max_keepdim(1)?;
            let min = scores.min_keepdim(1)?;
            scores = scores
                .broadcast_sub(&min)?
                .broadcast_div(&((max - &min)? + 1e-8)?)?;
        }
        let flat: Vec<f32> = labels.iter().flatten().copied().collect();
        let teacher = Tensor::from_vec(flat, (a, n), q.device())?;
        let ls = log_softmax(&scores)?;
        let lt = log_softmax(&teacher)?;
        let kl = (lt.exp()? * (lt - ls)?)?.sum_all()?;
        Ok(if self.size_average {
            (kl / a as f64)?
        } else {
            kl
        })
    }
}

impl Loss for Distillation {
    fn name(&self) -> &'static str {
        "distillation"
    }

    fn forward_backward(
        &self,
        model: &ColBERT,
        batch: &Batch,
        params: &[Param],
    ) -> Result<LossOutput> {
        let loss = self.forward(model, batch, Mode::Train)?;
        Ok(LossOutput {
            loss: scalar(&loss)?,
            grads: grads_of(&loss, params)?,
        })
    }

    fn loss(&self, model: &ColBERT, batch: &Batch) -> Result<f32> {
        scalar(&self.forward(model, batch, Mode::Train)?.detach())
    }
}
