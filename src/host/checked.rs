//! The one `Backend` implementation of the backends that compute on the
//! host ([`super::CpuReference`], [`crate::Cpu`]): every check of
//! `crate::validate` first (nothing is written on a failed call), then the
//! backend's unchecked op ([`HostOps`]). [`checked_host_backend!`] writes the
//! `Backend` impl.

use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};

/// The tied parameters as host slices: W [V, d], U [V, r], Vh [r, d].
pub(crate) type Params<'a, T> = (&'a [T], &'a [f32], &'a [f32]);
/// The gradient accumulators: dU, dVh, and dW if asked.
pub(crate) type GradBufs<'a, 'b> = (&'a mut [f32], &'a mut [f32], Option<&'b mut [f32]>);

/// The ops of a host backend on inputs already checked against the config
/// (lengths, ids, targets). Same contract as `Backend` otherwise.
pub(crate) trait HostOps {
    fn embed_forward<T: Element, I: TokenId>(&self, cfg: &LoraConfig, w: Params<'_, T>, ids: &[I], out: &mut [T]);
    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        w: Params<'_, T>,
        ids: &[I],
        d_embed: &[G],
        g: GradBufs<'_, '_>,
    );
    fn head_forward<T: Element>(&self, cfg: &LoraConfig, w: Params<'_, T>, h: &[T], logits: &mut [T]);
    #[allow(clippy::too_many_arguments)]
    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        w: Params<'_, T>,
        h: &[T],
        d_logits: &[G],
        dh: &mut [T],
        g: GradBufs<'_, '_>,
    );
    /// Returns the reduced loss; writes `lse`.
    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        w: Params<'_, T>,
        h: &[T],
        targets: &[I],
        lse: &mut [f32],
    ) -> f32;
    #[allow(clippy::too_many_arguments)]
    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        w: Params<'_, T>,
        h: &[T],
        targets: &[I],
        lse: &[f32],
        grad_loss: f32,
        dh: &mut [T],
        g: GradBufs<'_, '_>,
    );
    /// `W += sign·s·U·Vh`.
    fn merge<T: Element>(&self, cfg: &LoraConfig, sign: f64, w: &mut [T], u: &[f32], vh: &[f32]);
}

/// `impl Backend for $ty` over its [`HostOps`]: the checks, then the op.
macro_rules! checked_host_backend {
    ($ty:ty, $name:literal) => {
        impl $crate::backend::Backend for $ty {
            type Src<'a, T: 'static> = &'a [T];
            type Dst<'a, T: 'static> = &'a mut [T];

            fn name(&self) -> &'static str {
                $name
            }

            fn embed_forward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                ids: &[I],
                out: &mut [T],
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                embed_forward_lens(
                    cfg,
                    $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden),
                    ids.len(),
                    out.len(),
                )?;
                check_ids("ids", ids, cfg.vocab())?;
                $crate::host::HostOps::embed_forward(self, cfg, (w.w, w.lora_vocab, w.lora_hidden), ids, out);
                Ok(())
            }

            fn embed_backward<T: $crate::Element, G: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                ids: &[I],
                d_embed: &[G],
                g: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                let gl = $crate::host::grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref());
                let wl = $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden);
                embed_backward_lens(cfg, wl, ids.len(), d_embed.len(), gl)?;
                check_ids("ids", ids, cfg.vocab())?;
                let bufs = (&mut *g.lora_vocab, &mut *g.lora_hidden, g.w.as_deref_mut());
                $crate::host::HostOps::embed_backward(
                    self,
                    cfg,
                    (w.w, w.lora_vocab, w.lora_hidden),
                    ids,
                    d_embed,
                    bufs,
                );
                Ok(())
            }

            fn head_forward<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                h: &[T],
                logits: &mut [T],
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                head_forward_lens(
                    cfg,
                    $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden),
                    h.len(),
                    logits.len(),
                )?;
                $crate::host::HostOps::head_forward(self, cfg, (w.w, w.lora_vocab, w.lora_hidden), h, logits);
                Ok(())
            }

            fn head_backward<T: $crate::Element, G: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                h: &[T],
                d_logits: &[G],
                dh: &mut [T],
                g: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                let gl = $crate::host::grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref());
                let wl = $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden);
                head_backward_lens(cfg, wl, h.len(), d_logits.len(), dh.len(), gl)?;
                let bufs = (&mut *g.lora_vocab, &mut *g.lora_hidden, g.w.as_deref_mut());
                $crate::host::HostOps::head_backward(
                    self,
                    cfg,
                    (w.w, w.lora_vocab, w.lora_hidden),
                    h,
                    d_logits,
                    dh,
                    bufs,
                );
                Ok(())
            }

            fn head_xent_forward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                h: &[T],
                targets: &[I],
                loss: &mut [f32],
                lse: &mut [f32],
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                let wl = $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden);
                xent_forward_lens(cfg, wl, h.len(), targets.len(), loss.len(), lse.len())?;
                check_targets("targets", targets, cfg.vocab(), cfg.ignore_index())?;
                loss[0] = $crate::host::HostOps::head_xent_forward(
                    self,
                    cfg,
                    (w.w, w.lora_vocab, w.lora_hidden),
                    h,
                    targets,
                    lse,
                );
                Ok(())
            }

            fn head_xent_backward<T: $crate::Element, I: $crate::TokenId>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &$crate::Weights<'_, Self, T>,
                h: &[T],
                targets: &[I],
                lse: &[f32],
                grad_loss: f32,
                dh: &mut [T],
                g: &mut $crate::Grads<'_, Self>,
            ) -> $crate::Result<()> {
                use $crate::validate::*;
                let gl = $crate::host::grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref());
                let wl = $crate::host::weight_lens(w.w, w.lora_vocab, w.lora_hidden);
                xent_backward_lens(cfg, wl, h.len(), targets.len(), lse.len(), dh.len(), gl)?;
                check_targets("targets", targets, cfg.vocab(), cfg.ignore_index())?;
                let bufs = (&mut *g.lora_vocab, &mut *g.lora_hidden, g.w.as_deref_mut());
                let p = (w.w, w.lora_vocab, w.lora_hidden);
                $crate::host::HostOps::head_xent_backward(self, cfg, p, h, targets, lse, grad_loss, dh, bufs);
                Ok(())
            }

            fn merge<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &mut [T],
                u: &[f32],
                vh: &[f32],
            ) -> $crate::Result<()> {
                $crate::validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
                $crate::host::HostOps::merge(self, cfg, 1.0, w, u, vh);
                Ok(())
            }

            fn unmerge<T: $crate::Element>(
                &self,
                cfg: &$crate::LoraConfig,
                w: &mut [T],
                u: &[f32],
                vh: &[f32],
            ) -> $crate::Result<()> {
                $crate::validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
                $crate::host::HostOps::merge(self, cfg, -1.0, w, u, vh);
                Ok(())
            }
        }
    };
}
pub(crate) use checked_host_backend;
