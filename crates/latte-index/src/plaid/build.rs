//! Writing an index's files: training the centroids and the residual codec, encoding documents into a new
//! chunk, the inverted lists, and compaction's rewrite of the live documents. Nothing here commits: the
//! writer (`writer.rs`) does.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use half::f16;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::config::IndexConfig;
use super::layout::{chunk_file, ChunkMeta, Meta};
use super::{Codes, DocumentSource, PlaidIndex};
use crate::codec::Codec;
use crate::ivf;
use crate::spool::{spool_each, SpooledSource};
use crate::storage::{as_bytes, cast, write_sections, Mapped, StreamWriter};
use crate::{kmeans, pool, Error, Result};

/// Checks the new ids: non-empty, without newlines, unique, and not held by a live document
/// (`is_live`); an id whose document is deleted may be added again.
pub(super) fn validate_ids(
    source: &dyn DocumentSource,
    is_live: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut seen = HashSet::with_capacity(source.len());
    let mut ids = Vec::with_capacity(source.len());
    for i in 0..source.len() {
        let id = source.id(i);
        if id.is_empty() || id.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "document id {id:?} is empty or contains a newline"
            )));
        }
        if is_live(&id) || !seen.insert(id.clone()) {
            return Err(Error::DuplicateId(id));
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Loads (and pools) document `i`, checking its shape.
pub(super) fn load_doc<'a>(
    source: &'a dyn DocumentSource,
    i: usize,
    pool_factor: usize,
) -> Result<Cow<'a, [f32]>> {
    let dim = source.dim();
    let e = source.embeddings(i)?;
    if e.len() % dim != 0 {
        return Err(Error::Shape(format!(
            "document {:?}: {} values are not whole rows of dimension {dim}",
            source.id(i),
            e.len()
        )));
    }
    if e.is_empty() {
        return Err(Error::EmptyDocument(source.id(i)));
    }
    if let Some(p) = e.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "document {:?}: value {} at token {}, dimension {} is not finite",
            source.id(i),
            e[p],
            p / dim,
            p % dim
        )));
    }
    if pool_factor > 1 {
        Ok(Cow::Owned(pool::pool_embeddings_hierarchical(
            &e,
            dim,
            pool_factor,
            1,
        )?))
    } else {
        Ok(e)
    }
}

/// Refuses values the f16 copy cannot hold (|x| > 65,504 would be stored as ±inf).
fn check_f16_range(e: &[f32], dim: usize, id: impl Fn() -> String) -> Result<()> {
    let max = half::f16::MAX.to_f32();
    match e.iter().position(|x| x.abs() > max) {
        Some(p) => Err(Error::InvalidArgument(format!(
            "document {:?}: value {} at token {}, dimension {} is beyond half precision (|x| <= {max}), \
             which the index's f16 copy stores",
            id(),
            e[p],
            p / dim,
            p % dim
        ))),
        None => Ok(()),
    }
}

/// Pools every document of `source` once (each checked as [`load_doc`] checks it) into a temporary file in
/// `dir`, so the build reads each pooled document as often as it needs (training sample, encoding) without
/// pooling it again or holding the corpus in memory.
pub(super) fn pool_to_spool(
    dir: &Path,
    source: &dyn DocumentSource,
    pool_factor: usize,
) -> Result<SpooledSource> {
    spool_each(dir, source, |i| load_doc(source, i, pool_factor))
}

/// The default number of centroids of an index of `tokens` token vectors (after pooling):
/// `2^floor(log2(16·sqrt(tokens)))`, at least 1. A build estimates the token count from a probe of its sample.
pub fn default_num_centroids(tokens: u64) -> usize {
    centroids_for(tokens as f64)
}

fn centroids_for(tokens: f64) -> usize {
    1usize << ((16.0 * tokens.sqrt()).log2().floor().max(0.0) as u32)
}

