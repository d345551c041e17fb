//! Fused CPU kernels for inference: `x Wᵀ + b` in one gemm call (the bias is the initial value of the
//! output, so there is no zero-fill and no separate bias pass) and GELU with a fast erf.
//!
//! They run only in [`Mode::Infer`](crate::Mode) on float32 CPU tensors; everywhere else (training,
//! accelerators, other dtypes) the plain candle ops are used, which have backward passes.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::Linear;
use crate::Result;

fn threads() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

struct LinearOp {
    has_bias: bool,
    packed: std::sync::Arc<std::sync::OnceLock<Vec<f32>>>,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "latte-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) else {
            candle_core::bail!("latte-linear: float32 only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("latte-linear: inner dimensions {k} and {k2} differ");
        }
        let (Some((xo, _)), Some((wo, _))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("latte-linear: inputs must be contiguous");
        };
        let x = &x[xo..xo + m * k];
        let w = &w[wo..wo + n * k];
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            let bias = if self.has_bias {
                let bo = l3.start_offset();
                Some(&b[bo..bo + n])
            } else {
                None
            };
            let bp = self.packed.get_or_init(|| avx512::pack(w, n, k));
            let mut dst = vec![0f32; m * n];
            avx512::linear(x, m, k, bp, n, bias, &mut dst);
            return Ok((CpuStorage::F32(dst), Shape::from((m, n))));
        }
        let mut dst = Vec::with_capacity(m * n);
        if self.has_bias {
            let bo = l3.start_offset();
            let b = &b[bo..bo + n];
            for _ in 0..m {
                dst.extend_from_slice(b);
            }
        } else {
            dst.resize(m * n, 0f32);
        }
        // dst[m, n] = 1·dst + 1·x[m, k] · wᵀ[k, n]; wᵀ is read through strides (row i of w = column i).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                self.has_bias,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1f32,
                1f32,
                false,
                false,
                false,
                threads(),
            );
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }
}

/// An AVX-512 single-precision kernel for `x Wᵀ + b`: 8 × 32 register tiles (16 accumulators), `Wᵀ`
/// packed in panels of 32 columns, row blocks sized to stay in L2 run in parallel. Chosen at run time when the CPU has
/// AVX-512F; the `gemm` crate (AVX2 on stable Rust) is used otherwise.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    const MR: usize = 8;
    const NR: usize = 32;

    /// AVX-512F is present and not switched off with `LATTE_NO_AVX512=1`.
    pub fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::env::var("LATTE_NO_AVX512").map_or(true, |v| v.is_empty() || v == "0")
        })
    }

    /// `w` is `[n, k]` row-major; the result holds `ceil(n / NR)` panels of `k × NR` values, zero-padded.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let panels = n.div_ceil(NR);
        let mut out = vec![0f32; panels * k * NR];
        for j in 0..n {
            let base = (j / NR) * k * NR + j % NR;
            for (kk, &v) in w[j * k..(j + 1) * k].iter().enumerate() {
                out[base + kk * NR] = v;
            }
        }
        out
    }

    /// One `rows × cols` tile (rows ≤ MR, cols ≤ NR) of `out = bias + A · Bpanel`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        k: usize,
        a: [*const f32; MR],
        bp: *const f32,
        bias: *const f32,
        out: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        let mut c0 = [_mm512_loadu_ps(bias); MR];
        let mut c1 = [_mm512_loadu_ps(bias.add(16)); MR];
        for kk in 0..k {
            let b0 = _mm512_loadu_ps(bp.add(kk * NR));
            let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a[r].add(kk));
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
            }
        }
        let m0: __mmask16 = if cols >= 16 {
            0xFFFF
        } else {
            ((1u32 << cols) - 1) as u16
        };
        let m1: __mmask16 = if cols >= NR {
            0xFFFF
        } else if cols > 16 {
            ((1u32 << (cols - 16)) - 1) as u16
        } else {
            0
        };
        for r in 0..rows {
            let o = out.add(r * ldc);
            _mm512_mask_storeu_ps(o, m0, c0[r]);
            _mm512_mask_storeu_ps(o.add(16), m1, c1[r]);
        }
    }

    /// `dst[m, n] = x[m, k] · wᵀ + bias`, with `bp` = `pack(w, n, k)`.
    pub fn linear(
        x: &[f32],
        m: usize,
        k: usize,
        bp: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        dst: &mut [f32],
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(NR);
        let mut bias_pad = vec![0f32; panels * NR];
        if let Some(b) = bias {
            bias_pad[..n].copy_from_slice(b);
        }
        // Row blocks of about 384 KB of `x`, so a block stays in L2 while every panel of `Wᵀ` passes over it.
        let mc = ((96 * 1024) / k.max(1)).clamp(MR, 512) / MR * MR;
        let threads = candle_core::utils::get_num_threads();
        let mc = if threads > 1 && m <= mc * threads {
            // Small inputs: split evenly so every thread gets work.
            m.div_ceil(threads).div_ceil(MR) * MR
        } else {
            mc
        };
        let block = |(bi, d): (usize, &mut [f32])| {
            let r0 = bi * mc;
            let rows_in = d.len() / n;
            for p in 0..panels {
                let cols = NR.min(n - p * NR);
                let mut mr = 0;
                while mr < rows_in {
                    let rows = MR.min(rows_in - mr);
                    let mut a = [std::ptr::null::<f32>(); MR];
                    for (r, ptr) in a.iter_mut().enumerate() {
                        // Rows past the end repeat the last row; their results are not stored.
                        *ptr = x[(r0 + mr + r.min(rows - 1)) * k..].as_ptr();
                    }
                    // SAFETY: AVX-512F is present (checked by `available`), every pointer stays inside
                    // `x`, `bp`, `bias_pad` and `d` for the k, rows and cols given.
                    unsafe {
                        kernel(
                            k,
                            a,
                            bp.as_ptr().add(p * k * NR),
                            bias_pad.as_ptr().add(p * NR),
                            d.as_mut_ptr().add(mr * n + p * NR),
                            n,
                            rows,
                            cols,
                        );
                    }
                    mr += MR;
                }
            }
        };
        if threads > 1 && m > mc {
            dst.par_chunks_mut(mc * n).enumerate().for_each(block);
        } else {
            dst.chunks_mut(mc * n).enumerate().for_each(block);
        }
    }
}

