//! Residual codec: `x ≈ normalize(centroid[code] + weights[bucket(x − centroid)])`, `nbits` per dimension.

use crate::{Error, Result};

/// Trained codec parameters (besides the centroids).
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    pub(crate) nbits: usize,
    pub(crate) dim: usize,
    /// `2^nbits − 1` ascending cutoffs: bucket = number of cutoffs ≤ value.
    pub(crate) cutoffs: Vec<f32>,
    /// `2^nbits` reconstruction values.
    pub(crate) weights: Vec<f32>,
    /// 0.75-quantile of the residual norms on the training sample (used to report drift on add).
    pub(crate) cluster_threshold: f32,
    /// For each byte value, the `8 / nbits` reconstruction values it encodes, in dimension order.
    lut: Vec<f32>,
}

pub(crate) fn check_nbits(nbits: usize) -> Result<()> {
    if matches!(nbits, 1 | 2 | 4) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "nbits must be 1, 2 or 4, got {nbits}"
        )))
    }
}

fn quantile(sorted: &[f32], q: f64) -> f32 {
    // Linear interpolation, like numpy/torch quantile.
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let f = (pos - lo as f64) as f32;
    sorted[lo] * (1.0 - f) + sorted[hi] * f
}

impl Codec {
    pub(crate) fn new(
        nbits: usize,
        dim: usize,
        cutoffs: Vec<f32>,
        weights: Vec<f32>,
        cluster_threshold: f32,
    ) -> Self {
        let per = 8 / nbits;
        let mask = (1usize << nbits) - 1;
        let mut lut = vec![0f32; 256 * per];
        for byte in 0..256usize {
            for j in 0..per {
                let shift = 8 - nbits * (j + 1);
                lut[byte * per + j] = weights[(byte >> shift) & mask];
            }
        }
        Self {
            nbits,
            dim,
            cutoffs,
            weights,
            cluster_threshold,
            lut,
        }
    }

    /// Trains cutoffs and weights from the residuals of a sample (`n × dim` residual values).
    pub(crate) fn train(nbits: usize, dim: usize, residuals: &[f32]) -> Self {
        let mut values: Vec<f32> = residuals.to_vec();
        values.sort_by(f32::total_cmp);
        let levels = 1usize << nbits;
        let cutoffs = (1..levels)
            .map(|i| quantile(&values, i as f64 / levels as f64))
            .collect();
        let weights = (0..levels)
            .map(|i| quantile(&values, (i as f64 + 0.5) / levels as f64))
            .collect();
        let mut norms: Vec<f32> = residuals
            .chunks_exact(dim)
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect();
        norms.sort_by(f32::total_cmp);
        let threshold = if norms.is_empty() {
            0.0
        } else {
            quantile(&norms, 0.75)
        };
        Self::new(nbits, dim, cutoffs, weights, threshold)
    }

    /// Bytes per token of packed residuals.
    pub(crate) fn bytes_per_token(&self) -> usize {
        self.dim * self.nbits / 8
    }

    /// Packs the residual `r` (length `dim`) into `out` (`bytes_per_token` bytes).
    pub(crate) fn encode(&self, r: &[f32], out: &mut [u8]) {
        out.fill(0);
        for (j, &v) in r.iter().enumerate() {
            let bucket = self.cutoffs.partition_point(|&c| c <= v) as u8;
            let bit = j * self.nbits;
            out[bit / 8] |= bucket << (8 - self.nbits - bit % 8);
        }
    }

    /// Per byte position, the partial dot products of the query rows with the reconstruction values of the
    /// high and of the low nibble (16 rows of `stride` lanes each; field 0 sits in the high bits):
    /// `out[((p * 2 + half) * 16 + n) * stride + j]`. A table entry is then one addition per lane,
    /// `table[p][byte][j] = hi[p][byte >> 4][j] + lo[p][byte & 15][j]`.
    fn nibble_sums(&self, q: &[f32], lq: usize, stride: usize) -> Vec<f32> {
        let per = 8 / self.nbits;
        let half = per / 2;
        let positions = self.bytes_per_token();
        let mut sums = vec![0f32; positions * 2 * 16 * stride];
        for p in 0..positions {
            for n in 0..16usize {
                // The reconstruction values of the byte whose other nibble is zero.
                let wh = &self.lut[(n << 4) * per..((n << 4) + 1) * per];
                let wl = &self.lut[n * per..(n + 1) * per];
                let (hi, lo) = (((p * 2) * 16 + n) * stride, ((p * 2 + 1) * 16 + n) * stride);
                for j in 0..lq {
                    let qj = &q[j * self.dim + p * per..j * self.dim + (p + 1) * per];
                    sums[hi + j] = (0..half).map(|i| qj[i] * wh[i]).sum();
                    sums[lo + j] = (half..per).map(|i| qj[i] * wl[i]).sum();
                }
            }
        }
        sums
    }

    /// Lookup table for scoring packed residuals against a query (`lq × dim`) without decompressing them:
    /// entry `[(p * 256 + byte) * stride + j]` is `Σ_i q_j[p·per + i] · weight(bucket_i(byte))` over the `per = 8 / nbits`
    /// dimensions stored in byte position `p`. Summing the entries of a token's bytes gives `⟨q_j, residual⟩`.
    /// Rows are `stride ≥ lq` wide (zero padded).
    #[cfg(test)]
    pub(crate) fn query_table(&self, q: &[f32], lq: usize, stride: usize) -> Vec<f32> {
        let positions = self.bytes_per_token();
        let sums = self.nibble_sums(q, lq, stride);
        let mut table = vec![0f32; positions * 256 * stride];
        for p in 0..positions {
            for byte in 0..256usize {
                let h = &sums[((p * 2) * 16 + (byte >> 4)) * stride..][..stride];
                let l = &sums[((p * 2 + 1) * 16 + (byte & 15)) * stride..][..stride];
                let dst = &mut table[(p * 256 + byte) * stride..][..stride];
                for ((o, a), b) in dst.iter_mut().zip(h).zip(l) {
                    *o = a + b;
                }
            }
        }
        table
    }

