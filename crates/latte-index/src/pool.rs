//! Token pooling at index time, matching PyLate's `pool_embeddings_hierarchical`.
//!
//! Per document: the first `protected_tokens` rows are kept as they are; the other `n` rows are clustered into
//! `k = max(n / pool_factor, 1)` clusters by Ward hierarchical clustering on the cosine distance `1 − ⟨a, b⟩`
//! (scipy `linkage(method="ward")` + `fcluster(t=k, criterion="maxclust")`), and each cluster is replaced by the
//! mean of its rows (not re-normalised), in scipy's cluster label order.

use crate::{Error, Result};

/// One merge of the dendrogram, scipy layout: children (ids < n are points, n + i is merge i), height, size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Merge {
    /// Smaller child id.
    pub left: usize,
    /// Larger child id.
    pub right: usize,
    /// Ward distance.
    pub distance: f64,
    /// Points under this node.
    pub size: usize,
}

fn condensed(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i < j { (i, j) } else { (j, i) };
    n * i - i * (i + 1) / 2 + (j - i - 1)
}

/// Ward linkage of `n` points given their condensed distance matrix (scipy order), as scipy returns it: merges
/// sorted by distance, children relabelled so that `left < right`.
pub fn ward_linkage(dist: &[f64], n: usize) -> Vec<Merge> {
    assert_eq!(
        dist.len(),
        n * n.saturating_sub(1) / 2,
        "condensed distance matrix size"
    );
    if n < 2 {
        return Vec::new();
    }
    let mut d = dist.to_vec();
    let mut size = vec![1usize; n];
    let mut chain: Vec<usize> = Vec::with_capacity(n);
    let mut raw: Vec<(usize, usize, f64)> = Vec::with_capacity(n - 1);
    for _ in 0..n - 1 {
        if chain.is_empty() {
            chain.push(size.iter().position(|&s| s > 0).expect("a live cluster"));
        }
        let (x, y, current) = loop {
            let x = *chain.last().unwrap();
            let (mut y, mut current) = if chain.len() > 1 {
                let y = chain[chain.len() - 2];
                (y, d[condensed(n, x, y)])
            } else {
                (usize::MAX, f64::INFINITY)
            };
            for i in 0..n {
                if size[i] == 0 || i == x {
                    continue;
                }
                let v = d[condensed(n, x, i)];
                if v < current {
                    current = v;
                    y = i;
                }
            }
            if chain.len() > 1 && y == chain[chain.len() - 2] {
                break (x, y, current);
            }
            chain.push(y);
        };
        chain.truncate(chain.len() - 2);
        let (x, y) = if x > y { (y, x) } else { (x, y) };
        let (nx, ny) = (size[x], size[y]);
        raw.push((x, y, current));
        size[x] = 0;
        size[y] = nx + ny;
        for i in 0..n {
            let ni = size[i];
            if ni == 0 || i == y {
                continue;
            }
            let (dxi, dyi) = (d[condensed(n, i, x)], d[condensed(n, i, y)]);
            let t = 1.0 / (nx + ny + ni) as f64;
            let v = ((ni + nx) as f64 * t * dxi * dxi + (ni + ny) as f64 * t * dyi * dyi
                - ni as f64 * t * current * current)
                .sqrt();
            d[condensed(n, i, y)] = v;
        }
    }
    // Stable sort by distance, then relabel with a union-find (scipy `label`).
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|&a, &b| raw[a].2.total_cmp(&raw[b].2));
    let mut parent: Vec<usize> = (0..2 * n - 1).collect();
    let mut csize = vec![1usize; 2 * n - 1];
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        let mut root = x;
        while parent[root] != root {
            root = parent[root];
        }
        while parent[x] != root {
            let next = parent[x];
            parent[x] = root;
            x = next;
        }
        root
    }
    let mut out = Vec::with_capacity(n - 1);
    for (i, &o) in order.iter().enumerate() {
        let (x, y, dv) = raw[o];
        let (rx, ry) = (find(&mut parent, x), find(&mut parent, y));
        let (l, r) = if rx < ry { (rx, ry) } else { (ry, rx) };
        let new = n + i;
        parent[l] = new;
        parent[r] = new;
        csize[new] = csize[l] + csize[r];
        out.push(Merge {
            left: l,
            right: r,
            distance: dv,
            size: csize[new],
        });
    }
    out
}

