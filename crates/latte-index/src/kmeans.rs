//! Spherical k-means (Lloyd iterations, nearest centroid by inner product) with matmul-based assignment.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::linalg::{matmul_abt, normalize_rows};

const ASSIGN_BLOCK: usize = 1024;

/// For each point (`n × dim`), the index of the centroid (`k × dim`) with the largest inner product.
pub(crate) fn assign(points: &[f32], centroids: &[f32], dim: usize) -> Vec<u32> {
    let k = centroids.len() / dim;
    let mut codes = vec![0u32; points.len() / dim];
    codes
        .par_chunks_mut(ASSIGN_BLOCK)
        .enumerate()
        .for_each_init(Vec::new, |scores, (b, out)| {
            let rows = &points[b * ASSIGN_BLOCK * dim..(b * ASSIGN_BLOCK + out.len()) * dim];
            scores.resize(out.len() * k, 0.0);
            matmul_abt(rows, out.len(), centroids, k, dim, scores, false);
            for (o, row) in out.iter_mut().zip(scores.chunks_exact(k)) {
                let mut best = 0usize;
                let mut bv = f32::NEG_INFINITY;
                for (j, &v) in row.iter().enumerate() {
                    if v > bv {
                        bv = v;
                        best = j;
                    }
                }
                *o = best as u32;
            }
        });
    codes
}

/// Trains `k` unit-norm centroids on `points` (`n × dim`, n ≥ k) with `iters` Lloyd iterations.
/// Deterministic for a given seed. Empty clusters are re-seeded with a random point.
pub(crate) fn train(points: &[f32], dim: usize, k: usize, iters: usize, seed: u64) -> Vec<f32> {
    let n = points.len() / dim;
    assert!(k >= 1 && n >= k, "k-means needs at least k points");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut centroids: Vec<f32> = Vec::with_capacity(k * dim);
    for i in sample(&mut rng, n, k).into_iter() {
        centroids.extend_from_slice(&points[i * dim..(i + 1) * dim]);
    }
    normalize_rows(&mut centroids, dim);
    for _ in 0..iters {
        let codes = assign(points, &centroids, dim);
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &c) in codes.iter().enumerate() {
            let c = c as usize;
            counts[c] += 1;
            for (s, &v) in sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(&points[i * dim..(i + 1) * dim])
            {
                *s += v as f64;
            }
        }
        for c in 0..k {
            let dst = &mut centroids[c * dim..(c + 1) * dim];
            if counts[c] == 0 {
                let i = rand::Rng::random_range(&mut rng, 0..n);
                dst.copy_from_slice(&points[i * dim..(i + 1) * dim]);
            } else {
                for (d, s) in dst.iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                    *d = (*s / counts[c] as f64) as f32;
                }
            }
        }
        normalize_rows(&mut centroids, dim);
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separated_clusters() {
        // Three tight clusters around the axes of R^3.
        let mut pts = Vec::new();
        for i in 0..90 {
            let mut v = [0.01 * ((i % 7) as f32), 0.01 * ((i % 5) as f32), 0.0];
            v[i % 3] = 1.0;
            pts.extend_from_slice(&v);
        }
        normalize_rows(&mut pts, 3);
        let c = train(&pts, 3, 3, 10, 7);
        let codes = assign(&pts, &c, 3);
        for i in 0..90 {
            assert_eq!(codes[i], codes[i % 3], "point {i}");
        }
        assert_ne!(codes[0], codes[1]);
        assert_ne!(codes[1], codes[2]);
        assert_ne!(codes[0], codes[2]);
    }
}
