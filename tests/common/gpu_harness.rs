//! [`Harness`] for the CUDA backend: uploads the host inputs, poisons the
//! device outputs with NaN, runs the op, downloads the results.
#![cfg(feature = "cuda")]

use super::harness::{nan, Harness, HostGrads, HostWeights};
use bytemuck::Pod;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use std::marker::PhantomData;
use tiedlora::cuda::Cuda;
use tiedlora::{Backend, DType, Element, Error, Grads, LoraConfig, Result, Weights};

/// A device copy of a host slice of any plain-old-data type, held as bytes.
struct Dev<T> {
    bytes: CudaSlice<u8>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Dev<T> {
    fn view(&self) -> CudaView<'_, T> {
        // SAFETY: the bytes were copied from a `[T]` of this length, T is Pod
        // (every bit pattern valid) and device allocations are 256-byte aligned.
        unsafe { self.bytes.transmute::<T>(self.len) }.expect("length fits")
    }
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        // SAFETY: as in `view`.
        unsafe { self.bytes.transmute_mut::<T>(self.len) }.expect("length fits")
    }
    fn len(&self) -> usize {
        self.len
    }
}

fn up<T: Pod>(gpu: &Cuda, v: &[T]) -> Result<Dev<T>> {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let bytes = if bytes.is_empty() { &[0u8][..] } else { bytes };
    let buf = gpu.stream().clone_htod(bytes).map_err(|e| Error::Backend(format!("{e:?}")))?;
    Ok(Dev { bytes: buf, len: v.len(), _t: PhantomData })
}
use up as up_any;

fn down<T: Pod>(gpu: &Cuda, s: &Dev<T>) -> Result<Vec<T>> {
    let bytes = gpu.stream().clone_dtoh(&s.bytes).map_err(|e| Error::Backend(format!("{e:?}")))?;
    Ok(bytemuck::pod_collect_to_vec(&bytes[..s.len * std::mem::size_of::<T>()]))
}

struct DevGrads {
    u: Dev<f32>,
    vh: Dev<f32>,
    w: Option<Dev<f32>>,
}

impl DevGrads {
    fn up(gpu: &Cuda, g: &HostGrads) -> Result<Self> {
        Ok(DevGrads {
            u: up_any(gpu, &g.lora_vocab)?,
            vh: up_any(gpu, &g.lora_hidden)?,
            w: g.w.as_ref().map(|w| up_any(gpu, w)).transpose()?,
        })
    }
    fn grads(&mut self) -> Grads<'_, Cuda> {
        Grads {
            lora_vocab: self.u.view_mut(),
            lora_hidden: self.vh.view_mut(),
            w: self.w.as_mut().map(|w| w.view_mut()),
        }
    }
    fn down(&self, gpu: &Cuda, g: &mut HostGrads) -> Result<()> {
        g.lora_vocab = down(gpu, &self.u)?;
        g.lora_hidden = down(gpu, &self.vh)?;
        if let (Some(dw), Some(hw)) = (&self.w, g.w.as_mut()) {
            *hw = down(gpu, dw)?;
        }
        Ok(())
    }
}

struct DevWeights<T> {
    w: Dev<T>,
    u: Dev<f32>,
    vh: Dev<f32>,
}

impl<T: Element> DevWeights<T> {
    fn up(gpu: &Cuda, wt: HostWeights<T>) -> Result<Self> {
        Ok(DevWeights { w: up(gpu, wt.w)?, u: up_any(gpu, wt.u)?, vh: up_any(gpu, wt.vh)? })
    }
    fn weights(&self) -> Weights<'_, Cuda, T> {
        Weights { w: self.w.view(), lora_vocab: self.u.view(), lora_hidden: self.vh.view() }
    }
}

