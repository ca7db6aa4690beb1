//! The fast CPU backend: f32 arithmetic on blocked, vectorised GEMMs
//! (`matrixmultiply`), with f64 only where a reduction needs it (the
//! log-sum-exp sums, the loss, the per-id sums of the embedding backward).
//!
//! The head and the fused cross-entropy have the structure of the GPU kernels:
//! one GEMM per tile over d + r columns, `[h | s·p]·[W_b | U_b]ᵀ` with
//! `p = h·Vhᵀ`, so the LoRA term rides along as r extra columns; the
//! cross-entropy walks the vocabulary in blocks with an online log-sum-exp and
//! never holds a [T, V] buffer. f16 / bf16 weights are widened to f32 one
//! vocabulary block at a time. Results are checked against the f64 reference
//! ([`crate::Cpu`]) with the kernels' tolerances (by storage dtype, DESIGN.md §3).
//!
//! Threads: scoped threads over token rows (head forward, embedding forward,
//! merge) or over vocabulary ranges (head backward, cross-entropy forward and
//! backward), partial results combined in a fixed order, so every result is
//! bitwise deterministic for a given thread count and input (on a given
//! machine: the GEMM picks its SIMD kernel at run time).
//!
//! Like the reference, it computes the cross-entropy backward exactly: the
//! kernels' optional gradient filter (`LoraConfigBuilder::xent_grad_filter`)
//! is ignored.

mod blocks;
mod convert;
mod embed;
mod expf;
mod gemm;
mod head;
mod merge;
mod xent;

use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::cpu::{grad_lens, weight_lens};
use crate::dtype::{Element, TokenId};
use crate::error::Result;
use crate::validate::{
    check_ids, check_targets, check_weights, embed_backward_lens, embed_forward_lens, head_backward_lens,
    head_forward_lens, xent_backward_lens, xent_forward_lens, GradLens, WeightLens,
};

/// The fast CPU backend (f32 GEMMs, fused cross-entropy, all cores). Buffers
/// are host slices, as for [`crate::Cpu`]; see the module docs.
#[derive(Debug, Clone)]
pub struct CpuFast {
    threads: usize,
}

impl Default for CpuFast {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuFast {
    /// One worker per available core.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuFast { threads }
    }

    /// A fixed number of workers (at least 1); `with_threads(1)` runs everything on the caller's thread.
    pub fn with_threads(threads: usize) -> Self {
        CpuFast { threads: threads.max(1) }
    }

    /// The number of workers.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn wl<T: Element>(wt: &Weights<'_, CpuFast, T>) -> WeightLens {
    weight_lens(wt.w, wt.lora_vocab, wt.lora_hidden)
}

fn gl(g: &Grads<'_, CpuFast>) -> GradLens {
    grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref())
}

impl Backend for CpuFast {
    type Src<'a, T: 'static> = &'a [T];
    type Dst<'a, T: 'static> = &'a mut [T];

    fn name(&self) -> &'static str {
        "cpu-fast"
    }

    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: &[I],
        out: &mut [T],
    ) -> Result<()> {
        embed_forward_lens(cfg, wl(weights), ids.len(), out.len())?;
        check_ids("ids", ids, cfg.vocab())?;
        embed::forward(cfg, self.threads, weights.w, weights.lora_vocab, weights.lora_hidden, ids, out);
        Ok(())
    }

    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: &[I],
        d_embed: &[G],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        embed_backward_lens(cfg, wl(weights), ids.len(), d_embed.len(), gl(grads))?;
        check_ids("ids", ids, cfg.vocab())?;
        embed::backward(
            cfg,
            weights.lora_vocab,
            weights.lora_hidden,
            ids,
            d_embed,
            grads.lora_vocab,
            grads.lora_hidden,
            grads.w.as_deref_mut(),
        );
        Ok(())
    }

    fn head_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        logits: &mut [T],
    ) -> Result<()> {
        head_forward_lens(cfg, wl(weights), h.len(), logits.len())?;
        head::forward(cfg, self.threads, weights.w, weights.lora_vocab, weights.lora_hidden, h, logits);
        Ok(())
    }

    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        d_logits: &[G],
        dh: &mut [T],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        head_backward_lens(cfg, wl(weights), h.len(), d_logits.len(), dh.len(), gl(grads))?;
        head::backward(
            cfg,
            self.threads,
            weights.w,
            weights.lora_vocab,
            weights.lora_hidden,
            h,
            dh,
            grads.lora_vocab,
            grads.lora_hidden,
            grads.w.as_deref_mut(),
            &head::GivenGrad { d_logits, vocab: cfg.vocab() },
        );
        Ok(())
    }

    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        targets: &[I],
        loss: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        xent_forward_lens(cfg, wl(weights), h.len(), targets.len(), loss.len(), lse.len())?;
        check_targets("targets", targets, cfg.vocab(), cfg.ignore_index())?;
        loss[0] = xent::forward(cfg, self.threads, weights.w, weights.lora_vocab, weights.lora_hidden, h, targets, lse);
        Ok(())
    }

    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        targets: &[I],
        lse: &[f32],
        grad_loss: f32,
        dh: &mut [T],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        xent_backward_lens(cfg, wl(weights), h.len(), targets.len(), lse.len(), dh.len(), gl(grads))?;
        check_targets("targets", targets, cfg.vocab(), cfg.ignore_index())?;
        head::backward(
            cfg,
            self.threads,
            weights.w,
            weights.lora_vocab,
            weights.lora_hidden,
            h,
            dh,
            grads.lora_vocab,
            grads.lora_hidden,
            grads.w.as_deref_mut(),
            &xent::XentGrad::new(cfg, targets, lse, grad_loss),
        );
        Ok(())
    }

    fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], lora_vocab: &[f32], lora_hidden: &[f32]) -> Result<()> {
        check_weights(cfg, w.len(), lora_vocab.len(), lora_hidden.len())?;
        merge::apply(cfg, self.threads, 1.0, w, lora_vocab, lora_hidden);
        Ok(())
    }

    fn unmerge<T: Element>(
        &self,
        cfg: &LoraConfig,
        w: &mut [T],
        lora_vocab: &[f32],
        lora_hidden: &[f32],
    ) -> Result<()> {
        check_weights(cfg, w.len(), lora_vocab.len(), lora_hidden.len())?;
        merge::apply(cfg, self.threads, -1.0, w, lora_vocab, lora_hidden);
        Ok(())
    }
}
