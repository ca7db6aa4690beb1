//! The one [`Backend`] implementation over the kernels, for every kernel
//! backend ([`super::CpuKernels`], `Cuda`): each op checks its buffers
//! against the config, takes their addresses and runs the op sequence of
//! `super::ops` on the backend's executor. A backend only says how it
//! reaches its buffers and which executor runs its launches
//! ([`KernelDevice`]); [`kernel_backend!`] writes its `Backend` impl.

use super::exec::Executor;
use super::ops::{self, id_kind, GradAddrs, WeightAddrs};
use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::error::Result;
use crate::validate::{self, GradLens, WeightLens};

/// A backend whose ops run the kernels: its executor and how to take the
/// addresses of its buffers.
pub(crate) trait KernelDevice: Backend {
    /// The executor of one op.
    type Exec<'s>: Executor
    where
        Self: 's;
    /// The addresses of one op's buffers; dropped once the op's launches
    /// are enqueued (a GPU backend records the buffers' use then).
    type Addrs<'u>: Addrs<'u, Self>
    where
        Self: 'u;
    fn exec(&self) -> Self::Exec<'_>;
    fn addrs(&self) -> Self::Addrs<'_>;
    fn src_len<T: 'static>(s: &Self::Src<'_, T>) -> usize;
    fn dst_len<T: 'static>(s: &Self::Dst<'_, T>) -> usize;
}

/// Takes the addresses of one op's buffers, named for errors (a buffer of
/// another device is refused here, before anything is launched).
pub(crate) trait Addrs<'u, D: KernelDevice + ?Sized> {
    fn read<T: 'static>(&mut self, arg: &'static str, s: &'u D::Src<'_, T>) -> Result<u64>;
    fn write<T: 'static>(&mut self, arg: &'static str, s: &'u mut D::Dst<'_, T>) -> Result<u64>;
}

fn weight_lens<D: KernelDevice, T: Element>(w: &Weights<'_, D, T>) -> WeightLens {
    WeightLens { w: D::src_len(&w.w), lora_vocab: D::src_len(&w.lora_vocab), lora_hidden: D::src_len(&w.lora_hidden) }
}

fn grad_lens<D: KernelDevice>(g: &Grads<'_, D>) -> GradLens {
    GradLens {
        lora_vocab: D::dst_len(&g.lora_vocab),
        lora_hidden: D::dst_len(&g.lora_hidden),
        w: g.w.as_ref().map(|w| D::dst_len(w)),
    }
}

fn weight_addrs<'u, D: KernelDevice, T: Element>(
    w: &'u Weights<'_, D, T>,
    a: &mut impl Addrs<'u, D>,
) -> Result<WeightAddrs> {
    Ok(WeightAddrs {
        w: a.read("w", &w.w)?,
        u: a.read("lora_vocab", &w.lora_vocab)?,
        vh: a.read("lora_hidden", &w.lora_hidden)?,
    })
}

fn grad_addrs<'u, D: KernelDevice>(g: &'u mut Grads<'_, D>, a: &mut impl Addrs<'u, D>) -> Result<GradAddrs> {
    Ok(GradAddrs {
        u: a.write("grad_lora_vocab", &mut g.lora_vocab)?,
        vh: a.write("grad_lora_hidden", &mut g.lora_hidden)?,
        w: match &mut g.w {
            Some(w) => Some(a.write("grad_w", w)?),
            None => None,
        },
    })
}

pub(crate) fn embed_forward<D: KernelDevice, T: Element, I: TokenId>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    ids: D::Src<'_, I>,
    mut out: D::Dst<'_, T>,
) -> Result<()> {
    let t = validate::embed_forward_lens(cfg, weight_lens(weights), D::src_len(&ids), D::dst_len(&out))?;
    let mut a = d.addrs();
    let wt = weight_addrs(weights, &mut a)?;
    let (ids, out) = (a.read("ids", &ids)?, a.write("out", &mut out)?);
    // SAFETY: the lengths were checked against the config above and the
    // addresses come from live buffers of this backend, borrowed (and, on a
    // GPU, guarded) until `a` drops after the launches are enqueued; `out`
    // is a unique borrow, so it overlaps no input.
    unsafe { ops::embed_forward(&d.exec(), cfg, T::DTYPE, wt, ids, id_kind::<I>(), out, t) }
}

