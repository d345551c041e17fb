//! Differentiable MaxSim scores and the embedding of a text column for training, with PyLate's
//! training-time masks.
//!
//! PyLate pads every training text to its maximum length and masks by *multiplying* similarities by 0,
//! so a masked document token is a candidate of similarity 0 in the max over document tokens. latte pads
//! each column only to its longest text (far fewer tokens to run through the model) and restores the
//! exact same scores with a per-document floor: 0 for a document that PyLate's layout would give a
//! masked slot (shorter than `document_length`, or holding a skiplist token), −∞ otherwise.

use candle_core::{DType, Tensor, D};
use latte_models::Tokenized;
use latte_models::{ColBERT, Mode};

use crate::Result;

/// Far below any similarity of normalised vectors: "no floor".
const NO_FLOOR: f64 = -1e4;

/// One text column, tokenised and padded to a common length.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Token ids and attention masks, all of the same length.
    pub items: Vec<Tokenized>,
    /// Whether these are queries.
    pub is_query: bool,
}

impl Tokens {
    /// Tokenises `texts` as PyLate's collator does (`model.tokenize(texts, is_query, pad=True)`), padded
    /// to the longest text of the column.
    pub fn new(model: &ColBERT, texts: &[String], is_query: bool) -> Result<Self> {
        let mut items = model.tokenize(texts, is_query)?;
        let len = items.iter().map(|t| t.ids.len()).max().unwrap_or(1).max(1);
        let pad = model.pad_id();
        for t in &mut items {
            while t.ids.len() < len {
                t.ids.push(pad);
                t.mask.push(0);
            }
        }
        Ok(Self { items, is_query })
    }

    /// Rows `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> Self {
        Self {
            items: self.items[start..end].to_vec(),
            is_query: self.is_query,
        }
    }

    /// Number of texts.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No texts.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The masks of a column: `[n, len]` (1 = scored token) and, for documents, the `[n]` floors.
#[derive(Debug, Clone)]
pub struct Masks {
    /// Query mask (attention mask) or document mask (attention mask and not skiplisted), f32.
    pub mask: Tensor,
    /// Documents: 0 where PyLate's padded layout has a masked slot, a large negative value elsewhere.
    pub floor: Option<Tensor>,
}

/// The masks PyLate's losses use for `tokens` (`extract_skiplist_mask`).
pub fn masks(model: &ColBERT, tokens: &Tokens) -> Result<Masks> {
    let dev = model.transformer.device();
    let n = tokens.len();
    let len = tokens.items.first().map(|t| t.ids.len()).unwrap_or(1);
    let mut mask = Vec::with_capacity(n * len);
    let mut floor = Vec::with_capacity(n);
    for t in &tokens.items {
        let mut kept = 0usize;
        for (id, m) in t.ids.iter().zip(&t.mask) {
            let keep = *m == 1 && (tokens.is_query || !model.skiplist().contains(id));
            kept += keep as usize;
            mask.push(if keep { 1f32 } else { 0f32 });
        }
        floor.push(if kept < model.settings().document_length {
            0f32
        } else {
            NO_FLOOR as f32
        });
    }
    let mask = Tensor::from_vec(mask, (n, len), dev)?;
    let floor = if tokens.is_query {
        None
    } else {
        Some(Tensor::from_vec(floor, n, dev)?)
    };
    Ok(Masks { mask, floor })
}

/// Texts per forward pass inside [`embed`]: texts are sorted by length and run in groups this large (or
/// larger, where the texts past this count are as long as the group's longest), each padded only to its own
/// longest text.
const GROUP: usize = 8;

/// The most texts of one forward pass inside [`embed`] (bounds the activations kept for the backward pass).
const MAX_GROUP: usize = 32;

