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

/// A model loaded once, to encode texts chunk after chunk.
pub struct Encoder {
    model: latte_models::ColBERT,
    batch_size: usize,
}

impl Encoder {
    /// Loads `model` (a folder or Hub id); texts are encoded in batches of `batch_size`.
    pub fn load(model: &str, batch_size: usize) -> Result<Self> {
        let model = latte_models::ColBERT::load(model, &Default::default())
            .with_context(|| format!("loading model {model}"))?;
        Ok(Self { model, batch_size })
    }

    /// Encodes `texts` (documents when `is_query` is false), with a progress bar on a terminal.
    pub fn encode(&self, texts: &[String], is_query: bool) -> Result<Vec<Encoded>> {
        let opts = latte_models::EncodeOptions {
            batch_size: self.batch_size,
            ..Default::default()
        };
        let out = self.model.encode(texts, is_query, &opts)?;
        Ok(out
            .into_iter()
            .map(|e| Encoded {
                rows: e.rows,
                cols: e.cols,
                data: e.data,
            })
            .collect())
    }
}

/// Encodes `texts` with `model` (a folder or Hub id; documents when `is_query` is false) in batches of
/// `batch_size`, with a progress bar on a terminal.
pub fn encode_texts(
    model: &str,
    texts: &[String],
    is_query: bool,
    batch_size: usize,
) -> Result<Vec<Encoded>> {
    Encoder::load(model, batch_size)?.encode(texts, is_query)
}
