//! The one place the index and search commands choose the model and encode text (`latte index
//! --model/--corpus`, `latte search --queries`), and the one place `latte index` pools documents.

use anyhow::{bail, Context, Result};
use latte_index::{DocumentSource, PlaidIndex};
use latte_models::ColBERT;

use super::model_args::{self, IndexModelArgs, ModelOptions};

/// Token embeddings of one text: `rows × cols`, row-major.
pub struct Encoded {
    /// Tokens.
    pub rows: usize,
    /// Dimension.
    pub cols: usize,
    /// Values.
    pub data: Vec<f32>,
}

/// The model an index command encodes with: its name, the options that change embeddings, the model.
pub struct IndexModel {
    /// Folder or Hub id, as recorded in the index.
    pub name: String,
    /// The options it was loaded with, as recorded in the index.
    pub options: ModelOptions,
    /// The loaded model.
    pub model: ColBERT,
}

impl IndexModel {
    /// Loads `name` with `options` (and the Hub flags of `args`).
    pub fn load(name: String, options: ModelOptions, args: &IndexModelArgs) -> Result<Self> {
        let model = model_args::load(&name, &options.load_options(&args.hub.options()))?;
        Ok(Self {
            name,
            options,
            model,
        })
    }

    /// The model for documents added to `index` (`None`: a new index): the model named on the command line
    /// with the options given; on an existing index these must agree with what it recorded (the recorded
    /// options apply where no flag is given).
    pub fn for_documents(
        args: &IndexModelArgs,
        name: String,
        index: Option<&PlaidIndex>,
        where_: &str,
    ) -> Result<Self> {
        let given = args.given();
        let options = match index {
            Some(index) => {
                if let Some(m) = index.model() {
                    if m != name {
                        bail!("the index was built with model {m:?}, not {name:?}");
                    }
                }
                let recorded = model_args::options_from_index(index)?;
                model_args::check_same(&recorded, &given, where_)?;
                recorded.overridden_by(&given)
            }
            None => given,
        };
        let m = Self::load(name, options, args)?;
        if let Some(index) = index {
            m.check_dim(index.dim())?;
        }
        Ok(m)
    }

    /// The model for queries on `index`: the recorded model and options, each overridden by the command
    /// line; the resulting dimension must be the index's.
    pub fn for_queries(args: &IndexModelArgs, index: &PlaidIndex) -> Result<Self> {
        let name = match (&args.model, index.model()) {
            (Some(m), _) => m.clone(),
            (None, Some(m)) => m.to_string(),
            (None, None) => {
                bail!("the index does not record a model: pass --model or --query-embeddings")
            }
        };
        let options = model_args::options_from_index(index)?.overridden_by(&args.given());
        let m = Self::load(name, options, args)?;
        m.check_dim(index.dim())?;
        Ok(m)
    }

    /// Fails unless the model's vectors have the index's dimension.
    pub fn check_dim(&self, index_dim: usize) -> Result<()> {
        let got = self.model.output_dim();
        if got != index_dim {
            let how = match self.options.truncate_dim {
                Some(t) => format!("with --truncate-dim {t}"),
                None => "without --truncate-dim".to_string(),
            };
            bail!(
                "dimension mismatch: the index holds {index_dim}-dimensional embeddings but model {} {how} \
                 gives {got}-dimensional ones (expected {index_dim}, got {got})",
                self.name
            );
        }
        Ok(())
    }

    /// Encodes `texts` (documents when `is_query` is false) in batches of `batch_size`, with a progress bar
    /// on a terminal.
    pub fn encode(
        &self,
        texts: &[String],
        is_query: bool,
        batch_size: usize,
    ) -> Result<Vec<Encoded>> {
        let opts = latte_models::EncodeOptions {
            batch_size,
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

/// Pools every document of `source` once when `pool_factor > 1` (the index is then given `pool_factor: 1`,
/// so its training sample and its encoding pass read the pooled documents instead of pooling them again).
pub fn pool_documents(
    source: Box<dyn DocumentSource>,
    pool_factor: usize,
) -> Result<Box<dyn DocumentSource>> {
    if pool_factor <= 1 {
        return Ok(source);
    }
    let pooled = latte_index::pool::pool_source(source.as_ref(), pool_factor)
        .with_context(|| format!("pooling the documents (--pool-factor {pool_factor})"))?;
    Ok(Box::new(pooled))
}
