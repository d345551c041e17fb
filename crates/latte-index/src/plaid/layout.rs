//! The on-disk layout: file names, the metadata file (`meta.lt`, the single commit point), the codec file, and
//! the removal of files no commit references. FORMAT.md documents the bytes.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use std::path::Path;

use half::f16;

use super::config::IndexConfig;
use crate::centroids::Centroids;
use crate::codec::{check_nbits, Codec};
use crate::storage::{cast, sync_dir, Mapped, StreamWriter, FORMAT_VERSION};
use crate::{Error, Result};

/// The metadata file: its atomic replacement is the commit point of every write.
pub(super) const META: &str = "meta.lt";
/// Centroids and the residual codec.
pub(super) const CODEC: &str = "codec.lt";
/// The writer lock file (an OS lock on it is what counts; it holds the holder's pid).
pub(super) const LOCK: &str = "LOCK";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChunkMeta {
    pub(super) id: u64,
    pub(super) docs: usize,
    pub(super) tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) format_version: u32,
    pub(super) dim: usize,
    pub(super) num_centroids: usize,
    pub(super) config: IndexConfig,
    pub(super) generation: u64,
    pub(super) next_chunk: u64,
    pub(super) chunks: Vec<ChunkMeta>,
    /// Internal ids (positions over all chunks) of deleted documents, ascending.
    pub(super) deleted: Vec<u32>,
}

impl Meta {
    pub(super) fn ivf_name(&self) -> String {
        format!("ivf.{}.lt", self.generation)
    }
    pub(super) fn code_width(&self) -> usize {
        if self.num_centroids <= 1 << 16 {
            2
        } else {
            4
        }
    }
    pub(super) fn referenced_files(&self) -> HashSet<String> {
        let mut s: HashSet<String> = [META.to_string(), CODEC.to_string(), self.ivf_name()].into();
        for c in &self.chunks {
            for ext in ["docs", "codes", "res", "f16"] {
                s.insert(chunk_file(c.id, ext));
            }
        }
        s
    }
}

pub(super) fn chunk_file(id: u64, ext: &str) -> String {
    format!("c{id}.{ext}.lt")
}

pub(super) fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META);
    if !path.exists() {
        return Err(Error::NotAnIndex(dir.to_path_buf()));
    }
    let m = Mapped::open(&path, b"META")?;
    let meta: Meta = serde_json::from_slice(m.payload()).map_err(|e| Error::Corrupt {
        path: path.clone(),
        reason: format!("bad metadata: {e}"),
    })?;
    if meta.format_version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path,
            found: meta.format_version,
            oldest: crate::storage::OLDEST_SUPPORTED_VERSION,
            current: FORMAT_VERSION,
        });
    }
    Ok(meta)
}

/// Commits `meta` (the single commit point of every write) and removes files it no longer references.
pub(super) fn commit(dir: &Path, meta: &Meta) -> Result<()> {
    let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    let mut w = StreamWriter::create(&dir.join(META), b"META")?;
    w.write(&json)?;
    w.finish()?;
    sync_dir(dir)?;
    collect_garbage(dir, Some(meta));
    Ok(())
}

/// Removes index files not referenced by `meta` (left by an interrupted or superseded write). Only names this
/// crate writes are touched.
pub(super) fn collect_garbage(dir: &Path, meta: Option<&Meta>) {
    let keep = meta.map(Meta::referenced_files).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ours = (name.ends_with(".lt") || name.ends_with(".lt.tmp"))
            && (name.starts_with('c') || name.starts_with("ivf.") || name.starts_with("meta."));
        if ours && !keep.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

pub(super) fn parse_codec(file: Mapped, meta: &Meta) -> Result<(Centroids, Codec)> {
    let corrupt = |r: &str| Error::Corrupt {
        path: file.path().to_path_buf(),
        reason: r.into(),
    };
    let secs = file.sections()?;
    if secs.len() != 4 {
        return Err(corrupt("expected 4 sections"));
    }
    let cutoffs: &[f32] = cast(secs[1], file.path(), "cutoffs")?;
    let weights: &[f32] = cast(secs[2], file.path(), "weights")?;
    let thr: &[f32] = cast(secs[3], file.path(), "threshold")?;
    let nbits = meta.config.nbits;
    check_nbits(nbits).map_err(|_| corrupt("bad nbits in meta.lt"))?;
    // Format 1 stores f32 centroids, format 2 f16.
    let width = if file.version() >= 2 { 2 } else { 4 };
    if secs[0].len() != meta.num_centroids * meta.dim * width
        || cutoffs.len() != (1 << nbits) - 1
        || weights.len() != 1 << nbits
        || thr.len() != 1
    {
        return Err(corrupt("codec sizes do not match meta.lt"));
    }
    let codec = Codec::new(nbits, meta.dim, cutoffs.to_vec(), weights.to_vec(), thr[0]);
    let centroids = if width == 4 {
        Centroids::F32(cast::<f32>(secs[0], file.path(), "centroids")?.to_vec())
    } else {
        cast::<f16>(secs[0], file.path(), "centroids")?;
        let start = secs[0].as_ptr() as usize - file.payload().as_ptr() as usize;
        let range = start..start + secs[0].len();
        Centroids::F16 { file, range }
    };
    Ok((centroids, codec))
}
