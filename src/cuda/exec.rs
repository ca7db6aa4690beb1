//! [`CudaExec`]: the [`Executor`] of one CUDA stream. Kernels come from the
//! modules embedded at build time (cubin for the device's architecture when
//! one was built, else the compute_80 PTX, JIT-compiled by the driver).

#[cfg(feature = "experimental-kernels")]
use super::blas::Cublas;
use crate::error::{Error, Result};
#[cfg(feature = "experimental-kernels")]
use crate::kernels::dense::DenseGemm;
use crate::kernels::exec::{Executor, KernelOptions};
use crate::kernels::params::KernelParams;
use crate::kernels::plan::LaunchPlan;
use crate::kernels::scratch_meter::ScratchMeter;
use crate::kernels::{module_of, EmbeddedModule};
use cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

/// Dynamic shared memory a block may use without an opt-in attribute.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

pub(crate) fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("{what}: {e:?}"))
}

/// Loaded modules and resolved kernels of one context. Holds the context so
/// that it outlives the modules (unloading needs it current and alive).
pub(crate) struct KernelCache {
    ctx: Arc<CudaContext>,
    cc: (i32, i32),
    modules: Mutex<HashMap<&'static str, sys::CUmodule>>,
    functions: Mutex<HashMap<&'static str, sys::CUfunction>>,
    allowed: Mutex<HashMap<&'static str, u32>>,
}

// SAFETY: CUmodule / CUfunction are driver handles usable from any thread
// once the owning context is current; all access goes through the mutexes.
unsafe impl Send for KernelCache {}
// SAFETY: as above.
unsafe impl Sync for KernelCache {}

impl KernelCache {
    pub(crate) fn new(ctx: Arc<CudaContext>, cc: (i32, i32)) -> Self {
        KernelCache {
            ctx,
            cc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            allowed: Mutex::new(HashMap::new()),
        }
    }

    /// The device's compute capability (major, minor).
    #[cfg_attr(not(feature = "experimental-kernels"), allow(dead_code))]
    pub(crate) fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    fn load(&self, m: &'static EmbeddedModule) -> Result<sys::CUmodule> {
        let mut modules = self.modules.lock().map_err(|_| Error::Backend("kernel cache poisoned".into()))?;
        if let Some(&h) = modules.get(m.name) {
            return Ok(h);
        }
        let handle = match m.cubin_for(self.cc.0 as u32, self.cc.1 as u32) {
            // SAFETY: an ELF cubin embedded at build time, 64-byte aligned, alive for 'static.
            Some(cubin) => unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) },
            None => {
                let ptx = CString::new(m.ptx).map_err(|_| Error::Backend(format!("PTX of {} has a NUL", m.name)))?;
                // SAFETY: a NUL-terminated PTX string, alive for the call.
                unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
            }
        }
        .map_err(|e| driver_err(&format!("loading kernels/{}.cu for sm_{}{}", m.name, self.cc.0, self.cc.1), e))?;
        modules.insert(m.name, handle);
        Ok(handle)
    }

    /// Opts `f` in to `bytes` of dynamic shared memory (above the 48 KiB default).
    fn allow_shared(&self, kernel: &'static str, f: sys::CUfunction, bytes: u32) -> Result<()> {
        let mut allowed = self.allowed.lock().map_err(|_| Error::Backend("kernel cache poisoned".into()))?;
        if allowed.get(kernel).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        // SAFETY: `f` was resolved from a module this cache keeps loaded.
        unsafe {
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| driver_err(&format!("{kernel}: {bytes} B of dynamic shared memory"), e))?;
        allowed.insert(kernel, bytes);
        Ok(())
    }

    pub(crate) fn function(&self, kernel: &'static str) -> Result<sys::CUfunction> {
        if let Some(&f) = self.functions.lock().map_err(|_| Error::Backend("kernel cache poisoned".into()))?.get(kernel)
        {
            return Ok(f);
        }
        let m = module_of(kernel)
            .ok_or_else(|| Error::Backend(format!("kernel {kernel} is not in the embedded modules")))?;
        let module = self.load(m)?;
        let name = CString::new(kernel).map_err(|_| Error::Backend(format!("bad kernel name {kernel}")))?;
        // SAFETY: `module` was loaded above and is never unloaded while the cache lives.
        let f = unsafe { result::module::get_function(module, name) }.map_err(|e| driver_err(kernel, e))?;
        self.functions.lock().map_err(|_| Error::Backend("kernel cache poisoned".into()))?.insert(kernel, f);
        Ok(f)
    }
}

impl Drop for KernelCache {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        if let Ok(modules) = self.modules.lock() {
            for &m in modules.values() {
                // SAFETY: each module was loaded once by this cache; functions
                // resolved from it are dropped with the cache.
                let _ = unsafe { result::module::unload(m) };
            }
        }
    }
}

