//! Every level this machine has against the portable path and against an f64 reference, on odd shapes.

use super::bf16::{linear_bf16_at, K_ALIGN as BF16_K_ALIGN};
use super::int8::linear_i8_at;
use super::*;
use crate::cpu::{cpu, levels_here, Level};
use crate::half::{bf16_to_f32, f32_to_bf16};
use crate::math::gelu;

/// A small deterministic generator (xorshift), values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next() * scale).collect()
    }
}

/// Lipschitz constant of the exact GELU (its derivative peaks near 1.129).
const GELU_LIP: f64 = 1.13;

struct Case {
    m: usize,
    k: usize,
    n: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
    gelu: bool,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, flags: (bool, bool, bool), seed: u64) -> Case {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        // Rows of different magnitudes, so the per-row / per-channel scales differ.
        let mut x = rng.vec(m * k, 2.0);
        for (i, row) in x.chunks_mut(k.max(1)).enumerate() {
            let s = 1.0 + (i % 5) as f32;
            row.iter_mut().for_each(|v| *v *= s);
        }
        let w = rng.vec(n * k, 0.25);
        Case {
            m,
            k,
            n,
            x,
            w,
            bias: flags.0.then(|| rng.vec(n, 0.5)),
            residual: flags.1.then(|| rng.vec(m * n, 1.0)),
            gelu: flags.2,
        }
    }

    fn describe(&self) -> String {
        format!(
            "m={} k={} n={} bias={} residual={} gelu={}",
            self.m,
            self.k,
            self.n,
            self.bias.is_some(),
            self.residual.is_some(),
            self.gelu
        )
    }

    /// The value before the activation in f64 from the given (possibly rounded) operands, and the sum of
    /// magnitudes of its terms.
    fn pre(
        &self,
        i: usize,
        j: usize,
        xv: impl Fn(usize) -> f64,
        wv: impl Fn(usize) -> f64,
    ) -> (f64, f64) {
        let (mut s, mut mag) = (0f64, 0f64);
        for kk in 0..self.k {
            let t = xv(kk) * wv(kk);
            s += t;
            mag += t.abs();
        }
        for extra in [
            self.bias.as_ref().map(|b| b[j]),
            self.residual.as_ref().map(|r| r[i * self.n + j]),
        ]
        .into_iter()
        .flatten()
        {
            s += f64::from(extra);
            mag += f64::from(extra).abs();
        }
        (s, mag)
    }

    fn act(&self, v: f64) -> f64 {
        if self.gelu {
            f64::from(gelu(v as f32))
        } else {
            v
        }
    }

    /// Allowed distance after the activation for a pre-activation error `e` at value `v`.
    fn after_act(&self, e: f64, v: f64) -> f64 {
        if self.gelu {
            GELU_LIP * e + 1e-6 * v.abs() + 1e-7
        } else {
            e
        }
    }

    fn run_bf16(&self, level: Level, w: &PackedBf16) -> (Level, Vec<f32>) {
        let mut out = vec![f32::NAN; self.m * self.n];
        let ran = linear_bf16_at(
            level,
            &self.x,
            self.m,
            w,
            self.bias.as_deref(),
            self.residual.as_deref(),
            self.gelu,
            &mut out,
        )
        .unwrap();
        (ran, out)
    }

    fn run_i8(&self, level: Level, w: &PackedI8) -> (Level, Vec<f32>) {
        let mut out = vec![f32::NAN; self.m * self.n];
        let ran = linear_i8_at(
            level,
            &self.x,
            self.m,
            w,
            self.bias.as_deref(),
            self.residual.as_deref(),
            self.gelu,
            &mut out,
        )
        .unwrap();
        (ran, out)
    }
}

const MS: [usize; 3] = [1, 7, 33];
const KS: [usize; 4] = [1, 3, 65, 384];
const NS: [usize; 3] = [1, 17, 130];
const FLAGS: [(bool, bool, bool); 4] = [
    (false, false, false),
    (true, true, true),
    (true, false, true),
    (false, true, false),
];

