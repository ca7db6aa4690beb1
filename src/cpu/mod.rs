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
//! ([`crate::CpuReference`]) with the kernels' tolerances (by storage dtype, DESIGN.md §3).
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

use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::host::{checked_host_backend, GradBufs, HostOps, Params};

/// The fast CPU backend (f32 GEMMs, fused cross-entropy, all cores). Buffers
/// are host slices, as for [`crate::CpuReference`]; see the module docs.
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

checked_host_backend!(Cpu, "cpu-fast");

impl HostOps for Cpu {
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
        embed::backward(cfg, self.threads, u, vh, ids, d_embed, du, dvh, dw);
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
        let given = head::GivenGrad { d_logits, vocab: cfg.vocab() };
        head::backward(cfg, self.threads, w, u, vh, h, dh, du, dvh, dw, &given);
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
        let grad = xent::XentGrad::new(cfg, targets, lse, grad_loss);
        head::backward(cfg, self.threads, w, u, vh, h, dh, du, dvh, dw, &grad);
    }

    fn merge<T: Element>(&self, cfg: &LoraConfig, sign: f64, w: &mut [T], u: &[f32], vh: &[f32]) {
        merge::apply(cfg, self.threads, sign, w, u, vh);
    }
}
