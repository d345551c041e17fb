//! The layers the backbones are built from ([`nn`]: linear layers, layer norm, softmax, attention, dropout,
//! rotary positions), each choosing per [`Mode`](crate::Mode) between the fused ops of [`crate::ops`] and
//! candle's differentiable elementary ops. The backbones themselves are in [`crate::backbone`], PyLate's
//! Dense in [`crate::dense`].

pub mod nn;

#[cfg(test)]
mod fused_layer_tests;
