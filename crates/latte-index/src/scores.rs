//! ColBERT scoring with PyLate's semantics (`pylate.scores`).
//!
//! PyLate masks by **multiplying** similarities by the mask (0/1), not by using −∞: a masked document token
//! contributes a similarity of 0 to the max, and a masked query token contributes 0 to the sum. The padded-tensor
//! functions here ([`colbert_scores`], [`colbert_kd_scores`]) reproduce that exactly. The ragged functions
//! ([`maxsim`], [`maxsim_many`], [`colbert_scores_pairwise`]) compute the pure MaxSim
//! `Σ_q max_t ⟨q, d_t⟩` with no padding involved.

use rayon::prelude::*;

use crate::{Error, Result};
use latte_kernels::dot::{matmul_abt, max_rows_into};

/// The row-major matrix view, defined in latte-core and re-exported here under its old name.
pub use latte_core::EmbRef;

/// Pure MaxSim between one query and one document: `Σ_q max_t ⟨q, d_t⟩` (0 for an empty query or document).
pub fn maxsim(q: EmbRef<'_>, d: EmbRef<'_>) -> Result<f32> {
    check_dim(q.dim(), d.dim(), "document")?;
    let mut buf = Vec::new();
    Ok(maxsim_with(q, d, &mut buf))
}

pub(crate) fn maxsim_with(q: EmbRef<'_>, d: EmbRef<'_>, buf: &mut Vec<f32>) -> f32 {
    if q.rows() == 0 || d.rows() == 0 {
        return 0.0;
    }
    buf.resize(q.rows() * d.rows(), 0.0);
    matmul_abt(d.data(), d.rows(), q.data(), q.rows(), q.dim(), buf, false);
    let mut acc = vec![f32::NEG_INFINITY; q.rows()];
    max_rows_into(buf, q.rows(), &mut acc);
    acc.iter().sum()
}

/// MaxSim of one query against many documents, in parallel over documents.
pub fn maxsim_many(q: EmbRef<'_>, docs: &[EmbRef<'_>]) -> Result<Vec<f32>> {
    for d in docs {
        check_dim(q.dim(), d.dim(), "document")?;
    }
    Ok(docs
        .par_iter()
        .map_init(Vec::new, |buf, d| maxsim_with(q, *d, buf))
        .collect())
}

fn check_dim(expected: usize, got: usize, what: &str) -> Result<()> {
    if expected != got {
        return Err(Error::DimensionMismatch {
            what: what.into(),
            expected,
            got,
        });
    }
    Ok(())
}

fn check_len(name: &str, len: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if len != want {
        return Err(Error::Shape(format!(
            "{name} has {len} values, shape {shape:?} needs {want}"
        )));
    }
    Ok(())
}

/// PyLate `colbert_scores(Q, D, queries_mask, documents_mask)`.
///
/// `q` is `[n_q, l_q, h]`, `d` is `[n_d, l_d, h]` (zero-padded), masks are `[n_q, l_q]` and `[n_d, l_d]`
/// (1 keeps, 0 masks; any value multiplies). Returns `n_q × n_d` scores, row-major:
/// `score[a][b] = Σ_s max_t (⟨Q_as, D_bt⟩ · qmask_as · dmask_bt)`.
pub fn colbert_scores(
    q: &[f32],
    q_shape: [usize; 3],
    d: &[f32],
    d_shape: [usize; 3],
    queries_mask: Option<&[f32]>,
    documents_mask: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let [nq, lq, h] = q_shape;
    let [nd, ld, hd] = d_shape;
    check_len("queries", q.len(), &q_shape)?;
    check_len("documents", d.len(), &d_shape)?;
    check_dim(h, hd, "documents")?;
    if let Some(m) = queries_mask {
        check_len("queries_mask", m.len(), &[nq, lq])?;
    }
    if let Some(m) = documents_mask {
        check_len("documents_mask", m.len(), &[nd, ld])?;
    }
    let mut out = vec![0f32; nq * nd];
    out.par_chunks_mut(nd.max(1))
        .enumerate()
        .for_each(|(a, row)| {
            if nd == 0 {
                return;
            }
            let qa = &q[a * lq * h..(a + 1) * lq * h];
            let mut s = vec![0f32; lq * nd * ld];
            matmul_abt(qa, lq, d, nd * ld, h, &mut s, false);
            for (b, o) in row.iter_mut().enumerate() {
                let mut total = 0f32;
                for si in 0..lq {
                    let qm = queries_mask.map_or(1.0, |m| m[a * lq + si]);
                    let srow = &s[si * nd * ld + b * ld..si * nd * ld + (b + 1) * ld];
                    let mut best = f32::NEG_INFINITY;
                    for (t, &v) in srow.iter().enumerate() {
                        let dm = documents_mask.map_or(1.0, |m| m[b * ld + t]);
                        best = best.max(v * qm * dm);
                    }
                    if ld > 0 {
                        total += best;
                    }
                }
                *o = total;
            }
        });
    Ok(out)
}

