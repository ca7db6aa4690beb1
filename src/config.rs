//! The one validated description of a tied LoRA: shapes, scale and loss options.

use crate::error::{Error, Result};
use std::fmt;

/// How per-token cross-entropy losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Reduction {
    /// Mean over the tokens whose target is not `ignore_index` (0 if there are none).
    #[default]
    Mean,
    /// Sum over the tokens whose target is not `ignore_index`.
    Sum,
}

impl Reduction {
    /// Parses `mean` or `sum`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mean" => Some(Reduction::Mean),
            "sum" => Some(Reduction::Sum),
            _ => None,
        }
    }
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
        })
    }
}

/// PEFT's LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scale(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// Largest vocabulary / hidden size / rank accepted: kernels index rows with 32-bit ints.
pub const MAX_DIM: usize = i32::MAX as usize;

/// A validated tied-LoRA configuration. Build it with [`LoraConfig::builder`];
/// once built, every field is in its domain, so the ops only check buffers.
///
/// ```
/// use tiedlora::{LoraConfig, Reduction};
/// let cfg = LoraConfig::builder(256_000, 2304, 16)
///     .alpha(32.0)
///     .embed_scale((2304f64).sqrt()) // Gemma scales embeddings by sqrt(d)
///     .logit_softcap(30.0)            // Gemma 2
///     .reduction(Reduction::Mean)
///     .build()?;
/// assert_eq!(cfg.scale(), 2.0);
/// # Ok::<(), tiedlora::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    vocab: usize,
    hidden: usize,
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    embed_scale: f64,
    logit_softcap: Option<f64>,
    ignore_index: i64,
    reduction: Reduction,
    xent_grad_filter: Option<f64>,
}

/// Builder for [`LoraConfig`]; defaults follow PEFT (`lora_alpha = 8`, no rsLoRA)
/// and PyTorch's `cross_entropy` (`ignore_index = -100`, mean).
#[derive(Debug, Clone)]
pub struct LoraConfigBuilder {
    cfg: LoraConfig,
}

impl LoraConfig {
    /// Starts a config for a tied weight `w` [vocab, hidden] with LoRA rank `rank`.
    pub fn builder(vocab: usize, hidden: usize, rank: usize) -> LoraConfigBuilder {
        LoraConfigBuilder {
            cfg: LoraConfig {
                vocab,
                hidden,
                rank,
                alpha: 8.0,
                use_rslora: false,
                embed_scale: 1.0,
                logit_softcap: None,
                ignore_index: -100,
                reduction: Reduction::Mean,
                xent_grad_filter: None,
            },
        }
    }

    /// V: rows of `w` and `lora_vocab`.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// d: columns of `w` and `lora_hidden`.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    /// r: the LoRA rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// PEFT's `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// Whether the scale is `alpha / sqrt(r)` (rsLoRA) rather than `alpha / r`.
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }
    /// The LoRA scale s: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank, self.use_rslora)
    }
    /// c: the embedding output multiplier (1 unless the model scales, e.g. Gemma's sqrt(d)).
    pub fn embed_scale(&self) -> f64 {
        self.embed_scale
    }
    /// κ of the logit softcap `κ·tanh(z/κ)`, if any.
    pub fn logit_softcap(&self) -> Option<f64> {
        self.logit_softcap
    }
    /// Target value that contributes no loss and no gradient.
    pub fn ignore_index(&self) -> i64 {
        self.ignore_index
    }
    /// Loss reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }
    /// The factor the sum of the per-token losses is multiplied by, given the
    /// number of targets that are not `ignore_index`: 1/valid (mean), 1 (sum),
    /// and 0 when there is none (loss 0, zero gradients).
    pub fn loss_scale(&self, valid: usize) -> f64 {
        match self.reduction {
            _ if valid == 0 => 0.0,
            Reduction::Mean => 1.0 / valid as f64,
            Reduction::Sum => 1.0,
        }
    }
    /// Gradient filter ε of the fused cross-entropy backward, if on (see
    /// [`LoraConfigBuilder::xent_grad_filter`]).
    pub fn xent_grad_filter(&self) -> Option<f64> {
        self.xent_grad_filter
    }
}

