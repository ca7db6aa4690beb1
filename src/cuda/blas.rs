//! [`Cublas`]: the cuBLAS handle of the cuBLAS path ([`super::Cuda::with_cublas`]),
//! running the ops' [`DenseGemm`]s on the backend's stream.

use super::exec::driver_err;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::dense::DenseGemm;
use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

/// cuBLAS workspace: what cuBLAS asks for on Hopper (32 MiB), allocated once.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to one stream, with its workspace.
pub(crate) struct Cublas {
    // Dropped before the workspace it points at.
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

impl std::fmt::Debug for Cublas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cublas(cuBLAS)")
    }
}

fn data_type(t: DType) -> sys::cudaDataType {
    match t {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

impl Cublas {
    /// A handle on `stream`; an `Err` (never a panic) without libcublas.
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // CudaBlas::new panics without libcublas.
        if !super::libs::cublas_present() {
            return Err(Error::BackendUnavailable(
                "cuBLAS (libcublas.so.13) not found: put the CUDA toolkit's lib64, or pip's \
                 nvidia/cu13/lib, on LD_LIBRARY_PATH to use `Cuda::with_cublas`"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| driver_err("cublasCreate", e))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| driver_err("cuBLAS workspace", e))?;
        let ws = {
            let (ptr, _sync) = workspace.device_ptr(stream);
            ptr
        };
        // SAFETY: `workspace` is a live device allocation of WORKSPACE_BYTES
        // that outlives the handle (field order); both use `stream`.
        unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| driver_err("cublasSetWorkspace", e))?;
        Ok(Cublas { blas, _workspace: workspace })
    }

    /// Enqueues `g` (row-major, f32 compute) on the handle's stream, as the
    /// column-major call [`DenseGemm::col_major`] (the same value the CPU
    /// shim's `host_gemm` executes), after cuBLAS's argument rules.
    ///
    /// # Safety
    /// As [`crate::kernels::exec::Executor::gemm`].
    pub(crate) unsafe fn run(&self, g: &DenseGemm) -> Result<()> {
        let cm = g.col_major();
        cm.check()?;
        // `check` bounded every size by i32::MAX.
        let int = |v: usize| v as i32;
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        // SAFETY: the caller guarantees A, B and C hold the matrices `g`
        // describes for the GEMM's lifetime on this stream; alpha and beta
        // are host f32 values (host pointer mode, f32 compute), read before
        // the call returns.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(cm.trans_a),
                op(cm.trans_b),
                int(cm.m),
                int(cm.n),
                int(cm.k),
                &cm.alpha as *const f32 as *const c_void,
                cm.a.0 as *const c_void,
                data_type(cm.ab),
                int(cm.a.1),
                cm.b.0 as *const c_void,
                data_type(cm.ab),
                int(cm.b.1),
                &cm.beta as *const f32 as *const c_void,
                cm.c.0 as *mut c_void,
                data_type(cm.c_type),
                int(cm.c.1),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| driver_err(&format!("cublasGemmEx {}x{}x{}", g.m, g.n, g.k), e))
    }
}
