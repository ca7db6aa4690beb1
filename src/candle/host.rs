//! The ops on candle's CPU device: candle's `CpuStorage` read in place as
//! slices, the work done by [`crate::Cpu`].

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor, WithDType};

use super::ops::{with_float, with_ids, Ins, Kind, OpGrads, Params};
use super::{err, msg};
use crate::backend::{Backend, Grads, Weights};
use crate::cpu::Cpu;
use crate::dtype::Element;

/// A CPU storage and the layout to read it with.
pub(crate) type In<'a> = (&'a CpuStorage, &'a Layout);

pub(crate) fn cpu_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => Err(msg(format!("`{what}` is not on the CPU device like the op's other inputs"))),
    }
}

/// The contiguous elements of `x` as `T`, or an `Err` naming `what`.
fn slice<'a, T: WithDType>(x: In<'a>, what: &str) -> Result<&'a [T]> {
    if x.0.dtype() != <T as WithDType>::DTYPE {
        return Err(msg(format!("`{what}` is {:?}, expected {:?}", x.0.dtype(), <T as WithDType>::DTYPE)));
    }
    let (a, b) = x.1.contiguous_offsets().ok_or_else(|| msg(format!("`{what}` is not contiguous")))?;
    Ok(&x.0.as_slice::<T>()?[a..b])
}

pub(crate) fn forward(p: &Params, kind: &Kind, x: In, w: In, u: In, vh: In) -> Result<(CpuStorage, Shape)> {
    let shape = kind.out_shape(&p.cfg, x.1.dims())?;
    let n = shape.elem_count();
    let out = with_float!(w.0.dtype(), forward_t(p, kind, n, x, w, u, vh))?;
    Ok((out, shape))
}

fn forward_t<T: Element + WithDType>(
    p: &Params,
    kind: &Kind,
    n: usize,
    x: In,
    w: In,
    u: In,
    vh: In,
) -> Result<CpuStorage> {
    let (cpu, cfg) = (&p.engine.cpu, &p.cfg);
    let weights = Weights::<Cpu, T>::host(slice(w, "W")?, slice(u, "U")?, slice(vh, "Vh")?);
    // Poisoned: the backends write every element.
    let poison = || vec![<T as Element>::from_f64(f64::NAN); n];
    match kind {
        Kind::Embed => {
            let mut out = poison();
            with_ids!(slice, x, "ids", |ids| cpu.embed_forward(cfg, &weights, ids, &mut out)).map_err(err)?;
            Ok(T::to_cpu_storage_owned(out))
        }
        Kind::Logits => {
            let mut out = poison();
            cpu.head_forward(cfg, &weights, slice(x, "h")?, &mut out).map_err(err)?;
            Ok(T::to_cpu_storage_owned(out))
        }
        Kind::Loss { targets } => {
            let h = slice::<T>(x, "h")?;
            let (ts, tl) = targets.storage_and_layout();
            let t = (cpu_storage(&ts, "targets")?, tl);
            let mut out = vec![f32::NAN; n];
            let (loss, lse) = out.split_at_mut(1);
            with_ids!(slice, t, "targets", |tg| cpu.head_xent_forward(cfg, &weights, h, tg, loss, lse)).map_err(err)?;
            Ok(f32::to_cpu_storage_owned(out))
        }
    }
}

pub(crate) fn backward(p: &Params, kind: &Kind, x: &Tensor, ins: &Ins<CpuStorage>, want_dw: bool) -> Result<OpGrads> {
    let (dx, du, dvh, dw) = with_float!(p.w.dtype(), backward_t(p, kind, ins, want_dw))?;
    let (v, d, r) = (p.cfg.vocab(), p.cfg.hidden(), p.cfg.rank());
    let dev = Device::Cpu;
    Ok(OpGrads {
        dx: dx.map(|s| Tensor::from_storage(Storage::Cpu(s), x.shape(), BackpropOp::none(), false)),
        du: Tensor::from_vec(du, (v, r), &dev)?,
        dvh: Tensor::from_vec(dvh, (r, d), &dev)?,
        dw: dw.map(|g| Tensor::from_vec(g, (v, d), &dev)?.to_dtype(p.w.dtype())).transpose()?,
    })
}

type HostGradsOut = (Option<CpuStorage>, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

fn backward_t<T: Element + WithDType>(
    p: &Params,
    kind: &Kind,
    a: &Ins<CpuStorage>,
    want_dw: bool,
) -> Result<HostGradsOut> {
    let (cpu, cfg) = (&p.engine.cpu, &p.cfg);
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let weights = Weights::<Cpu, T>::host(slice(a.w, "W")?, slice(a.u, "U")?, slice(a.vh, "Vh")?);
    let (mut du, mut dvh) = (vec![0f32; v * r], vec![0f32; r * d]);
    let mut dw = want_dw.then(|| vec![0f32; v * d]);
    let mut grads = Grads::host(&mut du, &mut dvh, dw.as_deref_mut());
    let dx = match kind {
        Kind::Embed => {
            let de = slice::<T>(a.grad, "the embedding's gradient")?;
            with_ids!(slice, a.x, "ids", |ids| cpu.embed_backward(cfg, &weights, ids, de, &mut grads)).map_err(err)?;
            None
        }
        Kind::Logits => {
            let h = slice::<T>(a.x, "h")?;
            let mut dh = vec![<T as Element>::from_f64(f64::NAN); h.len()];
            let g = slice::<T>(a.grad, "the logits' gradient")?;
            cpu.head_backward(cfg, &weights, h, g, &mut dh, &mut grads).map_err(err)?;
            Some(T::to_cpu_storage_owned(dh))
        }
        Kind::Loss { targets } => {
            let h = slice::<T>(a.x, "h")?;
            let res = slice::<f32>(a.res, "the loss op's result")?;
            let (ts, tl) = targets.storage_and_layout();
            let t = (cpu_storage(&ts, "targets")?, tl);
            let mut dh = vec![<T as Element>::from_f64(f64::NAN); h.len()];
            with_ids!(slice, t, "targets", |tg| cpu.head_xent_backward(
                cfg,
                &weights,
                h,
                tg,
                &res[1..],
                a.grad_loss,
                &mut dh,
                &mut grads
            ))
            .map_err(err)?;
            Some(T::to_cpu_storage_owned(dh))
        }
    };
    Ok((dx, du, dvh, dw))
}