/// Runs the model on `tokens` and L2-normalises every token: `[n, len, dim]`.
///
/// Texts are run in groups of similar length, each padded only to its own longest text (padding changes
/// nothing: padded positions are masked out of attention and of the scores), then zero-padded back to
/// the column's length and put back in order. On real data this runs far fewer tokens through the
/// model than padding every text to the longest (or, as PyLate does, to `document_length`).
pub fn embed(model: &ColBERT, tokens: &Tokens, mode: Mode) -> Result<Tensor> {
    let n = tokens.len();
    let len = tokens.items.first().map(|t| t.ids.len()).unwrap_or(1);
    // Queries keep every position: expansion tokens are computed even where the attention mask is 0.
    let real = |t: &Tokenized| {
        if tokens.is_query {
            t.ids.len()
        } else {
            t.mask.iter().rposition(|&m| m == 1).map_or(1, |p| p + 1)
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(real(&tokens.items[i])));
    // Groups of GROUP texts, except that a text as long as its group's longest joins the group (up to
    // MAX_GROUP texts): it adds no padding, and each forward pass has a fixed cost (the weights gathered and
    // packed, every parameter's gradient accumulated, once per pass). Queries, all of one length, run as
    // one pass; so do the documents cut at `document_length`.
    // Documents on an encoder that skips the padding (their padded rows are masked out of the scores)
    // cost the same in any grouping: MAX_GROUP texts per pass, whatever their lengths.
    let unpadded = !tokens.is_query && model.skips_padding();
    let mut groups: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    for end in 1..=n {
        let size = end - start;
        let longer = end < n && real(&tokens.items[order[end]]) < real(&tokens.items[order[start]]);
        if end == n || size >= MAX_GROUP || (size >= GROUP && longer && !unpadded) {
            groups.push(&order[start..end]);
            start = end;
        }
    }
    let mut parts = Vec::new();
    for group in groups {
        let glen = group
            .iter()
            .map(|&i| real(&tokens.items[i]))
            .max()
            .unwrap_or(1);
        let batch: Vec<Tokenized> = group
            .iter()
            .map(|&i| {
                let t = &tokens.items[i];
                Tokenized {
                    ids: t.ids[..glen].to_vec(),
                    mask: t.mask[..glen].to_vec(),
                }
            })
            .collect();
        let x = if unpadded {
            model.forward_tokens_attended(&batch, mode)?
        } else {
            model.forward_tokens(&batch, mode)?.0
        };
        let x = if x.dtype() == DType::F32 {
            x
        } else {
            x.to_dtype(DType::F32)?
        };
        let x = ColBERT::normalize(&x)?;
        parts.push(if glen < len {
            x.pad_with_zeros(1, 0, len - glen)?
        } else {
            x
        });
    }
    let sorted = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 0)?
    };
    if order.iter().enumerate().all(|(a, &b)| a == b) {
        return Ok(sorted);
    }
    // Row `i` of the output is row `position of i in order` of `sorted`.
    let mut inverse = vec![0u32; n];
    for (pos, &i) in order.iter().enumerate() {
        inverse[i] = pos as u32;
    }
    let inverse = Tensor::from_vec(inverse, n, sorted.device())?;
    Ok(sorted.index_select(&inverse, 0)?)
}

/// `colbert_scores` with PyLate's masks: queries `[a, s, h]` against documents `[b, t, h]` → `[a, b]`.
/// `query_mask` (`[a, s]`) is given only when queries are not expanded.
pub fn colbert_scores(
    queries: &Tensor,
    query_mask: Option<&Tensor>,
    docs: &Tensor,
    doc_masks: &Masks,
) -> Result<Tensor> {
    let (a, s, h) = queries.dims3()?;
    let (b, t, _) = docs.dims3()?;
    let sims = queries
        .reshape((a * s, h))?
        .matmul(&docs.reshape((b * t, h))?.t()?)?
        .reshape((a, s, b, t))?;
    let sims = sims.broadcast_mul(&doc_masks.mask.reshape((1, 1, b, t))?)?;
    let mut best = sims.max_keepdim(3)?.squeeze(3)?; // [a, s, b]
    if let Some(f) = &doc_masks.floor {
        best = best.broadcast_maximum(&f.reshape((1, 1, b))?)?;
    }
    if let Some(m) = query_mask {
        best = best.broadcast_mul(&m.reshape((a, s, 1))?)?;
    }
    Ok(best.sum(1)?)
}

/// `colbert_kd_scores` with PyLate's masks: queries `[a, s, h]`, each against its own `n` documents
/// `[a·n, t, h]` (query-major) → `[a, n]`.
pub fn kd_scores(
    queries: &Tensor,
    query_mask: Option<&Tensor>,
    docs: &Tensor,
    doc_masks: &Masks,
) -> Result<Tensor> {
    let (a, s, h) = queries.dims3()?;
    let (an, t, _) = docs.dims3()?;
    if a == 0 || an % a != 0 {
        return Err(crate::Error::Invalid(format!(
            "{an} documents cannot be split evenly between {a} queries"
        )));
    }
    let n = an / a;
    let d = docs.reshape((a, n * t, h))?.transpose(1, 2)?.contiguous()?;
    let sims = queries.contiguous()?.matmul(&d)?.reshape((a, s, n, t))?;
    let sims = sims.broadcast_mul(&doc_masks.mask.reshape((a, 1, n, t))?)?;
    let mut best = sims.max_keepdim(3)?.squeeze(3)?; // [a, s, n]
    if let Some(f) = &doc_masks.floor {
        best = best.broadcast_maximum(&f.reshape((a, 1, n))?)?;
    }
    if let Some(m) = query_mask {
        best = best.broadcast_mul(&m.reshape((a, s, 1))?)?;
    }
    Ok(best.sum(1)?)
}

/// `log_softmax` over the last dimension, differentiable.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
