//! The one place the CLI needs a ColBERT encoder (`latte index --model/--corpus`, `latte search --queries`).

use anyhow::Result;

/// Token embeddings of one text: `rows × cols`, row-major.
pub struct Encoded {
    /// Tokens.
    pub rows: usize,
    /// Dimension.
    pub cols: usize,
    /// Values.
    pub data: Vec<f32>,
}

/// Encodes `texts` with `model` (documents when `is_query` is false), in batches of `batch_size`.
///
/// WIRING POINT for `latte-models` (the only model-dependent code of index/search). With the API on `main`
/// (`latte_models::ColBERT::load(&str, &options)`, `model.encode(&texts, is_query, &EncodeOptions)` returning
/// embeddings with `rows`, `cols`, `data`), replace the body with:
///
/// ```ignore
/// let model = latte_models::ColBERT::load(model, &Default::default())?; // or ModelArgs { model, .. }.load()
/// let opts = latte_models::EncodeOptions { batch_size, ..Default::default() };
/// let out = model.encode(texts, is_query, &opts)?;
/// Ok(out.into_iter().map(|e| Encoded { rows: e.rows, cols: e.cols, data: e.data }).collect())
/// ```
///
/// `latte index --corpus` calls this with `is_query = false` (documents), `latte search --queries` with
/// `is_query = true`; both check the returned shapes. A progress bar belongs here too (indicatif).
pub fn encode_texts(
    model: &str,
    texts: &[String],
    is_query: bool,
    batch_size: usize,
) -> Result<Vec<Encoded>> {
    let _ = (texts, is_query, batch_size);
    anyhow::bail!(
        "encoding with a model ({model}) is not available in this build yet; encode with `latte encode` or \
         PyLate and pass --embeddings/--ids (index) or --query-embeddings/--query-ids (search)"
    )
}
