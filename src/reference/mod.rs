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
mod xent;

pub use xent::logsumexp;

use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::host::{checked_host_backend, GradBufs, HostOps, Params};

/// The CPU reference backend. Buffers are host slices.
///
/// Ops that loop over token rows (embedding, head and cross-entropy forward
/// and backward, merge) split the rows over `threads` scoped threads; partial
/// gradients are summed in row order, so results depend only on the thread count.
#[derive(Debug, Clone)]
pub struct CpuReference {
    threads: usize,
}

impl Default for CpuReference {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuReference {
    /// One worker per available core.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuReference { threads }
    }

    /// A fixed number of workers (at least 1); `with_threads(1)` runs everything on the caller's thread.
    pub fn with_threads(threads: usize) -> Self {
        CpuReference { threads: threads.max(1) }
    }

    /// The number of workers.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

checked_host_backend!(CpuReference, "cpu-reference");

impl HostOps for CpuReference {
    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        (w, u, vh): Params<'_, T>,
        ids: &[I],
        out: &mut [T],
    ) {
        embed::forward(cfg, self.threads, w, u, vh, ids, out);
    }

    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        (_, u, vh): Params<'_, T>,
        ids: &[I],
        d_embed: &[G],
        (du, dvh, dw): GradBufs<'_, '_>,
    ) {
        embed::backward(cfg, u, vh, ids, d_embed, du, dvh, dw);
    }

    fn head_forward<T: Element>(&self, cfg: &LoraConfig, (w, u, vh): Params<'_, T>, h: &[T], logits: &mut [T]) {
        head::forward(cfg, self.threads, w, u, vh, h, logits);
    }

    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        (w, u, vh): Params<'_, T>,
        h: &[T],
        d_logits: &[G],
        dh: &mut [T],
        (du, dvh, dw): GradBufs<'_, '_>,
    ) {
        let v = cfg.vocab();
        let g_row = |t: usize, _h: &[f64], _p: &[f64], g: &mut [f64]| {
            for (gv, &x) in g.iter_mut().zip(&d_logits[t * v..(t + 1) * v]) {
                *gv = x.to_f64();
            }
        };
        head::backward_from_rows(cfg, self.threads, w, u, vh, h, dh, du, dvh, dw, g_row);
    }

    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        (w, u, vh): Params<'_, T>,
        h: &[T],
        targets: &[I],
        lse: &mut [f32],
    ) -> f32 {
        xent::forward(cfg, self.threads, w, u, vh, h, targets, lse)
    }

    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        (w, u, vh): Params<'_, T>,
        h: &[T],
        targets: &[I],
        lse: &[f32],
        grad_loss: f32,
        dh: &mut [T],
        (du, dvh, dw): GradBufs<'_, '_>,
    ) {
        xent::backward(cfg, self.threads, w, u, vh, h, targets, lse, grad_loss, dh, du, dvh, dw);
    }

    fn merge<T: Element>(&self, cfg: &LoraConfig, sign: f64, w: &mut [T], u: &[f32], vh: &[f32]) {
        merge::apply(cfg, self.threads, sign, w, u, vh);
    }
}
