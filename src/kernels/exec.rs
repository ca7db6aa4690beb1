//! [`Executor`]: what an op needs from the machine that runs its kernels.
//!
//! The op sequences (`src/kernels/ops/`) are written once against this trait;
//! the CPU shim ([`super::host::HostExec`]) and the GPU ([`crate::cuda`])
//! implement it. Both therefore run the same launches (plans and params) in
//! the same order, so the CPU run also tests the host side of every op.

#[cfg(feature = "experimental-kernels")]
use super::dense::DenseGemm;
use super::params::KernelParams;
use super::plan::LaunchPlan;
#[cfg(feature = "experimental-kernels")]
use crate::error::Error;
use crate::error::Result;

/// Which implementation runs the head ops, for both kernel backends
/// (`Cuda::with_options`, `CpuKernels::new`). Every setting gives the same
/// results up to f32 summation order; [`super::select`] turns them into the
/// kernel each launch runs.
///
/// The default runs the WMMA tile kernels with the register-staged main
/// loop: the path measured on a GPU (BENCHMARKS.md, H200, 2026-11-28). The
/// other fields exist with the feature `experimental-kernels`: variants no
/// GPU run has measured yet, compiled and tested on the CPU shim so that one
/// can measure and promote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOptions {
    /// Most bytes of each per-block buffer of the fused cross-entropy: the
    /// backward's G block and f32 `dh` accumulator block
    /// ([`super::xent_backward_block`]), and on the cuBLAS path the f32
    /// logits chunk; 0 = [`super::XENT_CHUNK_BYTES`].
    pub xent_chunk_bytes: usize,
    /// The rank <= 16 half-precision `grad_h` on its `_2blocks` kernels (two
    /// resident blocks per SM on sm_90+; one on sm_80).
    #[cfg(feature = "experimental-kernels")]
    pub grad_h_two_blocks: bool,
    /// `head_forward` (f16 / bf16) on 128 × 256 tiles (`_w256`: 64 × 64 warp
    /// tiles, 3-stage cp.async ring).
    #[cfg(feature = "experimental-kernels")]
    pub wide_tiles: bool,
    /// The f16 / bf16 GEMMs that have an `_mma` variant on it: `head_forward`,
    /// the head backward's `grad_h` and `grad_param` (G in the storage dtype)
    /// and the fused cross-entropy's logit kernels. ldmatrix + mma.sync on a
    /// 3-stage cp.async ring, epilogue from registers.
    #[cfg(feature = "experimental-kernels")]
    pub mma: bool,
    /// Hopper warpgroup MMAs (`_wgmma`, only in the sm_90a cubin, so compute
    /// capability 9.0 only): `head_forward` (128 × 128, or 128 × 256 with
    /// `wide_tiles`), the head backward's GEMMs when G is in the storage
    /// dtype and unfiltered, and the fused cross-entropy's logit kernels.
    /// Takes precedence over `mma` where both apply.
    #[cfg(feature = "experimental-kernels")]
    pub wgmma: bool,
    /// With `wgmma`: `grad_h` with 64 extra U columns at every rank, so W's
    /// N-major tile is three whole 64-column swizzle atoms (m64n192k16)
    /// instead of ending in a partly filled one.
    #[cfg(feature = "experimental-kernels")]
    pub wgmma_whole_atoms: bool,
    /// The head's GEMMs on cuBLAS ([`Executor::gemm`]; on the CPU shim a host
    /// f32 GEMM stands in for it): `head_forward` as one K = d + r GEMM per
    /// vocabulary chunk over concatenated `[h | p]`, `[W_c | U_c]`; the fused
    /// cross-entropy per chunk of f32 logits (at most `xent_chunk_bytes`)
    /// with one small kernel folding each chunk into logsumexp pairs or into
    /// G; `head_backward` (G in the storage dtype) as `G·W`, `G·U`,
    /// `Gᵀ·p`, `Gᵀ·h`. Still one shared gradient and no [T, V] buffer.
    #[cfg(feature = "experimental-kernels")]
    pub cublas: bool,
}

impl KernelOptions {
    /// These options with [`KernelOptions::xent_chunk_bytes`] set.
    pub fn with_xent_chunk_bytes(mut self, bytes: usize) -> Self {
        self.xent_chunk_bytes = bytes;
        self
    }
}

/// Memory and launches on one machine (host threads or one CUDA stream).
pub trait Executor {
    /// An owned scratch buffer (host memory or device memory).
    type Scratch;

    /// A zero-filled scratch buffer of at least `bytes` bytes, 16-byte aligned.
    fn scratch(&self, bytes: usize) -> Result<Self::Scratch>;
    /// A scratch buffer like [`Executor::scratch`] but with unspecified
    /// contents (on a GPU: no memset launch), for buffers whose every byte
    /// an op reads is first written by its own launches. The host executor
    /// fills it with 0xFF bytes (NaN as f32, -1 as i32), so that the tests
    /// catch a read before a write.
    fn scratch_uninit(&self, bytes: usize) -> Result<Self::Scratch>;
    /// The address kernels use for `s`.
    fn addr(&self, s: &Self::Scratch) -> u64;
    /// Copies the first `out.len()` bytes of `s` to the host, after every
    /// launch issued so far has finished.
    fn download(&self, s: &Self::Scratch, out: &mut [u8]) -> Result<()>;
    /// Reads `out.len()` bytes at `addr` inside a caller buffer (used to quote
    /// an offending token id in an error), after every launch so far.
    fn read_at(&self, addr: u64, out: &mut [u8]) -> Result<()>;
    /// Streaming multiprocessors of the device (sizes grid-stride launches;
    /// results never depend on it).
    fn multiprocessors(&self) -> u32;
    /// Which kernel variants the ops launch (same results, different speed).
    fn options(&self) -> KernelOptions;
    /// Device address of the deferred id-error record ([`super::ops::ID_RECORD_LEN`]
    /// × i64: error count, argument code, first bad index, its value, vocab), if this executor
    /// defers the embedding ops' id check instead of reading it back
    /// (`Cuda::with_deferred_id_errors`); `None` (the default) checks at once.
    fn deferred_id_record(&self) -> Option<u64> {
        None
    }
    /// Runs one kernel.
    ///
    /// # Safety
    /// `params` must be the params struct of `plan.kernel`, and every address
    /// in it must be valid for the reads and writes that kernel does under
    /// `plan` until the launch has finished.
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan, params: &P) -> Result<()>;
    /// Runs one [`DenseGemm`] on this executor's cuBLAS (on the CPU shim, a
    /// host f32 GEMM), ordered after every launch so far (an `Err` where
    /// there is none; the ops only ask on the cuBLAS path).
    ///
    /// # Safety
    /// Every address in `g` must be valid for the reads and writes the GEMM
    /// does (A, B read; C written, and read unless `beta == 0`) until it has
    /// finished, and C must not overlap A or B.
    #[cfg(feature = "experimental-kernels")]
    unsafe fn gemm(&self, g: &DenseGemm) -> Result<()> {
        let _ = g;
        Err(Error::UnsupportedCombination("this executor has no cuBLAS".into()))
    }
}