pub(crate) fn embed_backward<D: KernelDevice, T: Element, G: Element, I: TokenId>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    ids: D::Src<'_, I>,
    d_embed: D::Src<'_, G>,
    grads: &mut Grads<'_, D>,
) -> Result<()> {
    let lens = (D::src_len(&ids), D::src_len(&d_embed));
    let t = validate::embed_backward_lens(cfg, weight_lens(weights), lens.0, lens.1, grad_lens(grads))?;
    let mut a = d.addrs();
    let (wt, g) = (weight_addrs(weights, &mut a)?, grad_addrs(grads, &mut a)?);
    let (ids, de) = (a.read("ids", &ids)?, a.read("d_embed", &d_embed)?);
    // SAFETY: as in `embed_forward`; the gradients are unique borrows.
    unsafe { ops::embed_backward(&d.exec(), cfg, G::DTYPE, wt, ids, id_kind::<I>(), de, g, t) }
}

pub(crate) fn head_forward<D: KernelDevice, T: Element>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    h: D::Src<'_, T>,
    mut logits: D::Dst<'_, T>,
) -> Result<()> {
    let t = validate::head_forward_lens(cfg, weight_lens(weights), D::src_len(&h), D::dst_len(&logits))?;
    let mut a = d.addrs();
    let wt = weight_addrs(weights, &mut a)?;
    let (h, logits) = (a.read("h", &h)?, a.write("logits", &mut logits)?);
    // SAFETY: as in `embed_forward`.
    unsafe { ops::head_forward(&d.exec(), cfg, T::DTYPE, wt, h, logits, t) }
}

pub(crate) fn head_backward<D: KernelDevice, T: Element, G: Element>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    h: D::Src<'_, T>,
    d_logits: D::Src<'_, G>,
    mut dh: D::Dst<'_, T>,
    grads: &mut Grads<'_, D>,
) -> Result<()> {
    let lens = (D::src_len(&h), D::src_len(&d_logits), D::dst_len(&dh));
    let t = validate::head_backward_lens(cfg, weight_lens(weights), lens.0, lens.1, lens.2, grad_lens(grads))?;
    let mut a = d.addrs();
    let (wt, g) = (weight_addrs(weights, &mut a)?, grad_addrs(grads, &mut a)?);
    let (h, gl) = (a.read("h", &h)?, a.read("d_logits", &d_logits)?);
    let dh = a.write("dh", &mut dh)?;
    // SAFETY: as in `embed_forward`; `dh` and the gradients are unique borrows.
    unsafe { ops::head_backward(&d.exec(), cfg, T::DTYPE, G::DTYPE, wt, h, gl, dh, g, t) }
}