/// Samples documents, trains centroids (k-means) and the residual codec. `source` holds the documents as they
/// will be indexed (already pooled).
///
/// Memory is bounded by the k-means training set, not by the corpus: the sampled documents are streamed and
/// each token is kept with the probability that makes the set about `num_centroids ×
/// kmeans_points_per_centroid` tokens plus a held-out set of at most 50,000 for the codec; the kept tokens
/// are shuffled in place.
pub(super) fn train(
    source: &dyn DocumentSource,
    config: &IndexConfig,
) -> Result<(Vec<f32>, Codec)> {
    let n = source.len();
    let dim = source.dim();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let n_sample = ((1.0 + 16.0 * (120.0 * n as f64).sqrt()) as usize).min(n);
    let mut picked: Vec<usize> = sample(&mut rng, n, n_sample).into_vec();
    picked.sort_unstable();
    // Estimate the corpus size from a probe of the sample.
    let probe: Vec<usize> = picked
        .iter()
        .copied()
        .step_by((n_sample / 512).max(1))
        .collect();
    let probe_tokens: usize = probe
        .par_iter()
        .map(|&i| load_doc(source, i, 1).map(|e| e.len() / dim))
        .sum::<Result<usize>>()?;
    let avg = probe_tokens as f64 / probe.len() as f64;
    let est_tokens = avg * n as f64;
    let k_default = centroids_for(est_tokens);
    let k_want = config.num_centroids.unwrap_or(k_default).max(1);
    let heldout_cap = 50_000usize;
    let target = k_want * config.kmeans_points_per_centroid + heldout_cap;
    let keep_p = (target as f64 / (avg * n_sample as f64)).min(1.0);
    // Stream the sample, keeping each token with probability keep_p. The expected number of kept rows is
    // reserved with a margin: pages of the reserve that are never written cost no memory.
    let expected = (keep_p * avg * n_sample as f64 * 1.25) as usize + 1024;
    let mut points: Vec<f32> = Vec::with_capacity(expected.saturating_mul(dim));
    for batch in picked.chunks(256) {
        let docs: Vec<Cow<'_, [f32]>> = batch
            .par_iter()
            .map(|&i| load_doc(source, i, 1))
            .collect::<Result<_>>()?;
        for d in docs {
            for row in d.chunks_exact(dim) {
                if keep_p >= 1.0 || rng.random::<f64>() < keep_p {
                    points.extend_from_slice(row);
                }
            }
        }
    }
    let total = points.len() / dim;
    if total == 0 {
        return Err(Error::InvalidArgument(
            "the sampled documents have no tokens".into(),
        ));
    }
    // Shuffle rows, split off a held-out set for the codec.
    let order = sample(&mut rng, total, total).into_vec();
    let heldout = if total >= 20 {
        (total / 20).min(heldout_cap)
    } else {
        0
    };
    let train_n = (total - heldout)
        .min(k_want * config.kmeans_points_per_centroid)
        .max(1);
    // Rows in shuffled order (row j = old row order[j]): held-out rows first, then the training rows.
    permute_rows(&mut points, dim, &order);
    points.truncate((heldout + train_n.min(total - heldout)) * dim);
    points.shrink_to_fit();
    let train_pts = &points[heldout * dim..];
    let held_pts = if heldout > 0 {
        points[..heldout * dim].to_vec()
    } else {
        train_pts.to_vec()
    };
    let k = k_want.min(train_pts.len() / dim);
    let centroids = kmeans::train(
        train_pts,
        dim,
        k,
        config.kmeans_iters,
        config.seed,
        config.probe(),
    );
    drop(points);
    let codes = kmeans::Assigner::new(&centroids, dim, config.probe()).assign(&held_pts);
    let mut residuals = held_pts;
    for (t, &c) in codes.iter().enumerate() {
        let c = c as usize;
        for (r, &cv) in residuals[t * dim..(t + 1) * dim]
            .iter_mut()
            .zip(&centroids[c * dim..(c + 1) * dim])
        {
            *r -= cv;
        }
    }
    Ok((centroids, Codec::train(config.nbits, dim, &residuals)))
}

/// Reorders the `dim`-wide rows of `rows` in place so that row `j` becomes the old row `order[j]` (`order` a
/// permutation), following the permutation's cycles with one spare row.
fn permute_rows(rows: &mut [f32], dim: usize, order: &[usize]) {
    let n = order.len();
    debug_assert_eq!(rows.len(), n * dim);
    let mut done = vec![false; n];
    let mut spare = vec![0f32; dim];
    for start in 0..n {
        if done[start] || order[start] == start {
            done[start] = true;
            continue;
        }
        // Cycle start → order[start] → order[order[start]] → … back to start.
        spare.copy_from_slice(&rows[start * dim..(start + 1) * dim]);
        let mut j = start;
        loop {
            done[j] = true;
            let from = order[j];
            if from == start {
                rows[j * dim..(j + 1) * dim].copy_from_slice(&spare);
                break;
            }
            rows.copy_within(from * dim..(from + 1) * dim, j * dim);
            j = from;
        }
    }
}

