//! Embedding: `e_t = c·(W[i_t] + s·U[i_t]·Vh)` and its backward. The low-rank
//! product runs on the GEMM (`U[ids]·Vh` is a `[T, r]·[r, d]` product), the
//! gathers and the per-id sums are plain loops. Inputs are already validated.

use super::blocks::workers;
use super::convert::{narrow_into, widen_into};
use super::gemm::{gemm, Mat, MatMut};
use crate::config::LoraConfig;
use crate::dtype::{DType, Element, TokenId};
use crate::host::parallel::for_row_chunks;
use std::borrow::Cow;

/// `U[ids]` as f32 `[ids.len(), r]`.
fn gather_rows<I: TokenId>(lora_vocab: &[f32], r: usize, ids: &[I]) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * r];
    for (dst, id) in out.chunks_exact_mut(r).zip(ids) {
        let i = id.to_i64() as usize;
        dst.copy_from_slice(&lora_vocab[i * r..(i + 1) * r]);
    }
    out
}

/// `src` as f32, borrowed when it already is f32.
fn as_f32<T: Element>(src: &[T]) -> Cow<'_, [f32]> {
    if T::DTYPE == DType::F32 {
        Cow::Borrowed(bytemuck::cast_slice(src))
    } else {
        let mut out = vec![0f32; src.len()];
        widen_into(&mut out, src);
        Cow::Owned(out)
    }
}

pub fn forward<T: Element, I: TokenId>(
    cfg: &LoraConfig,
    threads: usize,
    w: &[T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    ids: &[I],
    out: &mut [T],
) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let (s, c) = (cfg.scale() as f32, cfg.embed_scale() as f32);
    let threads = workers(threads, ids.len() * d * (r + 1));
    for_row_chunks(out, d, threads, |rows, chunk| {
        let n = rows.len();
        let ids = &ids[rows];
        let u_sel = gather_rows(lora_vocab, r, ids);
        // e = W[ids], then e += s·U[ids]·Vh on the GEMM (beta = 1), in the
        // output itself when it is f32.
        let mut tmp = Vec::new();
        let e: &mut [f32] = if T::DTYPE == DType::F32 {
            bytemuck::cast_slice_mut(chunk)
        } else {
            tmp.resize(n * d, 0f32);
            &mut tmp
        };
        for (row, id) in e.chunks_exact_mut(d).zip(ids) {
            let i = id.to_i64() as usize;
            widen_into(row, &w[i * d..(i + 1) * d]);
        }
        gemm(s, Mat::rows(&u_sel, n, r, r), Mat::rows(lora_hidden, r, d, d), 1.0, MatMut::rows(e, n, d, d));
        if c != 1.0 {
            e.iter_mut().for_each(|x| *x *= c);
        }
        if T::DTYPE != DType::F32 {
            narrow_into(chunk, &tmp);
        }
    });
}

/// Adds the embedding path's gradients:
/// `dU[i] += c·s·Σ_{t:i_t=i} dE_t·Vhᵀ`, `dVh += c·s·Σ_t U[i_t]ᵀ·dE_t`, `dW[i] += c·Σ_{t:i_t=i} dE_t`.
/// Rows of the same id are summed in f64 in token order and added once.
///
/// Two independent halves: dVh (one GEMM) and dU / dW (one GEMM, then the
/// per-id sums); with two or more threads and enough work they run side by
/// side. Neither depends on the other, so the result is the same either way.
#[allow(clippy::too_many_arguments)]
pub fn backward<G: Element, I: TokenId>(
    cfg: &LoraConfig,
    threads: usize,
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    ids: &[I],
    d_embed: &[G],
    grad_lora_vocab: &mut [f32],
    grad_lora_hidden: &mut [f32],
    grad_w: Option<&mut [f32]>,
) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let t = ids.len();
    let de = as_f32(d_embed);
    let de = &*de;
    let d_hidden = move || {
        // dVh += c·s·U[ids]ᵀ·dE
        let grad_lora_hidden = grad_lora_hidden; // moved in: the closure runs once
        let u_sel = gather_rows(lora_vocab, r, ids);
        gemm(
            (cfg.embed_scale() * cfg.scale()) as f32,
            Mat::rows(&u_sel, t, r, r).t(),
            Mat::rows(de, t, d, d),
            1.0,
            MatMut::rows(grad_lora_hidden, r, d, d),
        );
    };
    let d_vocab = move || d_vocab_rows(cfg, lora_hidden, ids, de, grad_lora_vocab, grad_w);
    if workers(threads, 2 * t * r * d) >= 2 {
        std::thread::scope(|scope| {
            let h = scope.spawn(d_hidden);
            d_vocab();
            h.join().expect("cpu-fast worker thread panicked");
        });
    } else {
        d_hidden();
        d_vocab();
    }
}

/// `dU[i] += c·s·Σ_{t:i_t=i} (dE·Vhᵀ)_t` and `dW[i] += c·Σ_{t:i_t=i} dE_t`.
fn d_vocab_rows<I: TokenId>(
    cfg: &LoraConfig,
    lora_hidden: &[f32],
    ids: &[I],
    de: &[f32],
    grad_lora_vocab: &mut [f32],
    mut grad_w: Option<&mut [f32]>,
) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let (s, c) = (cfg.scale(), cfg.embed_scale());
    let t = ids.len();
    // a = dE·Vhᵀ [T, r]
    let mut a = vec![0f32; t * r];
    gemm(1.0, Mat::rows(de, t, d, d), Mat::rows(lora_hidden, r, d, d).t(), 0.0, MatMut::rows(&mut a, t, r, r));
    // Tokens grouped by id, token order within an id.
    let mut order: Vec<usize> = (0..t).collect();
    order.sort_unstable_by_key(|&ti| (ids[ti].to_i64(), ti));
    let mut du = vec![0f64; r];
    let mut dw = vec![0f64; if grad_w.is_some() { d } else { 0 }];
    for group in order.chunk_by(|&x, &y| ids[x].to_i64() == ids[y].to_i64()) {
        du.iter_mut().for_each(|x| *x = 0.0);
        dw.iter_mut().for_each(|x| *x = 0.0);
        for &ti in group {
            for (x, &y) in du.iter_mut().zip(&a[ti * r..(ti + 1) * r]) {
                *x += y as f64;
            }
            if grad_w.is_some() {
                for (x, &y) in dw.iter_mut().zip(&de[ti * d..(ti + 1) * d]) {
                    *x += y as f64;
                }
            }
        }
        let i = ids[group[0]].to_i64() as usize;
        for (g, &x) in grad_lora_vocab[i * r..(i + 1) * r].iter_mut().zip(&du) {
            *g = (*g as f64 + c * s * x) as f32;
        }
        if let Some(gw) = grad_w.as_deref_mut() {
            for (g, &x) in gw[i * d..(i + 1) * d].iter_mut().zip(&dw) {
                *g = (*g as f64 + c * x) as f32;
            }
        }
    }
}
