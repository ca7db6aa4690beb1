//! Embedding: `e_t = c·(W[i_t] + s·U[i_t]·Vh)` and its backward. Memory-bound:
//! plain f32 loops over rows, one GEMM for dVh. Inputs are already validated.

use super::convert::{narrow_into, widen, widen_into};
use super::gemm::{gemm, Mat, MatMut};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::host::parallel::for_row_chunks;

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
    for_row_chunks(out, d, threads, |rows, chunk| {
        let mut delta = vec![0f32; d];
        let mut row = vec![0f32; d];
        for (t, e_row) in rows.zip(chunk.chunks_exact_mut(d)) {
            let i = ids[t].to_i64() as usize;
            delta.iter_mut().for_each(|x| *x = 0.0);
            for (j, &u) in lora_vocab[i * r..(i + 1) * r].iter().enumerate() {
                for (x, &vh) in delta.iter_mut().zip(&lora_hidden[j * d..(j + 1) * d]) {
                    *x += u * vh;
                }
            }
            widen_into(&mut row, &w[i * d..(i + 1) * d]);
            for (x, &dl) in row.iter_mut().zip(&delta) {
                *x = c * (*x + s * dl);
            }
            narrow_into(e_row, &row);
        }
    });
}

/// Adds the embedding path's gradients:
/// `dU[i] += c·s·Σ_{t:i_t=i} dE_t·Vhᵀ`, `dVh += c·s·Σ_t U[i_t]ᵀ·dE_t`, `dW[i] += c·Σ_{t:i_t=i} dE_t`.
/// Rows of the same id are summed in f64 in token order and added once.
#[allow(clippy::too_many_arguments)]
pub fn backward<G: Element, I: TokenId>(
    cfg: &LoraConfig,
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    ids: &[I],
    d_embed: &[G],
    grad_lora_vocab: &mut [f32],
    grad_lora_hidden: &mut [f32],
    grad_w: Option<&mut [f32]>,
) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let (s, c) = (cfg.scale(), cfg.embed_scale());
    let t = ids.len();
    let de = widen(d_embed);
    // dVh += c·s·U_selᵀ·dE
    let mut u_sel = vec![0f32; t * r];
    for (dst, id) in u_sel.chunks_exact_mut(r).zip(ids) {
        let i = id.to_i64() as usize;
        dst.copy_from_slice(&lora_vocab[i * r..(i + 1) * r]);
    }
    gemm(
        (c * s) as f32,
        Mat::rows(&u_sel, t, r, r).t(),
        Mat::rows(&de, t, d, d),
        1.0,
        MatMut::rows(grad_lora_hidden, r, d, d),
    );
    // a = dE·Vhᵀ [T, r]
    let mut a = vec![0f32; t * r];
    gemm(1.0, Mat::rows(&de, t, d, d), Mat::rows(lora_hidden, r, d, d).t(), 0.0, MatMut::rows(&mut a, t, r, r));
    // Tokens grouped by id (stable: token order within an id).
    let mut order: Vec<usize> = (0..t).collect();
    order.sort_by_key(|&ti| ids[ti].to_i64());
    let mut du = vec![0f64; r];
    let mut dw = vec![0f64; if grad_w.is_some() { d } else { 0 }];
    let mut grad_w = grad_w;
    let mut start = 0;
    while start < t {
        let i = ids[order[start]].to_i64();
        let mut end = start;
        du.iter_mut().for_each(|x| *x = 0.0);
        dw.iter_mut().for_each(|x| *x = 0.0);
        while end < t && ids[order[end]].to_i64() == i {
            let ti = order[end];
            for (x, &y) in du.iter_mut().zip(&a[ti * r..(ti + 1) * r]) {
                *x += y as f64;
            }
            if grad_w.is_some() {
                for (x, &y) in dw.iter_mut().zip(&de[ti * d..(ti + 1) * d]) {
                    *x += y as f64;
                }
            }
            end += 1;
        }
        let i = i as usize;
        for (g, &x) in grad_lora_vocab[i * r..(i + 1) * r].iter_mut().zip(&du) {
            *g = (*g as f64 + c * s * x) as f32;
        }
        if let Some(gw) = grad_w.as_deref_mut() {
            for (g, &x) in gw[i * d..(i + 1) * d].iter_mut().zip(&dw) {
                *g = (*g as f64 + c * x) as f32;
            }
        }
        start = end;
    }
}