/// scipy `fcluster(Z, t=max_clusters, criterion="maxclust")`: labels `1..` for each of the `n` points.
pub fn fcluster_maxclust(z: &[Merge], n: usize, max_clusters: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if z.is_empty() {
        return vec![1; n];
    }
    // Monotone criterion: the largest merge distance in each subtree.
    let mut mc = vec![0f64; z.len()];
    for (i, m) in z.iter().enumerate() {
        let mut v = m.distance;
        for c in [m.left, m.right] {
            if c >= n {
                v = v.max(mc[c - n]);
            }
        }
        mc[i] = v;
    }
    let mut sorted = mc.clone();
    sorted.sort_by(f64::total_cmp);
    let count = |t: f64| n - mc.iter().filter(|&&v| v <= t).count();
    let threshold = if max_clusters >= n {
        f64::NEG_INFINITY
    } else {
        // Smallest candidate threshold giving at most max_clusters clusters.
        let i = sorted.partition_point(|&t| count(t) > max_clusters);
        sorted[i.min(sorted.len() - 1)]
    };
    // scipy `cluster_monocrit`: depth-first from the root, left child first.
    let mut labels = vec![0usize; n];
    let mut visited = vec![false; 2 * n - 1];
    let mut stack = vec![2 * n - 2];
    let mut n_cluster = 0usize;
    let mut leader: Option<usize> = None;
    while let Some(&node) = stack.last() {
        let root = node - n;
        let (lc, rc) = (z[root].left, z[root].right);
        if leader.is_none() && mc[root] <= threshold {
            leader = Some(root);
            n_cluster += 1;
        }
        if lc >= n && !visited[lc] {
            visited[lc] = true;
            stack.push(lc);
            continue;
        }
        if rc >= n && !visited[rc] {
            visited[rc] = true;
            stack.push(rc);
            continue;
        }
        for c in [lc, rc] {
            if c < n {
                if leader.is_none() {
                    n_cluster += 1;
                }
                labels[c] = n_cluster;
            }
        }
        if leader == Some(root) {
            leader = None;
        }
        stack.pop();
    }
    labels
}

/// Document `i` of `source` pooled (first token protected, as the index's own pooling does); a shape error
/// names the document.
fn pool_document(
    source: &dyn crate::DocumentSource,
    i: usize,
    pool_factor: usize,
) -> Result<Vec<f32>> {
    let e = source.embeddings(i)?;
    pool_embeddings_hierarchical(&e, source.dim(), pool_factor, 1).map_err(|err| match err {
        Error::Shape(m) => Error::Shape(format!("document {:?}: {m}", source.id(i))),
        other => other,
    })
}

/// Pools every document of `source` exactly once (in parallel, the first token of each kept as it is, as the
/// index's own pooling does) into an in-memory source. Index the result with `pool_factor: 1`: the index then
/// reads each pooled document as often as it needs (training sample, encoding) without pooling it again.
pub fn pool_source(
    source: &dyn crate::DocumentSource,
    pool_factor: usize,
) -> Result<crate::VecSource> {
    use rayon::prelude::*;
    let pooled: Vec<Vec<f32>> = (0..source.len())
        .into_par_iter()
        .map(|i| pool_document(source, i, pool_factor))
        .collect::<Result<_>>()?;
    let mut out = crate::VecSource::new(source.dim());
    for (i, doc) in pooled.into_iter().enumerate() {
        out.push(source.id(i), doc)?;
    }
    Ok(out)
}

/// Pools every document of `source` exactly once, as [`pool_source`] does, into a temporary file in `dir`
/// (removed when the result is dropped) instead of memory, for corpora too large to hold pooled.
pub fn pool_to_spool(
    source: &dyn crate::DocumentSource,
    pool_factor: usize,
    dir: &std::path::Path,
) -> Result<crate::SpooledSource> {
    crate::spool::spool_each(dir, source, |i| {
        pool_document(source, i, pool_factor).map(std::borrow::Cow::Owned)
    })
}