/// PyLate `colbert_scores_pairwise(Q, D)`: pure MaxSim of `queries[i]` against `documents[i]`.
pub fn colbert_scores_pairwise(
    queries: &[EmbRef<'_>],
    documents: &[EmbRef<'_>],
) -> Result<Vec<f32>> {
    if queries.len() != documents.len() {
        return Err(Error::Shape(format!(
            "{} queries but {} documents: pairwise scoring needs one document per query",
            queries.len(),
            documents.len()
        )));
    }
    for (q, d) in queries.iter().zip(documents) {
        check_dim(q.dim(), d.dim(), "document")?;
    }
    Ok(queries
        .par_iter()
        .zip(documents.par_iter())
        .map_init(Vec::new, |buf, (q, d)| maxsim_with(*q, *d, buf))
        .collect())
}

/// PyLate `colbert_kd_scores(Q, D, queries_mask, documents_mask)`: `Q` is `[a, s, h]`, `D` is `[a, b, t, h]`
/// (each query against its own `b` documents), masks `[a, s]` and `[a, b, t]`. Returns `a × b` scores.
pub fn colbert_kd_scores(
    q: &[f32],
    q_shape: [usize; 3],
    d: &[f32],
    d_shape: [usize; 4],
    queries_mask: Option<&[f32]>,
    documents_mask: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let [na, s, h] = q_shape;
    let [da, nb, t, hd] = d_shape;
    if na != da {
        return Err(Error::Shape(format!(
            "{na} queries but documents for {da} queries"
        )));
    }
    check_len("queries", q.len(), &q_shape)?;
    check_len("documents", d.len(), &d_shape)?;
    check_dim(h, hd, "documents")?;
    if let Some(m) = queries_mask {
        check_len("queries_mask", m.len(), &[na, s])?;
    }
    if let Some(m) = documents_mask {
        check_len("documents_mask", m.len(), &[na, nb, t])?;
    }
    let mut out = vec![0f32; na * nb];
    for a in 0..na {
        let scores = colbert_scores(
            &q[a * s * h..(a + 1) * s * h],
            [1, s, h],
            &d[a * nb * t * h..(a + 1) * nb * t * h],
            [nb, t, h],
            queries_mask.map(|m| &m[a * s..(a + 1) * s]),
            documents_mask.map(|m| &m[a * nb * t..(a + 1) * nb * t]),
        )?;
        out[a * nb..(a + 1) * nb].copy_from_slice(&scores);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_multiplies_by_zero() {
        // One query token [1, 0], one document with tokens [-1, 0] and [-2, 0]: all similarities negative.
        let q = [1.0, 0.0];
        let d = [-1.0, 0.0, -2.0, 0.0];
        let plain = colbert_scores(&q, [1, 1, 2], &d, [1, 2, 2], None, None).unwrap();
        assert_eq!(plain, vec![-1.0]);
        let masked = colbert_scores(&q, [1, 1, 2], &d, [1, 2, 2], None, Some(&[1.0, 0.0])).unwrap();
        // The masked token contributes 0, which beats -1.
        assert_eq!(masked, vec![0.0]);
        let qmasked = colbert_scores(&q, [1, 1, 2], &d, [1, 2, 2], Some(&[0.0]), None).unwrap();
        assert_eq!(qmasked, vec![0.0]);
    }

    #[test]
    fn shapes_are_checked() {
        let err =
            colbert_scores(&[1.0; 4], [1, 2, 2], &[1.0; 3], [1, 1, 3], None, None).unwrap_err();
        assert!(matches!(err, Error::DimensionMismatch { .. }), "{err}");
        let err =
            colbert_scores(&[1.0; 3], [1, 2, 2], &[1.0; 2], [1, 1, 2], None, None).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{err}");
        assert!(EmbRef::new(&[1.0; 5], 2).is_err());
    }
}
