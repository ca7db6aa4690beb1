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
mod parallel;
mod xent;

pub use xent::logsumexp;

use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::error::Result;
use crate::validate::{check_grads, check_ids, check_len, check_targets, check_tokens, check_weights};

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

fn check_w<T: Element>(cfg: &LoraConfig, wt: &Weights<'_, Cpu, T>) -> Result<()> {
    check_weights(cfg, wt.w.len(), wt.lora_vocab.len(), wt.lora_hidden.len())
}

fn check_g(cfg: &LoraConfig, g: &Grads<'_, Cpu>) -> Result<()> {
    check_grads(cfg, g.lora_vocab.len(), g.lora_hidden.len(), g.w.as_ref().map(|w| w.len()))
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
        check_w(cfg, weights)?;
        let t = check_tokens("ids", ids.len())?;
        check_len("out", out.len(), t, cfg.hidden(), "T, d")?;
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
        check_w(cfg, weights)?;
        check_g(cfg, grads)?;
        let t = check_tokens("ids", ids.len())?;
        check_len("d_embed", d_embed.len(), t, cfg.hidden(), "T, d")?;
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
        check_w(cfg, weights)?;
        let t = check_tokens("h", h.len() / cfg.hidden())?;
        check_len("h", h.len(), t, cfg.hidden(), "T, d")?;
        check_len("logits", logits.len(), t, cfg.vocab(), "T, V")?;
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
        check_w(cfg, weights)?;
        check_g(cfg, grads)?;
        let t = check_tokens("h", h.len() / cfg.hidden())?;
        check_len("h", h.len(), t, cfg.hidden(), "T, d")?;
        check_len("d_logits", d_logits.len(), t, cfg.vocab(), "T, V")?;
        check_len("dh", dh.len(), t, cfg.hidden(), "T, d")?;
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
        check_w(cfg, weights)?;
        let t = check_tokens("targets", targets.len())?;
        check_len("h", h.len(), t, cfg.hidden(), "T, d")?;
        check_len("loss", loss.len(), 1, 1, "1, 1")?;
        check_len("lse", lse.len(), t, 1, "T, 1")?;
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
        check_w(cfg, weights)?;
        check_g(cfg, grads)?;
        let t = check_tokens("targets", targets.len())?;
        check_len("h", h.len(), t, cfg.hidden(), "T, d")?;
        check_len("lse", lse.len(), t, 1, "T, 1")?;
        check_len("dh", dh.len(), t, cfg.hidden(), "T, d")?;
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

impl<'a, T: Element> Weights<'a, Cpu, T> {
    /// Borrows host slices as the tied parameters (`&vec` coerces to a slice here).
    pub fn host(w: &'a [T], lora_vocab: &'a [f32], lora_hidden: &'a [f32]) -> Self {
        Weights { w, lora_vocab, lora_hidden }
    }
}

impl<'a> Grads<'a, Cpu> {
    /// Borrows host gradient accumulators; `w` is `Some` only for full tied fine-tuning.
    pub fn host(lora_vocab: &'a mut [f32], lora_hidden: &'a mut [f32], w: Option<&'a mut [f32]>) -> Self {
        Grads { lora_vocab, lora_hidden, w }
    }
}
