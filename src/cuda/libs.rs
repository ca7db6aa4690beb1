//! Whether the CUDA libraries can be used: an `Err` instead of cudarc's
//! panic when one is missing.
//!
//! This crate's own CUDA build has cudarc load libcuda and libcublas at run
//! time (`fallback-dynamic-loading`), so a missing library is probed for.
//! With the feature `candle`, candle's CUDA backend turns on cudarc's
//! `dynamic-linking` instead: the libraries are linked at build time, so a
//! program that runs has them (and cudarc has no probe to call).

/// libcuda can be loaded.
pub(crate) fn driver_present() -> bool {
    #[cfg(not(feature = "candle"))]
    {
        // SAFETY: only probes whether the library can be loaded.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(feature = "candle")]
    {
        true
    }
}

/// libcublas can be loaded.
#[cfg(feature = "experimental-kernels")]
pub(crate) fn cublas_present() -> bool {
    #[cfg(not(feature = "candle"))]
    {
        // SAFETY: only probes whether the library can be loaded.
        unsafe { cudarc::cublas::sys::is_culib_present() }
    }
    #[cfg(feature = "candle")]
    {
        true
    }
}
