//! The one API every backend implements, so a trainer is written once.
//!
//! A backend fixes how borrowed buffers look: host slices for [`crate::CpuReference`],
//! device views for the CUDA backend. The ops, their argument order and their
//! semantics are the same everywhere:
//!
//! * forward ops and `dh` **write** their output (every element);
//! * gradient buffers in [`Grads`] are **added into**, so calling
//!   [`Backend::embed_backward`] and [`Backend::head_backward`] (or
//!   [`Backend::head_xent_backward`]) on the same `Grads` leaves the one shared
//!   gradient of the tied delta in them;
//! * every check (buffer lengths, token ranges) happens before any output is touched.

use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::error::Result;

/// A read-only host buffer: the `Src` of the backends over host memory
/// ([`crate::CpuReference`], [`crate::Cpu`], `CpuKernels`).
pub type HostSrc<'a, T> = &'a [T];
/// A writable host buffer: the `Dst` of the backends over host memory.
pub type HostDst<'a, T> = &'a mut [T];

/// The tied parameters every op reads: `w` [V, d] in the storage dtype,
/// `lora_vocab` U [V, r] and `lora_hidden` Vh [r, d] in f32.
pub struct Weights<'a, B: Backend + ?Sized, T: Element> {
    /// The tied base weight W [V, d], row-major.
    pub w: B::Src<'a, T>,
    /// U [V, r] (PEFT `lora_embedding_A`ᵀ = lm_head `lora_B`).
    pub lora_vocab: B::Src<'a, f32>,
    /// Vh [r, d] (PEFT `lora_embedding_B`ᵀ = lm_head `lora_A`).
    pub lora_hidden: B::Src<'a, f32>,
}

/// Gradient accumulators (f32), added into by every backward op.
pub struct Grads<'a, B: Backend + ?Sized> {
    /// dU [V, r].
    pub lora_vocab: B::Dst<'a, f32>,
    /// dVh [r, d].
    pub lora_hidden: B::Dst<'a, f32>,
    /// dW [V, d] for full tied fine-tuning; `None` in LoRA mode (W frozen).
    pub w: Option<B::Dst<'a, f32>>,
}

/// Tied-LoRA ops over borrowed buffers. See the module docs for the contract
/// and DESIGN.md §2 for the math.
///
/// `T` is the storage dtype of `w`, `h`, `e`, logits and `dh`; `G` is the
/// dtype of an upstream gradient (`d_embed`, `d_logits`), which may differ
/// (e.g. f32 gradients for bf16 weights); `I` is the id type (`u32` or `i64`).
pub trait Backend {
    /// A read-only buffer of `T`.
    type Src<'a, T: 'static>;
    /// A writable buffer of `T`.
    type Dst<'a, T: 'static>;

    /// Short name for reports (`cpu-reference`, `cuda`, ...).
    fn name(&self) -> &'static str;

    /// `e[t] = c · (W[ids[t]] + s · U[ids[t]] · Vh)`; `out` is [T, d].
    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: Self::Src<'_, I>,
        out: Self::Dst<'_, T>,
    ) -> Result<()>;

    /// Given `d_embed` = ∂L/∂e [T, d]: `dU[i] += c·s·Σ_{t: ids[t]=i} dE_t Vhᵀ`,
    /// `dVh += c·s·Σ_t U[ids[t]]ᵀ dE_t`, and `dW[i] += c·Σ_{t: ids[t]=i} dE_t` if asked.
    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: Self::Src<'_, I>,
        d_embed: Self::Src<'_, G>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()>;

    /// `logits = h Wᵀ + s·(h Vhᵀ) Uᵀ`; `h` is [T, d], `logits` [T, V].
    fn head_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: Self::Src<'_, T>,
        logits: Self::Dst<'_, T>,
    ) -> Result<()>;

    /// Given `d_logits` = G [T, V]: writes `dh = G W + s (G U) Vh`, adds
    /// `dU += s Gᵀ (h Vhᵀ)`, `dVh += s (G U)ᵀ h`, and `dW += Gᵀ h` if asked.
    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: Self::Src<'_, T>,
        d_logits: Self::Src<'_, G>,
        dh: Self::Dst<'_, T>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()>;

    /// Cross-entropy of the (softcapped) head logits against `targets`,
    /// without a [T, V] buffer: writes `loss` \[1\] (reduced per the config; 0 if
    /// every target is ignored) and `lse` \[T\], the per-token logsumexp of the
    /// softcapped logits (written for every token, ignored ones included), which
    /// [`Backend::head_xent_backward`] takes back.
    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: Self::Src<'_, T>,
        targets: Self::Src<'_, I>,
        loss: Self::Dst<'_, f32>,
        lse: Self::Dst<'_, f32>,
    ) -> Result<()>;

    /// Backward of [`Backend::head_xent_forward`] times the upstream scalar
    /// `grad_loss` (1 when the loss is the objective), from the forward's
    /// `lse`. Recomputes the logits (never all of them at once: no [T, V]
    /// buffer); writes `dh` [T, d] and adds `dU`, `dVh` (and `dW` if asked)
    /// into `grads` like `head_backward`, so the embedding backward can add
    /// into the same buffers. Bitwise deterministic on every backend.
    #[allow(clippy::too_many_arguments)]
    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: Self::Src<'_, T>,
        targets: Self::Src<'_, I>,
        lse: Self::Src<'_, f32>,
        grad_loss: f32,
        dh: Self::Dst<'_, T>,
        grads: &mut Grads<'_, Self>,
    ) -> Result<()>;

    /// `W += s·U·Vh` in place, rounded once to W's dtype.
    fn merge<T: Element>(
        &self,
        cfg: &LoraConfig,
        w: Self::Dst<'_, T>,
        lora_vocab: Self::Src<'_, f32>,
        lora_hidden: Self::Src<'_, f32>,
    ) -> Result<()>;

    /// `W -= s·U·Vh` in place; after [`Backend::merge`] restores W up to one rounding.
    fn unmerge<T: Element>(
        &self,
        cfg: &LoraConfig,
        w: Self::Dst<'_, T>,
        lora_vocab: Self::Src<'_, f32>,
        lora_hidden: Self::Src<'_, f32>,
    ) -> Result<()>;
}
