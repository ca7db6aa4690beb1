//! Shape and range checks shared by every backend. Each returns a typed error
//! naming the argument, the expected and the actual size.

use crate::config::LoraConfig;
use crate::dtype::TokenId;
use crate::error::{Error, Result};

/// Checks that `arg` holds `rows * cols` elements; `shape` names the dims, e.g. `"T, d"`.
pub fn check_len(arg: &'static str, actual: usize, rows: usize, cols: usize, shape: &str) -> Result<()> {
    let expected = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::ShapeMismatch(format!("`{arg}` shape [{shape}] = [{rows}, {cols}] overflows")))?;
    if actual != expected {
        let names: Vec<&str> = shape.split(',').map(str::trim).collect();
        let dims = if names.len() == 2 {
            format!("[{}={rows}, {}={cols}]", names[0], names[1])
        } else {
            format!("[{rows}, {cols}]")
        };
        return Err(Error::len(arg, expected, actual, dims));
    }
    Ok(())
}

/// Checks `w` [V, d], `lora_vocab` [V, r] and `lora_hidden` [r, d].
pub fn check_weights(cfg: &LoraConfig, w: usize, lora_vocab: usize, lora_hidden: usize) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    check_len("w", w, v, d, "V, d")?;
    check_len("lora_vocab", lora_vocab, v, r, "V, r")?;
    check_len("lora_hidden", lora_hidden, r, d, "r, d")
}

/// Checks the gradient accumulators: `grad_lora_vocab` [V, r], `grad_lora_hidden` [r, d],
/// and `grad_w` [V, d] when present.
pub fn check_grads(cfg: &LoraConfig, lora_vocab: usize, lora_hidden: usize, w: Option<usize>) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    check_len("grad_lora_vocab", lora_vocab, v, r, "V, r")?;
    check_len("grad_lora_hidden", lora_hidden, r, d, "r, d")?;
    if let Some(w) = w {
        check_len("grad_w", w, v, d, "V, d")?;
    }
    Ok(())
}

/// Number of tokens T; at least one is required.
pub fn check_tokens(arg: &'static str, len: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::ShapeMismatch(format!("`{arg}` is empty: at least one token is required")));
    }
    if len > crate::config::MAX_DIM {
        return Err(Error::ShapeMismatch(format!("`{arg}` has {len} tokens, at most 2^31 - 1 are supported")));
    }
    Ok(len)
}

/// Every id must lie in `0..vocab`.
pub fn check_ids<I: TokenId>(arg: &'static str, ids: &[I], vocab: usize) -> Result<()> {
    for (index, &id) in ids.iter().enumerate() {
        let value = id.to_i64();
        if value < 0 || value >= vocab as i64 {
            return Err(Error::TokenOutOfRange { arg, index, value, vocab });
        }
    }
    Ok(())
}

/// Whether `target` is the ignore index. For `u32` targets, the 32-bit pattern of
/// a negative ignore index (`-100i32 as u32`) also counts.
#[inline]
pub fn is_ignored<I: TokenId>(target: I, ignore_index: i64) -> bool {
    let t = target.to_i64();
    t == ignore_index || (I::NAME == "u32" && (t as u32 as i32) as i64 == ignore_index)
}

/// Every target must be `ignore_index` or lie in `0..vocab`.
pub fn check_targets<I: TokenId>(arg: &'static str, targets: &[I], vocab: usize, ignore_index: i64) -> Result<()> {
    for (index, &t) in targets.iter().enumerate() {
        if is_ignored(t, ignore_index) {
            continue;
        }
        let value = t.to_i64();
        if value < 0 || value >= vocab as i64 {
            return Err(Error::TokenOutOfRange { arg, index, value, vocab });
        }
    }
    Ok(())
}

/// Buffer lengths of the tied parameters, for the per-op checks below.
#[derive(Debug, Clone, Copy)]
pub struct WeightLens {
    /// `w`.
    pub w: usize,
    /// `lora_vocab`.
    pub lora_vocab: usize,
    /// `lora_hidden`.
    pub lora_hidden: usize,
}

/// Buffer lengths of the gradient accumulators.
#[derive(Debug, Clone, Copy)]
pub struct GradLens {
    /// `grad_lora_vocab`.
    pub lora_vocab: usize,
    /// `grad_lora_hidden`.
    pub lora_hidden: usize,
    /// `grad_w`, if present.
    pub w: Option<usize>,
}

/// Every length check of `embed_forward`; returns T.
pub fn embed_forward_lens(cfg: &LoraConfig, wl: WeightLens, ids: usize, out: usize) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    let t = check_tokens("ids", ids)?;
    check_len("out", out, t, cfg.hidden(), "T, d")?;
    Ok(t)
}

/// Every length check of `embed_backward`; returns T.
pub fn embed_backward_lens(
    cfg: &LoraConfig,
    wl: WeightLens,
    ids: usize,
    d_embed: usize,
    gl: GradLens,
) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    check_grads(cfg, gl.lora_vocab, gl.lora_hidden, gl.w)?;
    let t = check_tokens("ids", ids)?;
    check_len("d_embed", d_embed, t, cfg.hidden(), "T, d")?;
    Ok(t)
}

/// Every length check of `head_forward`; returns T.
pub fn head_forward_lens(cfg: &LoraConfig, wl: WeightLens, h: usize, logits: usize) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    let t = check_tokens("h", h / cfg.hidden())?;
    check_len("h", h, t, cfg.hidden(), "T, d")?;
    check_len("logits", logits, t, cfg.vocab(), "T, V")?;
    Ok(t)
}

/// Every length check of `head_backward`; returns T.
pub fn head_backward_lens(
    cfg: &LoraConfig,
    wl: WeightLens,
    h: usize,
    d_logits: usize,
    dh: usize,
    gl: GradLens,
) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    check_grads(cfg, gl.lora_vocab, gl.lora_hidden, gl.w)?;
    let t = check_tokens("h", h / cfg.hidden())?;
    check_len("h", h, t, cfg.hidden(), "T, d")?;
    check_len("d_logits", d_logits, t, cfg.vocab(), "T, V")?;
    check_len("dh", dh, t, cfg.hidden(), "T, d")?;
    Ok(t)
}

/// Every length check of `head_xent_forward`; returns T.
pub fn xent_forward_lens(
    cfg: &LoraConfig,
    wl: WeightLens,
    h: usize,
    targets: usize,
    loss: usize,
    lse: usize,
) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    let t = check_tokens("targets", targets)?;
    check_len("h", h, t, cfg.hidden(), "T, d")?;
    check_len("loss", loss, 1, 1, "1, 1")?;
    check_len("lse", lse, t, 1, "T, 1")?;
    Ok(t)
}

/// Every length check of `head_xent_backward`; returns T.
#[allow(clippy::too_many_arguments)]
pub fn xent_backward_lens(
    cfg: &LoraConfig,
    wl: WeightLens,
    h: usize,
    targets: usize,
    lse: usize,
    dh: usize,
    gl: GradLens,
) -> Result<usize> {
    check_weights(cfg, wl.w, wl.lora_vocab, wl.lora_hidden)?;
    check_grads(cfg, gl.lora_vocab, gl.lora_hidden, gl.w)?;
    let t = check_tokens("targets", targets)?;
    check_len("h", h, t, cfg.hidden(), "T, d")?;
    check_len("lse", lse, t, 1, "T, 1")?;
    check_len("dh", dh, t, cfg.hidden(), "T, d")?;
    Ok(t)
}
