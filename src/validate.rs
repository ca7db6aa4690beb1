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
