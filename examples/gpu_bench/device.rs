//! The GPU side of the harness: the device and its stream, cuBLAS, the
//! baseline kernels (`kernels/baseline.cu`), CUDA-event timing and the
//! peak-memory probe.

use super::*;

fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    // Event tracking is off (one stream), so the guard records nothing.
    let (p, _guard) = s.device_ptr(stream);
    p
}

const BENCH_KERNELS: [&str; 9] = [
    "tl_bench_fill_f32",
    "tl_bench_fill_bf16",
    "tl_bench_cast_f32_bf16",
    "tl_bench_axpby_bf16",
    "tl_bench_gather_rows_b16",
    "tl_bench_scatter_add_f32",
    "tl_bench_diff_norm_f32",
    "tl_bench_diff_norm_bf16",
    "tl_bench_xent_rows_bf16",
];
const THREADS: u32 = 256;

/// The kernels of `kernels/baseline.cu`, loaded from the crate's embedded module.
pub(crate) struct BenchKernels {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) module: drv_sys::CUmodule,
    pub(crate) funcs: HashMap<&'static str, drv_sys::CUfunction>,
    pub(crate) max_blocks: u64,
}

impl BenchKernels {
    pub(crate) fn load(stream: &Arc<CudaStream>, cc: (i32, i32), sms: u32) -> Res<Self> {
        let m = tiedlora::kernels::module_of(BENCH_KERNELS[0])
            .ok_or("kernels/baseline.cu is not in this build of tiedlora (rebuild with --features cuda)")?;
        stream.context().bind_to_thread().ctx("bind context")?;
        let module = match m.cubin_for(cc.0 as u32, cc.1 as u32) {
            // SAFETY: an ELF cubin embedded at build time, 64-byte aligned, alive for 'static.
            Some(cubin) => unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) },
            None => {
                let ptx = CString::new(m.ptx).map_err(|_| "PTX of baseline.cu has a NUL".to_string())?;
                // SAFETY: a NUL-terminated PTX string, alive for the call.
                unsafe { drv::module::load_data(ptx.as_ptr() as *const c_void) }
            }
        }
        .ctx(&format!("loading kernels/baseline.cu for sm_{}{}", cc.0, cc.1))?;
        let mut k =
            BenchKernels { stream: stream.clone(), module, funcs: HashMap::new(), max_blocks: 8 * sms.max(1) as u64 };
        for name in BENCH_KERNELS {
            let c = CString::new(name).map_err(|_| format!("bad kernel name {name}"))?;
            // SAFETY: `module` was loaded above and is unloaded only when `k` drops.
            let f = unsafe { drv::module::get_function(k.module, c) }.ctx(name)?;
            k.funcs.insert(name, f);
        }
        Ok(k)
    }

    /// Blocks for `work` items (grid-stride kernels: any count works).
    fn grid(&self, work: u64) -> u32 {
        work.div_ceil(THREADS as u64).clamp(1, self.max_blocks) as u32
    }

    /// # Safety
    /// Every address in `params` must be valid for what kernel `name` reads and
    /// writes with those params (kernels/baseline_params.h), until the stream
    /// has run the launch.
    unsafe fn launch<P: Pod>(&self, name: &'static str, blocks: u32, params: &P) -> Res<()> {
        let f = *self.funcs.get(name).ok_or(format!("kernel {name} not loaded"))?;
        self.stream.context().bind_to_thread().ctx("bind context")?;
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: every kernel of baseline.cu takes exactly one argument, a `P`
        // by value (kernels/common.cuh ABI), which cuLaunchKernel copies before
        // returning; address validity is the caller's contract.
        unsafe { drv::launch_kernel(f, (blocks, 1, 1), (THREADS, 1, 1), 0, self.stream.cu_stream(), &mut args) }
            .ctx(&format!("launch {name}"))
    }
}

impl Drop for BenchKernels {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // SAFETY: loaded once in `load`; its functions are dropped with `self`
        // and every launch has finished (synchronize above).
        let _ = unsafe { drv::module::unload(self.module) };
    }
}

/// A bf16 GEMM operand: a row-major matrix, used as stored or transposed.
pub(crate) struct In<'a> {
    pub(crate) buf: &'a CudaSlice<bf16>,
    pub(crate) trans: bool,
}