impl Harness for Cuda {
    fn name(&self) -> String {
        Backend::name(self).into()
    }
    fn tolerance(&self, storage: DType, _out: DType) -> f64 {
        storage.tolerance()
    }
    fn supports(&self, op: &str) -> bool {
        super::harness::kernel_ops(op)
    }
    fn embed_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, ids: &[i64]) -> Result<Vec<T>> {
        let dw = DevWeights::up(self, wt)?;
        let ids = up_any(self, ids)?;
        let mut out = up(self, &nan::<T>(ids.len() * cfg.hidden()))?;
        Backend::embed_forward(self, cfg, &dw.weights(), ids.view(), out.view_mut())?;
        down(self, &out)
    }
    fn embed_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        ids: &[i64],
        d_embed: &[G],
        g: &mut HostGrads,
    ) -> Result<()> {
        let dw = DevWeights::up(self, wt)?;
        let ids = up_any(self, ids)?;
        let de = up(self, d_embed)?;
        let mut dg = DevGrads::up(self, g)?;
        Backend::embed_backward(self, cfg, &dw.weights(), ids.view(), de.view(), &mut dg.grads())?;
        dg.down(self, g)
    }
    fn head_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, h: &[T]) -> Result<Vec<T>> {
        let dw = DevWeights::up(self, wt)?;
        let hd = up(self, h)?;
        let mut out = up(self, &nan::<T>(h.len() / cfg.hidden() * cfg.vocab()))?;
        Backend::head_forward(self, cfg, &dw.weights(), hd.view(), out.view_mut())?;
        down(self, &out)
    }
    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        d_logits: &[G],
        g: &mut HostGrads,
    ) -> Result<Vec<T>> {
        let dw = DevWeights::up(self, wt)?;
        let hd = up(self, h)?;
        let gd = up(self, d_logits)?;
        let mut dh = up(self, &nan::<T>(h.len()))?;
        let mut dg = DevGrads::up(self, g)?;
        Backend::head_backward(self, cfg, &dw.weights(), hd.view(), gd.view(), dh.view_mut(), &mut dg.grads())?;
        dg.down(self, g)?;
        down(self, &dh)
    }
    fn xent_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        targets: &[i64],
    ) -> Result<(f32, Vec<f32>)> {
        let dw = DevWeights::up(self, wt)?;
        let hd = up(self, h)?;
        let td = up_any(self, targets)?;
        let mut loss = up(self, &[f32::NAN])?;
        let mut lse = up(self, &nan::<f32>(targets.len()))?;
        Backend::head_xent_forward(self, cfg, &dw.weights(), hd.view(), td.view(), loss.view_mut(), lse.view_mut())?;
        Ok((down(self, &loss)?[0], down(self, &lse)?))
    }
    fn xent_backward<T: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        targets: &[i64],
        lse: &[f32],
        grad_loss: f32,
        g: &mut HostGrads,
    ) -> Result<Vec<T>> {
        let dw = DevWeights::up(self, wt)?;
        let hd = up(self, h)?;
        let td = up_any(self, targets)?;
        let ld = up(self, lse)?;
        let mut dh = up(self, &nan::<T>(h.len()))?;
        let mut dg = DevGrads::up(self, g)?;
        Backend::head_xent_backward(
            self,
            cfg,
            &dw.weights(),
            hd.view(),
            td.view(),
            ld.view(),
            grad_loss,
            dh.view_mut(),
            &mut dg.grads(),
        )?;
        dg.down(self, g)?;
        down(self, &dh)
    }
    fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32], sign: f64) -> Result<()> {
        let mut wd = up(self, w)?;
        let ud = up_any(self, u)?;
        let vd = up_any(self, vh)?;
        if sign > 0.0 {
            Backend::merge(self, cfg, wd.view_mut(), ud.view(), vd.view())?;
        } else {
            Backend::unmerge(self, cfg, wd.view_mut(), ud.view(), vd.view())?;
        }
        w.copy_from_slice(&down(self, &wd)?);
        Ok(())
    }
}

/// `embed_forward` with u32 ids (the harness otherwise uses i64).
pub fn embed_forward_u32<T: Element>(gpu: &Cuda, cfg: &LoraConfig, wt: HostWeights<T>, ids: &[u32]) -> Result<Vec<T>> {
    let dw = DevWeights::up(gpu, wt)?;
    let ids = up_any(gpu, ids)?;
    let mut out = up(gpu, &nan::<T>(ids.len() * cfg.hidden()))?;
    Backend::embed_forward(gpu, cfg, &dw.weights(), ids.view(), out.view_mut())?;
    down(gpu, &out)
}

/// Peak scratch bytes of the fused cross-entropy forward and backward at one
/// (large) shape, with the loss, for the memory test: W is a random block of
/// 2^20 values repeated (drawing V·d values on the host would dominate the
/// test), h is fully random.
pub fn xent_scratch_at<T: Element>(
    gpu: &Cuda,
    cfg: &LoraConfig,
    tokens: usize,
    rng: &mut rand::rngs::StdRng,
) -> Result<(usize, usize, f32, Vec<T>)> {
    use super::rand_inputs::{ids, normal};
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let block: Vec<T> = normal(rng, 1 << 20, 0.02);
    let w: Vec<T> = block.iter().copied().cycle().take(v * d).collect();
    let u: Vec<f32> = normal(rng, v * r, 0.01);
    let vh: Vec<f32> = normal(rng, r * d, 0.02);
    let h: Vec<T> = normal(rng, tokens * d, 1.0);
    let targets = ids(rng, tokens, v);
    let dw = DevWeights::up(gpu, HostWeights { w: &w, u: &u, vh: &vh })?;
    drop(w);
    let (hd, td) = (up(gpu, &h)?, up_any(gpu, &targets)?);
    let mut loss = up(gpu, &[f32::NAN])?;
    let mut lse = up(gpu, &nan::<f32>(tokens))?;
    let mut dh = up(gpu, &nan::<T>(tokens * d))?;
    let mut dg = DevGrads::up(gpu, &HostGrads::zeros(cfg, false))?;
    gpu.reset_scratch_peak();
    Backend::head_xent_forward(gpu, cfg, &dw.weights(), hd.view(), td.view(), loss.view_mut(), lse.view_mut())?;
    let fwd = gpu.reset_scratch_peak();
    Backend::head_xent_backward(
        gpu,
        cfg,
        &dw.weights(),
        hd.view(),
        td.view(),
        lse.view(),
        1.0,
        dh.view_mut(),
        &mut dg.grads(),
    )?;
    let bwd = gpu.scratch_peak_bytes();
    Ok((fwd, bwd, down(gpu, &loss)?[0], down(gpu, &dh)?))
}
