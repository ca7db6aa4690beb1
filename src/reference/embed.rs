//! Reference embedding: `e_t = c·(W[i_t] + s·U[i_t]·Vh)` and its backward.
//! Inputs are already validated (lengths, id ranges) by the caller.

use super::math::add_into;
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
    let (s, c) = (cfg.scale(), cfg.embed_scale());
    for_row_chunks(out, d, threads, |rows, chunk| {
        for (t, e_row) in rows.zip(chunk.chunks_exact_mut(d)) {
            let i = ids[t].to_i64() as usize;
            let w_row = &w[i * d..(i + 1) * d];
            let u_row = &lora_vocab[i * r..(i + 1) * r];
            for (k, e) in e_row.iter_mut().enumerate() {
                let delta: f64 = (0..r).map(|j| u_row[j] as f64 * lora_hidden[j * d + k] as f64).sum();
                *e = T::from_f64(c * (w_row[k].to_f64() + s * delta));
            }
        }
    });
}

/// Adds the embedding path's gradients:
/// `dU[i] += c·s·Σ_{t:i_t=i} dE_t·Vhᵀ`, `dVh += c·s·Σ_t U[i_t]ᵀ·dE_t`, `dW[i] += c·Σ_{t:i_t=i} dE_t`.
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
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let (s, c) = (cfg.scale(), cfg.embed_scale());
    let mut du = vec![0f64; v * r];
    let mut dvh = vec![0f64; r * d];
    let mut dw = grad_w.as_ref().map(|_| vec![0f64; v * d]);
    for (t, &id) in ids.iter().enumerate() {
        let i = id.to_i64() as usize;
        let de = &d_embed[t * d..(t + 1) * d];
        for j in 0..r {
            let vh_row = &lora_hidden[j * d..(j + 1) * d];
            let g: f64 = de.iter().zip(vh_row).map(|(&x, &y)| x.to_f64() * y as f64).sum();
            du[i * r + j] += c * s * g;
            let u_ij = lora_vocab[i * r + j] as f64;
            for k in 0..d {
                dvh[j * d + k] += c * s * u_ij * de[k].to_f64();
            }
        }
        if let Some(dw) = dw.as_mut() {
            for k in 0..d {
                dw[i * d + k] += c * de[k].to_f64();
            }
        }
    }
    add_into(grad_lora_vocab, &du);
    add_into(grad_lora_hidden, &dvh);
    if let (Some(g), Some(acc)) = (grad_w, dw) {
        add_into(g, &acc);
    }
}
