//! The CUDA backend (feature `cuda`): the same [`Backend`] ops on device
//! buffers, with the kernels compiled into the crate at build time.
//!
//! Buffers are cudarc views on the backend's stream, so a trainer hands in its
//! own allocations (a raw cudarc `CudaSlice`, candle's storage) without copies:
//! `slice.as_view()` / `slice.as_view_mut()` (or `.slice(..)`).
//!
//! The buffers may also be used on the trainer's other streams of the same
//! context: each op takes their addresses through cudarc, whose event
//! tracking (on by default) makes the backend's stream wait for their earlier
//! writes, and records the op's own use once its launches are enqueued, so
//! another stream that later reads a gradient or rewrites an input waits for
//! the op's kernels. With event tracking off, ordering across streams is the
//! caller's (e.g. [`Cuda::synchronize`]). A buffer of another context (another
//! GPU, or a non-primary context) is refused with [`Error::WrongDevice`]
//! before anything is launched.
//!
//! ```no_run
//! # fn main() -> tiedlora::Result<()> {
//! use tiedlora::{cuda::Cuda, Backend, LoraConfig, Weights};
//! let gpu = Cuda::new(0)?; // Err (never a panic) without a driver or GPU
//! let cfg = LoraConfig::builder(1000, 64, 8).build()?;
//! let s = gpu.stream();
//! let w = s.clone_htod(&vec![0.01f32; 1000 * 64]).unwrap();
//! let u = s.clone_htod(&vec![0.0f32; 1000 * 8]).unwrap();
//! let vh = s.clone_htod(&vec![0.1f32; 8 * 64]).unwrap();
//! let ids = s.clone_htod(&[1u32, 5, 999]).unwrap();
//! let mut e = s.alloc_zeros::<f32>(3 * 64).unwrap();
//! let weights = Weights { w: w.as_view(), lora_vocab: u.as_view(), lora_hidden: vh.as_view() };
//! gpu.embed_forward(&cfg, &weights, ids.as_view(), e.as_view_mut())?;
//! # Ok(())
//! # }
//! ```

mod blas;
mod buffer_uses;
mod exec;

use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::error::{Error, Result};
use crate::kernels::exec::KernelOptions;
use crate::kernels::ops::{self, id_kind, GradAddrs, WeightAddrs};
use crate::kernels::scratch_meter::ScratchMeter;
use crate::validate::{self, GradLens, WeightLens};
use blas::GemmEngine;
use buffer_uses::BufferUses;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};
use exec::{driver_err, CudaExec, KernelCache};
use std::sync::Arc;

/// The CUDA backend on one stream. Its ops return once their launches are
/// enqueued; dropping it waits for the stream.
pub struct Cuda {
    // Dropped first: the kernel cache unloads its modules while the context
    // (which it also holds) is alive.
    cache: KernelCache,
    /// cuBLAS, loaded by `with_cublas(true)`.
    engine: Option<GemmEngine>,
    stream: Arc<CudaStream>,
    sms: u32,
    options: KernelOptions,
    scratch: ScratchMeter,
    /// The deferred id-error record (5 × i64), if enabled; the lock is only
    /// for clearing it through `&self`.
    deferred_ids: Option<std::sync::Mutex<CudaSlice<i64>>>,
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // Ops return as soon as their launches are enqueued: wait for them
        // before the fields go (the kernel cache unloads the modules those
        // launches run from). Errors are the stream's, reported by the next
        // call on it, not here.
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // What a trainer logs to say which kernels ran.
        f.debug_struct("Cuda")
            .field("device", &self.stream.context().ordinal())
            .field("kernels", &self.name())
            .field("options", &self.options)
            .field("deferred_id_errors", &self.deferred_ids.is_some())
            .finish()
    }
}