    /// [`Self::query_table`] quantised to i16 (`round(entry · scale)`), with the scale chosen so that the sum
    /// of a token's `bytes_per_token` entries stays within i16: `scale = 32000 / (max |entry| · positions)`.
    /// Built straight from the nibble sums: the largest entry of a position and lane is the largest high
    /// plus the largest low partial sum, so the f32 table is never materialised.
    pub(crate) fn query_table_i16(&self, q: &[f32], lq: usize, stride: usize) -> (Vec<i16>, f32) {
        let positions = self.bytes_per_token();
        let sums = self.nibble_sums(q, lq, stride);
        let sums = &sums[..];
        let mut max = 0f32;
        for p in 0..positions {
            for j in 0..stride {
                let col =
                    |h: usize| (0..16).map(move |n| sums[((p * 2 + h) * 16 + n) * stride + j]);
                let (hmax, hmin) =
                    col(0).fold((f32::MIN, f32::MAX), |(a, b), v| (a.max(v), b.min(v)));
                let (lmax, lmin) =
                    col(1).fold((f32::MIN, f32::MAX), |(a, b), v| (a.max(v), b.min(v)));
                max = max.max((hmax + lmax).abs()).max((hmin + lmin).abs());
            }
        }
        let scale = if max > 0.0 {
            32_000.0 / (max * positions as f32)
        } else {
            1.0
        };
        let mut table = vec![0i16; positions * 256 * stride];
        latte_kernels::search::fill_i16_table(sums, &mut table, positions, stride, scale);
        (table, scale)
    }

    /// Reconstructs a unit-norm token from its centroid and packed residual.
    pub(crate) fn decode(&self, centroid: &[f32], packed: &[u8], out: &mut [f32]) {
        let per = 8 / self.nbits;
        for (b, (o, c)) in packed
            .iter()
            .zip(out.chunks_exact_mut(per).zip(centroid.chunks_exact(per)))
        {
            let w = &self.lut[*b as usize * per..(*b as usize + 1) * per];
            for j in 0..per {
                o[j] = c[j] + w[j];
            }
        }
        let n = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            out.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_uses_buckets() {
        for nbits in [1usize, 2, 4] {
            let dim = 8;
            let residuals: Vec<f32> = (0..800)
                .map(|i| ((i * 37 % 101) as f32 / 100.0) - 0.5)
                .collect();
            let codec = Codec::train(nbits, dim, &residuals);
            assert_eq!(codec.cutoffs.len(), (1 << nbits) - 1);
            let centroid = [0f32; 8];
            let r = [-0.45, -0.2, 0.0, 0.1, 0.3, 0.49, -0.05, 0.2];
            let mut packed = vec![0u8; codec.bytes_per_token()];
            codec.encode(&r, &mut packed);
            let mut out = [0f32; 8];
            codec.decode(&centroid, &packed, &mut out);
            // With more bits the reconstruction (after normalisation) gets closer to the normalised input.
            let rn = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            let cos: f32 = r.iter().zip(&out).map(|(a, b)| a / rn * b).sum();
            let floor = match nbits {
                1 => 0.6,
                2 => 0.85,
                _ => 0.97,
            };
            assert!(cos > floor, "nbits {nbits}: cos {cos}");
        }
    }

    #[test]
    fn query_table_sums_to_the_dot_product_with_the_reconstruction() {
        for nbits in [1usize, 2, 4] {
            let dim = 16;
            let residuals: Vec<f32> = (0..1600)
                .map(|i| ((i * 53 % 97) as f32 / 96.0) - 0.5)
                .collect();
            let codec = Codec::train(nbits, dim, &residuals);
            let (lq, stride) = (3usize, 5usize);
            let q: Vec<f32> = (0..lq * dim)
                .map(|i| ((i * 29 % 31) as f32 / 15.0) - 1.0)
                .collect();
            let table = codec.query_table(&q, lq, stride);
            assert_eq!(table.len(), codec.bytes_per_token() * 256 * stride);
            // The i16 table is the quantised f32 one, entry for entry.
            let want = latte_kernels::search::quantize_table(&table, codec.bytes_per_token());
            assert_eq!(codec.query_table_i16(&q, lq, stride), want);
            for r in residuals.chunks_exact(dim).take(20) {
                let mut packed = vec![0u8; codec.bytes_per_token()];
                codec.encode(r, &mut packed);
                // The reconstructed residual, bucket by bucket (decode would also add a centroid and normalise).
                let rec: Vec<f32> = (0..dim)
                    .map(|d| {
                        let bit = d * nbits;
                        let b = (packed[bit / 8] >> (8 - nbits - bit % 8)) & ((1 << nbits) - 1);
                        codec.weights[b as usize]
                    })
                    .collect();
                for j in 0..stride {
                    let got: f32 = packed
                        .iter()
                        .enumerate()
                        .map(|(p, &b)| table[(p * 256 + b as usize) * stride + j])
                        .sum();
                    let want: f32 = if j < lq {
                        (0..dim).map(|d| q[j * dim + d] * rec[d]).sum()
                    } else {
                        0.0 // padding lanes
                    };
                    assert!(
                        (got - want).abs() < 1e-5,
                        "nbits {nbits} lane {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
