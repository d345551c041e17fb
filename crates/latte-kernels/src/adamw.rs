//! One AdamW update of a parameter in a single pass over its values, moments and gradient, in place.
//!
//! The numbers are those of the elementary tensor ops the update was first written with (and that
//! `torch.optim.AdamW` computes): every intermediate rounded to f32 in the same order, each scalar factor
//! computed in f64 and rounded to f32 where the op would. Written as separate tensor ops, the update is some
//! fifteen passes over every parameter, each with its own full-size temporary; here it is one.

use rayon::prelude::*;

/// The scalars of one update of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// β₁ (first-moment decay).
    pub beta1: f64,
    /// β₂ (second-moment decay).
    pub beta2: f64,
    /// ε, added to the bias-corrected second moment's square root.
    pub eps: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Decoupled weight decay of this parameter (0 for biases and norms).
    pub weight_decay: f64,
    /// This parameter's step number, from 1.
    pub step: u64,
}

/// `x · mul + add` in f32, as an affine tensor op computes it.
#[inline(always)]
fn affine(x: f32, mul: f32, add: f32) -> f32 {
    x * mul + add
}

/// The f32 factors of one step.
#[derive(Clone, Copy)]
struct Factors {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    lr_over_bc1: f32,
    /// `Some(1 − lr · decay)` when the parameter decays.
    decay: Option<f32>,
    /// The moments start from nothing (the first step of this parameter).
    first: bool,
}

/// Updates `p` (the parameter), `m` and `v` (its first and second moments) in place from the gradient
/// `g`. On the first step (`s.step == 1`) `m` and `v` are written without being read.
///
/// # Panics
/// If the four slices differ in length.
pub fn adamw_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "adamw: {n} values but gradient {}, moments {} and {}",
        g.len(),
        m.len(),
        v.len()
    );
    let t = s.step.max(1) as i32;
    let bc1 = 1.0 - s.beta1.powi(t);
    let bc2 = 1.0 - s.beta2.powi(t);
    let f = Factors {
        b1: s.beta1 as f32,
        one_minus_b1: (1.0 - s.beta1) as f32,
        b2: s.beta2 as f32,
        one_minus_b2: (1.0 - s.beta2) as f32,
        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        eps: s.eps as f32,
        lr_over_bc1: (s.lr / bc1) as f32,
        decay: (s.weight_decay != 0.0).then_some((1.0 - s.lr * s.weight_decay) as f32),
        first: s.step <= 1,
    };
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| update_widest(p, g, m, v, f));
}

widest!(update_widest = update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], f: Factors));

#[inline(always)]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], f: Factors) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let gm = affine(g, f.one_minus_b1, 0.0);
        let gv = affine(g * g, f.one_minus_b2, 0.0);
        let (m1, v1) = if f.first {
            (gm, gv)
        } else {
            (affine(*m, f.b1, 0.0) + gm, affine(*v, f.b2, 0.0) + gv)
        };
        let denom = affine(affine(v1.sqrt(), f.inv_sqrt_bc2, 0.0), 1.0, f.eps);
        let update = affine(m1 / denom, f.lr_over_bc1, 0.0);
        let decayed = match f.decay {
            Some(d) => affine(*p, d, 0.0),
            None => *p,
        };
        *p = decayed - update;
        *m = m1;
        *v = v1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    /// The update written out op by op, one value at a time, with the scalars as the tensor ops take them.
    fn reference(p: f32, g: f32, m: Option<f32>, v: Option<f32>, s: AdamWStep) -> (f32, f32, f32) {
        let af = |x: f32, mul: f64, add: f64| x * mul as f32 + add as f32;
        let m1 = match m {
            Some(m) => af(m, s.beta1, 0.0) + af(g, 1.0 - s.beta1, 0.0),
            None => af(g, 1.0 - s.beta1, 0.0),
        };
        let v1 = match v {
            Some(v) => af(v, s.beta2, 0.0) + af(g * g, 1.0 - s.beta2, 0.0),
            None => af(g * g, 1.0 - s.beta2, 0.0),
        };
        let t = s.step as i32;
        let (bc1, bc2) = (1.0 - s.beta1.powi(t), 1.0 - s.beta2.powi(t));
        let denom = af(af(v1.sqrt(), 1.0 / bc2.sqrt(), 0.0), 1.0, s.eps);
        let update = af(m1 / denom, s.lr / bc1, 0.0);
        let dec = if s.weight_decay != 0.0 {
            af(p, 1.0 - s.lr * s.weight_decay, 0.0)
        } else {
            p
        };
        (dec - update, m1, v1)
    }

    #[test]
    fn fused_update_matches_the_op_sequence_bit_for_bit() {
        let n = (1 << 14) * 2 + 37;
        let scaled =
            |seed: u64, s: f32| -> Vec<f32> { values(n, seed).iter().map(|x| x * s).collect() };
        let p0 = scaled(1, 0.5);
        let g = scaled(2, 0.005);
        let m0 = scaled(3, 0.0005);
        let v0: Vec<f32> = scaled(4, 5e-6).iter().map(|x| x.abs()).collect();
        for (step, decay) in [(1u64, 0.01), (1, 0.0), (2, 0.01), (37, 0.0), (1000, 0.1)] {
            let s = AdamWStep {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                lr: 3e-5,
                weight_decay: decay,
                step,
            };
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            adamw_step(&mut p, &g, &mut m, &mut v, s);
            for i in 0..n {
                let (mo, vo) = if step == 1 {
                    (None, None)
                } else {
                    (Some(m0[i]), Some(v0[i]))
                };
                let (wp, wm, wv) = reference(p0[i], g[i], mo, vo, s);
                assert_eq!(
                    (p[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                    (wp.to_bits(), wm.to_bits(), wv.to_bits()),
                    "step {step}, decay {decay}, value {i}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "adamw: 3 values")]
    fn lengths_must_agree() {
        let s = AdamWStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            lr: 1e-3,
            weight_decay: 0.0,
            step: 1,
        };
        adamw_step(&mut [0.0; 3], &[0.0; 2], &mut [0.0; 3], &mut [0.0; 3], s);
    }
}
