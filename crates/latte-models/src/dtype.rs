//! The precision of the encoder's big linear layers in inference: [`Dtype`], and the scope that carries it
//! into a forward pass ([`with_dtype`]).
//!
//! With `bf16` the linear layers (q/k/v, attention output, MLP up/down) round their weights (once, packed
//! on first use) and activations to bf16 and accumulate in f32 ([`latte_kernels::lowp::linear_bf16`]);
//! with `int8` they quantise weights per output channel and activations per row, accumulate in i32 and
//! dequantise in f32 ([`latte_kernels::lowp::linear_i8`]; Gemma 3's query / key / value projections stay
//! f32 under int8). Embeddings, layer norms, attention (q·kᵀ,
//! softmax, p·v) and the final Dense projections always run in f32. Only CPU inference on float32 weights
//! uses reduced precision. Training takes f32 or bf16: with bf16 the fused training layers (and the
//! elementary path's linear op) run the forward, input-gradient and weight-gradient products in bf16 with
//! f32 accumulation, on f32 master weights; int8 training is refused.

use std::fmt;
use std::str::FromStr;

/// Precision of the encoder's linear layers in inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// Full precision (the default).
    #[default]
    F32,
    /// bf16 weights and activations, f32 accumulation.
    Bf16,
    /// Dynamically quantised int8 (per-channel weight scales, per-row activation scales).
    Int8,
}

impl Dtype {
    /// The name used on the command line and in saved options: `f32`, `bf16` or `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`Dtype`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dtype: expected one of f32, bf16, int8, got {0:?}")]
pub struct ParseDtypeError(pub String);

impl FromStr for Dtype {
    type Err = ParseDtypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            "int8" => Ok(Dtype::Int8),
            _ => Err(ParseDtypeError(s.to_string())),
        }
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

thread_local! {
    static DTYPE: std::cell::Cell<Dtype> = const { std::cell::Cell::new(Dtype::F32) };
}

/// Runs `f` with the linear layers of [`Mode::Infer`](crate::Mode) forward passes on this thread at
/// `dtype` (the ops read it through [`current`]); restores the previous value afterwards, also on error.
pub(crate) fn with_dtype<R>(dtype: Dtype, f: impl FnOnce() -> R) -> R {
    struct Restore(Dtype);
    impl Drop for Restore {
        fn drop(&mut self) {
            DTYPE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DTYPE.with(|d| d.replace(dtype)));
    f()
}

/// The dtype of the enclosing [`with_dtype`] on this thread (f32 outside one).
pub(crate) fn current() -> Dtype {
    DTYPE.with(|d| d.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        for d in [Dtype::F32, Dtype::Bf16, Dtype::Int8] {
            assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<Dtype>(&json).unwrap(), d);
        }
        assert_eq!(Dtype::default(), Dtype::F32);
        let e = "fp16".parse::<Dtype>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "dtype: expected one of f32, bf16, int8, got \"fp16\""
        );
        assert!("BF16".parse::<Dtype>().is_err());
        assert!(serde_json::from_str::<Dtype>("\"int4\"").is_err());
    }

    #[test]
    fn scope_restores() {
        assert_eq!(current(), Dtype::F32);
        with_dtype(Dtype::Int8, || {
            assert_eq!(current(), Dtype::Int8);
            with_dtype(Dtype::Bf16, || assert_eq!(current(), Dtype::Bf16));
            assert_eq!(current(), Dtype::Int8);
        });
        assert_eq!(current(), Dtype::F32);
    }
}
