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

#[cfg(feature = "experimental-kernels")]
mod blas;
mod buffer_uses;
mod exec;
pub(crate) mod libs;

use crate::backend::{Grads, Weights};
use crate::error::{Error, Result};
use crate::kernels::adapter::{kernel_backend, Addrs, KernelDevice};
use crate::kernels::exec::KernelOptions;
use crate::kernels::ops;
use crate::kernels::scratch_meter::ScratchMeter;
#[cfg(feature = "experimental-kernels")]
use blas::Cublas;
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
    /// cuBLAS, loaded when the options ask for it.
    #[cfg(feature = "experimental-kernels")]
    cublas: Option<Cublas>,
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
            .field("kernels", &self.backend_name())
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
            #[cfg(feature = "experimental-kernels")]
            cublas: None,
            stream,
            sms: sms.max(1) as u32,
            options: KernelOptions::default(),
            scratch: ScratchMeter::new(),
            deferred_ids: None,
        })
    }

    /// The backend with these kernel options (the same type and meaning as
    /// `CpuKernels::new`). `Err` if the device cannot run them: the wgmma
    /// kernels need compute capability 9.0 (their sm_90a cubin), the cuBLAS
    /// path a loadable libcublas (and takes 32 MiB for its workspace).
    pub fn with_options(mut self, options: KernelOptions) -> Result<Self> {
        #[cfg(feature = "experimental-kernels")]
        {
            let cc = self.cache.compute_capability();
            if options.wgmma && cc != (9, 0) {
                return Err(Error::UnsupportedCombination(format!(
                    "wgmma kernels need compute capability 9.0 (their sm_90a cubin); this GPU is {}.{}",
                    cc.0, cc.1
                )));
            }
            self.cublas = match (options.cublas, self.cublas.take()) {
                (false, _) => None,
                (true, Some(c)) => Some(c),
                (true, None) => Some(Cublas::new(&self.stream)?),
            };
        }
        self.options = options;
        Ok(self)
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::wide_tiles`] set.
    #[cfg(feature = "experimental-kernels")]
    pub fn with_wide_tiles(mut self, on: bool) -> Self {
        self.options.wide_tiles = on;
        self
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::mma`] set.
    #[cfg(feature = "experimental-kernels")]
    pub fn with_mma(mut self, on: bool) -> Self {
        self.options.mma = on;
        self
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::wgmma`] set: an `Err`
    /// on any device but compute capability 9.0 (H100, H200, GH200).
    ///
    /// ```no_run
    /// # fn main() -> tiedlora::Result<()> {
    /// use tiedlora::cuda::Cuda;
    /// let gpu = Cuda::new(0)?.with_wgmma(true)?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "experimental-kernels")]
    pub fn with_wgmma(self, on: bool) -> Result<Self> {
        let options = KernelOptions { wgmma: on, ..self.options };
        self.with_options(options)
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::wgmma_whole_atoms`] set.
    #[cfg(feature = "experimental-kernels")]
    pub fn with_wgmma_whole_atoms(mut self, on: bool) -> Self {
        self.options.wgmma_whole_atoms = on;
        self
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::cublas`] set: an
    /// `Err` if libcublas cannot be loaded.
    ///
    /// ```no_run
    /// # fn main() -> tiedlora::Result<()> {
    /// use tiedlora::cuda::Cuda;
    /// let gpu = Cuda::new(0)?.with_cublas(true)?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "experimental-kernels")]
    pub fn with_cublas(self, on: bool) -> Result<Self> {
        let options = KernelOptions { cublas: on, ..self.options };
        self.with_options(options)
    }

    /// As [`Cuda::with_options`] with [`KernelOptions::grad_h_two_blocks`] set.
    #[cfg(feature = "experimental-kernels")]
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

    /// As [`Cuda::with_options`] with [`KernelOptions::xent_chunk_bytes`]
    /// set: the bytes of each per-block buffer of the fused cross-entropy
    /// (default [`crate::kernels::XENT_CHUNK_BYTES`], sized to stay in L2).
    /// The same results up to f32 rounding for any value (the sums are
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

    /// The kernel options this backend runs with (the memory formulas take them).
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
            #[cfg(feature = "experimental-kernels")]
            cublas: self.cublas.as_ref(),
            deferred_id_record: self.deferred_ids.as_ref().map(|r| {
                let r = r.lock().unwrap_or_else(|p| p.into_inner());
                let (ptr, _sync) = r.device_ptr(&self.stream);
                ptr
            }),
        }
    }
}

impl Cuda {
    fn backend_name(&self) -> &'static str {
        #[cfg(feature = "experimental-kernels")]
        {
            let o = self.options;
            if o.cublas {
                return "cuda-cublas";
            }
            if o.wgmma || o.mma || o.wide_tiles || o.grad_h_two_blocks {
                return "cuda-experimental";
            }
        }
        "cuda"
    }
}

impl<'u> Addrs<'u, Cuda> for BufferUses<'u> {
    fn read<T: 'static>(&mut self, arg: &'static str, s: &'u CudaView<'_, T>) -> Result<u64> {
        BufferUses::read(self, arg, s)
    }
    fn write<T: 'static>(&mut self, arg: &'static str, s: &'u mut CudaViewMut<'_, T>) -> Result<u64> {
        BufferUses::write(self, arg, s)
    }
}

impl KernelDevice for Cuda {
    type Exec<'s> = CudaExec<'s>;
    type Addrs<'u> = BufferUses<'u>;
    fn exec(&self) -> CudaExec<'_> {
        Cuda::exec(self)
    }
    fn addrs(&self) -> BufferUses<'_> {
        BufferUses::new(&self.stream)
    }
    fn src_len<T: 'static>(s: &CudaView<'_, T>) -> usize {
        s.len()
    }
    fn dst_len<T: 'static>(s: &CudaViewMut<'_, T>) -> usize {
        s.len()
    }
}

kernel_backend!(Cuda, src = CudaView, dst = CudaViewMut);

impl<'a, T: crate::Element> Weights<'a, Cuda, T> {
    /// Borrows device buffers as the tied parameters.
    pub fn device(w: &'a CudaSlice<T>, lora_vocab: &'a CudaSlice<f32>, lora_hidden: &'a CudaSlice<f32>) -> Self {
        Weights { w: w.as_view(), lora_vocab: lora_vocab.as_view(), lora_hidden: lora_hidden.as_view() }
    }
}

impl<'a> Grads<'a, Cuda> {
    /// Borrows device gradient accumulators; `w` is `Some` only for full tied fine-tuning.
    pub fn device(
        lora_vocab: &'a mut CudaSlice<f32>,
        lora_hidden: &'a mut CudaSlice<f32>,
        w: Option<&'a mut CudaSlice<f32>>,
    ) -> Self {
        Grads {
            lora_vocab: lora_vocab.as_view_mut(),
            lora_hidden: lora_hidden.as_view_mut(),
            w: w.map(|w| w.as_view_mut()),
        }
    }
}

// A trainer may share one backend across threads (each op enqueues on the
// backend's stream): keep `Cuda` Send + Sync.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Cuda>();
};