impl Cuda {
    /// The backend on a new stream of GPU `ordinal`. Without a CUDA driver or
    /// device this is an `Err`, never a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        crate::require_cuda()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&format!("opening GPU {ordinal}"), e))?;
        let stream = ctx.new_stream().map_err(|e| driver_err("creating a stream", e))?;
        Self::with_stream(stream)
    }

    /// The backend on a caller's stream (e.g. the trainer's): every op is
    /// enqueued there, ordered with the caller's own work.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        crate::require_cuda()?;
        let cc = stream.context().compute_capability().map_err(|e| driver_err("compute capability", e))?;
        if cc.0 < 8 {
            return Err(Error::BackendUnavailable(format!(
                "GPU compute capability {}.{}: the kernels need sm_80 or newer",
                cc.0, cc.1
            )));
        }
        let sms = stream
            .context()
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("multiprocessor count", e))?;
        Ok(Cuda {
            cache: KernelCache::new(stream.context().clone(), cc),
            engine: None,
            stream,
            sms: sms.max(1) as u32,
            options: KernelOptions::default(),
            scratch: ScratchMeter::new(),
            deferred_ids: None,
        })
    }

    /// Runs the head GEMMs with the 3-stage cp.async main loop (`_s3` kernels)
    /// instead of the register-staged one. Same results; speed differs by card
    /// (BENCHMARKS.md measures both).
    pub fn with_gemm_pipeline(mut self, on: bool) -> Self {
        self.options.gemm_stages = if on { 3 } else { 1 };
        self
    }

    /// Runs `head_forward` (f16 / bf16) on the wide-tile kernels: 128 × 256
    /// blocks with 64 × 64 warp tiles and a 3-stage cp.async ring (an
    /// experiment; BENCHMARKS.md says whether it pays). Same results.
    pub fn with_wide_tiles(mut self, on: bool) -> Self {
        self.options.wide_tiles = on;
        self
    }

    /// Runs the f16 / bf16 GEMMs that have an `_mma` variant on it:
    /// `head_forward` (also with [`Cuda::with_wide_tiles`]), the head
    /// backward's `dh` and `dU` / `dW` GEMMs when G is in the storage dtype
    /// (also inside the fused cross-entropy backward), and the fused
    /// cross-entropy's logit kernels (`head_xent_forward`'s partials and the
    /// backward's per-chunk G). Those use ldmatrix + mma.sync on a 3-stage
    /// cp.async ring, with the epilogue reading the accumulators from
    /// registers, instead of WMMA (an experiment: BENCHMARKS.md says whether
    /// it pays). Same results up to f32 summation order.
    pub fn with_mma(mut self, on: bool) -> Self {
        self.options.mma = on;
        self
    }

    /// Runs `head_forward` (f16 / bf16) on Hopper warpgroup MMAs
    /// (`wgmma.mma_async` reading 128-byte-swizzled shared-memory tiles
    /// through matrix descriptors): 128 × 128 blocks, or 128 × 256 with
    /// [`Cuda::with_wide_tiles`]; the head backward's GEMMs (`dh`: W read
    /// N-major, `G·U` from the same MMAs; `dU` / `dW`: Gᵀ read M-major) when
    /// G is in the storage dtype and no gradient filter is on (else the
    /// other kernels run); and the fused cross-entropy's logit kernels
    /// (`head_xent_forward`'s partials, 128 × 128 tiles kept in registers
    /// for the online logsumexp, and `head_xent_backward`'s per-chunk G). These kernels exist only in the sm_90a
    /// cubin, so this is an `Err` on any device but compute capability 9.0
    /// (H100, H200, GH200). Same results up to f32 summation order.
    ///
    /// ```no_run
    /// # fn main() -> tiedlora::Result<()> {
    /// use tiedlora::cuda::Cuda;
    /// let gpu = Cuda::new(0)?.with_wgmma(true)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_wgmma(mut self, on: bool) -> Result<Self> {
        let cc = self.cache.compute_capability();
        if on && cc != (9, 0) {
            return Err(Error::UnsupportedCombination(format!(
                "wgmma kernels need compute capability 9.0 (their sm_90a cubin); this GPU is {}.{}",
                cc.0, cc.1
            )));
        }
        self.options.wgmma = on;
        Ok(self)
    }

    /// With [`Cuda::with_wgmma`]: run the head backward's `dh` GEMM (and the
    /// fused cross-entropy backward's) with 64 extra U columns at every rank,
    /// so W's N-major tile is three whole 64-column swizzle atoms
    /// (m64n192k16) rather than ending in a partly filled one (n144 at
    /// r <= 16, n160 at r <= 32). Same results, more MMA work at r <= 32; a
    /// fallback kept until a GPU run confirms the partial atoms (BENCHMARKS.md).
    pub fn with_wgmma_whole_atoms(mut self, on: bool) -> Self {
        self.options.wgmma_whole_atoms = on;
        self
    }

    /// Runs the head's GEMMs on cuBLAS (`cublasGemmEx`, f32 compute)
    /// instead of the hand-written tile kernels, keeping the fusion where it
    /// matters (no `[T, V]` temporary, one shared gradient):
    ///
    /// - `head_forward`: one K = d + r GEMM per vocabulary chunk,
    ///   `[h | p]·[W_c | U_c]ᵀ` (p = s·h·Vhᵀ) over operands concatenated in
    ///   scratch (`[T, d + r]` once, `[C, d + r]` ≤ 32 MiB per chunk), rounded
    ///   once straight into the logits, as the fused kernel does.
    /// - `head_xent_forward`: per vocabulary chunk of f32 logits `[T, C]` (at
    ///   most 32 MiB, [`Cuda::with_xent_chunk_bytes`], so it stays in L2),
    ///   cuBLAS writes `p·U_cᵀ` and the `h·W_cᵀ` GEMM adds onto it (beta 1,
    ///   in its epilogue); one kernel folds the chunk
    ///   into per-row running logsumexp pairs, in a fixed order.
    /// - `head_xent_backward`: per block of tokens × vocabulary columns (f32
    ///   logits + G in the chunk bytes), the logits as above, G from them,
    ///   then cuBLAS `dh_acc += G·W`, `gu += G·U`, `dU += Gᵀ·p`, `dW += Gᵀ·h`
    ///   (with the gradient filter on, the fused logit kernel writes G and
    ///   cuBLAS consumes it).
    /// - `head_backward` (G in the storage dtype): `G·W` and `G·U` into f32,
    ///   one kernel adds `s·(G·U)·Vh` and rounds `dh` once, and
    ///   `dU += Gᵀ·p`, `dW += Gᵀ·h`. It reads G three times (the fused kernels
    ///   twice) and holds an f32 `[T, d]` (75 MB at the Gemma-2-2B shape).
    ///
    /// The operands are rounded as in the fused kernels (U to the storage
    /// dtype), so the results agree up to f32 summation order; cuBLAS gives
    /// the same bits run to run on one GPU and toolkit. BENCHMARKS.md
    /// compares the two paths. `Err` if libcublas cannot be loaded; takes 32
    /// MiB of device memory for cuBLAS's workspace.
    ///
    /// ```no_run
    /// # fn main() -> tiedlora::Result<()> {
    /// use tiedlora::cuda::Cuda;
    /// let gpu = Cuda::new(0)?.with_cublas(true)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_cublas(mut self, on: bool) -> Result<Self> {
        self.engine = if on { Some(GemmEngine::new(&self.stream)?) } else { None };
        self.options.cublas = on;
        Ok(self)
    }

    /// Whether the rank <= 16 half-precision `dh` GEMM of the head backward
    /// (and the fused cross-entropy backward) asks for two resident blocks per
    /// SM (default yes; only sm_90+ cubins differ). Same results; a knob so
    /// the benchmark can compare both in one run.
    pub fn with_grad_h_two_blocks(mut self, on: bool) -> Self {
        self.options.grad_h_two_blocks = on;
        self
    }

    /// Lets `embed_forward` and `embed_backward` return without waiting for
    /// their id check (by default each reads the check's result back, a host
    /// round trip per call that dominates the forward at training sizes).
    ///
    /// Bad ids stay harmless on the device: no memory is read or written for
    /// them, the forward writes their rows as NaN and the backward drops
    /// their tokens. The first one (index, value) is recorded on the device
    /// and reported by the next [`Cuda::take_id_error`], as
    /// [`Error::TokenOutOfRange`]. The kernel that meets a bad id records it
    /// itself, so `embed_forward` is then a single kernel launch (the gather
    /// checks each id as it loads it) and `embed_backward` has no extra one. The cross-entropy ops keep checking their
    /// targets at once (they need the count of valid targets on the host).
    ///
    /// ```no_run
    /// # fn main() -> tiedlora::Result<()> {
    /// use tiedlora::cuda::Cuda;
    /// let gpu = Cuda::new(0)?.with_deferred_id_errors(true)?;
    /// // ... embed_forward / embed_backward calls, no host round trip ...
    /// gpu.take_id_error()?; // once per step: Err if any id was out of range
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_deferred_id_errors(mut self, on: bool) -> Result<Self> {
        self.deferred_ids = if on {
            let rec =
                self.stream.alloc_zeros::<i64>(ops::ID_RECORD_LEN).map_err(|e| driver_err("deferred id record", e))?;
            Some(std::sync::Mutex::new(rec))
        } else {
            None
        };
        Ok(self)
    }

    /// Waits for the stream and returns the first out-of-range id the
    /// embedding ops met since the last call, as [`Error::TokenOutOfRange`]
    /// (the record is then cleared). Always `Ok` unless
    /// [`Cuda::with_deferred_id_errors`] is on: without it every op reports
    /// its own bad ids.
    pub fn take_id_error(&self) -> Result<()> {
        let Some(rec) = &self.deferred_ids else { return Ok(()) };
        let mut rec = rec.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = [0i64; ops::ID_RECORD_LEN];
        self.stream.memcpy_dtoh(&*rec, &mut r).map_err(|e| driver_err("reading the id record", e))?;
        self.synchronize()?;
        if r[0] == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_htod(&[0i64; ops::ID_RECORD_LEN], &mut *rec)
            .map_err(|e| driver_err("clearing the id record", e))?;
        // r[1] is the argument code: only the embedding ops' "ids" defer so far.
        debug_assert_eq!(r[1], i64::from(crate::kernels::ops::DEFERRED_ARG_IDS));
        Err(Error::TokenOutOfRange { arg: "ids", index: r[2] as usize, value: r[3], vocab: r[4] as usize })
    }

    /// Bytes of each per-block buffer of the fused cross-entropy: the
    /// backward's G block and f32 `dh` accumulator block
    /// ([`crate::kernels::xent_backward_block`]), the GEMM engine's f32 logits
    /// chunk (default [`crate::kernels::XENT_CHUNK_BYTES`], sized to stay in
    /// L2). The same results up to f32 rounding for any value (the sums are
    /// grouped by block), bitwise deterministic for each; a tuning knob for
    /// other cards.
    pub fn with_xent_chunk_bytes(mut self, bytes: usize) -> Self {
        self.options.xent_chunk_bytes = bytes;
        self
    }

    /// Total bytes of scratch device memory the ops have allocated on this
    /// backend so far (an op that loops over blocks may allocate and free one
    /// block's scratch per iteration: see [`Cuda::scratch_peak_bytes`] for its
    /// memory).
    pub fn scratch_bytes_allocated(&self) -> usize {
        self.scratch.allocated()
    }

    /// The most scratch device memory live at once since the last
    /// [`Cuda::reset_scratch_peak`]: the ops' extra memory. Every op frees its
    /// scratch (stream-ordered) before it returns, so a reset before a call
    /// and a read after it give that call's peak extra memory, which the
    /// formulas [`crate::kernels::head_xent_forward_scratch_bytes`] /
    /// [`crate::kernels::head_xent_backward_scratch_bytes`] bound.
    ///
    /// ```rust,ignore
    /// cuda.reset_scratch_peak();
    /// cuda.head_xent_backward(&cfg, &weights, h, targets, lse, 1.0, dh, &mut grads)?;
    /// let extra = cuda.scratch_peak_bytes();
    /// ```
    pub fn scratch_peak_bytes(&self) -> usize {
        self.scratch.peak()
    }

    /// Starts a new peak for [`Cuda::scratch_peak_bytes`] (from the scratch
    /// live now: 0 between ops); returns the old peak.
    pub fn reset_scratch_peak(&self) -> usize {
        self.scratch.reset_peak()
    }

    /// The kernel variants this backend runs (set by the `with_*` builders;
    /// the memory formulas take them).
    pub fn kernel_options(&self) -> KernelOptions {
        self.options
    }

    /// Streaming multiprocessors of the device (sizes some launches and the
    /// memory formulas, e.g. [`crate::kernels::head_xent_forward_scratch_bytes`]).
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    /// The stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every op issued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("synchronize", e))
    }

    fn exec(&self) -> CudaExec<'_> {
        CudaExec {
            stream: &self.stream,
            cache: &self.cache,
            sms: self.sms,
            options: self.options,
            meter: &self.scratch,
            engine: self.engine.as_ref(),
            deferred_id_record: self.deferred_ids.as_ref().map(|r| {
                let r = r.lock().unwrap_or_else(|p| p.into_inner());
                let (ptr, _sync) = r.device_ptr(&self.stream);
                ptr
            }),
        }
    }
}

