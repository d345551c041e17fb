//! Raw speed of the packed linear kernel on the shapes of a BERT layer, single thread, beside the `gemm`
//! crate (what the portable level runs, and what every level below AVX-512 ran before the AVX2 tile):
//! `RAYON_NUM_THREADS=1 cargo run --release -p latte-kernels --example gemm_speed`.
//!
//! Reports GFLOP/s per second of this thread's CPU time (from `/proc/thread-self/schedstat` on Linux, so
//! that other processes on a shared machine do not skew it) and per second of wall time.
use latte_kernels::gemm::{self, Packed};
use latte_kernels::Level;

/// Nanoseconds this thread has run on a CPU, when the kernel reports it.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() {
    println!("level {}", latte_kernels::level());
    // Deterministic values in [-1, 1).
    let values = |n: usize, seed: u64| -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    for (m, n, k) in [
        (5760, 384, 384),
        (5760, 1536, 384),
        (5760, 384, 1536),
        (4096, 2304, 768),
        (4096, 3072, 768),
        (4096, 768, 3072),
    ] {
        let x = values(m * k, 1);
        let (w, b) = (values(n * k, 2), values(n, 3));
        let p = Packed::from_rows(&w, n, k, Some(&b));
        let mut out = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let mut time = |name: &str, f: &mut dyn FnMut(&mut [f32])| {
            for _ in 0..3 {
                f(&mut out);
            }
            let r = 20;
            let (t, c) = (std::time::Instant::now(), cpu_ns());
            for _ in 0..r {
                f(&mut out);
            }
            let wall = t.elapsed().as_secs_f64() / r as f64;
            match (c, cpu_ns()) {
                (Some(a), Some(b)) => println!(
                    "{m} {n} {k} {name} GFLOP/s {:.1} (CPU time), {:.1} (wall)",
                    flop / ((b - a) as f64 / 1e9 / r as f64) / 1e9,
                    flop / wall / 1e9
                ),
                _ => println!("{m} {n} {k} {name} GFLOP/s {:.1}", flop / wall / 1e9),
            }
        };
        time("latte", &mut |o| gemm::linear(&x, m, &p, None, false, o));
        time("gemm-crate", &mut |o| {
            gemm::linear_rows_at(Level::Portable, &x, m, &w, Some(&b), n, k, o)
        });
    }
}
