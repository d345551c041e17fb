//! Raw speed of the fused linear kernel on the shapes of a BERT layer (single thread with
//! `RAYON_NUM_THREADS=1`): `cargo run --release -p latte-models --example gemm_speed`.
use candle_core::{Device, Tensor};
use latte_models::nn::Linear;

fn main() {
    let dev = Device::Cpu;
    for (m, n, k) in [(5760, 384, 384), (5760, 1536, 384), (5760, 384, 1536)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let layer = Linear::new(
            Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap(),
            Some(Tensor::randn(0f32, 1.0, n, &dev).unwrap()),
        );
        for _ in 0..3 {
            latte_models::fused::linear(&layer, &x).unwrap();
        }
        let t = std::time::Instant::now();
        let r = 20;
        for _ in 0..r {
            latte_models::fused::linear(&layer, &x).unwrap();
        }
        let dt = t.elapsed().as_secs_f64() / r as f64;
        println!(
            "{m} {n} {k} latte GFLOP/s {:.1}",
            2.0 * (m * n * k) as f64 / dt / 1e9
        );
    }
}