pub(crate) fn head_xent_forward<D: KernelDevice, T: Element, I: TokenId>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    h: D::Src<'_, T>,
    targets: D::Src<'_, I>,
    mut loss: D::Dst<'_, f32>,
    mut lse: D::Dst<'_, f32>,
) -> Result<()> {
    let lens = (D::src_len(&h), D::src_len(&targets), D::dst_len(&loss), D::dst_len(&lse));
    let t = validate::xent_forward_lens(cfg, weight_lens(weights), lens.0, lens.1, lens.2, lens.3)?;
    let mut a = d.addrs();
    let wt = weight_addrs(weights, &mut a)?;
    let (h, tg) = (a.read("h", &h)?, a.read("targets", &targets)?);
    let (loss, lse) = (a.write("loss", &mut loss)?, a.write("lse", &mut lse)?);
    // SAFETY: as in `embed_forward`.
    unsafe { ops::head_xent_forward(&d.exec(), cfg, T::DTYPE, wt, h, tg, id_kind::<I>(), loss, lse, t) }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn head_xent_backward<D: KernelDevice, T: Element, I: TokenId>(
    d: &D,
    cfg: &LoraConfig,
    weights: &Weights<'_, D, T>,
    h: D::Src<'_, T>,
    targets: D::Src<'_, I>,
    lse: D::Src<'_, f32>,
    grad_loss: f32,
    mut dh: D::Dst<'_, T>,
    grads: &mut Grads<'_, D>,
) -> Result<()> {
    let lens = (D::src_len(&h), D::src_len(&targets), D::src_len(&lse), D::dst_len(&dh));
    let t = validate::xent_backward_lens(cfg, weight_lens(weights), lens.0, lens.1, lens.2, lens.3, grad_lens(grads))?;
    let mut a = d.addrs();
    let (wt, g) = (weight_addrs(weights, &mut a)?, grad_addrs(grads, &mut a)?);
    let (h, tg) = (a.read("h", &h)?, a.read("targets", &targets)?);
    let (lse, dh) = (a.read("lse", &lse)?, a.write("dh", &mut dh)?);
    let kind = id_kind::<I>();
    // SAFETY: as in `head_backward`.
    unsafe { ops::head_xent_backward(&d.exec(), cfg, T::DTYPE, wt, h, tg, kind, lse, grad_loss, dh, g, t) }
}

/// `merge` (`sign` = false) and `unmerge` (`sign` = true).
pub(crate) fn merge<D: KernelDevice, T: Element>(
    d: &D,
    cfg: &LoraConfig,
    mut w: D::Dst<'_, T>,
    u: D::Src<'_, f32>,
    vh: D::Src<'_, f32>,
    subtract: bool,
) -> Result<()> {
    validate::check_weights(cfg, D::dst_len(&w), D::src_len(&u), D::src_len(&vh))?;
    let mut a = d.addrs();
    let w = a.write("w", &mut w)?;
    let (u, vh) = (a.read("lora_vocab", &u)?, a.read("lora_hidden", &vh)?);
    // SAFETY: as in `embed_forward`; `w` is a unique borrow.
    unsafe { ops::merge(&d.exec(), cfg, T::DTYPE, w, u, vh, subtract) }
}

/// Writes `impl Backend for $ty` over the adapter functions above; `$ty`
/// implements [`KernelDevice`] with `$src` / `$dst` as its buffers.
macro_rules! kernel_backend {
    ($ty:ty, src = $src:ident, dst = $dst:ident) => {
        impl $crate::backend::Backend for $ty {
            type Src<'a, T: 'static> = $src<'a, T>;
            type Dst<'a, T: 'static> = $dst<'a, T>;

            fn name(&self) -> &'static str {
                self.backend_name()
            }

            fn embed_forward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                ids: Self::Src<'_, I>,
                out: Self::Dst<'_, T>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::embed_forward(self, cfg, weights, ids, out)
            }

            fn embed_backward<T: $crate::Element, G: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                ids: Self::Src<'_, I>,
                d_embed: Self::Src<'_, G>,
                grads: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::embed_backward(self, cfg, weights, ids, d_embed, grads)
            }

            fn head_forward<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                h: Self::Src<'_, T>,
                logits: Self::Dst<'_, T>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::head_forward(self, cfg, weights, h, logits)
            }

            fn head_backward<T: $crate::Element, G: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                h: Self::Src<'_, T>,
                d_logits: Self::Src<'_, G>,
                dh: Self::Dst<'_, T>,
                grads: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::head_backward(self, cfg, weights, h, d_logits, dh, grads)
            }

            fn head_xent_forward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                h: Self::Src<'_, T>,
                targets: Self::Src<'_, I>,
                loss: Self::Dst<'_, f32>,
                lse: Self::Dst<'_, f32>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::head_xent_forward(self, cfg, weights, h, targets, loss, lse)
            }

            fn head_xent_backward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                weights: &$crate::Weights<'_, Self, T>,
                h: Self::Src<'_, T>,
                targets: Self::Src<'_, I>,
                lse: Self::Src<'_, f32>,
                grad_loss: f32,
                dh: Self::Dst<'_, T>,
                grads: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::head_xent_backward(self, cfg, weights, h, targets, lse, grad_loss, dh, grads)
            }

            fn merge<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: Self::Dst<'_, T>,
                lora_vocab: Self::Src<'_, f32>,
                lora_hidden: Self::Src<'_, f32>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::merge(self, cfg, w, lora_vocab, lora_hidden, false)
            }

            fn unmerge<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: Self::Dst<'_, T>,
                lora_vocab: Self::Src<'_, f32>,
                lora_hidden: Self::Src<'_, f32>,
            ) -> $crate::Result<()> {
                $crate::kernels::adapter::merge(self, cfg, w, lora_vocab, lora_hidden, true)
            }
        }
    };
}
pub(crate) use kernel_backend;