/// `x Wᵀ + b` for a float32 CPU tensor of any leading shape, in one gemm call.
pub fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let usable = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && layer.weight.dtype() == candle_core::DType::F32
        && layer.weight.is_contiguous();
    if !usable {
        return Ok(layer.forward(x)?);
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let x2 = x.contiguous()?.reshape((m, k))?;
    let bias = match &layer.bias {
        Some(b) => b.clone(),
        None => layer.weight.narrow(1, 0, 1)?.squeeze(1)?, // unused placeholder
    };
    let y = x2.apply_op3_no_bwd(
        &layer.weight,
        &bias,
        &LinearOp {
            has_bias: layer.bias.is_some(),
            packed: layer.packed.clone(),
        },
    )?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = layer.out_dim();
    Ok(y.reshape(out_dims)?)
}

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_7) * t - 0.284_496_72) * t
            + 0.254_829_6)
            * t
            * (-a * a).exp();
    s * y
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "latte-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("latte-gelu-erf: float32 only");
        };
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("latte-gelu-erf: input must be contiguous");
        };
        let x = &x[o1..o2];
        let mut out = vec![0f32; x.len()];
        let f = |(o, i): (&mut [f32], &[f32])| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        };
        const CHUNK: usize = 1 << 15;
        if x.len() > CHUNK && candle_core::utils::get_num_threads() > 1 {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(f);
        } else {
            f((&mut out, x));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Exact-form GELU, `0.5·x·(1 + erf(x/√2))`, on float32 CPU tensors.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluOp)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_linear_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        // Shapes with remainders in every dimension of the tiling (8 rows, 32 columns, 64-row blocks).
        for (b, l, k, n, bias) in [
            (2, 5, 7, 3, true),
            (2, 5, 7, 3, false),
            (3, 47, 33, 70, true),
            (1, 130, 64, 32, false),
            (2, 700, 24, 40, true),
            (1, 2000, 16, 33, true),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, l, k), &dev).unwrap();
            let layer = Linear::new(
                Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(),
                bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap()),
            );
            let a = linear(&layer, &x).unwrap();
            let want = layer.forward(&x).unwrap();
            assert_eq!(a.dims(), &[b, l, n]);
            let b = want;
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn fast_gelu_matches_erf_gelu() {
        let x = Tensor::arange(-800i64, 800, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let x = (x / 100.0).unwrap();
        let a = gelu_erf(&x).unwrap();
        let b = x.gelu_erf().unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 2e-6, "{d}");
    }
}
