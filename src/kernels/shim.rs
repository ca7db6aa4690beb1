//! Running the kernels on the CPU: `kernels/*.cu` compiled by the host C++
//! compiler against `kernels/shim/cuda_shim.h` (feature `cpu-kernels`).
//!
//! Each `TL_KERNEL(name, Params)` in a `.cu` file becomes a C function
//! `int name(gx, gy, gz, bx, by, bz, smem_bytes, const void* params)` that runs
//! the whole grid on OS threads (one per CUDA thread, blocks one at a time) and
//! returns when it is done. Declare such entry points with `shim_kernels!`
//! and call them through [`launch`] with the same [`LaunchPlan`] and params
//! struct the GPU path uses.
//!
//! Launches are serialized inside the shim (`__shared__` variables are
//! process-wide statics), so calling [`launch`] from parallel tests is fine.

use std::ffi::c_void;

use super::plan::LaunchPlan;
use crate::{Error, Result};

/// The C signature of every shim kernel entry point (see `TL_KERNEL` in
/// `kernels/common.cuh`): grid x/y/z, block x/y/z, dynamic shared memory bytes,
/// pointer to the params struct; returns a `TL_SHIM_*` status code.
pub type ShimEntry = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, *const c_void) -> i32;

/// Declares shim kernel entry points (`extern "C"`, signature [`ShimEntry`]):
/// `shim_kernels!(tl_embed_fwd_f32, tl_embed_fwd_bf16);`
macro_rules! shim_kernels {
    ($($name:ident),* $(,)?) => {
        unsafe extern "C" {
            $(
                #[allow(missing_docs)]
                pub fn $name(
                    gx: u32, gy: u32, gz: u32,
                    bx: u32, by: u32, bz: u32,
                    smem_bytes: u32,
                    params: *const ::std::ffi::c_void,
                ) -> i32;
            )*
        }
    };
}
#[allow(unused_imports)] // used by path (`crate::kernels::shim::shim_kernels!`) from other modules
pub(crate) use shim_kernels;

/// Status codes returned by a shim entry point (`TL_SHIM_*` in `cuda_shim.h`).
fn describe(code: i32) -> &'static str {
    match code {
        1 => "invalid grid: a dimension is 0 or above the CUDA limits (x < 2^31, y and z <= 65535)",
        2 => "invalid block: 0 threads, more than 1024, x or y above 1024, z above 64, or above the kernel's __launch_bounds__",
        3 => "dynamic shared memory above 227 KiB",
        4 => "the OS refused to create a thread",
        5 => "null params pointer",
        _ => "unknown shim status",
    }
}

/// Runs one kernel on the CPU: `entry` over `plan`'s grid with `params`.
///
/// Blocks until the whole grid has finished. A bad plan (zero grid, block of
/// more than 1024 threads, too much shared memory) is an
/// [`Error::Backend`]; the shim aborts the process, with a message naming the
/// kernel, block and thread, on a deadlock or misuse of a warp-synchronous
/// operation.
///
/// # Safety
/// - `entry` must be the shim entry point of a kernel whose params struct is
///   `P` (same size, field order and types as the C++ struct).
/// - Every pointer inside `params` must be valid for the reads and writes the
///   kernel does under `plan`, for the duration of the call, and nothing else
///   may access that memory during the call.
pub unsafe fn launch<P: Copy>(entry: ShimEntry, plan: &LaunchPlan, params: &P) -> Result<()> {
    let (gx, gy, gz) = plan.grid;
    let (bx, by, bz) = plan.block;
    // SAFETY: the caller guarantees that `entry` takes a `P` and that the
    // pointers inside it are valid (this function's contract). `params` is a
    // live reference for the whole call, and the shim copies it before the
    // kernel runs and returns only after every CPU thread has finished.
    let code = unsafe { entry(gx, gy, gz, bx, by, bz, plan.shared_bytes, (params as *const P).cast::<c_void>()) };
    match code {
        0 => Ok(()),
        code => Err(Error::Backend(format!("CPU shim launch {plan} failed: {} (code {code})", describe(code)))),
    }
}

/// Entry points of `kernels/shim_selftest.cu` (used by `tests/shim_selftest.rs`).
pub mod selftest {
    shim_kernels!(
        tl_selftest_reduce,
        tl_selftest_early_exit,
        tl_selftest_warp,
        tl_selftest_atomics,
        tl_selftest_convert,
        tl_selftest_wmma_f16,
        tl_selftest_wmma_bf16,
        tl_selftest_misuse,
    );
}