fn cases() -> impl Iterator<Item = Case> {
    let mut seed = 0;
    MS.into_iter()
        .flat_map(move |m| {
            KS.into_iter().flat_map(move |k| {
                NS.into_iter().flat_map(move |n| {
                    FLAGS.into_iter().map(move |f| {
                        seed += 1;
                        Case::new(m, k, n, f, seed + (m * 1000 + k * 10 + n) as u64)
                    })
                })
            })
        })
        // One product large enough for the parallel, multi-task path (several row and column tasks).
        .chain([Case::new(200, 384, 300, (true, true, true), 7)])
}

fn bf16_x(c: &Case, i: usize) -> impl Fn(usize) -> f64 + '_ {
    move |kk| f64::from(bf16_to_f32(f32_to_bf16(c.x[i * c.k + kk])))
}

#[test]
fn bf16_every_level_matches_portable_and_f32() {
    let u = f64::from(f32::EPSILON) / 2.0;
    let mut ran_at = std::collections::BTreeSet::new();
    let mut worst_vs_portable = 0f64;
    for c in cases() {
        let w = PackedBf16::pack(&c.w, c.n, c.k).unwrap();
        let (_, portable) = c.run_bf16(Level::Portable, &w);
        for level in levels_here() {
            let (ran, out) = c.run_bf16(level, &w);
            ran_at.insert(ran);
            for i in 0..c.m {
                for j in 0..c.n {
                    let got = f64::from(out[i * c.n + j]);
                    // (a) against the portable path: the same products, f32 sums in another order.
                    let wr = |kk: usize| f64::from(bf16_to_f32(w.get(j, kk)));
                    let (v, mag) = c.pre(i, j, bf16_x(&c, i), wr);
                    let order = 2.0 * (c.k + 4) as f64 * u * mag;
                    let p = f64::from(portable[i * c.n + j]);
                    // The AVX2 kernel adds the same exact products in the portable order: bit for bit.
                    assert!(
                        ran != Level::Avx2
                            || out[i * c.n + j].to_bits() == portable[i * c.n + j].to_bits(),
                        "bf16 at avx2 vs portable, {}: [{i}][{j}] {got} vs {p}",
                        c.describe()
                    );
                    worst_vs_portable = worst_vs_portable.max((got - p).abs() / mag.max(1e-30));
                    assert!(
                        (got - p).abs() <= c.after_act(order, v) + 1e-30,
                        "bf16 at {ran} vs portable, {}: [{i}][{j}] {got} vs {p}",
                        c.describe()
                    );
                    // (b) against f64 on the unrounded operands: two bf16 roundings (2^-8 each) per
                    // product, plus the f32 sums.
                    let (exact, emag) = c.pre(
                        i,
                        j,
                        |kk| f64::from(c.x[i * c.k + kk]),
                        |kk| f64::from(c.w[j * c.k + kk]),
                    );
                    let bound = emag * (2.0f64.powi(-7) + 2.0f64.powi(-16)) + 1.01 * order;
                    let want = c.act(exact);
                    assert!(
                        (got - want).abs() <= c.after_act(bound, exact) + 1e-6 * want.abs(),
                        "bf16 at {ran} vs f32, {}: [{i}][{j}] {got} vs {want} (bound {bound})",
                        c.describe()
                    );
                }
            }
        }
    }
    eprintln!(
        "bf16 kernels ran at {:?} (cpu: {}); worst |level - portable| / Σ|terms| = {worst_vs_portable:e}",
        ran_at,
        cpu()
    );
    if cpu().level < Level::Amx {
        eprintln!("bf16: AMX absent on this machine, the AMX kernel was not run");
    }
    assert!(ran_at.contains(&Level::Portable));
}

