//! The unfused paths a PEFT user runs (cuBLAS GEMMs with separate passes
//! over [T, V]) and cuBLAS's base GEMMs alone: the references of every row.

use super::*;

/// (a) head forward as PEFT runs it: logits = h·Wᵀ; a = h·Vhᵀ; lora = a·Uᵀ
/// (separate [T, V]); logits += s·lora.
pub(crate) fn unfused_head_forward(gpu: &Gpu, m: &Model, h: &CudaSlice<bf16>, logits: &mut CudaSlice<bf16>) -> Res<()> {
    let (t, v, d, r) = m.dims();
    let blas = gpu.blas()?;
    blas.gemm((t, v, d), nt(h), tr(&m.w), Out::Bf16(logits), 1.0, 0.0)?;
    let mut a = gpu.alloc::<bf16>(t * r)?;
    blas.gemm((t, r, d), nt(h), tr(&m.vh_b), Out::Bf16(&mut a), 1.0, 0.0)?;
    let mut lora = gpu.alloc::<bf16>(t * v)?;
    blas.gemm((t, v, r), nt(&a), tr(&m.u_b), Out::Bf16(&mut lora), 1.0, 0.0)?;
    gpu.axpby_inplace(logits, &lora, 1.0, m.s)
}

/// (b) the base GEMM alone.
pub(crate) fn cublas_base_gemm(gpu: &Gpu, m: &Model, h: &CudaSlice<bf16>, logits: &mut CudaSlice<bf16>) -> Res<()> {
    let (t, v, d, _) = m.dims();
    gpu.blas()?.gemm((t, v, d), nt(h), tr(&m.w), Out::Bf16(logits), 1.0, 0.0)
}

/// Head backward as PEFT autograd runs it (LoRA mode).
pub(crate) fn unfused_head_backward(
    gpu: &Gpu,
    m: &Model,
    h: &CudaSlice<bf16>,
    g: &CudaSlice<bf16>,
    dh: &mut CudaSlice<bf16>,
    du: &mut CudaSlice<f32>,
    dvh: &mut CudaSlice<f32>,
) -> Res<()> {
    let (t, v, d, r) = m.dims();
    let blas = gpu.blas()?;
    blas.gemm((t, d, v), nt(g), nt(&m.w), Out::Bf16(dh), 1.0, 0.0)?;
    let gs = gpu.scaled(g, m.s)?;
    let mut a = gpu.alloc::<bf16>(t * r)?;
    blas.gemm((t, r, d), nt(h), tr(&m.vh_b), Out::Bf16(&mut a), 1.0, 0.0)?;
    blas.gemm((v, r, t), tr(&gs), nt(&a), Out::F32(du), 1.0, 1.0)?;
    let mut ga = gpu.alloc::<bf16>(t * r)?;
    blas.gemm((t, r, v), nt(&gs), nt(&m.u_b), Out::Bf16(&mut ga), 1.0, 0.0)?;
    drop(gs);
    blas.gemm((r, d, t), tr(&ga), nt(h), Out::F32(dvh), 1.0, 1.0)?;
    blas.gemm((t, d, r), nt(&ga), nt(&m.vh_b), Out::Bf16(dh), 1.0, 1.0)
}

/// cuBLAS dh = G·W alone (the backward's compute-bound core).
pub(crate) fn cublas_grad_h_gemm(gpu: &Gpu, m: &Model, g: &CudaSlice<bf16>, dh: &mut CudaSlice<bf16>) -> Res<()> {
    let (t, v, d, _) = m.dims();
    gpu.blas()?.gemm((t, d, v), nt(g), nt(&m.w), Out::Bf16(dh), 1.0, 0.0)
}

/// Embedding forward, unfused: e = W[ids]; a = U[ids]; e = c·(e + s·a·Vh).
pub(crate) fn unfused_embed_forward(gpu: &Gpu, m: &Model, ids: &Ids, out: &mut CudaSlice<bf16>) -> Res<()> {
    let (t, _, d, r) = m.dims();
    gpu.gather(ids, &m.w, d, out)?;
    let mut a = gpu.alloc::<bf16>(t * r)?;
    gpu.gather(ids, &m.u_b, r, &mut a)?;
    let mut delta = gpu.alloc::<bf16>(t * d)?;
    gpu.blas()?.gemm((t, d, r), nt(&a), nt(&m.vh_b), Out::Bf16(&mut delta), 1.0, 0.0)?;
    gpu.axpby_inplace(out, &delta, m.c, m.c * m.s)
}

/// Embedding backward, unfused: dEs = c·s·dE; a = U[ids]; dVh += aᵀ·dEs;
/// dA = dEs·Vhᵀ (f32); dU[ids] += dA (atomics).
pub(crate) fn unfused_embed_backward(
    gpu: &Gpu,
    m: &Model,
    ids: &Ids,
    de: &CudaSlice<bf16>,
    du: &mut CudaSlice<f32>,
    dvh: &mut CudaSlice<f32>,
) -> Res<()> {
    let (t, _, d, r) = m.dims();
    let blas = gpu.blas()?;
    let des = gpu.scaled(de, m.c * m.s)?;
    let mut a = gpu.alloc::<bf16>(t * r)?;
    gpu.gather(ids, &m.u_b, r, &mut a)?;
    blas.gemm((r, d, t), tr(&a), nt(&des), Out::F32(dvh), 1.0, 1.0)?;
    let mut da = gpu.alloc::<f32>(t * r)?;
    blas.gemm((t, r, d), nt(&des), tr(&m.vh_b), Out::F32(&mut da), 1.0, 0.0)?;
    gpu.scatter_add(ids, &da, r, du, 1.0)
}
