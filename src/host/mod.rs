//! Trainer code written once for every backend over host memory.
//!
//! [`Backend`] fixes each backend's buffer types through generic associated
//! types, so code generic over it cannot pass a `&[f32]` without bounds on
//! those types and a turbofish on every call. [`HostBackend`] is the same
//! ops with host slices in their signatures, implemented by every backend
//! whose buffers are host memory ([`CpuReference`], [`crate::Cpu`], and
//! `CpuKernels` with the feature `cpu-kernels`), so generic code reads like
//! code for one backend:
//!
//! ```
//! use tiedlora::host::{HostBackend, HostGrads, HostWeights};
//! use tiedlora::{CpuReference, Grads, LoraConfig, Weights};
//!
//! /// One embedding forward + backward into the shared gradient, on any host backend.
//! fn embed_step<B: HostBackend>(
//!     b: &B,
//!     cfg: &LoraConfig,
//!     weights: &HostWeights<'_, f32>,
//!     ids: &[u32],
//!     grads: &mut HostGrads<'_>,
//! ) -> tiedlora::Result<Vec<f32>> {
//!     let mut e = vec![0.0; ids.len() * cfg.hidden()];
//!     b.embed_forward(cfg, weights, ids, &mut e)?;
//!     b.embed_backward(cfg, weights, ids, &e, grads)?;
//!     Ok(e)
//! }
//!
//! let cfg = LoraConfig::builder(10, 4, 2).build()?;
//! let (w, u, vh) = (vec![0.1f32; 40], vec![0.2f32; 20], vec![0.3f32; 8]);
//! let (mut du, mut dvh) = (vec![0.0; 20], vec![0.0; 8]);
//! let e = embed_step(&CpuReference::new(), &cfg, &Weights::host(&w, &u, &vh), &[1, 7], &mut Grads::host(&mut du, &mut dvh, None))?;
//! assert_eq!(e.len(), 8);
//! # Ok::<(), tiedlora::Error>(())
//! ```
//!
//! Import this trait or [`Backend`] where the ops are called, not both: a
//! type that implements both would make the call ambiguous.

use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::cpu::Cpu;
use crate::dtype::{Element, TokenId};
use crate::error::Result;
use crate::reference::CpuReference;
use crate::validate::{GradLens, WeightLens};

mod checked;
pub(crate) mod parallel;

pub(crate) use checked::{checked_host_backend, GradBufs, HostOps, Params};

/// The tied parameters as host slices, for every [`HostBackend`]
/// (`Weights::host(w, u, vh)` builds one).
pub type HostWeights<'a, T> = Weights<'a, Cpu, T>;
/// The gradient accumulators as host slices, for every [`HostBackend`]
/// (`Grads::host(du, dvh, dw)` builds one).
pub type HostGrads<'a> = Grads<'a, Cpu>;

mod sealed {
    pub trait Sealed {}
}

/// The [`Backend`] ops over host slices; see the module docs. Sealed: the
/// crate's host backends implement it.
pub trait HostBackend: sealed::Sealed {
    /// As [`Backend::name`].
    fn name(&self) -> &'static str;
    /// As [`Backend::embed_forward`].
    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        ids: &[I],
        out: &mut [T],
    ) -> Result<()>;
    /// As [`Backend::embed_backward`].
    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        ids: &[I],
        d_embed: &[G],
        grads: &mut HostGrads<'_>,
    ) -> Result<()>;
    /// As [`Backend::head_forward`].
    fn head_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        h: &[T],
        logits: &mut [T],
    ) -> Result<()>;
    /// As [`Backend::head_backward`].
    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        h: &[T],
        d_logits: &[G],
        dh: &mut [T],
        grads: &mut HostGrads<'_>,
    ) -> Result<()>;
    /// As [`Backend::head_xent_forward`].
    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        h: &[T],
        targets: &[I],
        loss: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()>;
    /// As [`Backend::head_xent_backward`].
    #[allow(clippy::too_many_arguments)]
    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &HostWeights<'_, T>,
        h: &[T],
        targets: &[I],
        lse: &[f32],
        grad_loss: f32,
        dh: &mut [T],
        grads: &mut HostGrads<'_>,
    ) -> Result<()>;
    /// As [`Backend::merge`].
    fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], lora_vocab: &[f32], lora_hidden: &[f32]) -> Result<()>;
    /// As [`Backend::unmerge`].
    fn unmerge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], lora_vocab: &[f32], lora_hidden: &[f32])
        -> Result<()>;
}

