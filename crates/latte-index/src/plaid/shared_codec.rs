//! [`IndexCodec`]: the trained part of an index (centroids and residual codec) as a value of its own, so that
//! several indexes (the shards of one collection) can be built with the same one.

use std::borrow::Cow;
use std::path::Path;

use half::f16;

use super::build::load_doc;
use super::layout::{parse_codec, read_meta, CODEC};
use super::DocumentSource;
use crate::codec::{check_nbits, Codec};
use crate::storage::{as_bytes, cast, write_sections, Mapped};
use crate::{Error, Result};

/// File kind of a codec saved on its own ([`IndexCodec::save`]).
const KIND: &[u8; 4] = b"CODS";

/// The trained part of a PLAID index: its centroids (stored in half precision, as the index stores them) and
/// its residual codec (bucket cutoffs and reconstruction weights for `nbits` bits per dimension).
///
/// [`PlaidIndex::create`](super::PlaidIndex::create) trains one ([`PlaidIndex::train_codec`](super::PlaidIndex::train_codec))
/// and builds the index with it ([`PlaidIndex::create_with_codec`](super::PlaidIndex::create_with_codec)).
/// Indexes built with the same codec assign every token to the same centroid and encode it the same way, so
/// the shards of a collection that share one find, between them, the candidates one index over the whole
/// collection would find.
///
/// Obtain one by training ([`PlaidIndex::train_codec`](super::PlaidIndex::train_codec)), from an existing
/// index ([`IndexCodec::from_index`]), from arrays ([`IndexCodec::new`]) or from a file written by
/// [`IndexCodec::save`] ([`IndexCodec::load`]).
#[derive(Clone, PartialEq)]
pub struct IndexCodec {
    dim: usize,
    nbits: usize,
    centroids: Vec<f16>,
    cutoffs: Vec<f32>,
    weights: Vec<f32>,
    cluster_threshold: f32,
}

impl std::fmt::Debug for IndexCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexCodec")
            .field("dim", &self.dim)
            .field("nbits", &self.nbits)
            .field("num_centroids", &self.num_centroids())
            .finish()
    }
}

fn invalid(what: &str, detail: String) -> Error {
    Error::InvalidArgument(format!("codec: {what}: {detail}"))
}

impl IndexCodec {
    /// A codec from its arrays: `centroids` (`k × dim` row-major, rounded to half precision as an index
    /// stores them), the `2^nbits − 1` ascending bucket `cutoffs`, the `2^nbits` reconstruction `weights` and
    /// the `cluster_threshold` (the 0.75-quantile of the training residuals' norms, which adds compare their
    /// residuals with to report drift). The error names the array that does not fit.
    pub fn new(
        dim: usize,
        nbits: usize,
        centroids: &[f32],
        cutoffs: Vec<f32>,
        weights: Vec<f32>,
        cluster_threshold: f32,
    ) -> Result<Self> {
        check_nbits(nbits).map_err(|e| invalid("nbits", e.to_string()))?;
        if dim == 0 || !dim.is_multiple_of(8) {
            return Err(invalid(
                "dim",
                format!("expected a positive multiple of 8, got {dim}"),
            ));
        }
        if centroids.is_empty() || !centroids.len().is_multiple_of(dim) {
            return Err(invalid(
                "centroids",
                format!(
                    "expected k × {dim} values (k ≥ 1), got {} values",
                    centroids.len()
                ),
            ));
        }
        let max = f16::MAX.to_f32();
        if let Some(p) = centroids
            .iter()
            .position(|x| !x.is_finite() || x.abs() > max)
        {
            return Err(invalid(
                "centroids",
                format!(
                    "value {} (centroid {}, dimension {}) is not a finite half-precision number",
                    centroids[p],
                    p / dim,
                    p % dim
                ),
            ));
        }
        let levels = 1usize << nbits;
        if cutoffs.len() != levels - 1 {
            return Err(invalid(
                "cutoffs",
                format!(
                    "expected {} values for nbits {nbits}, got {}",
                    levels - 1,
                    cutoffs.len()
                ),
            ));
        }
        if cutoffs.iter().any(|c| !c.is_finite()) || cutoffs.windows(2).any(|w| w[0] > w[1]) {
            return Err(invalid(
                "cutoffs",
                format!("expected finite ascending values, got {cutoffs:?}"),
            ));
        }
        if weights.len() != levels {
            return Err(invalid(
                "weights",
                format!(
                    "expected {levels} values for nbits {nbits}, got {}",
                    weights.len()
                ),
            ));
        }
        if weights.iter().any(|w| !w.is_finite()) {
            return Err(invalid(
                "weights",
                format!("expected finite values, got {weights:?}"),
            ));
        }
        if !cluster_threshold.is_finite() || cluster_threshold < 0.0 {
            return Err(invalid(
                "cluster_threshold",
                format!("expected a finite number of at least 0, got {cluster_threshold}"),
            ));
        }
        Ok(Self {
            dim,
            nbits,
            centroids: centroids.iter().map(|&v| f16::from_f32(v)).collect(),
            cutoffs,
            weights,
            cluster_threshold,
        })
    }