/// Encodes every document of `source` into a new chunk (codes, residuals, f16 copy, doclens + ids), streaming;
/// documents are pooled by `pool_factor` as they are read (1 when `source` holds them pooled already).
/// Returns the chunk, its codes (for the inverted lists) and the number of outlier tokens.
pub(super) fn write_chunk(
    dir: &Path,
    meta: &mut Meta,
    centroids: &[f32],
    codec: &Codec,
    source: &dyn DocumentSource,
    ids: &[String],
    pool_factor: usize,
) -> Result<(ChunkMeta, Vec<u32>, u64)> {
    let dim = meta.dim;
    let id = meta.next_chunk;
    meta.next_chunk += 1;
    let mut codes_w = StreamWriter::create(&dir.join(chunk_file(id, "codes")), b"CODE")?;
    let mut res_w = StreamWriter::create(&dir.join(chunk_file(id, "res")), b"RESI")?;
    let mut full_w = if meta.config.store_full {
        Some(StreamWriter::create(
            &dir.join(chunk_file(id, "f16")),
            b"FULL",
        )?)
    } else {
        None
    };
    let bpt = codec.bytes_per_token();
    let mut all_codes: Vec<u32> = Vec::new();
    let mut doclens: Vec<u32> = Vec::with_capacity(source.len());
    let mut outliers = 0u64;
    let thr2 = codec.cluster_threshold * codec.cluster_threshold;
    let assigner = kmeans::Assigner::new(centroids, dim, meta.config.probe());
    let mut start = 0;
    const BATCH_DOCS: usize = 512;
    while start < source.len() {
        let end = (start + BATCH_DOCS).min(source.len());
        let docs: Vec<Cow<'_, [f32]>> = (start..end)
            .into_par_iter()
            .map(|i| load_doc(source, i, pool_factor))
            .collect::<Result<_>>()?;
        if full_w.is_some() {
            for (j, d) in docs.iter().enumerate() {
                check_f16_range(d, dim, || source.id(start + j))?;
            }
        }
        let mut flat: Vec<f32> = Vec::with_capacity(docs.iter().map(|d| d.len()).sum());
        for d in &docs {
            if d.len() / dim > u32::MAX as usize {
                return Err(Error::InvalidArgument(
                    "a document has more than 2^32 tokens".into(),
                ));
            }
            doclens.push((d.len() / dim) as u32);
            flat.extend_from_slice(d);
        }
        drop(docs);
        let codes = assigner.assign(&flat);
        let mut packed = vec![0u8; codes.len() * bpt];
        outliers += packed
            .par_chunks_mut(bpt.max(1) * 256)
            .enumerate()
            .map(|(b, out)| {
                let mut r = vec![0f32; dim];
                let mut n_out = 0u64;
                for (t, o) in out.chunks_exact_mut(bpt).enumerate() {
                    let tok = b * 256 + t;
                    let c = codes[tok] as usize;
                    let mut norm2 = 0f32;
                    for ((rv, &x), &cv) in r
                        .iter_mut()
                        .zip(&flat[tok * dim..(tok + 1) * dim])
                        .zip(&centroids[c * dim..(c + 1) * dim])
                    {
                        *rv = x - cv;
                        norm2 += *rv * *rv;
                    }
                    if norm2 > thr2 {
                        n_out += 1;
                    }
                    codec.encode(&r, o);
                }
                n_out
            })
            .sum::<u64>();
        if meta.code_width() == 2 {
            let c16: Vec<u16> = codes.iter().map(|&c| c as u16).collect();
            codes_w.write(as_bytes(&c16))?;
        } else {
            codes_w.write(as_bytes(&codes))?;
        }
        res_w.write(&packed)?;
        if let Some(w) = full_w.as_mut() {
            let h: Vec<f16> = flat.iter().map(|&v| f16::from_f32(v)).collect();
            w.write(as_bytes(&h))?;
        }
        all_codes.extend_from_slice(&codes);
        start = end;
    }
    let tokens = all_codes.len() as u64;
    codes_w.finish()?;
    res_w.finish()?;
    if let Some(w) = full_w {
        w.finish()?;
    }
    let names = ids.join("\n");
    write_sections(
        &dir.join(chunk_file(id, "docs")),
        b"DOCS",
        &[as_bytes(&doclens), names.as_bytes()],
    )?;
    Ok((
        ChunkMeta {
            id,
            docs: source.len(),
            tokens,
        },
        all_codes,
        outliers,
    ))
}