fn wl<T: Element>(w: &Weights<'_, Cuda, T>) -> WeightLens {
    WeightLens { w: w.w.len(), lora_vocab: w.lora_vocab.len(), lora_hidden: w.lora_hidden.len() }
}

fn gl(g: &Grads<'_, Cuda>) -> GradLens {
    GradLens { lora_vocab: g.lora_vocab.len(), lora_hidden: g.lora_hidden.len(), w: g.w.as_ref().map(|w| w.len()) }
}

fn weight_addrs<'a, T: Element>(w: &'a Weights<'_, Cuda, T>, uses: &mut BufferUses<'a>) -> Result<WeightAddrs> {
    Ok(WeightAddrs {
        w: uses.read("w", &w.w)?,
        u: uses.read("lora_vocab", &w.lora_vocab)?,
        vh: uses.read("lora_hidden", &w.lora_hidden)?,
    })
}

fn grad_addrs<'a>(g: &'a mut Grads<'_, Cuda>, uses: &mut BufferUses<'a>) -> Result<GradAddrs> {
    Ok(GradAddrs {
        u: uses.write("grad_lora_vocab", &mut g.lora_vocab)?,
        vh: uses.write("grad_lora_hidden", &mut g.lora_hidden)?,
        w: g.w.as_mut().map(|w| uses.write("grad_w", w)).transpose()?,
    })
}

