//! Dense f32 kernels: `A · Bᵀ` through the `gemm` crate, row-wise maxima, segmented MaxSim, row
//! normalisation, and the tiled nearest-centroid scan of k-means' two-level assignment ([`scan_tiles`]).
//!
//! Each runs at the process's level ([`crate::cpu()`]); the `*_at` forms take a level (capped at the
//! process's, so they are safe) for tests that compare every level in one process.

use std::sync::OnceLock;

use crate::cpu::{self, Cpu, Level};
use crate::search::multiversion;

/// `out[m × n] = a[m × k] · b[n × k]ᵀ`, all row-major. `parallel` lets gemm use the rayon pool.
pub fn matmul_abt(
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

multiversion! {
    /// For `rows × width` scores, `acc[j] = max(acc[j], row[j])` over the given rows. Scores are never NaN
    /// here, so the comparison skips f32::max's NaN handling and the loop vectorises (AVX2 when available).
    pub fn max_rows_into / max_rows_into_at(scores: &[f32], width: usize, acc: &mut [f32]) -> () {
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
pub fn maxsim_segments(
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
pub fn normalize_rows(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// Centroids per tile of [`scan_tiles`]: a tile holds `TILE` centroids dimension-major (`tile[l * TILE + i]`
/// is centroid `i`'s dimension `l`).
pub const TILE: usize = 16;

/// Whether the matmul (`gemm`, which picks its kernels itself, whatever `LATTE_SIMD` says) rounds with fused
/// multiply-adds on this CPU: [`scan_tiles`] must round the same way at every level.
fn gemm_fuses() -> bool {
    static FUSED: OnceLock<bool> = OnceLock::new();
    *FUSED.get_or_init(|| {
        cfg!(target_arch = "aarch64") || Cpu::detect_uncapped().level >= Level::Avx2
    })
}

/// Scores the points `pts` (indices into `rows`, `dim` values each) against every centroid of `tiles` (whole
/// tiles of [`TILE`] centroids, their original indices in `ids`) and keeps, per point, the best (score, index)
/// in `best` (ties: lower index), with exactly the rounding of [`matmul_abt`] (one multiply-add per dimension,
/// in dimension order, fused where the matmul fuses).
pub fn scan_tiles(
    tiles: &[f32],
    ids: &[u32],
    dim: usize,
    pts: &[u32],
    rows: &[f32],
    best: &mut [(f32, u32)],
) {
    scan_tiles_at(cpu::level(), tiles, ids, dim, pts, rows, best)
}

/// [`scan_tiles`] at `level` (capped at this process's level).
pub fn scan_tiles_at(
    level: Level,
    tiles: &[f32],
    ids: &[u32],
    dim: usize,
    pts: &[u32],
    rows: &[f32],
    best: &mut [(f32, u32)],
) {
    assert!(
        dim > 0
            && tiles.len() == ids.len() * dim
            && ids.len().is_multiple_of(TILE)
            && rows.len().is_multiple_of(dim)
            && pts
                .iter()
                .all(|&p| (p as usize) < rows.len() / dim && (p as usize) < best.len()),
        "scan_tiles: inconsistent sizes"
    );
    let level = level.min(cpu::level());
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Level::Avx512 && gemm_fuses() {
            // SAFETY: the process's level includes AVX-512 F.
            return unsafe { scan_avx512(tiles, ids, dim, pts, rows, best) };
        }
        if level >= Level::Avx2 && gemm_fuses() {
            // SAFETY: the process's level includes AVX2 and FMA.
            return unsafe { scan_avx2(tiles, ids, dim, pts, rows, best) };
        }
    }
    let _ = level;
    // Portable: fused (a software multiply-add where the CPU's FMA is not enabled) exactly when gemm fuses.
    if gemm_fuses() {
        scan_group::<true, 4>(tiles, ids, dim, pts, rows, best)
    } else {
        scan_group::<false, 4>(tiles, ids, dim, pts, rows, best)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scan_avx512(
    tiles: &[f32],
    ids: &[u32],
    dim: usize,
    pts: &[u32],
    rows: &[f32],
    best: &mut [(f32, u32)],
) {
    scan_group::<true, 8>(tiles, ids, dim, pts, rows, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scan_avx2(
    tiles: &[f32],
    ids: &[u32],
    dim: usize,
    pts: &[u32],
    rows: &[f32],
    best: &mut [(f32, u32)],
) {
    scan_group::<true, 6>(tiles, ids, dim, pts, rows, best)
}

/// Scores the points `pts` (indices into `rows`, `dim` values each) against every centroid of one group's tiles
/// and keeps, per point, the best (score, original index) in `best` (ties: lower index). `M` points at a time
/// against one tile: `M × TILE` accumulators, one fused multiply-add per dimension each, in dimension order
/// (the same rounding as the matmul). The last group of points is padded by repeating its last point.
#[inline(always)]
fn scan_group<const FUSED: bool, const M: usize>(
    tiles: &[f32],
    ids: &[u32],
    dim: usize,
    pts: &[u32],
    rows: &[f32],
    best: &mut [(f32, u32)],
) {
    for chunk in pts.chunks(M) {
        let x: [&[f32]; M] = std::array::from_fn(|i| {
            let p = chunk[i.min(chunk.len() - 1)] as usize;
            &rows[p * dim..(p + 1) * dim]
        });
        for (tile, tid) in tiles.chunks_exact(dim * TILE).zip(ids.chunks_exact(TILE)) {
            let mut acc = [[0f32; TILE]; M];
            for (l, t) in tile.chunks_exact(TILE).enumerate() {
                let t: &[f32; TILE] = t.try_into().unwrap();
                for (a, xr) in acc.iter_mut().zip(&x) {
                    let xv = xr[l];
                    for (av, &tv) in a.iter_mut().zip(t) {
                        *av = if FUSED {
                            xv.mul_add(tv, *av)
                        } else {
                            xv * tv + *av
                        };
                    }
                }
            }
            for (a, &p) in acc.iter().zip(chunk) {
                let b = &mut best[p as usize];
                for (&v, &id) in a.iter().zip(tid) {
                    if v > b.0 || (v == b.0 && id < b.1) {
                        *b = (v, id);
                    }
                }
            }
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

    #[test]
    fn max_rows_match_plain_code_at_every_level() {
        let (rows, width) = (13usize, 37usize);
        let scores: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 53 % 71) as f32) - 35.0)
            .collect();
        let mut want = vec![f32::NEG_INFINITY; width];
        for r in 0..rows {
            for j in 0..width {
                want[j] = want[j].max(scores[r * width + j]);
            }
        }
        for level in cpu::levels_here() {
            eprintln!("max_rows_into at {level}");
            let mut acc = vec![f32::NEG_INFINITY; width];
            max_rows_into_at(level, &scores, width, &mut acc);
            assert_eq!(acc, want, "{level}");
        }
    }

    #[test]
    fn scan_tiles_matches_the_matmul_at_every_level() {
        for dim in [3usize, 16, 37] {
            let k = 3 * TILE;
            let n = 11;
            let cents: Vec<f32> = (0..k * dim)
                .map(|i| ((i * 29 % 61) as f32 - 30.0) / 17.0)
                .collect();
            let mut rows: Vec<f32> = (0..n * dim)
                .map(|i| ((i * 43 % 59) as f32 - 29.0) / 13.0)
                .collect();
            // A point equal to a centroid, and duplicate centroids (ties go to the lower index).
            rows[..dim].copy_from_slice(&cents[5 * dim..6 * dim]);
            let mut cents = cents;
            let dup = cents[7 * dim..8 * dim].to_vec();
            cents[20 * dim..21 * dim].copy_from_slice(&dup);
            let mut scores = vec![0f32; n * k];
            matmul_abt(&rows, n, &cents, k, dim, &mut scores, false);
            let want: Vec<(f32, u32)> = scores
                .chunks_exact(k)
                .map(|r| {
                    let mut b = (f32::NEG_INFINITY, u32::MAX);
                    for (i, &v) in r.iter().enumerate() {
                        if v > b.0 {
                            b = (v, i as u32);
                        }
                    }
                    b
                })
                .collect();
            // Tiles: centroids in reverse order, dimension-major within each tile.
            let ids: Vec<u32> = (0..k as u32).rev().collect();
            let mut tiles = vec![0f32; k * dim];
            for (t, tid) in ids.chunks_exact(TILE).enumerate() {
                for (i, &c) in tid.iter().enumerate() {
                    for l in 0..dim {
                        tiles[t * TILE * dim + l * TILE + i] = cents[c as usize * dim + l];
                    }
                }
            }
            let pts: Vec<u32> = (0..n as u32).collect();
            for level in cpu::levels_here() {
                eprintln!("scan_tiles at {level}, dim {dim}");
                let mut best = vec![(f32::NEG_INFINITY, u32::MAX); n];
                scan_tiles_at(level, &tiles, &ids, dim, &pts, &rows, &mut best);
                assert_eq!(best, want, "{level} dim {dim}");
            }
        }
    }

    #[test]
    fn normalize_rows_gives_unit_rows_and_keeps_zero_rows() {
        let dim = 7;
        let mut v: Vec<f32> = (0..3 * dim).map(|i| (i % 5) as f32 - 2.0).collect();
        v[dim..2 * dim].fill(0.0);
        let orig = v.clone();
        normalize_rows(&mut v, dim);
        for (r, (row, o)) in v.chunks_exact(dim).zip(orig.chunks_exact(dim)).enumerate() {
            let n = o.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n == 0.0 {
                assert_eq!(row, o, "row {r}");
            } else {
                for (a, b) in row.iter().zip(o) {
                    assert!((a - b / n).abs() < 1e-6, "row {r}");
                }
            }
        }
    }
}