/// Writes the inverted lists (centroid → ascending unique internal doc ids) for `meta`'s chunks: the chunks of
/// `current` (read from disk) followed by the new chunk whose codes are `new_codes`.
pub(super) fn write_ivf(
    dir: &Path,
    meta: &Meta,
    current: Option<&PlaidIndex>,
    new_codes: &[u32],
) -> Result<()> {
    let k = meta.num_centroids;
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut doc = 0u32;
    let mut per_doc: Vec<u32> = Vec::new();
    let flush = |per_doc: &mut Vec<u32>, doc: u32, pairs: &mut Vec<(u32, u32)>| {
        per_doc.sort_unstable();
        per_doc.dedup();
        pairs.extend(per_doc.iter().map(|&c| (c, doc)));
        per_doc.clear();
    };
    if let Some(cur) = current {
        for d in 0..cur.ids.len() {
            match cur.codes_of(d) {
                Codes::U16(cs) => per_doc.extend(cs.iter().map(|&c| c as u32)),
                Codes::U32(cs) => per_doc.extend_from_slice(cs),
            }
            flush(&mut per_doc, doc, &mut pairs);
            doc += 1;
        }
    }
    if !new_codes.is_empty() {
        let last = meta.chunks.last().expect("new chunk");
        let lens = chunk_doclens(dir, last.id)?;
        let mut t = 0usize;
        for l in lens {
            per_doc.extend_from_slice(&new_codes[t..t + l as usize]);
            t += l as usize;
            flush(&mut per_doc, doc, &mut pairs);
            doc += 1;
        }
    }
    pairs.par_sort_unstable();
    let (offsets, data) = ivf::encode(&pairs, k);
    write_sections(
        &dir.join(meta.ivf_name()),
        b"IVFL",
        &[as_bytes(&offsets), &data],
    )
}

pub(super) fn chunk_doclens(dir: &Path, id: u64) -> Result<Vec<u32>> {
    let f = Mapped::open(&dir.join(chunk_file(id, "docs")), b"DOCS")?;
    let secs = f.sections()?;
    Ok(cast::<u32>(secs[0], f.path(), "doclens")?.to_vec())
}

/// Writes one new chunk holding the live documents of `current` and new inverted lists; returns the metadata
/// that references them (not yet committed).
pub(super) fn compact_into(dir: &Path, current: &PlaidIndex, mut meta: Meta) -> Result<Meta> {
    let dim = meta.dim;
    let dead: HashSet<u32> = meta.deleted.iter().copied().collect();
    let id = meta.next_chunk;
    meta.next_chunk += 1;
    let mut codes_w = StreamWriter::create(&dir.join(chunk_file(id, "codes")), b"CODE")?;
    let mut res_w = StreamWriter::create(&dir.join(chunk_file(id, "res")), b"RESI")?;
    let mut full_w = if meta.config.store_full {
        Some(StreamWriter::create(
            &dir.join(chunk_file(id, "f16")),
            b"FULL",
        )?)
    } else {
        None
    };
    let bpt = current.codec.bytes_per_token();
    let cw = meta.code_width();
    let mut doclens = Vec::new();
    let mut ids = Vec::new();
    let mut all_codes = Vec::new();
    for d in 0..current.ids.len() {
        if dead.contains(&(d as u32)) {
            continue;
        }
        let (c, s, e) = current.local_range(d);
        codes_w.write(&c.codes.payload()[s * cw..e * cw])?;
        res_w.write(&c.res.payload()[s * bpt..e * bpt])?;
        if let (Some(w), Some(f)) = (full_w.as_mut(), c.full.as_ref()) {
            w.write(&f.payload()[s * dim * 2..e * dim * 2])?;
        }
        match current.codes_of(d) {
            Codes::U16(cs) => all_codes.extend(cs.iter().map(|&c| c as u32)),
            Codes::U32(cs) => all_codes.extend_from_slice(cs),
        }
        doclens.push((e - s) as u32);
        ids.push(current.ids[d].as_str());
    }
    codes_w.finish()?;
    res_w.finish()?;
    if let Some(w) = full_w {
        w.finish()?;
    }
    write_sections(
        &dir.join(chunk_file(id, "docs")),
        b"DOCS",
        &[as_bytes(&doclens), ids.join("\n").as_bytes()],
    )?;
    meta.chunks = vec![ChunkMeta {
        id,
        docs: ids.len(),
        tokens: all_codes.len() as u64,
    }];
    meta.deleted.clear();
    write_ivf(dir, &meta, None, &all_codes)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_permuted_in_place_equal_rows_gathered_in_that_order() {
        let dim = 3;
        for n in [0usize, 1, 2, 7, 64] {
            let rows: Vec<f32> = (0..n * dim).map(|v| v as f32 * 0.5 - 1.0).collect();
            let mut rng = StdRng::seed_from_u64(n as u64);
            let order = sample(&mut rng, n, n).into_vec();
            let mut gathered = Vec::new();
            for &i in &order {
                gathered.extend_from_slice(&rows[i * dim..(i + 1) * dim]);
            }
            let mut permuted = rows.clone();
            permute_rows(&mut permuted, dim, &order);
            assert_eq!(permuted, gathered, "n = {n}");
        }
    }
}