impl Backend for Cuda {
    type Src<'a, T: 'static> = CudaView<'a, T>;
    type Dst<'a, T: 'static> = CudaViewMut<'a, T>;

    fn name(&self) -> &'static str {
        if self.options.cublas {
            // The head GEMMs run on cuBLAS (G in f32 under half storage and
            // the filtered G still on the kernels the other options pick).
            return "cuda-cublas";
        }
        if self.options.wgmma {
            // The kernels wgmma does not cover (f32, the filtered backward)
            // run on mma.sync when that is on too.
            return match (self.options.wide_tiles, self.options.mma) {
                (true, true) => "cuda-wide-wgmma-mma",
                (true, false) => "cuda-wide-wgmma",
                (false, true) => "cuda-wgmma-mma",
                (false, false) => "cuda-wgmma",
            };
        }
        match (self.options.gemm_stages == 3, self.options.wide_tiles, self.options.mma) {
            (_, true, true) => "cuda-wide-mma",
            (_, true, false) => "cuda-wide",
            (_, false, true) => "cuda-mma",
            (true, false, false) => "cuda-s3",
            (false, false, false) => "cuda",
        }
    }

    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: CudaView<'_, I>,
        mut out: CudaViewMut<'_, T>,
    ) -> Result<()> {
        let t = validate::embed_forward_lens(cfg, wl(weights), ids.len(), out.len())?;
        let mut uses = BufferUses::new(&self.stream);
        let wt = weight_addrs(weights, &mut uses)?;
        let (ids_addr, out_addr) = (uses.read("ids", &ids)?, uses.write("out", &mut out)?);
        ops::embed_forward(&self.exec(), cfg, T::DTYPE, wt, ids_addr, id_kind::<I>(), out_addr, t)
    }

    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: CudaView<'_, I>,
        d_embed: CudaView<'_, G>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::embed_backward_lens(cfg, wl(weights), ids.len(), d_embed.len(), gl(grads))?;
        let mut uses = BufferUses::new(&self.stream);
        let (wt, g) = (weight_addrs(weights, &mut uses)?, grad_addrs(grads, &mut uses)?);
        let (ids_addr, de) = (uses.read("ids", &ids)?, uses.read("d_embed", &d_embed)?);
        ops::embed_backward(&self.exec(), cfg, G::DTYPE, wt, ids_addr, id_kind::<I>(), de, g, t)
    }

    fn head_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: CudaView<'_, T>,
        mut logits: CudaViewMut<'_, T>,
    ) -> Result<()> {
        let t = validate::head_forward_lens(cfg, wl(weights), h.len(), logits.len())?;
        let mut uses = BufferUses::new(&self.stream);
        let wt = weight_addrs(weights, &mut uses)?;
        let (h_addr, out) = (uses.read("h", &h)?, uses.write("logits", &mut logits)?);
        ops::head_forward(&self.exec(), cfg, T::DTYPE, wt, h_addr, out, t)
    }

    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: CudaView<'_, T>,
        d_logits: CudaView<'_, G>,
        mut dh: CudaViewMut<'_, T>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::head_backward_lens(cfg, wl(weights), h.len(), d_logits.len(), dh.len(), gl(grads))?;
        let mut uses = BufferUses::new(&self.stream);
        let (wt, g) = (weight_addrs(weights, &mut uses)?, grad_addrs(grads, &mut uses)?);
        let (h_addr, g_addr) = (uses.read("h", &h)?, uses.read("d_logits", &d_logits)?);
        let dh_addr = uses.write("dh", &mut dh)?;
        ops::head_backward(&self.exec(), cfg, T::DTYPE, G::DTYPE, wt, h_addr, g_addr, dh_addr, g, t)
    }

    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: CudaView<'_, T>,
        targets: CudaView<'_, I>,
        mut loss: CudaViewMut<'_, f32>,
        mut lse: CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let t = validate::xent_forward_lens(cfg, wl(weights), h.len(), targets.len(), loss.len(), lse.len())?;
        let mut uses = BufferUses::new(&self.stream);
        let wt = weight_addrs(weights, &mut uses)?;
        let (h_addr, t_addr) = (uses.read("h", &h)?, uses.read("targets", &targets)?);
        let (loss_addr, lse_addr) = (uses.write("loss", &mut loss)?, uses.write("lse", &mut lse)?);
        ops::head_xent_forward(&self.exec(), cfg, T::DTYPE, wt, h_addr, t_addr, id_kind::<I>(), loss_addr, lse_addr, t)
    }

    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: CudaView<'_, T>,
        targets: CudaView<'_, I>,
        lse: CudaView<'_, f32>,
        grad_loss: f32,
        mut dh: CudaViewMut<'_, T>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::xent_backward_lens(cfg, wl(weights), h.len(), targets.len(), lse.len(), dh.len(), gl(grads))?;
        let mut uses = BufferUses::new(&self.stream);
        let (wt, g) = (weight_addrs(weights, &mut uses)?, grad_addrs(grads, &mut uses)?);
        let (h_addr, t_addr) = (uses.read("h", &h)?, uses.read("targets", &targets)?);
        let (lse_addr, dh_addr) = (uses.read("lse", &lse)?, uses.write("dh", &mut dh)?);
        ops::head_xent_backward(
            &self.exec(),
            cfg,
            T::DTYPE,
            wt,
            h_addr,
            t_addr,
            id_kind::<I>(),
            lse_addr,
            grad_loss,
            dh_addr,
            g,
            t,
        )
    }

    fn merge<T: Element>(
        &self,
        cfg: &LoraConfig,
        mut w: CudaViewMut<'_, T>,
        u: CudaView<'_, f32>,
        vh: CudaView<'_, f32>,
    ) -> Result<()> {
        validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
        let mut uses = BufferUses::new(&self.stream);
        let w_addr = uses.write("w", &mut w)?;
        let (u_addr, vh_addr) = (uses.read("lora_vocab", &u)?, uses.read("lora_hidden", &vh)?);
        ops::merge(&self.exec(), cfg, T::DTYPE, w_addr, u_addr, vh_addr, false)
    }

    fn unmerge<T: Element>(
        &self,
        cfg: &LoraConfig,
        mut w: CudaViewMut<'_, T>,
        u: CudaView<'_, f32>,
        vh: CudaView<'_, f32>,
    ) -> Result<()> {
        validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
        let mut uses = BufferUses::new(&self.stream);
        let w_addr = uses.write("w", &mut w)?;
        let (u_addr, vh_addr) = (uses.read("lora_vocab", &u)?, uses.read("lora_hidden", &vh)?);
        ops::merge(&self.exec(), cfg, T::DTYPE, w_addr, u_addr, vh_addr, true)
    }
}

// A trainer may share one backend across threads (each op enqueues on the
// backend's stream): keep `Cuda` Send + Sync.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cuda>();
};
