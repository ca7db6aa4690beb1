//! Shared test support: golden-file loading, comparison, random inputs.
#![allow(dead_code)]

#[cfg(feature = "candle")]
pub mod candle_cases;
pub mod golden;
pub mod gpu_harness;
pub mod harness;
#[cfg(feature = "cpu-kernels")]
pub mod kernel_cases;
pub mod parity;
pub mod rand_inputs;
pub mod sampled;