#[test]
fn int8_every_level_matches_portable_exactly_and_f32_within_quantisation() {
    let u = f64::from(f32::EPSILON) / 2.0;
    let mut ran_at = std::collections::BTreeSet::new();
    for c in cases() {
        let w = PackedI8::pack(&c.w, c.n, c.k).unwrap();
        let (_, portable) = c.run_i8(Level::Portable, &w);
        for level in levels_here() {
            let (ran, out) = c.run_i8(level, &w);
            ran_at.insert(ran);
            // (a) the integer sums are exact and the dequantisation is shared: bit for bit.
            for (idx, (a, b)) in out.iter().zip(&portable).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "int8 at {ran} vs portable, {}: element {idx}: {a} vs {b}",
                    c.describe()
                );
            }
            // (b) against f64 on the unquantised operands: |x w - x̂ ŵ| <= |x| s/2 + |ŵ| r/2 per term.
            for i in 0..c.m {
                let row = &c.x[i * c.k..(i + 1) * c.k];
                let r = f64::from(row.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0;
                for j in 0..c.n {
                    let s = f64::from(w.scales()[j]);
                    let (exact, _) = c.pre(
                        i,
                        j,
                        |kk| f64::from(row[kk]),
                        |kk| f64::from(c.w[j * c.k + kk]),
                    );
                    let mut quant = 0f64;
                    for (kk, xk) in row.iter().enumerate() {
                        let (xv, wq) = (f64::from(*xk).abs(), f64::from(w.get(j, kk)).abs() * s);
                        quant += xv * s / 2.0 + wq * r / 2.0;
                    }
                    let (_, qmag) = c.pre(
                        i,
                        j,
                        |kk| f64::from(row[kk]).abs() + r,
                        |kk| f64::from(w.get(j, kk)).abs() * s,
                    );
                    let bound = quant * (1.0 + 1e-4) + 8.0 * u * qmag + 1e-30;
                    let got = f64::from(out[i * c.n + j]);
                    let want = c.act(exact);
                    assert!(
                        (got - want).abs() <= c.after_act(bound, exact) + 1e-6 * want.abs(),
                        "int8 at {ran} vs f32, {}: [{i}][{j}] {got} vs {want} (bound {bound})",
                        c.describe()
                    );
                }
            }
        }
    }
    eprintln!("int8 kernels ran at {:?} (cpu: {})", ran_at, cpu());
    if !cpu().amx_int8 {
        eprintln!("int8: AMX absent on this machine, the AMX kernel was not run");
    }
    assert!(ran_at.contains(&Level::Portable));
}

#[test]
fn amx_kernels_match_portable_where_the_cpu_has_amx() {
    // The AMX level is only reported when Linux granted the tile state.
    assert!(cpu().level < Level::Amx || crate::cpu::amx_permission());
    if cpu().level < Level::Amx {
        eprintln!(
            "AMX absent on this machine (cpu: {}): the AMX kernels were not run here",
            cpu()
        );
        return;
    }
    for c in [
        Case::new(33, 384, 130, (true, true, true), 11),
        Case::new(64, 768, 64, (false, false, false), 12),
        Case::new(1, 3, 17, (true, false, false), 13),
    ] {
        let w = PackedBf16::pack(&c.w, c.n, c.k).unwrap();
        let (ran, amx) = c.run_bf16(Level::Amx, &w);
        assert_eq!(ran, Level::Amx);
        let (_, portable) = c.run_bf16(Level::Portable, &w);
        for (a, p) in amx.iter().zip(&portable) {
            let tol = 1e-4 * (1.0 + p.abs());
            assert!(
                (a - p).abs() <= tol,
                "bf16 AMX vs portable {}: {a} vs {p}",
                c.describe()
            );
        }
        if cpu().amx_int8 {
            let w = PackedI8::pack(&c.w, c.n, c.k).unwrap();
            let (ran, amx) = c.run_i8(Level::Amx, &w);
            assert_eq!(ran, Level::Amx);
            let (_, portable) = c.run_i8(Level::Portable, &w);
            assert_eq!(amx, portable, "int8 AMX vs portable {}", c.describe());
        }
        eprintln!("AMX kernels ran and matched on {}", c.describe());
    }
}

#[test]
fn public_entry_points_run_at_the_process_level() {
    let c = Case::new(9, 70, 40, (true, true, true), 21);
    let wb = PackedBf16::pack(&c.w, c.n, c.k).unwrap();
    let wi = PackedI8::pack(&c.w, c.n, c.k).unwrap();
    let mut out = vec![0f32; c.m * c.n];
    let args = (c.bias.as_deref(), c.residual.as_deref());
    linear_bf16(&c.x, c.m, &wb, args.0, args.1, true, &mut out).unwrap();
    assert_eq!(out, c.run_bf16(bf16_level(), &wb).1);
    linear_i8(&c.x, c.m, &wi, args.0, args.1, true, &mut out).unwrap();
    assert_eq!(out, c.run_i8(i8_level(), &wi).1);
    eprintln!(
        "public bf16 level {}, int8 level {}",
        bf16_level(),
        i8_level()
    );
    // m = 0 is a valid empty batch.
    linear_bf16(&[], 0, &wb, None, None, false, &mut []).unwrap();
    linear_i8(&[], 0, &wi, None, None, false, &mut []).unwrap();
}

