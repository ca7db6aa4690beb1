//! [`Executor`]: what an op needs from the machine that runs its kernels.
//!
//! The op sequences (`src/kernels/ops/`) are written once against this trait;
//! the CPU shim ([`super::host::HostExec`]) and the GPU ([`crate::cuda`])
//! implement it. Both therefore run the same launches (plans and params) in
//! the same order, so the CPU run also tests the host side of every op.

use super::dense::DenseGemm;
use super::params::KernelParams;
use super::plan::LaunchPlan;
use crate::error::{Error, Result};

/// Kernel variants of the head ops: every combination gives the same results
/// (up to f32 summation order); they differ in speed, which the benchmark
/// compares. Set through `Cuda::with_*` and the `CpuKernels` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    /// GEMM main loop of the head kernels: 1 (register-staged) or 3 (cp.async ring).
    pub gemm_stages: u32,
    /// Run the rank <= 16 half-precision `grad_h` on its `_o2` kernels (two
    /// resident blocks per SM on sm_90+).
    pub grad_h_two_blocks: bool,
    /// Run `head_forward` (f16 / bf16) on the wide-tile kernels (128 x 256
    /// blocks, 3-stage ring).
    pub wide_tiles: bool,
    /// Run the f16 / bf16 GEMMs that have an `_mma` variant on it:
    /// `head_forward`, the head backward's grad_h and grad_param (G in the
    /// storage dtype) and the fused cross-entropy's logit kernels. ldmatrix +
    /// mma.sync on the 3-stage cp.async ring, epilogue from registers.
    pub mma: bool,
    /// Run `head_forward` (f16 / bf16) on Hopper warpgroup MMAs
    /// (`wgmma.mma_async` from 128-byte-swizzled shared tiles, `_wgmma`
    /// kernels, which exist only in the sm_90a cubin): 128 × 128 blocks, or
    /// 128 × 256 with `wide_tiles`; the head backward's GEMMs when G is in
    /// the storage dtype and unfiltered (grad_h: W read N-major, U's columns
    /// in the same MMAs; grad_param: Gᵀ read M-major); and the fused
    /// cross-entropy's logit kernels (128 × 128: the forward's partials with
    /// the tile in registers, the backward's per-chunk G). Takes precedence
    /// over `mma` for those.
    pub wgmma: bool,
    /// Give the wgmma grad_h 64 extra U columns at every rank (m64n192k16:
    /// W's N-major tile in three whole 64-column swizzle atoms) instead of
    /// the smallest of 16 / 32 / 64 that holds r (n144 / n160 end in a partly
    /// filled atom, a layout CUTLASS never generates). More MMA work at
    /// r <= 32; a fallback until a GPU run confirms the partial atoms.
    pub wgmma_whole_atoms: bool,
    /// Most bytes of each per-block buffer of the fused cross-entropy: the
    /// forward's f32 logits chunk on the GEMM engine; the backward's G block
    /// and f32 `dh` accumulator block ([`super::xent_backward_block`]), or
    /// the engine's f32 logits + G block; 0 = [`super::XENT_CHUNK_BYTES`].
    pub xent_chunk_bytes: usize,
    /// Run the head's GEMMs on the executor's GEMM engine
    /// ([`Executor::gemm`]: cuBLAS on a GPU). `head_forward`: one K = d + r
    /// GEMM per vocabulary chunk over concatenated `[h | p]`, `[W_c | U_c]`,
    /// straight into the logits. The fused cross-entropy goes per chunk of
    /// f32 logits [T, C] (at most `xent_chunk_bytes`, so the chunk stays in
    /// L2): the engine writes `p·U_cᵀ` and adds `h·W_cᵀ` onto it, then one small
    /// kernel folds the chunk into logsumexp pairs or turns it into G (the
    /// backward per block of tokens × columns, with the engine's `dh += G·W`,
    /// `gu += G·U`, `dU += Gᵀ·p`, `dW += Gᵀ·h` on it); `head_backward` (G in
    /// the storage dtype) runs `G·W`, `G·U` into f32, `dU += Gᵀ·p`,
    /// `dW += Gᵀ·h`. Still one shared gradient and no [T, V] buffer.
    pub cublas: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            gemm_stages: 1,
            grad_h_two_blocks: true,
            wide_tiles: false,
            mma: false,
            wgmma: false,
            wgmma_whole_atoms: false,
            xent_chunk_bytes: 0,
            cublas: false,
        }
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
    /// Copies `data` to the start of `s`.
    fn upload(&self, s: &mut Self::Scratch, data: &[u8]) -> Result<()>;
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
    /// Device address of the deferred id-error record (5 × i64: error count,
    /// argument code, first bad index, its value, vocab), if this executor
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
    /// Runs one [`DenseGemm`] on this executor's GEMM engine, ordered after
    /// every launch so far (an `Err` where there is none; the ops only ask
    /// when [`KernelOptions::cublas`] is on).
    ///
    /// # Safety
    /// Every address in `g` must be valid for the reads and writes the GEMM
    /// does (A, B read; C written, and read unless `beta == 0`) until it has
    /// finished, and C must not overlap A or B.
    unsafe fn gemm(&self, g: &DenseGemm) -> Result<()> {
        let _ = g;
        Err(Error::UnsupportedCombination("this executor has no GEMM engine".into()))
    }
}