/// Launches on one stream, scratch from that stream's allocator.
pub(crate) struct CudaExec<'a> {
    pub(crate) stream: &'a Arc<CudaStream>,
    pub(crate) cache: &'a KernelCache,
    pub(crate) sms: u32,
    pub(crate) options: KernelOptions,
    /// Scratch counters ([`super::Cuda::scratch_peak_bytes`]).
    pub(crate) meter: &'a ScratchMeter,
    /// Device address of the deferred id-error record, if enabled.
    pub(crate) deferred_id_record: Option<u64>,
    /// cuBLAS on this stream, with `options.cublas`.
    #[cfg(feature = "experimental-kernels")]
    pub(crate) cublas: Option<&'a Cublas>,
}

/// Device scratch of one op, counted on the backend's meter until dropped
/// (the free is stream-ordered, like the allocation: the counts follow the
/// stream's own order of allocations and frees).
pub(crate) struct CudaScratch<'a> {
    buf: CudaSlice<u8>,
    meter: &'a ScratchMeter,
}

impl Drop for CudaScratch<'_> {
    fn drop(&mut self) {
        self.meter.free(self.buf.len());
    }
}

impl<'a> CudaExec<'a> {
    fn counted(&self, buf: CudaSlice<u8>) -> CudaScratch<'a> {
        self.meter.alloc(buf.len());
        CudaScratch { buf, meter: self.meter }
    }
}

impl<'a> Executor for CudaExec<'a> {
    type Scratch = CudaScratch<'a>;

    fn scratch(&self, bytes: usize) -> Result<CudaScratch<'a>> {
        // Device allocations are 256-byte aligned.
        let buf = self.stream.alloc_zeros::<u8>(bytes.max(16)).map_err(|e| driver_err("scratch allocation", e))?;
        Ok(self.counted(buf))
    }
    fn scratch_uninit(&self, bytes: usize) -> Result<CudaScratch<'a>> {
        // SAFETY: u8 has no invalid bit patterns, and the ops that ask for an
        // uninitialized scratch write every byte they read first (the host
        // executor poisons these buffers, so the CPU tests check that).
        let buf = unsafe { self.stream.alloc::<u8>(bytes.max(16)) }.map_err(|e| driver_err("scratch allocation", e))?;
        Ok(self.counted(buf))
    }
    fn addr(&self, s: &CudaScratch<'a>) -> u64 {
        let (ptr, _sync) = s.buf.device_ptr(self.stream);
        ptr
    }
    fn download(&self, s: &CudaScratch<'a>, out: &mut [u8]) -> Result<()> {
        self.stream.memcpy_dtoh(&s.buf.slice(..out.len()), out).map_err(|e| driver_err("download", e))?;
        self.stream.synchronize().map_err(|e| driver_err("synchronize", e))
    }
    fn read_at(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("synchronize", e))?;
        self.stream.context().bind_to_thread().map_err(|e| driver_err("bind context", e))?;
        // SAFETY: `addr` lies inside a caller buffer with out.len() readable
        // bytes (checked by the caller); the stream has finished all work.
        unsafe { result::memcpy_dtoh_sync(out, addr) }.map_err(|e| driver_err("read", e))
    }
    fn multiprocessors(&self) -> u32 {
        self.sms
    }
    fn options(&self) -> KernelOptions {
        self.options
    }
    fn deferred_id_record(&self) -> Option<u64> {
        self.deferred_id_record
    }
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan, params: &P) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| driver_err("bind context", e))?;
        let f = self.cache.function(plan.kernel)?;
        if plan.shared_bytes > DEFAULT_SHARED_LIMIT {
            self.cache.allow_shared(plan.kernel, f, plan.shared_bytes)?;
        }
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: the kernel takes exactly one argument, a `P` by value
        // (kernels/common.cuh); cuLaunchKernel copies it before returning.
        // The caller guarantees every address in `params` is valid for the
        // kernel (Executor::launch contract).
        unsafe {
            result::launch_kernel(f, plan.grid, plan.block, plan.shared_bytes, self.stream.cu_stream(), &mut args)
        }
        .map_err(|e| driver_err(&format!("launch {plan}"), e))
    }
    #[cfg(feature = "experimental-kernels")]
    unsafe fn gemm(&self, g: &DenseGemm) -> Result<()> {
        let engine = self.cublas.ok_or_else(|| Error::Backend("a cuBLAS call without cuBLAS loaded".into()))?;
        self.stream.context().bind_to_thread().map_err(|e| driver_err("bind context", e))?;
        // SAFETY: the caller's guarantees (Executor::gemm); the handle is
        // bound to this stream, so the GEMM is ordered after every launch.
        unsafe { engine.run(g) }
    }
}
