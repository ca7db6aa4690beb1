//! The blocking shared by the head and cross-entropy ops: the augmented hidden
//! rows `[h | s·p]` (p = h·Vhᵀ), the augmented weight blocks `[W_b | U_b]`, so
//! that one GEMM over d + r columns gives `h·W_bᵀ + s·(h·Vhᵀ)·U_bᵀ`; block
//! sizes; and a deterministic map over scoped threads.

use super::convert::widen_into;
use super::gemm::{gemm, Mat, MatMut};
use crate::config::LoraConfig;
use crate::dtype::Element;
use std::ops::Range;

/// Vocabulary entries per block: the f32 block `[V_b, d + r]` of the weights
/// is about 1 MiB (at least 64 rows, at most 4096).
pub fn vocab_block(cfg: &LoraConfig) -> usize {
    let k = cfg.hidden() + cfg.rank();
    ((1 << 18) / k).clamp(64, 4096)
}

/// Tokens per block: a `[T_b, V_b]` f32 tile of logits stays in cache.
pub const TOKEN_BLOCK: usize = 128;

/// `range` cut into consecutive pieces of at most `step` elements.
pub fn blocks(range: Range<usize>, step: usize) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range.step_by(step.max(1)).map(move |s| s..(s + step).min(end))
}

/// `[h | s·p]` as f32 `[T, d + r]`, with `p = h·Vhᵀ`.
pub fn hidden_aug<T: Element>(cfg: &LoraConfig, h: &[T], lora_hidden: &[f32]) -> Vec<f32> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let k = d + r;
    let t = h.len() / d;
    let h32 = super::convert::widen(h);
    let mut hp = vec![0f32; t * k];
    for (dst, src) in hp.chunks_exact_mut(k).zip(h32.chunks_exact(d)) {
        dst[..d].copy_from_slice(src);
    }
    let mut p = vec![0f32; t * r];
    gemm(
        cfg.scale() as f32,
        Mat::rows(&h32, t, d, d),
        Mat::rows(lora_hidden, r, d, d).t(),
        0.0,
        MatMut::rows(&mut p, t, r, r),
    );
    for (dst, src) in hp.chunks_exact_mut(k).zip(p.chunks_exact(r)) {
        dst[d..].copy_from_slice(src);
    }
    hp
}

/// Fills `out` with `[W_b | U_b]` as f32 `[V_b, d + r]` for the rows `vb`.
pub fn weight_aug<T: Element>(cfg: &LoraConfig, w: &[T], lora_vocab: &[f32], vb: Range<usize>, out: &mut Vec<f32>) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let k = d + r;
    out.resize(vb.len() * k, 0.0);
    for (row, v) in out.chunks_exact_mut(k).zip(vb) {
        widen_into(&mut row[..d], &w[v * d..(v + 1) * d]);
        row[d..].copy_from_slice(&lora_vocab[v * r..(v + 1) * r]);
    }
}

/// Multiply-adds below which an op runs on the caller's thread: a spawned
/// worker costs tens of microseconds, and on a busy machine it may wait a
/// scheduler slice (milliseconds) for a core, far more than it would save.
pub const PAR_MIN_WORK: usize = 1 << 22;

/// The workers for an op of `work` multiply-adds: `threads`, or 1 when the op
/// is too small to share.
pub fn workers(threads: usize, work: usize) -> usize {
    if work < PAR_MIN_WORK {
        1
    } else {
        threads
    }
}

/// Runs `f` on every item, one scoped thread per item (the last on the
/// caller's thread), and returns the results in item order.
pub fn par_map<S: Send, R: Send, F: Fn(S) -> R + Sync>(items: Vec<S>, f: F) -> Vec<R> {
    let mut items = items;
    let Some(last) = items.pop() else { return Vec::new() };
    if items.is_empty() {
        return vec![f(last)];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items.into_iter().map(|s| scope.spawn(move || f(s))).collect();
        let tail = f(last);
        let mut out: Vec<R> = handles.into_iter().map(|h| h.join().expect("cpu-fast worker thread panicked")).collect();
        out.push(tail);
        out
    })
}

/// Splits `data` (rows of `row_len`) into the consecutive row `ranges`.
pub fn split_rows<'a, T>(data: &'a mut [T], row_len: usize, ranges: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut rest = data;
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(range.len() * row_len);
        out.push(head);
        rest = tail;
    }
    out
}
