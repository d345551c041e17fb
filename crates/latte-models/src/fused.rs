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
        let x = Tensor::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap();
        for bias in [true, false] {
            let layer = Linear {
                weight: Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap(),
                bias: bias.then(|| Tensor::randn(0f32, 1.0, 3, &dev).unwrap()),
            };
            let a = linear(&layer, &x).unwrap();
            let b = layer.forward(&x).unwrap();
            assert_eq!(a.dims(), &[2, 5, 3]);
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
