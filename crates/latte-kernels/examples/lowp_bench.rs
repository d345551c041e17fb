//! GFLOP/s of the reduced-precision linear layers against an f32 reference, at the encoder's shapes.
//!
//! `cargo run --release -p latte-kernels --example lowp_bench` (optionally `-- <rows>`, default 32 × 128
//! tokens). The f32 reference is a plain blocked loop (8 rows × 32 columns of accumulators over packed
//! weights) compiled for AVX-512 + FMA where the CPU has them; its numbers are a yardstick, not the
//! workspace's tuned f32 kernel.

use std::time::Instant;

use latte_kernels::lowp::{bf16_level, i8_level, linear_bf16, linear_i8, PackedBf16, PackedI8};

const SHAPES: [(&str, usize, usize); 7] = [
    ("MiniLM qkv  384->1152", 384, 1152),
    ("MiniLM up   384->1536", 384, 1536),
    ("MiniLM down 1536->384", 1536, 384),
    ("BERT qkv    768->2304", 768, 2304),
    ("BERT out    768->768 ", 768, 768),
    ("BERT up     768->3072", 768, 3072),
    ("BERT down  3072->768 ", 3072, 768),
];

/// f32 weights transposed into panels of 32 columns: `[panel][k][32]`.
struct PackedF32 {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    fn pack(w: &[f32], n: usize, k: usize) -> PackedF32 {
        assert!(
            n.is_multiple_of(32),
            "the reference wants n a multiple of 32"
        );
        let mut data = vec![0f32; n * k];
        for j in 0..n {
            for kk in 0..k {
                data[(j / 32) * k * 32 + kk * 32 + j % 32] = w[j * k + kk];
            }
        }
        PackedF32 { n, k, data }
    }
}

#[inline(always)]
fn f32_rows(x: &[f32], w: &PackedF32, bias: &[f32], out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    let m = out.len() / n;
    for (jp, panel) in w.data.chunks(k * 32).enumerate() {
        let mut i0 = 0;
        while i0 < m {
            let rows = 8.min(m - i0);
            let mut acc = [[0f32; 32]; 8];
            for kk in 0..k {
                let b: &[f32; 32] = panel[kk * 32..kk * 32 + 32].try_into().unwrap();
                for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                    let a = x[(i0 + r) * k + kk];
                    for c in 0..32 {
                        acc_r[c] = a.mul_add(b[c], acc_r[c]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                let o = &mut out[(i0 + r) * n + jp * 32..(i0 + r) * n + jp * 32 + 32];
                for c in 0..32 {
                    o[c] = acc_r[c] + bias[jp * 32 + c];
                }
            }
            i0 += 8;
        }
    }
}

/// The same 8 × 32 tile with explicit AVX-512 FMAs (two accumulators per row).
///
/// # Safety
/// AVX512F available; `x` holds the rows of `out` (`out.len() / w.n` rows of `w.k`), `bias` `w.n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_rows_avx512(x: &[f32], w: &PackedF32, bias: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (n, k) = (w.n, w.k);
    let m = out.len() / n;
    assert!(x.len() >= m * k && bias.len() >= n && w.data.len() >= n * k);
    for (jp, panel) in w.data.chunks(k * 32).enumerate() {
        let mut i0 = 0;
        while i0 < m {
            let rows = 8.min(m - i0);
            let mut acc = [[_mm512_setzero_ps(); 2]; 8];
            for kk in 0..k {
                // SAFETY: kk < k rows of 32 in this panel (asserted lengths).
                let b0 = unsafe { _mm512_loadu_ps(panel.as_ptr().add(kk * 32)) };
                // SAFETY: as above.
                let b1 = unsafe { _mm512_loadu_ps(panel.as_ptr().add(kk * 32 + 16)) };
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // Rows past the end repeat the last row; their sums are never stored.
                    let a = _mm512_set1_ps(x[(i0 + r.min(rows - 1)) * k + kk]);
                    acc_r[0] = _mm512_fmadd_ps(a, b0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(a, b1, acc_r[1]);
                }
            }
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                let o = &mut out[(i0 + r) * n + jp * 32..(i0 + r) * n + jp * 32 + 32];
                let b = &bias[jp * 32..jp * 32 + 32];
                // SAFETY: `o` and `b` hold 32 values each.
                unsafe {
                    _mm512_storeu_ps(
                        o.as_mut_ptr(),
                        _mm512_add_ps(acc_r[0], _mm512_loadu_ps(b.as_ptr())),
                    );
                    _mm512_storeu_ps(
                        o.as_mut_ptr().add(16),
                        _mm512_add_ps(acc_r[1], _mm512_loadu_ps(b.as_ptr().add(16))),
                    );
                }
            }
            i0 += 8;
        }
    }
}