pub(crate) fn nt(buf: &CudaSlice<bf16>) -> In<'_> {
    In { buf, trans: false }
}

pub(crate) fn tr(buf: &CudaSlice<bf16>) -> In<'_> {
    In { buf, trans: true }
}

/// A GEMM result: bf16 or f32, row-major.
pub(crate) enum Out<'a> {
    Bf16(&'a mut CudaSlice<bf16>),
    F32(&'a mut CudaSlice<f32>),
}

/// cuBLAS on the bench stream, with its workspace from the same pool.
pub(crate) struct Blas {
    pub(crate) blas: CudaBlas, // dropped before the workspace it uses
    pub(crate) _workspace: CudaSlice<u8>,
    pub(crate) stream: Arc<CudaStream>,
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Res<Self> {
        // SAFETY: only probes whether libcublas can be dlopen'ed (CudaBlas::new panics otherwise).
        if !unsafe { blas_sys::is_culib_present() } {
            return Err("libcublas (libcublas.so.13) not found: add its directory (e.g. the CUDA toolkit's \
                        lib64 or python's nvidia/cu13/lib) to LD_LIBRARY_PATH"
                .into());
        }
        let blas = CudaBlas::new(stream.clone()).ctx("cublasCreate")?;
        let workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE).ctx("cuBLAS workspace")?;
        let ws = addr(&workspace, stream);
        // SAFETY: `workspace` is a live device allocation of CUBLAS_WORKSPACE
        // bytes that outlives the handle (field order); both use one stream.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, CUBLAS_WORKSPACE) }
            .result()
            .ctx("cublasSetWorkspace")?;
        Ok(Blas { blas, _workspace: workspace, stream: stream.clone() })
    }

    /// Row-major `C[m, n] = alpha · op(A) · op(B) + beta · C` with bf16 A and B
    /// (A stored [m, k], or [k, m] when transposed; B stored [k, n], or [n, k]),
    /// f32 compute (`CUBLAS_COMPUTE_32F`), C in bf16 or f32.
    ///
    /// cuBLAS is column-major: a row-major [r, c] matrix is its column-major
    /// [c, r] transpose, so this computes `Cᵀ = op(B)ᵀ · op(A)ᵀ`, i.e. cuBLAS
    /// m' = n, n' = m with B first.
    pub(crate) fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: In<'_>,
        b: In<'_>,
        c: Out<'_>,
        alpha: f32,
        beta: f32,
    ) -> Res<()> {
        let need = |what: &str, len: usize, want: usize| -> Res<()> {
            if len < want {
                Err(format!("gemm {m}x{n}x{k}: {what} has {len} elements, needs {want}"))
            } else {
                Ok(())
            }
        };
        need("A", a.buf.len(), m * k)?;
        need("B", b.buf.len(), k * n)?;
        let i = |v: usize| i32::try_from(v).map_err(|_| format!("gemm dimension {v} exceeds i32"));
        let (mi, ni, ki) = (i(m)?, i(n)?, i(k)?);
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ldb = if b.trans { ki } else { ni };
        let lda = if a.trans { mi } else { ki };
        let (pa, pb) = (addr(a.buf, &self.stream), addr(b.buf, &self.stream));
        let (pc, c_ty) = match c {
            Out::Bf16(s) => {
                need("C", s.len(), m * n)?;
                (addr(s, &self.stream), blas_sys::cudaDataType::CUDA_R_16BF)
            }
            Out::F32(s) => {
                need("C", s.len(), m * n)?;
                (addr(s, &self.stream), blas_sys::cudaDataType::CUDA_R_32F)
            }
        };
        let bf = blas_sys::cudaDataType::CUDA_R_16BF;
        // SAFETY: A, B and C are live device buffers on the handle's stream
        // whose lengths were checked above against the operand shapes implied
        // by (m, n, k, ld*); alpha and beta are host f32 (host pointer mode,
        // f32 compute), read before the call returns.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                op(b.trans),
                op(a.trans),
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const c_void,
                pb as *const c_void,
                bf,
                ldb,
                pa as *const c_void,
                bf,
                lda,
                &beta as *const f32 as *const c_void,
                pc as *mut c_void,
                c_ty,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .ctx(&format!("cublasGemmEx {m}x{n}x{k}"))
    }
}