#[test]
fn bf16_rounding_is_to_nearest_even_and_keeps_specials() {
    let r = |bits: u32| f32_to_bf16(f32::from_bits(bits));
    assert_eq!(r(0x3f80_0000), 0x3f80); // 1.0
    assert_eq!(r(0x3f80_8000), 0x3f80); // tie, even below
    assert_eq!(r(0x3f81_8000), 0x3f82); // tie, even above
    assert_eq!(r(0x3f80_8001), 0x3f81); // above the tie
    assert_eq!(r(0x3f80_7fff), 0x3f80); // below the tie
    assert_eq!(r(0xbf81_8000), 0xbf82); // negative tie
    assert_eq!(f32_to_bf16(-0.0), 0x8000);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds up to infinity, like the hardware
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    // A NaN whose payload sits in the low half only must not turn into infinity.
    assert!(bf16_to_f32(r(0x7f80_0001)).is_nan());
    assert_eq!(bf16_to_f32(f32_to_bf16(1.5)), 1.5);
}

#[test]
fn packing_layouts_hold_every_weight_and_zero_padding() {
    let (n, k) = (19, 37);
    let w = Rng(5).vec(n * k, 3.0);
    let p = PackedBf16::pack(&w, n, k).unwrap();
    assert_eq!((p.n(), p.k(), p.kp()), (n, k, BF16_K_ALIGN * 2));
    for j in 0..32 {
        for kk in 0..p.kp() {
            let want = if j < n && kk < k {
                f32_to_bf16(w[j * k + kk])
            } else {
                0
            };
            assert_eq!(p.get(j, kk), want, "bf16 layout at [{j}][{kk}]");
        }
    }
    // Packing the transpose gives the same layout, byte for byte, for shapes on and off the panel width.
    // Special values (NaN, infinities, signed zeros, ties and the largest finite values) land on every
    // path of the vectorised conversion.
    let special = [
        f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::MAX,
        f32::MIN_POSITIVE / 4.0,
    ];
    for (n, k) in [(n, k), (16, 32), (1, 1), (33, 3), (70, 9)] {
        let mut w = Rng(6).vec(n * k, 2.0);
        for (i, v) in w.iter_mut().step_by(7).enumerate() {
            *v = special[i % special.len()];
        }
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let from_t = PackedBf16::pack_transposed(&wt, n, k).unwrap();
        let packed = PackedBf16::pack(&w, n, k).unwrap();
        for j in 0..n {
            for kk in 0..k {
                let want = f32_to_bf16(w[j * k + kk]);
                assert_eq!(packed.get(j, kk), want, "[{n}, {k}] at [{j}][{kk}]");
            }
        }
        assert_eq!(from_t, packed, "[{n}, {k}]");
    }
    assert!(matches!(
        PackedBf16::pack_transposed(&w, n, k + 1),
        Err(LowpError::Length { .. })
    ));
    assert!(matches!(
        PackedBf16::pack_transposed(&[], 0, 3),
        Err(LowpError::Empty { .. })
    ));
    let mut w8 = w.clone();
    w8[3 * k..4 * k].iter_mut().for_each(|v| *v = 0.0); // an all-zero channel
    let q = PackedI8::pack(&w8, n, k).unwrap();
    for j in 0..n {
        let row = &w8[j * k..(j + 1) * k];
        let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(q.scales()[j], max / 127.0);
        let mut hit = max == 0.0;
        for (kk, wk) in row.iter().enumerate() {
            let v = q.get(j, kk);
            assert!((-127..=127).contains(&v));
            hit |= v.unsigned_abs() == 127;
            let back = f32::from(v) * q.scales()[j];
            assert!((back - wk).abs() <= q.scales()[j] * 0.5001);
        }
        assert!(hit, "channel {j}: its largest weight quantises to ±127");
        for kk in k..64 {
            assert_eq!(q.get(j, kk), 0);
        }
    }
    // The zero channel gives zero (plus bias) rather than NaN.
    let x = vec![1.0f32; 2 * k];
    let mut out = vec![0f32; 2 * n];
    linear_i8(&x, 2, &q, None, None, false, &mut out).unwrap();
    assert_eq!(out[3], 0.0);
    assert_eq!(out[n + 3], 0.0);
}