/// Pools one document (`rows × dim`, row-major), PyLate `pool_embeddings_hierarchical` semantics.
pub fn pool_embeddings_hierarchical(
    emb: &[f32],
    dim: usize,
    pool_factor: usize,
    protected_tokens: usize,
) -> Result<Vec<f32>> {
    if dim == 0 || !emb.len().is_multiple_of(dim) {
        return Err(Error::Shape(format!(
            "{} values are not whole rows of dimension {dim}",
            emb.len()
        )));
    }
    if pool_factor == 0 {
        return Err(Error::InvalidArgument(
            "pool_factor must be at least 1".into(),
        ));
    }
    let rows = emb.len() / dim;
    let p = protected_tokens.min(rows);
    let to_pool = &emb[p * dim..];
    let n = rows - p;
    let k = (n / pool_factor).max(1);
    if k >= n {
        return Ok(emb.to_vec());
    }
    let mut dist = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        let a = &to_pool[i * dim..(i + 1) * dim];
        for j in i + 1..n {
            let b = &to_pool[j * dim..(j + 1) * dim];
            let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            dist.push((1.0f32 - cos) as f64);
        }
    }
    let z = ward_linkage(&dist, n);
    let labels = fcluster_maxclust(&z, n, k);
    let mut sums = vec![0f32; k * dim];
    let mut counts = vec![0usize; k];
    for (i, &l) in labels.iter().enumerate() {
        let c = l - 1;
        counts[c] += 1;
        for (s, &v) in sums[c * dim..(c + 1) * dim]
            .iter_mut()
            .zip(&to_pool[i * dim..(i + 1) * dim])
        {
            *s += v;
        }
    }
    let mut out = emb[..p * dim].to_vec();
    for c in 0..k {
        if counts[c] > 0 {
            out.extend(
                sums[c * dim..(c + 1) * dim]
                    .iter()
                    .map(|s| s / counts[c] as f32),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linkage_of_points_on_a_line() {
        // 1-D points 0, 1, 5 with distance |a - b|: merge (0,1) at 1, then with 2.
        let d = [1.0, 5.0, 4.0];
        let z = ward_linkage(&d, 3);
        assert_eq!((z[0].left, z[0].right, z[0].size), (0, 1, 2));
        assert_eq!((z[1].left, z[1].right, z[1].size), (2, 3, 3));
        assert!((z[0].distance - 1.0).abs() < 1e-12);
        // Ward: sqrt((1+1)/3 * 25 + (1+1)/3 * 16 - 1/3 * 1) = sqrt(27)
        assert!((z[1].distance - 27f64.sqrt()).abs() < 1e-9);
        assert_eq!(fcluster_maxclust(&z, 3, 2), vec![1, 1, 2]);
        assert_eq!(fcluster_maxclust(&z, 3, 1), vec![1, 1, 1]);
    }

    #[test]
    fn pooling_keeps_protected_and_reduces() {
        let dim = 2;
        let emb = [1.0, 0.0, 0.0, 1.0, 0.1, 0.99, 1.0, 0.0, 0.99, 0.1];
        let out = pool_embeddings_hierarchical(&emb, dim, 2, 1).unwrap();
        assert_eq!(out.len(), 3 * dim);
        assert_eq!(&out[..2], &[1.0, 0.0]);
    }

    /// A source that counts how often each document is read.
    struct Counting {
        docs: Vec<Vec<f32>>,
        reads: Vec<std::sync::atomic::AtomicUsize>,
    }

    impl crate::DocumentSource for Counting {
        fn len(&self) -> usize {
            self.docs.len()
        }
        fn dim(&self) -> usize {
            2
        }
        fn id(&self, i: usize) -> String {
            format!("d{i}")
        }
        fn embeddings(&self, i: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
            self.reads[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(std::borrow::Cow::Borrowed(&self.docs[i]))
        }
    }

    #[test]
    fn pool_source_and_pool_to_spool_pool_each_document_once() {
        use crate::DocumentSource;
        let docs: Vec<Vec<f32>> = (0..5)
            .map(|d| {
                (0..2 * (3 + d))
                    .map(|v| ((v * 7 + d * 3) % 11) as f32 / 11.0 + 0.05)
                    .collect()
            })
            .collect();
        let src = Counting {
            reads: docs.iter().map(|_| Default::default()).collect(),
            docs: docs.clone(),
        };
        let pooled = pool_source(&src, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spooled = pool_to_spool(&src, 2, dir.path()).unwrap();
        assert_eq!((pooled.len(), spooled.len()), (5, 5));
        for (i, d) in docs.iter().enumerate() {
            // Read once by each of the two calls.
            assert_eq!(src.reads[i].load(std::sync::atomic::Ordering::Relaxed), 2);
            let want = pool_embeddings_hierarchical(d, 2, 2, 1).unwrap();
            // One pooling: the protected first token plus (n - 1) / 2 clusters.
            let n = d.len() / 2;
            assert_eq!(want.len() / 2, 1 + ((n - 1) / 2).max(1));
            assert_eq!(pooled.id(i), format!("d{i}"));
            assert_eq!(pooled.embeddings(i).unwrap().as_ref(), want.as_slice());
            assert_eq!(spooled.id(i), format!("d{i}"));
            assert_eq!(spooled.embeddings(i).unwrap().as_ref(), want.as_slice());
        }
    }
}
