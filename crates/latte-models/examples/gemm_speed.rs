//! Raw speed of the fused linear kernel on the shapes of a BERT layer, single thread:
//! `RAYON_NUM_THREADS=1 cargo run --release -p latte-models --example gemm_speed`.
//!
//! Reports GFLOP/s per second of this thread's CPU time (from `/proc/thread-self/schedstat` on Linux, so
//! that other processes on a shared machine do not skew it) and per second of wall time.
use candle_core::{Device, Tensor};
use latte_models::nn::Linear;

/// Nanoseconds this thread has run on a CPU, when the kernel reports it.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn main() {
    let dev = Device::Cpu;
    for (m, n, k) in [
        (5760, 384, 384),
        (5760, 1536, 384),
        (5760, 384, 1536),
        (4096, 2304, 768),
        (4096, 3072, 768),
        (4096, 768, 3072),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let layer = Linear::new(
            Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(),
            Some(Tensor::randn(0f32, 1.0, n, &dev).unwrap()),
        );
        for _ in 0..3 {
            latte_models::fused::linear(&layer, &x).unwrap();
        }
        let r = 20;
        let (t, c) = (std::time::Instant::now(), cpu_ns());
        for _ in 0..r {
            latte_models::fused::linear(&layer, &x).unwrap();
        }
        let wall = t.elapsed().as_secs_f64() / r as f64;
        let flop = 2.0 * (m * n * k) as f64;
        match (c, cpu_ns()) {
            (Some(a), Some(b)) => println!(
                "{m} {n} {k} latte GFLOP/s {:.1} (CPU time), {:.1} (wall)",
                flop / ((b - a) as f64 / 1e9 / r as f64) / 1e9,
                flop / wall / 1e9
            ),
            _ => println!("{m} {n} {k} latte GFLOP/s {:.1}", flop / wall / 1e9),
        }
    }
}
