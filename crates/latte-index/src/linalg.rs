//! Dense kernels: `A · Bᵀ` through the `gemm` crate, row-wise argmax, segmented MaxSim.

/// `out[m × n] = a[m × k] · b[n × k]ᵀ`, all row-major. `parallel` lets gemm use the rayon pool.
pub(crate) fn matmul_abt(
    a: &[f32],
    m: usize,
    b: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    parallel: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= n * k && out.len() >= m * n,
        "matmul_abt: buffer too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let par = if parallel && m * n * k > 1 << 20 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee that every index gemm touches is in bounds: dst (i, j) at
    // i*n + j < m*n, lhs (i, l) at i*k + l < m*k, rhs (l, j) = b[j*k + l] < n*k. `read_dst = false`, so the
    // previous contents of `out` are ignored (alpha is unused).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

crate::kernels::multiversion! {
    /// For `rows × width` scores, `acc[j] = max(acc[j], row[j])` over the given rows. Scores are never NaN
    /// here, so the comparison skips f32::max's NaN handling and the loop vectorises (AVX2 when available).
    pub(crate) fn max_rows_into(scores: &[f32], width: usize, acc: &mut [f32]) -> () {
        for row in scores.chunks_exact(width) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = if v > *a { v } else { *a };
            }
        }
    }
}

/// Scores of one query (`lq × dim`) against documents stored contiguously (`tokens × dim`), document `i`
/// owning token rows `offsets[i]..offsets[i + 1]`: pure MaxSim (max over the document's tokens, summed over
/// query tokens). Works in blocks so the score matrix stays small.
pub(crate) fn maxsim_segments(
    q: &[f32],
    lq: usize,
    tokens: &[f32],
    offsets: &[usize],
    dim: usize,
) -> Vec<f32> {
    let n_docs = offsets.len().saturating_sub(1);
    let mut out = vec![0f32; n_docs];
    let mut scratch = Vec::new();
    let mut acc = vec![0f32; lq];
    let mut d = 0;
    const BLOCK_TOKENS: usize = 2048;
    while d < n_docs {
        let start = offsets[d];
        let mut end_doc = d + 1;
        while end_doc < n_docs && offsets[end_doc + 1] - start <= BLOCK_TOKENS {
            end_doc += 1;
        }
        let end = offsets[end_doc];
        let nt = end - start;
        scratch.resize(nt * lq, 0.0);
        // token-major scores: row t holds the scores of token t against every query token.
        matmul_abt(
            &tokens[start * dim..end * dim],
            nt,
            q,
            lq,
            dim,
            &mut scratch,
            false,
        );
        for (i, o) in out.iter_mut().enumerate().take(end_doc).skip(d) {
            let (a, b) = (offsets[i] - start, offsets[i + 1] - start);
            acc.fill(f32::NEG_INFINITY);
            max_rows_into(&scratch[a * lq..b * lq], lq, &mut acc);
            *o = if b > a { acc.iter().sum() } else { 0.0 };
        }
        d = end_doc;
    }
    out
}

/// L2-normalises each row in place (rows with zero norm are left as they are).
pub(crate) fn normalize_rows(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive() {
        let (m, n, k) = (7, 5, 13);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 3 % 13) as f32) * 0.5 - 2.0)
            .collect();
        let mut out = vec![0f32; m * n];
        matmul_abt(&a, m, &b, n, k, &mut out, false);
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
                assert!(
                    (out[i * n + j] - e).abs() < 1e-4,
                    "{i},{j}: {} vs {e}",
                    out[i * n + j]
                );
            }
        }
    }

    #[test]
    fn segments_match_naive_maxsim() {
        let dim = 4;
        let q = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let tokens = [0.5, 0.5, 0.0, 0.0, -1.0, 2.0, 0.0, 0.0, 3.0, -1.0, 0.0, 0.0];
        let s = maxsim_segments(&q, 2, &tokens, &[0, 2, 3], dim);
        assert_eq!(s, vec![0.5 + 2.0, 3.0 - 1.0]);
    }
}