/// `out = x · Wᵀ + bias` in f32, parallel over blocks of 64 rows.
fn linear_f32(x: &[f32], w: &PackedF32, bias: &[f32], out: &mut [f32]) {
    use rayon::prelude::*;
    let (n, k) = (w.n, w.k);
    #[cfg(target_arch = "x86_64")]
    let wide = is_x86_feature_detected!("avx512f");
    out.par_chunks_mut(64 * n)
        .zip(x.par_chunks(64 * k))
        .for_each(|(o, xs)| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX512F was detected at run time just above; the chunks hold whole rows of x and out.
                unsafe { f32_rows_avx512(xs, w, bias, o) };
                return;
            }
            f32_rows(xs, w, bias, o)
        });
}

fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// CPU seconds used by this process so far (all threads).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best wall-clock and best CPU seconds of `f` over at least 3 runs and 0.5 s (after one warm-up run).
/// On a shared machine the CPU time is the steadier measure of the kernel itself.
fn best_of(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let (mut best, mut best_cpu, mut total, mut runs) = (f64::INFINITY, f64::INFINITY, 0.0, 0);
    while runs < 3 || total < 0.5 {
        let (t, c) = (Instant::now(), cpu_seconds());
        f();
        let s = t.elapsed().as_secs_f64();
        best_cpu = best_cpu.min(cpu_seconds() - c);
        best = best.min(s);
        total += s;
        runs += 1;
    }
    (best, best_cpu)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn main() -> anyhow::Result<()> {
    let m: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 32 * 128,
    };
    println!(
        "cpu {}; bf16 kernel at {}, int8 kernel at {}; m = {m} rows",
        latte_kernels::cpu(),
        bf16_level(),
        i8_level()
    );
    println!(
        "{:<22} {:>3} | wall GFLOP/s: {:>6} {:>6} {:>6} {:>5} {:>5} | per CPU-second: {:>6} {:>6} {:>6} {:>5} {:>5} | max rel err",
        "shape", "thr", "f32", "bf16", "int8", "bf16x", "int8x", "f32", "bf16", "int8", "bf16x", "int8x"
    );
    for (name, k, n) in SHAPES {
        let x = data(m * k, 1 + k as u64, 1.0);
        let w = data(n * k, 2 + n as u64, 0.05);
        let bias = data(n, 3, 0.1);
        let wf = PackedF32::pack(&w, n, k);
        let wb = PackedBf16::pack(&w, n, k)?;
        let wi = PackedI8::pack(&w, n, k)?;
        let (mut of, mut ob, mut oi) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
        let flop = 2.0 * m as f64 * n as f64 * k as f64;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            let [tf, tb, ti] = pool.install(|| -> anyhow::Result<[(f64, f64); 3]> {
                let tf = best_of(|| linear_f32(&x, &wf, &bias, &mut of));
                let mut res = Ok(());
                let tb = best_of(|| {
                    res =
                        res.clone()
                            .and(linear_bf16(&x, m, &wb, Some(&bias), None, false, &mut ob));
                });
                let ti = best_of(|| {
                    res = res
                        .clone()
                        .and(linear_i8(&x, m, &wi, Some(&bias), None, false, &mut oi));
                });
                res?;
                Ok([tf, tb, ti])
            })?;
            let g = |t: f64| flop / t / 1e9;
            println!(
                "{name:<22} {threads:>3} |               {:>6.1} {:>6.1} {:>6.1} {:>5.2} {:>5.2} |                 {:>6.1} {:>6.1} {:>6.1} {:>5.2} {:>5.2} | bf16 {:.1e}, int8 {:.1e}",
                g(tf.0),
                g(tb.0),
                g(ti.0),
                tf.0 / tb.0,
                tf.0 / ti.0,
                g(tf.1),
                g(tb.1),
                g(ti.1),
                tf.1 / tb.1,
                tf.1 / ti.1,
                max_rel(&ob, &of),
                max_rel(&oi, &of)
            );
        }
    }
    Ok(())
}