    /// The codec trained by a build: centroids rounded to half precision.
    pub(super) fn from_trained(centroids: &[f32], codec: Codec) -> Self {
        Self {
            dim: codec.dim,
            nbits: codec.nbits,
            centroids: centroids.iter().map(|&v| f16::from_f32(v)).collect(),
            cutoffs: codec.cutoffs,
            weights: codec.weights,
            cluster_threshold: codec.cluster_threshold,
        }
    }

    /// The codec of the index in `dir` (reads `meta.lt` and the codec file only, checksums verified).
    pub fn from_index(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let meta = read_meta(dir)?;
        let file = Mapped::open(&dir.join(CODEC), b"CODC")?;
        let (centroids, codec) = parse_codec(file, &meta)?;
        Ok(Self::from_trained(&centroids.to_f32(), codec))
    }

    /// Reads a codec written by [`IndexCodec::save`] (checksum verified; the error names the file).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = Mapped::open(path, KIND)?;
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let secs = file.sections()?;
        if secs.len() != 5 {
            return Err(corrupt(format!("expected 5 sections, got {}", secs.len())));
        }
        let shape: &[u64] = cast(secs[0], path, "shape")?;
        if shape.len() != 2 {
            return Err(corrupt(format!(
                "shape: expected 2 values, got {}",
                shape.len()
            )));
        }
        let (dim, nbits) = (shape[0] as usize, shape[1] as usize);
        let half: &[f16] = cast(secs[1], path, "centroids")?;
        let centroids: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        let cutoffs: &[f32] = cast(secs[2], path, "cutoffs")?;
        let weights: &[f32] = cast(secs[3], path, "weights")?;
        let thr: &[f32] = cast(secs[4], path, "threshold")?;
        if thr.len() != 1 {
            return Err(corrupt(format!(
                "threshold: expected 1 value, got {}",
                thr.len()
            )));
        }
        Self::new(
            dim,
            nbits,
            &centroids,
            cutoffs.to_vec(),
            weights.to_vec(),
            thr[0],
        )
        .map_err(|e| corrupt(e.to_string()))
    }

    /// Writes the codec to the file `path` (atomically: a temporary file renamed into place), in the
    /// checksummed layout of the index files (FORMAT.md, "Codec file").
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let shape = [self.dim as u64, self.nbits as u64];
        write_sections(
            path.as_ref(),
            KIND,
            &[
                as_bytes(&shape),
                as_bytes(&self.centroids),
                as_bytes(&self.cutoffs),
                as_bytes(&self.weights),
                as_bytes(&[self.cluster_threshold]),
            ],
        )
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Residual bits per dimension.
    pub fn nbits(&self) -> usize {
        self.nbits
    }

    /// Number of centroids.
    pub fn num_centroids(&self) -> usize {
        self.centroids.len() / self.dim
    }

    /// The centroids, `k × dim` row-major (the half-precision values an index stores, as f32).
    pub fn centroids(&self) -> Vec<f32> {
        self.centroids.iter().map(|v| v.to_f32()).collect()
    }

    /// The `2^nbits − 1` ascending bucket cutoffs.
    pub fn cutoffs(&self) -> &[f32] {
        &self.cutoffs
    }

    /// The `2^nbits` reconstruction weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// The 0.75-quantile of the training residuals' norms.
    pub fn cluster_threshold(&self) -> f32 {
        self.cluster_threshold
    }

    /// The centroids as the index file stores them.
    pub(super) fn half(&self) -> &[f16] {
        &self.centroids
    }

    /// The residual codec.
    pub(super) fn codec(&self) -> Codec {
        Codec::new(
            self.nbits,
            self.dim,
            self.cutoffs.clone(),
            self.weights.clone(),
            self.cluster_threshold,
        )
    }

    /// Checks that an index of `dim`-dimensional documents built with `config` can use this codec; the error
    /// names the setting that differs.
    pub(super) fn check_fits(&self, dim: usize, config: &super::IndexConfig) -> Result<()> {
        if dim != self.dim {
            return Err(invalid(
                "dim",
                format!(
                    "the codec is for dimension {}, the documents have dimension {dim}",
                    self.dim
                ),
            ));
        }
        if config.nbits != self.nbits {
            return Err(invalid(
                "nbits",
                format!(
                    "the codec has {} bits per dimension, the index configuration asks for {}",
                    self.nbits, config.nbits
                ),
            ));
        }
        if let Some(k) = config.num_centroids {
            if k != self.num_centroids() {
                return Err(invalid(
                    "num_centroids",
                    format!(
                        "the codec has {} centroids, the index configuration asks for {k}",
                        self.num_centroids()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A source whose documents are pooled as they are read (for training a codec on documents that the index
/// will pool).
pub(super) struct PoolingSource<'a> {
    pub(super) inner: &'a dyn DocumentSource,
    pub(super) pool_factor: usize,
}

impl DocumentSource for PoolingSource<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn id(&self, i: usize) -> String {
        self.inner.id(i)
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Owned(
            load_doc(self.inner, i, self.pool_factor)?.into_owned(),
        ))
    }
}