/// `impl HostBackend for $ty` forwarding to its [`Backend`] impl (whose
/// buffers are host slices), re-borrowing the weights and gradients as its own.
macro_rules! host_backend {
    ($ty:ty) => {
        impl sealed::Sealed for $ty {}

        impl HostBackend for $ty {
            fn name(&self) -> &'static str {
                Backend::name(self)
            }
            fn embed_forward<T: Element, I: TokenId>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                ids: &[I],
                out: &mut [T],
            ) -> Result<()> {
                Backend::embed_forward(
                    self,
                    cfg,
                    &Weights::<$ty, T> {
                        w: weights.w,
                        lora_vocab: weights.lora_vocab,
                        lora_hidden: weights.lora_hidden,
                    },
                    ids,
                    out,
                )
            }
            fn embed_backward<T: Element, G: Element, I: TokenId>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                ids: &[I],
                d_embed: &[G],
                grads: &mut HostGrads<'_>,
            ) -> Result<()> {
                let w = Weights::<$ty, T> {
                    w: weights.w,
                    lora_vocab: weights.lora_vocab,
                    lora_hidden: weights.lora_hidden,
                };
                let mut g = Grads::<$ty> {
                    lora_vocab: grads.lora_vocab,
                    lora_hidden: grads.lora_hidden,
                    w: grads.w.as_deref_mut(),
                };
                Backend::embed_backward(self, cfg, &w, ids, d_embed, &mut g)
            }
            fn head_forward<T: Element>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                h: &[T],
                logits: &mut [T],
            ) -> Result<()> {
                Backend::head_forward(
                    self,
                    cfg,
                    &Weights::<$ty, T> {
                        w: weights.w,
                        lora_vocab: weights.lora_vocab,
                        lora_hidden: weights.lora_hidden,
                    },
                    h,
                    logits,
                )
            }
            fn head_backward<T: Element, G: Element>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                h: &[T],
                d_logits: &[G],
                dh: &mut [T],
                grads: &mut HostGrads<'_>,
            ) -> Result<()> {
                let w = Weights::<$ty, T> {
                    w: weights.w,
                    lora_vocab: weights.lora_vocab,
                    lora_hidden: weights.lora_hidden,
                };
                let mut g = Grads::<$ty> {
                    lora_vocab: grads.lora_vocab,
                    lora_hidden: grads.lora_hidden,
                    w: grads.w.as_deref_mut(),
                };
                Backend::head_backward(self, cfg, &w, h, d_logits, dh, &mut g)
            }
            fn head_xent_forward<T: Element, I: TokenId>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                h: &[T],
                targets: &[I],
                loss: &mut [f32],
                lse: &mut [f32],
            ) -> Result<()> {
                let w = Weights::<$ty, T> {
                    w: weights.w,
                    lora_vocab: weights.lora_vocab,
                    lora_hidden: weights.lora_hidden,
                };
                Backend::head_xent_forward(self, cfg, &w, h, targets, loss, lse)
            }
            fn head_xent_backward<T: Element, I: TokenId>(
                &self,
                cfg: &LoraConfig,
                weights: &HostWeights<'_, T>,
                h: &[T],
                targets: &[I],
                lse: &[f32],
                grad_loss: f32,
                dh: &mut [T],
                grads: &mut HostGrads<'_>,
            ) -> Result<()> {
                let w = Weights::<$ty, T> {
                    w: weights.w,
                    lora_vocab: weights.lora_vocab,
                    lora_hidden: weights.lora_hidden,
                };
                let mut g = Grads::<$ty> {
                    lora_vocab: grads.lora_vocab,
                    lora_hidden: grads.lora_hidden,
                    w: grads.w.as_deref_mut(),
                };
                Backend::head_xent_backward(self, cfg, &w, h, targets, lse, grad_loss, dh, &mut g)
            }
            fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32]) -> Result<()> {
                Backend::merge(self, cfg, w, u, vh)
            }
            fn unmerge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32]) -> Result<()> {
                Backend::unmerge(self, cfg, w, u, vh)
            }
        }
    };
}

host_backend!(CpuReference);
host_backend!(Cpu);
#[cfg(feature = "cpu-kernels")]
host_backend!(crate::kernels::CpuKernels);

impl<'a, B, T: Element> Weights<'a, B, T>
where
    B: Backend<Src<'a, T> = &'a [T], Src<'a, f32> = &'a [f32]> + ?Sized,
{
    /// Borrows host slices as the tied parameters (`&vec` coerces to a slice
    /// here), for any backend whose buffers are host slices ([`Cpu`],
    /// [`CpuReference`], `CpuKernels`); a [`HostWeights`] for every [`HostBackend`].
    pub fn host(w: &'a [T], lora_vocab: &'a [f32], lora_hidden: &'a [f32]) -> Self {
        Weights { w, lora_vocab, lora_hidden }
    }
}

impl<'a, B> Grads<'a, B>
where
    B: Backend<Dst<'a, f32> = &'a mut [f32]> + ?Sized,
{
    /// Borrows host gradient accumulators (a [`HostGrads`] for every
    /// [`HostBackend`]); `w` is `Some` only for full tied fine-tuning.
    pub fn host(lora_vocab: &'a mut [f32], lora_hidden: &'a mut [f32], w: Option<&'a mut [f32]>) -> Self {
        Grads { lora_vocab, lora_hidden, w }
    }
}

/// Lengths of host-slice weights (shared by every host-buffer backend).
pub(crate) fn weight_lens<T>(w: &[T], u: &[f32], vh: &[f32]) -> WeightLens {
    WeightLens { w: w.len(), lora_vocab: u.len(), lora_hidden: vh.len() }
}

/// Lengths of host-slice gradients.
pub(crate) fn grad_lens(u: &[f32], vh: &[f32], w: Option<&[f32]>) -> GradLens {
    GradLens { lora_vocab: u.len(), lora_hidden: vh.len(), w: w.map(<[f32]>::len) }
}
