//! The CPU reference backend: f64 accumulation, code that reads like the
//! formulas in DESIGN.md §2. It is the yardstick the kernels are tested
//! against, and a usable backend for small models and tests.

// The reference spells the formulas with explicit indices on purpose: a reader
// checks `dU[v*r + j] += s * G[v] * p[j]` against DESIGN.md line by line.
#![allow(clippy::needless_range_loop)]

mod embed;
mod head;
mod math;
mod merge;
pub(crate) mod parallel;
mod xent;

pub use xent::logsumexp;

use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::error::Result;
use crate::validate::{
    check_ids, check_targets, check_weights, embed_backward_lens, embed_forward_lens, head_backward_lens,
    head_forward_lens, xent_backward_lens, xent_forward_lens, GradLens, WeightLens,
};

/// The CPU reference backend. Buffers are host slices.
///
/// Ops that loop over token rows (embedding, head and cross-entropy forward
/// and backward, merge) split the rows over `threads` scoped threads; partial
/// gradients are summed in row order, so results depend only on the thread count.
#[derive(Debug, Clone)]
pub struct Cpu {
    threads: usize,
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpu {
    /// One worker per available core.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cpu { threads }
    }

    /// A fixed number of workers (at least 1); `with_threads(1)` runs everything on the caller's thread.
    pub fn with_threads(threads: usize) -> Self {
        Cpu { threads: threads.max(1) }
    }

    /// The number of workers.
    pub fn threads(&self) -> usize {
        self.threads
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

fn wl<T: Element>(wt: &Weights<'_, Cpu, T>) -> WeightLens {
    weight_lens(wt.w, wt.lora_vocab, wt.lora_hidden)
}

fn gl(g: &Grads<'_, Cpu>) -> GradLens {
    grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref())
}

impl Backend for Cpu {
    type Src<'a, T: 'static> = &'a [T];
    type Dst<'a, T: 'static> = &'a mut [T];

    fn name(&self) -> &'static str {
        "cpu-reference"
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
        let v = cfg.vocab();
        let g_row = |t: usize, _h: &[f64], _p: &[f64], g: &mut [f64]| {
            for (gv, &x) in g.iter_mut().zip(&d_logits[t * v..(t + 1) * v]) {
                *gv = x.to_f64();
            }
        };
        head::backward_from_rows(
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
            g_row,
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
        xent::backward(
            cfg,
            self.threads,
            weights.w,
            weights.lora_vocab,
            weights.lora_hidden,
            h,
            targets,
            lse,
            grad_loss,
            dh,
            grads.lora_vocab,
            grads.lora_hidden,
            grads.w.as_deref_mut(),
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
