#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod host;
pub mod init;
pub mod io;
#[cfg(any(feature = "cuda", feature = "cpu-kernels"))]
pub mod kernels;
pub mod peft;
pub mod reference;
pub mod validate;

pub use backend::{Backend, Grads, Weights};
pub use config::{LoraConfig, LoraConfigBuilder, Reduction};
pub use cpu::Cpu;
pub use dtype::{DType, Element, TokenId};
pub use error::{Error, Result};
pub use half::{bf16, f16};
/// The `rand` crate [`init::init_lora`] takes an RNG from (re-exported so
/// callers need no version of their own).
pub use rand;
pub use reference::CpuReference;

/// Checks that the CUDA backend can be used in this build on this machine:
/// the kernels were compiled in (feature `cuda`) and a CUDA driver library is
/// present. The `Err` says exactly what is missing and how to get it.
pub fn require_cuda() -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::BackendUnavailable(
            "this build of tiedlora has no CUDA kernels: run `bash scripts/install-nvcc.sh` \
             (or set NVCC / CUDA_HOME) and build with `--features cuda`"
                .into(),
        ))
    }
    #[cfg(feature = "cuda")]
    {
        if cuda::libs::driver_present() {
            Ok(())
        } else {
            Err(Error::BackendUnavailable(
                "no CUDA driver library (libcuda.so) on this machine: the CUDA backend needs an NVIDIA driver".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_request_without_kernels_says_how_to_get_them() {
        let msg = super::require_cuda().unwrap_err().to_string();
        assert!(msg.contains("scripts/install-nvcc.sh") && msg.contains("--features cuda"), "{msg}");
    }

    #[test]
    #[cfg(feature = "cuda")]
    fn cuda_request_with_kernels_checks_the_driver() {
        // With the kernels built in, the only possible refusal is a missing driver.
        if let Err(e) = super::require_cuda() {
            assert!(e.to_string().contains("driver"), "{e}");
        }
    }
}