#[test]
fn bad_shapes_are_errors_naming_the_argument() {
    let w = vec![0.5f32; 6];
    let e = PackedBf16::pack(&w[..5], 2, 3).unwrap_err();
    assert_eq!(
        e,
        LowpError::Length {
            what: "bf16 weights",
            expected: 6,
            got: 5
        }
    );
    assert!(e.to_string().contains("expected 6") && e.to_string().contains("got 5"));
    assert!(matches!(
        PackedI8::pack(&[], 0, 3),
        Err(LowpError::Empty { .. })
    ));
    assert!(matches!(
        PackedBf16::pack(&[], 3, 0),
        Err(LowpError::Empty { .. })
    ));
    let mut bad = w.clone();
    bad[4] = f32::NAN;
    let e = PackedI8::pack(&bad, 2, 3).unwrap_err();
    assert!(matches!(
        e,
        LowpError::NonFinite {
            channel: 1,
            input: 1,
            ..
        }
    ));
    assert!(e.to_string().contains("channel 1"));
    let pb = PackedBf16::pack(&w, 2, 3).unwrap();
    let pi = PackedI8::pack(&w, 2, 3).unwrap();
    let x = vec![1f32; 3 * 4];
    let mut out = vec![0f32; 4 * 2];
    let expect = |r: Result<(), LowpError>, what: &str, expected: usize, got: usize| match r {
        Err(LowpError::Length {
            what: w,
            expected: e,
            got: g,
        }) => assert_eq!((w, e, g), (what, expected, got)),
        other => panic!("expected a length error for {what}, got {other:?}"),
    };
    expect(
        linear_bf16(&x[..11], 4, &pb, None, None, false, &mut out),
        "bf16 input x",
        12,
        11,
    );
    expect(
        linear_bf16(&x, 4, &pb, Some(&[0.0; 3]), None, false, &mut out),
        "bf16 bias",
        2,
        3,
    );
    expect(
        linear_i8(&x, 4, &pi, None, Some(&[0.0; 7]), false, &mut out),
        "int8 residual",
        8,
        7,
    );
    expect(
        linear_i8(&x, 4, &pi, None, None, false, &mut out[..6]),
        "int8 output",
        8,
        6,
    );
}

#[test]
fn non_finite_values_propagate_or_stay_contained_without_panics() {
    let (m, k, n) = (3, 5, 4);
    let mut w = Rng(9).vec(n * k, 1.0);
    w[2 * k + 1] = f32::NAN; // channel 2
    let x = Rng(10).vec(m * k, 1.0);
    let pb = PackedBf16::pack(&w, n, k).unwrap();
    for level in levels_here() {
        let mut out = vec![0f32; m * n];
        let ran = linear_bf16_at(level, &x, m, &pb, None, None, true, &mut out).unwrap();
        for i in 0..m {
            for j in 0..n {
                assert_eq!(out[i * n + j].is_nan(), j == 2, "bf16 at {ran}: [{i}][{j}]");
            }
        }
    }
    // int8: a row with a NaN activation quantises to 0 (finite outputs); the other rows are untouched.
    let w8 = Rng(11).vec(n * k, 1.0);
    let pi = PackedI8::pack(&w8, n, k).unwrap();
    let mut xs = x.clone();
    xs[k + 2] = f32::NAN; // row 1
    let (mut clean, mut dirty) = (vec![0f32; m * n], vec![0f32; m * n]);
    for level in levels_here() {
        let ran = linear_i8_at(level, &x, m, &pi, None, None, false, &mut clean).unwrap();
        linear_i8_at(level, &xs, m, &pi, None, None, false, &mut dirty).unwrap();
        for i in [0, 2] {
            assert_eq!(
                clean[i * n..(i + 1) * n],
                dirty[i * n..(i + 1) * n],
                "int8 at {ran}, row {i}"
            );
        }
        assert!(
            dirty[n..2 * n].iter().all(|v| v.is_finite()),
            "int8 at {ran}: row 1"
        );
    }
}
