//! The ops on candle's CUDA device (features `candle` + `cuda`): candle's
//! `CudaStorage` is a cudarc slice of the same cudarc version, so the
//! kernels read W, U, Vh, ids and h in place and write into fresh slices on
//! candle's own stream (the `Cuda` backend of [`super::ops::Engine`] was made
//! with `CudaDevice::cuda_stream`): no host round trip, no copy of W.

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Layout, Result, Shape, Storage, Tensor, WithDType};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};

use super::ops::{with_float, with_ids, Ins, Kind, OpGrads, Params};
use super::{err, msg};
use crate::backend::{Backend, Grads, Weights};
use crate::cuda::Cuda;
use crate::dtype::Element;
use crate::{bf16, f16};

/// A CUDA storage and the layout to read it with.
pub(crate) type In<'a> = (&'a CudaStorage, &'a Layout);

/// The storage dtypes of W and h on the GPU.
trait Float: Element + WithDType + CudaDType + DeviceRepr + ValidAsZeroBits {}
impl Float for f32 {}
impl Float for f16 {}
impl Float for bf16 {}

pub(crate) fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => Err(msg(format!("`{what}` is not on the CUDA device like the op's other inputs"))),
    }
}

/// The contiguous elements of `x` as a view of `T`, or an `Err` naming `what`.
fn view<'a, T: WithDType + CudaDType>(x: In<'a>, what: &str) -> Result<CudaView<'a, T>> {
    if x.0.dtype() != <T as WithDType>::DTYPE {
        return Err(msg(format!("`{what}` is {:?}, expected {:?}", x.0.dtype(), <T as WithDType>::DTYPE)));
    }
    let (a, b) = x.1.contiguous_offsets().ok_or_else(|| msg(format!("`{what}` is not contiguous")))?;
    Ok(x.0.as_cuda_slice::<T>()?.slice(a..b))
}

fn gpu(p: &Params) -> Result<&Cuda> {
    p.engine.cuda.as_ref().ok_or_else(|| msg("the tied weight is not on a CUDA device"))
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(g: &Cuda, n: usize) -> Result<CudaSlice<T>> {
    g.stream().alloc_zeros::<T>(n).map_err(|e| msg(format!("CUDA allocation of {n} elements: {e}")))
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &candle_core::CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(st, shape, BackpropOp::none(), false)
}

pub(crate) fn forward(p: &Params, kind: &Kind, x: In, w: In, u: In, vh: In) -> Result<(CudaStorage, Shape)> {
    let shape = kind.out_shape(&p.cfg, x.1.dims())?;
    let n = shape.elem_count();
    let out = with_float!(w.0.dtype(), forward_t(p, kind, n, x, w, u, vh))?;
    Ok((out, shape))
}

fn forward_t<T: Float>(p: &Params, kind: &Kind, n: usize, x: In, w: In, u: In, vh: In) -> Result<CudaStorage> {
    let (g, cfg, dev) = (gpu(p)?, &p.cfg, &x.0.device);
    let weights = Weights::<Cuda, T> { w: view(w, "W")?, lora_vocab: view(u, "U")?, lora_hidden: view(vh, "Vh")? };
    match kind {
        Kind::Embed => {
            let mut out = alloc::<T>(g, n)?;
            with_ids!(view, x, "ids", |ids| g.embed_forward(cfg, &weights, ids, out.as_view_mut())).map_err(err)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        Kind::Logits => {
            let mut out = alloc::<T>(g, n)?;
            g.head_forward(cfg, &weights, view(x, "h")?, out.as_view_mut()).map_err(err)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        Kind::Loss { targets } => {
            let h = view::<T>(x, "h")?;
            let (ts, tl) = targets.storage_and_layout();
            let t = (cuda_storage(&ts, "targets")?, tl);
            let mut out = alloc::<f32>(g, n)?;
            {
                let (loss, lse) = out.split_at_mut(1);
                with_ids!(view, t, "targets", |tg| g.head_xent_forward(cfg, &weights, h, tg, loss, lse))
                    .map_err(err)?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }
}

pub(crate) fn backward(
    p: &Params,
    kind: &Kind,
    x: &Tensor,
    dev: &candle_core::CudaDevice,
    ins: &Ins<CudaStorage>,
    want_dw: bool,
) -> Result<OpGrads> {
    let (v, d, r) = (p.cfg.vocab(), p.cfg.hidden(), p.cfg.rank());
    let (dx, du, dvh, dw) = with_float!(p.w.dtype(), backward_t(p, kind, ins, want_dw))?;
    Ok(OpGrads {
        dx: dx.map(|s| Tensor::from_storage(Storage::Cuda(s), x.shape(), BackpropOp::none(), false)),
        du: wrap(du, dev, (v, r)),
        dvh: wrap(dvh, dev, (r, d)),
        dw: dw.map(|g| wrap(g, dev, (v, d)).to_dtype(p.w.dtype())).transpose()?,
    })
}

type DeviceGrads = (Option<CudaStorage>, CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>);

fn backward_t<T: Float>(p: &Params, kind: &Kind, a: &Ins<CudaStorage>, want_dw: bool) -> Result<DeviceGrads> {
    let (g, cfg, dev) = (gpu(p)?, &p.cfg, &a.x.0.device);
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let weights =
        Weights::<Cuda, T> { w: view(a.w, "W")?, lora_vocab: view(a.u, "U")?, lora_hidden: view(a.vh, "Vh")? };
    let (mut du, mut dvh) = (alloc::<f32>(g, v * r)?, alloc::<f32>(g, r * d)?);
    let mut dw = if want_dw { Some(alloc::<f32>(g, v * d)?) } else { None };
    let dx = {
        let mut grads = Grads::<Cuda> {
            lora_vocab: du.as_view_mut(),
            lora_hidden: dvh.as_view_mut(),
            w: dw.as_mut().map(|s| s.as_view_mut()),
        };
        match kind {
            Kind::Embed => {
                let de = view::<T>(a.grad, "the embedding's gradient")?;
                with_ids!(view, a.x, "ids", |ids| g.embed_backward(cfg, &weights, ids, de, &mut grads)).map_err(err)?;
                None
            }
            Kind::Logits => {
                let h = view::<T>(a.x, "h")?;
                let mut dh = alloc::<T>(g, h.len())?;
                let gl = view::<T>(a.grad, "the logits' gradient")?;
                g.head_backward(cfg, &weights, h, gl, dh.as_view_mut(), &mut grads).map_err(err)?;
                Some(CudaStorage::wrap_cuda_slice(dh, dev.clone()))
            }
            Kind::Loss { targets } => {
                let h = view::<T>(a.x, "h")?;
                let res = view::<f32>(a.res, "the loss op's result")?;
                let lse = res.slice(1..);
                let (ts, tl) = targets.storage_and_layout();
                let t = (cuda_storage(&ts, "targets")?, tl);
                let mut dh = alloc::<T>(g, h.len())?;
                with_ids!(view, t, "targets", |tg| g.head_xent_backward(
                    cfg,
                    &weights,
                    h,
                    tg,
                    lse,
                    a.grad_loss,
                    dh.as_view_mut(),
                    &mut grads
                ))
                .map_err(err)?;
                Some(CudaStorage::wrap_cuda_slice(dh, dev.clone()))
            }
        }
    };
    Ok((dx, du, dvh, dw))
}