/// How peak extra device memory is read.
pub(crate) enum MemMethod {
    /// `CU_MEMPOOL_ATTR_USED_MEM_HIGH` of the device's current pool.
    Pool(drv_sys::CUmemoryPool),
    /// `cuMemGetInfo` before/after, with the pool trimmed first (an upper bound).
    MemGetInfo(drv_sys::CUmemoryPool, String),
    /// Nothing usable.
    Unavailable(String),
}

fn pool_attr(pool: drv_sys::CUmemoryPool, attr: drv_sys::CUmemPool_attribute) -> Res<u64> {
    let mut v: u64 = 0;
    // SAFETY: `pool` is the device's pool (valid for the context's life); the
    // used/reserved attributes are cuuint64_t, which `v` is.
    unsafe { drv::mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut c_void) }
        .ctx("cuMemPoolGetAttribute")?;
    Ok(v)
}

impl MemMethod {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Self {
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return MemMethod::Unavailable(
                "the device has no stream-ordered allocator: cudarc allocates with cuMemAlloc".into(),
            );
        }
        let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the device handle comes from a live context; `pool` is an out-parameter.
        let got = unsafe { drv_sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }.result();
        if let Err(e) = got {
            return MemMethod::Unavailable(format!("cuDeviceGetMemPool: {e:?}"));
        }
        // Keep freed blocks in the pool (as PyTorch's caching allocator does),
        // so the timed loops do not map and unmap memory on every call.
        let mut threshold = u64::MAX;
        // SAFETY: valid pool; RELEASE_THRESHOLD is a cuuint64_t.
        let _ = unsafe {
            drv::mem_pool::set_attribute(
                pool,
                drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            )
        };
        match pool_attr(pool, drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH) {
            Ok(_) => MemMethod::Pool(pool),
            Err(e) => MemMethod::MemGetInfo(pool, e),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            MemMethod::Pool(_) => "stream-ordered pool high-watermark (CU_MEMPOOL_ATTR_USED_MEM_HIGH) minus the \
                                   bytes in use before the call; every buffer (ours, cuBLAS baselines' \
                                   temporaries, the library's scratch) comes from cuMemAllocAsync on the same pool; \
                                   cuBLAS's 32 MiB workspace is allocated beforehand and not counted"
                .into(),
            MemMethod::MemGetInfo(_, why) => format!(
                "cuMemGetInfo delta after trimming the pool (an upper bound: pool reserve growth), because the pool \
                 watermark is unavailable ({why})"
            ),
            MemMethod::Unavailable(why) => format!("not measured: {why}"),
        }
    }

    /// Returns the pool's unused reserved memory to the device (between shapes).
    pub(crate) fn trim(&self) {
        if let MemMethod::Pool(pool) | MemMethod::MemGetInfo(pool, _) = self {
            // SAFETY: valid pool; trimming only releases reserved memory no allocation uses.
            let _ = unsafe { drv::mem_pool::trim_to(*pool, 0) };
        }
    }

    /// Peak bytes allocated by `f` on top of what was in use before it.
    pub(crate) fn measure(&self, stream: &Arc<CudaStream>, f: impl FnOnce() -> Res<()>) -> Res<Option<u64>> {
        stream.synchronize().ctx("synchronize")?;
        match self {
            MemMethod::Pool(pool) => {
                let before = pool_attr(*pool, drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
                let mut zero: u64 = 0;
                // SAFETY: valid pool; USED_MEM_HIGH is a cuuint64_t and may only be reset to 0.
                unsafe {
                    drv::mem_pool::set_attribute(
                        *pool,
                        drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut c_void,
                    )
                }
                .ctx("reset USED_MEM_HIGH")?;
                f()?;
                stream.synchronize().ctx("synchronize")?;
                let high = pool_attr(*pool, drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
                Ok(Some(high.saturating_sub(before)))
            }
            MemMethod::MemGetInfo(pool, _) => {
                // SAFETY: valid pool; trimming only returns unused reserved memory.
                unsafe { drv::mem_pool::trim_to(*pool, 0) }.ctx("cuMemPoolTrimTo")?;
                let (free0, _) = drv::mem_get_info().ctx("cuMemGetInfo")?;
                f()?;
                stream.synchronize().ctx("synchronize")?;
                let (free1, _) = drv::mem_get_info().ctx("cuMemGetInfo")?;
                Ok(Some(free0.saturating_sub(free1) as u64))
            }
            MemMethod::Unavailable(_) => {
                f()?;
                Ok(None)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) median_ms: f64,
    pub(crate) min_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) iters: usize,
}

/// Token ids on the device, with the vocabulary they are valid for.
pub(crate) struct Ids {
    pub(crate) buf: CudaSlice<u32>,
    pub(crate) vocab: usize,
}

/// Everything the bench needs on the device.
pub(crate) struct Gpu {
    pub(crate) cuda: Cuda,
    /// The same backend with the wide-tile head forward (128 x 256, 3 stages).
    pub(crate) cuda_wide: Option<Cuda>,
    /// The same backend with grad_h at two blocks per SM on sm_90+ (`with_grad_h_two_blocks`).
    pub(crate) cuda_gh2: Option<Cuda>,
    /// The same backend on the ldmatrix + mma.sync kernels (`Cuda::with_mma`).
    pub(crate) cuda_mma: Option<Cuda>,
    /// ... and with the wide-tile head forward too.
    pub(crate) cuda_wide_mma: Option<Cuda>,
    /// The head forward on Hopper warpgroup MMAs (`Cuda::with_wgmma`; None
    /// off compute capability 9.0), 128 x 128 and 128 x 256 tiles.
    pub(crate) cuda_wgmma: Option<Cuda>,
    pub(crate) cuda_wide_wgmma: Option<Cuda>,
    /// wgmma for the kernels that have it (head forward, grad_h, the
    /// cross-entropy's logit kernels) and mma.sync for the other GEMMs.
    pub(crate) cuda_wgmma_mma: Option<Cuda>,
    /// ... with the grad_h in whole 64-column atoms (`with_wgmma_whole_atoms`).
    pub(crate) cuda_wgmma_whole: Option<Cuda>,
    /// The cuBLAS paths (`Cuda::with_cublas`; None if
    /// libcublas does not load), and the same with 128 MiB logit chunks.
    pub(crate) cuda_cublas: Option<Cuda>,
    pub(crate) cuda_cublas_big: Option<Cuda>,
    /// The default kernels with 128 MiB cross-entropy blocks: at the bench
    /// shapes one token block of all T rows (the backward's layout before
    /// token blocks), against the default 32 MiB (several blocks).
    pub(crate) cuda_big: Option<Cuda>,
    /// The same backend with deferred id errors (no host round trip in the embedding ops).
    pub(crate) cuda_defer: Option<Cuda>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) k: BenchKernels,
    pub(crate) blas: Result<Blas, String>,
    pub(crate) mem: MemMethod,
    pub(crate) info: Value,
}

impl Gpu {
    pub(crate) fn new(variants: Variants) -> Result<Self, tiedlora::Error> {
        let cuda = Cuda::new(0)?;
        let stream = cuda.stream().clone();
        let ctx = stream.context().clone();
        // SAFETY: this program issues all work on the one stream above (the
        // backend, cuBLAS, copies, frees), so cross-stream event tracking is not
        // needed; it is turned off before any buffer is allocated.
        unsafe { ctx.disable_event_tracking() };
        let err = |what: &str, e: &dyn std::fmt::Debug| tiedlora::Error::Backend(format!("{what}: {e:?}"));
        let cc = ctx.compute_capability().map_err(|e| err("compute capability", &e))?;
        let sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err("SM count", &e))?;
        let l2 = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).unwrap_or(0);
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let mut drv_version: i32 = 0;
        // SAFETY: out-parameter; the driver library is loaded (Cuda::new succeeded).
        let _ = unsafe { drv_sys::cuDriverGetVersion(&mut drv_version) };
        // SAFETY: the device handle of a live context.
        let total = unsafe { drv::device::total_mem(ctx.cu_device()) }.unwrap_or(0);
        let k = BenchKernels::load(&stream, cc, sms as u32).map_err(tiedlora::Error::Backend)?;
        let mem = MemMethod::new(&stream);
        let blas = Blas::new(&stream);
        let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
            .ok()
            .and_then(|v| v.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown (no /proc/driver/nvidia/version)".into());
        let info = json!({
            "name": name,
            "driver": driver,
            "compute_capability": format!("{}.{}", cc.0, cc.1),
            "driver_cuda_version": format!("{}.{}", drv_version / 1000, (drv_version % 1000) / 10),
            "multiprocessors": sms,
            "l2_bytes": l2,
            "memory_bytes": total,
            "async_alloc": ctx.has_async_alloc(),
        });
        // One more backend on the same stream, if its family was asked for.
        let more = |on: bool| -> Result<Option<Cuda>, tiedlora::Error> {
            if on {
                Cuda::with_stream(stream.clone()).map(Some)
            } else {
                Ok(None)
            }
        };
        let cuda_wide = more(variants.tiles)?.map(|c| c.with_wide_tiles(true));
        let cuda_gh2 = more(variants.tiles)?.map(|c| c.with_grad_h_two_blocks(true));
        let cuda_big = more(variants.tiles)?.map(|c| c.with_xent_chunk_bytes(128 << 20));
        let cuda_mma = more(variants.mma)?.map(|c| c.with_mma(true));
        let cuda_wide_mma = more(variants.mma)?.map(|c| c.with_mma(true).with_wide_tiles(true));
        let cuda_defer = more(variants.defer)?.map(|c| c.with_deferred_id_errors(true)).transpose()?;
        // wgmma: None off compute capability 9.0; cuBLAS: None if libcublas does not load.
        let wgmma = || more(variants.wgmma).map(|c| c.and_then(|c| c.with_wgmma(true).ok()));
        let cuda_wgmma = wgmma()?;
        let cuda_wide_wgmma = wgmma()?.map(|c| c.with_wide_tiles(true));
        // mma.sync for the GEMMs wgmma does not cover, unless that family is out.
        let cuda_wgmma_mma = wgmma()?.map(|c| c.with_mma(variants.mma));
        let cuda_wgmma_whole = wgmma()?.map(|c| c.with_mma(variants.mma).with_wgmma_whole_atoms(true));
        let cublas = || more(variants.cublas).map(|c| c.and_then(|c| c.with_cublas(true).ok()));
        let cuda_cublas = cublas()?;
        let cuda_cublas_big = cublas()?.map(|c| c.with_xent_chunk_bytes(128 << 20));
        Ok(Gpu {
            cuda,
            cuda_cublas,
            cuda_cublas_big,
            cuda_big,
            cuda_wide,
            cuda_gh2,
            cuda_mma,
            cuda_wide_mma,
            cuda_wgmma,
            cuda_wide_wgmma,
            cuda_wgmma_mma,
            cuda_wgmma_whole,
            cuda_defer,
            stream,
            k,
            blas,
            mem,
            info,
        })
    }

    pub(crate) fn sync(&self) -> Res<()> {
        self.stream.synchronize().ctx("synchronize")
    }

    pub(crate) fn blas(&self) -> Res<&Blas> {
        self.blas.as_ref().map_err(|e| format!("cuBLAS unavailable: {e}"))
    }

    /// An uninitialised buffer (stream-ordered, from the pool); callers write
    /// every element before reading it.
    pub(crate) fn alloc<T: DeviceRepr>(&self, n: usize) -> Res<CudaSlice<T>> {
        // SAFETY: uninitialised device memory is only ever written first by
        // the callers (a fill, a GEMM with beta = 0, a gather or a copy).
        unsafe { self.stream.alloc::<T>(n) }.ctx(&format!("allocating {n} elements"))
    }

    pub(crate) fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Res<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n).ctx(&format!("allocating {n} elements"))
    }

    pub(crate) fn fill_bf16(&self, out: &mut CudaSlice<bf16>, scale: f32, seed: u32) -> Res<()> {
        let n = out.len() as u64;
        let p = FillParams { out: addr(out, &self.stream), n, scale, offset: 0.0, seed, _pad: 0 };
        // SAFETY: `out` holds n bf16.
        unsafe { self.k.launch("tl_bench_fill_bf16", self.k.grid(n), &p) }
    }

    pub(crate) fn fill_f32(&self, out: &mut CudaSlice<f32>, scale: f32, seed: u32) -> Res<()> {
        let n = out.len() as u64;
        let p = FillParams { out: addr(out, &self.stream), n, scale, offset: 0.0, seed, _pad: 0 };
        // SAFETY: `out` holds n f32.
        unsafe { self.k.launch("tl_bench_fill_f32", self.k.grid(n), &p) }
    }

    pub(crate) fn cast_bf16(&self, x: &CudaSlice<f32>) -> Res<CudaSlice<bf16>> {
        let out = self.alloc::<bf16>(x.len())?;
        let n = x.len() as u64;
        let p = CastParams { x: addr(x, &self.stream), out: addr(&out, &self.stream), n };
        // SAFETY: x holds n f32, out n bf16.
        unsafe { self.k.launch("tl_bench_cast_f32_bf16", self.k.grid(n), &p)? };
        Ok(out)
    }

    /// `x = alpha·x + beta·y` (bf16, f32 math), in place.
    pub(crate) fn axpby_inplace(&self, x: &mut CudaSlice<bf16>, y: &CudaSlice<bf16>, alpha: f32, beta: f32) -> Res<()> {
        if y.len() < x.len() {
            return Err(format!("axpby: y has {} elements, x {}", y.len(), x.len()));
        }
        let n = x.len() as u64;
        let xa = addr(x, &self.stream);
        let p = AxpbyParams { x: xa, y: addr(y, &self.stream), out: xa, n, alpha, beta };
        // SAFETY: x (read and written in place, element by element) and y hold >= n bf16.
        unsafe { self.k.launch("tl_bench_axpby_bf16", self.k.grid(n.div_ceil(8)), &p) }
    }

    /// `out = beta·y` (bf16) into a new buffer.
    pub(crate) fn scaled(&self, y: &CudaSlice<bf16>, beta: f32) -> Res<CudaSlice<bf16>> {
        let out = self.alloc::<bf16>(y.len())?;
        let n = y.len() as u64;
        let p = AxpbyParams { x: 0, y: addr(y, &self.stream), out: addr(&out, &self.stream), n, alpha: 0.0, beta };
        // SAFETY: y and out hold n bf16; x is null (the kernel then reads only y).
        unsafe { self.k.launch("tl_bench_axpby_bf16", self.k.grid(n.div_ceil(8)), &p)? };
        Ok(out)
    }

    /// `out[t, :] = src[ids[t], :]` for bf16 rows of `ncols`.
    pub(crate) fn gather(&self, ids: &Ids, src: &CudaSlice<bf16>, ncols: usize, out: &mut CudaSlice<bf16>) -> Res<()> {
        let tokens = ids.buf.len();
        if src.len() < ids.vocab * ncols || out.len() < tokens * ncols {
            return Err("gather: buffer sizes do not match the ids".into());
        }
        let p = GatherParams {
            ids: addr(&ids.buf, &self.stream),
            src: addr(src, &self.stream),
            out: addr(out, &self.stream),
            tokens: tokens as i32,
            ncols: ncols as i32,
        };
        // SAFETY: every id is < ids.vocab (Ids invariant), src holds vocab rows
        // of ncols, out tokens rows of ncols (checked above).
        unsafe { self.k.launch("tl_bench_gather_rows_b16", self.k.grid((tokens * ncols) as u64), &p) }
    }

    /// `out[ids[t], :] += scale · src[t, :]` with float atomics.
    pub(crate) fn scatter_add(
        &self,
        ids: &Ids,
        src: &CudaSlice<f32>,
        ncols: usize,
        out: &mut CudaSlice<f32>,
        scale: f32,
    ) -> Res<()> {
        let tokens = ids.buf.len();
        if out.len() < ids.vocab * ncols || src.len() < tokens * ncols {
            return Err("scatter_add: buffer sizes do not match the ids".into());
        }
        let p = ScatterAddParams {
            ids: addr(&ids.buf, &self.stream),
            src: addr(src, &self.stream),
            out: addr(out, &self.stream),
            tokens: tokens as i32,
            ncols: ncols as i32,
            scale,
            _pad: 0,
        };
        // SAFETY: every id is < ids.vocab, out holds vocab rows of ncols, src tokens rows (checked above).
        unsafe { self.k.launch("tl_bench_scatter_add_f32", self.k.grid((tokens * ncols) as u64), &p) }
    }

    /// Cross-entropy over stored bf16 logits [T, V] (replaced by G in place);
    /// per-row losses (times `scale`) into `row_loss`.
    pub(crate) fn xent_rows(
        &self,
        logits: &mut CudaSlice<bf16>,
        ids: &Ids,
        row_loss: &mut CudaSlice<f32>,
        softcap: f32,
        scale: f32,
    ) -> Res<()> {
        let tokens = ids.buf.len();
        if logits.len() < tokens * ids.vocab || row_loss.len() < tokens {
            return Err("xent_rows: buffer sizes do not match the targets".into());
        }
        let p = XentRowsParams {
            logits: addr(logits, &self.stream),
            targets: addr(&ids.buf, &self.stream),
            row_loss: addr(row_loss, &self.stream),
            tokens: tokens as i32,
            vocab: ids.vocab as i32,
            softcap,
            scale,
        };
        let blocks = (tokens as u64).clamp(1, self.k.max_blocks) as u32;
        // SAFETY: logits hold tokens rows of vocab bf16, every target < vocab
        // (Ids invariant), row_loss tokens f32 (checked above).
        unsafe { self.k.launch("tl_bench_xent_rows_bf16", blocks, &p) }
    }

    /// `‖a − b‖ / ‖b‖` computed on the device (f64 partial sums).
    pub(crate) fn rel_norm<T: DeviceRepr + Element>(&self, a: &CudaSlice<T>, b: &CudaSlice<T>) -> Res<f64> {
        let n = a.len().min(b.len()) as u64;
        let kernel = match T::DTYPE {
            tiedlora::DType::F32 => "tl_bench_diff_norm_f32",
            tiedlora::DType::BF16 => "tl_bench_diff_norm_bf16",
            other => return Err(format!("rel_norm: no kernel for {other}")),
        };
        let blocks = self.k.grid(n);
        let partial = self.zeros::<f64>(2 * blocks as usize)?;
        let p = DiffNormParams {
            a: addr(a, &self.stream),
            b: addr(b, &self.stream),
            partial: addr(&partial, &self.stream),
            n,
        };
        // SAFETY: a and b hold >= n elements of the kernel's dtype; partial 2·blocks f64.
        unsafe { self.k.launch(kernel, blocks, &p)? };
        let host = self.stream.clone_dtoh(&partial).ctx("download partial sums")?;
        self.sync()?;
        let d2: f64 = host.iter().step_by(2).sum();
        let r2: f64 = host.iter().skip(1).step_by(2).sum();
        Ok(rel_from(d2, r2))
    }

    /// Median (and min, max) of `iters` calls of `f`, each between two CUDA
    /// events, after `warmup` untimed calls. `f(i)` gets the call's index
    /// (for rotating input copies).
    pub(crate) fn time(&self, warmup: usize, iters: usize, mut f: impl FnMut(usize) -> Res<()>) -> Res<Timing> {
        for i in 0..warmup {
            f(i)?;
        }
        let ctx = self.stream.context();
        let flags = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events: Vec<(CudaEvent, CudaEvent)> = (0..iters)
            .map(|_| Ok((ctx.new_event(flags).ctx("event")?, ctx.new_event(flags).ctx("event")?)))
            .collect::<Res<_>>()?;
        self.sync()?;
        for (i, (start, end)) in events.iter().enumerate() {
            start.record(&self.stream).ctx("record event")?;
            f(warmup + i)?;
            end.record(&self.stream).ctx("record event")?;
        }
        self.sync()?;
        let mut ms: Vec<f64> =
            events.iter().map(|(s, e)| s.elapsed_ms(e).map(f64::from).ctx("elapsed")).collect::<Res<_>>()?;
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 { ms[n / 2] } else { 0.5 * (ms[n / 2 - 1] + ms[n / 2]) };
        Ok(Timing { median_ms: median, min_ms: ms[0], max_ms: ms[n - 1], iters: n })
    }
}

fn rel_from(d2: f64, r2: f64) -> f64 {
    if r2 > 0.0 {
        (d2 / r2).sqrt()
    } else if d2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

pub(crate) fn rel_host(a: &[f64], b: &[f64]) -> f64 {
    let (mut d2, mut r2) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        d2 += (x - y) * (x - y);
        r2 += y * y;
    }
    if a.len() != b.len() {
        return f64::NAN;
    }
    rel_from(d2, r2)
}