impl LoraConfigBuilder {
    /// PEFT's `lora_alpha` (default 8). Must be finite.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.cfg.alpha = alpha;
        self
    }
    /// rsLoRA scaling `alpha / sqrt(r)` (default off).
    pub fn use_rslora(mut self, on: bool) -> Self {
        self.cfg.use_rslora = on;
        self
    }
    /// Embedding output multiplier c (default 1). Must be finite.
    pub fn embed_scale(mut self, c: f64) -> Self {
        self.cfg.embed_scale = c;
        self
    }
    /// Logit softcap κ (Gemma 2 uses 30). Must be finite and > 0.
    pub fn logit_softcap(mut self, kappa: f64) -> Self {
        self.cfg.logit_softcap = Some(kappa);
        self
    }
    /// Softcap as an option; `None` or `Some(0.0)` (the golden-file convention) turns it off.
    pub fn logit_softcap_opt(mut self, kappa: Option<f64>) -> Self {
        self.cfg.logit_softcap = kappa.filter(|&k| k != 0.0);
        self
    }
    /// Target value to ignore (default -100). With `u32` targets, a target holding
    /// the 32-bit two's-complement pattern of a negative `ignore_index`
    /// (`-100i32 as u32`) is ignored too.
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.cfg.ignore_index = ignore_index;
        self
    }
    /// Loss reduction (default mean).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.cfg.reduction = reduction;
        self
    }

    /// Approximate fused cross-entropy backward (off by default: exact).
    ///
    /// With ε set, the kernel backends drop every 128 × 128 tile (128 tokens ×
    /// 128 vocabulary entries) of G = ∂loss/∂logits whose entries all satisfy
    /// |G| < ε·f, where f = `grad_loss` / N (mean) or `grad_loss` (sum) bounds
    /// every |G| entry; the gradient GEMMs skip those tiles (the logits are
    /// still recomputed: the filter decides from them). Each dropped entry is
    /// below ε·f, so the error is bounded element-wise:
    /// |Δdh[t, k]| ≤ ε·f·Σ_v |W'[v, k]| (W' = W + s·U·Vh),
    /// |ΔdU[v, j]| ≤ ε·f·Σ_t |p[t, j]| (p = s·h·Vhᵀ), |ΔdW[v, k]| ≤ ε·f·Σ_t |h[t, k]|,
    /// |ΔdVh[j, k]| ≤ s·Σ_t (ε·f·Σ_v |U[v, j]|)·|h[t, k]|;
    /// `tests/kernels_cpu.rs` checks exactly these bounds. Worth it when the
    /// softmax is peaked (trained models): most tiles then hold only tiny
    /// probabilities. The CPU reference ignores the filter and stays exact.
    /// Must be in (0, 1).
    pub fn xent_grad_filter(mut self, eps: f64) -> Self {
        self.cfg.xent_grad_filter = Some(eps);
        self
    }

    /// Checks every field and returns the config.
    pub fn build(self) -> Result<LoraConfig> {
        let c = self.cfg;
        let dim = |field: &'static str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::InvalidConfig { field, value: v.to_string(), reason: "must be at least 1" });
            }
            if v > MAX_DIM {
                return Err(Error::InvalidConfig { field, value: v.to_string(), reason: "must be at most 2^31 - 1" });
            }
            Ok(())
        };
        dim("vocab", c.vocab)?;
        dim("hidden", c.hidden)?;
        dim("rank", c.rank)?;
        if c.vocab.checked_mul(c.hidden.max(c.rank)).is_none() {
            return Err(Error::InvalidConfig {
                field: "vocab",
                value: format!("{} x {}", c.vocab, c.hidden),
                reason: "vocab * hidden overflows usize",
            });
        }
        // Kernels use these values in f32, so they must be finite there too.
        let finite = |field: &'static str, v: f64| -> Result<()> {
            if v.is_finite() && (v as f32).is_finite() {
                Ok(())
            } else {
                Err(Error::InvalidConfig { field, value: v.to_string(), reason: "must be finite (also as f32)" })
            }
        };
        finite("alpha", c.alpha)?;
        finite("embed_scale", c.embed_scale)?;
        if !(c.scale() as f32).is_finite() {
            return Err(Error::InvalidConfig {
                field: "scale",
                value: c.scale().to_string(),
                reason: "alpha / r (or alpha / sqrt(r)) must be finite in f32",
            });
        }
        if let Some(k) = c.logit_softcap {
            if !(k.is_finite() && (k as f32).is_finite() && k > 0.0) {
                return Err(Error::InvalidConfig {
                    field: "logit_softcap",
                    value: k.to_string(),
                    reason: "must be finite and > 0",
                });
            }
        }
        if let Some(eps) = c.xent_grad_filter {
            if !(eps > 0.0 && eps < 1.0) {
                return Err(Error::InvalidConfig {
                    field: "xent_grad_filter",
                    value: eps.to_string(),
                    reason: "must be in (0, 1)",
                });
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_plain_and_rslora() {
        let c = LoraConfig::builder(10, 4, 4).alpha(8.0).build().unwrap();
        assert_eq!(c.scale(), 2.0);
        let c = LoraConfig::builder(10, 4, 16).alpha(8.0).use_rslora(true).build().unwrap();
        assert_eq!(c.scale(), 2.0);
    }
}
