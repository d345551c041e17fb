//! The one place the index and search commands encode text (`latte index --model/--corpus`,
//! `latte search --queries`).

use anyhow::{Context, Result};

/// Token embeddings of one text: `rows × cols`, row-major.
pub struct Encoded {
    /// Tokens.
    pub rows: usize,
    /// Dimension.
    pub cols: usize,
    /// Values.
    pub data: Vec<f32>,
}

/// Encodes `texts` with `model` (a folder or Hub id; documents when `is_query` is false) in batches of
/// `batch_size`, with a progress bar on a terminal.
pub fn encode_texts(
    model: &str,
    texts: &[String],
    is_query: bool,
    batch_size: usize,
) -> Result<Vec<Encoded>> {
    let m = latte_models::ColBERT::load(model, &Default::default())
        .with_context(|| format!("loading model {model}"))?;
    let opts = latte_models::EncodeOptions {
        batch_size,
        ..Default::default()
    };
    let out = m.encode(texts, is_query, &opts)?;
    Ok(out
        .into_iter()
        .map(|e| Encoded {
            rows: e.rows,
            cols: e.cols,
            data: e.data,
        })
        .collect())
}
