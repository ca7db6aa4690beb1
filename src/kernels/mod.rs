//! The hand-written kernels in `kernels/*.cu` and the two ways to run them.
//!
//! - `LaunchPlan` describes one launch (grid, block, dynamic shared
//!   memory); the kernel's arguments are one `#[repr(C)]` params struct (ABI in
//!   `kernels/common.cuh`). Both executors take exactly these two things.
//! - Which kernel each op launches is decided in one place, `select`, from
//!   the [`KernelOptions`]; the default build compiles one implementation per
//!   op (feature `experimental-kernels` adds the unmeasured variants).
//! - Feature `cpu-kernels`: [`shim`] runs the kernels on CPU threads (the same
//!   `.cu` sources compiled by the host C++ compiler against
//!   `kernels/shim/cuda_shim.h`).
//! - Feature `cuda`: [`MODULES`] holds every `kernels/*.cu` compiled by nvcc
//!   (PTX for `compute_80`, cubins for `sm_80` and `sm_90a`), for cudarc to load.

pub(crate) mod adapter;
#[cfg(feature = "experimental-kernels")]
pub(crate) mod dense;
pub(crate) mod exec;
// The op sequences take raw device / host addresses (`unsafe fn`s):
// crate-internal, reached through the safe `Backend` impls. Their memory
// formulas are public.
pub(crate) mod ops;
pub(crate) mod params;
pub(crate) mod plan;
pub(crate) mod scratch_meter;
pub(crate) mod select;

pub use exec::KernelOptions;
pub use ops::{
    head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes, xent_backward_block, XENT_CHUNK_BYTES,
};
pub use plan::LaunchPlan;
pub use select::{compiled_kernels, MAX_HEAD_RANK};

#[cfg(feature = "cpu-kernels")]
pub mod host;
#[cfg(feature = "cpu-kernels")]
pub mod shim;
#[cfg(feature = "cpu-kernels")]
pub use host::CpuKernels;

/// Resources ptxas reported for one kernel on one architecture.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelResources {
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, in bytes (dynamic comes from the plan).
    pub shared_bytes: u32,
}

/// One kernel entry point of an embedded module.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedKernel {
    /// The `extern "C"` symbol.
    pub name: &'static str,
    /// ptxas's report for `sm_80`.
    pub sm80: KernelResources,
    /// ptxas's report for `sm_90a`.
    pub sm90: KernelResources,
}

/// One `kernels/*.cu` file compiled by nvcc at build time.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedModule {
    /// The file's stem (`kernels/shim_selftest.cu` -> `"shim_selftest"`).
    pub name: &'static str,
    /// PTX for `compute_80` (JIT-compiled by the driver on any sm_80+ GPU).
    pub ptx: &'static str,
    /// Cubin for `sm_80` (A100); 64-byte aligned.
    pub cubin_sm80: &'static [u8],
    /// Cubin for `sm_90a` (H100/H200: sm_90 plus wgmma); 64-byte aligned.
    pub cubin_sm90: &'static [u8],
    /// The kernels it defines.
    pub kernels: &'static [EmbeddedKernel],
}

#[cfg(feature = "cuda")]
impl EmbeddedModule {
    /// The cubin for compute capability `major.minor`, if one was built for
    /// exactly that architecture (otherwise load [`EmbeddedModule::ptx`]).
    pub fn cubin_for(&self, major: u32, minor: u32) -> Option<&'static [u8]> {
        match (major, minor) {
            (8, 0) => Some(self.cubin_sm80),
            (9, 0) => Some(self.cubin_sm90),
            _ => None,
        }
    }

    /// The kernel named `name`, if this module defines it.
    pub fn kernel(&self, name: &str) -> Option<&'static EmbeddedKernel> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

/// Bytes with 64-byte alignment (cubins are ELF images).
#[cfg(feature = "cuda")]
#[repr(C, align(64))]
struct Aligned<const N: usize>([u8; N]);

#[cfg(feature = "cuda")]
include!(concat!(env!("OUT_DIR"), "/kernels_embedded.rs"));

/// The embedded module compiled from `kernels/<name>.cu`.
#[cfg(feature = "cuda")]
pub fn module(name: &str) -> Option<&'static EmbeddedModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// The embedded module that defines kernel `kernel`.
#[cfg(feature = "cuda")]
pub fn module_of(kernel: &str) -> Option<&'static EmbeddedModule> {
    MODULES.iter().find(|m| m.kernel(kernel).is_some())
}
