//! Reference LM head: `z = h Wᵀ + s·(h Vhᵀ) Uᵀ` and its backward. The logit
//! row and the backward-from-one-row pieces are shared with the fused
//! cross-entropy (`xent.rs`), which only differs in where G comes from.

use super::math::{add_into, dot, project_hidden, widen};
use crate::config::LoraConfig;
use crate::dtype::Element;
use crate::host::parallel::for_row_chunks;

/// One logit row: `z[v] = W[v]·h_t + s·U[v]·p_t` with `p_t = h_t Vhᵀ`.
pub fn logit_row<T: Element>(cfg: &LoraConfig, w: &[T], lora_vocab: &[f32], h_row: &[f64], p: &[f64], z: &mut [f64]) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let s = cfg.scale();
    for (v, zv) in z.iter_mut().enumerate() {
        *zv = dot(&w[v * d..(v + 1) * d], h_row) + s * dot(&lora_vocab[v * r..(v + 1) * r], p);
    }
}

pub fn forward<T: Element>(
    cfg: &LoraConfig,
    threads: usize,
    w: &[T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    h: &[T],
    logits: &mut [T],
) {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    for_row_chunks(logits, v, threads, |rows, chunk| {
        let mut p = vec![0f64; r];
        let mut z = vec![0f64; v];
        for (t, out_row) in rows.zip(chunk.chunks_exact_mut(v)) {
            let h_row = widen(&h[t * d..(t + 1) * d]);
            project_hidden(&h_row, lora_hidden, r, &mut p);
            logit_row(cfg, w, lora_vocab, &h_row, &p, &mut z);
            for (o, &zv) in out_row.iter_mut().zip(&z) {
                *o = T::from_f64(zv);
            }
        }
    });
}

/// f64 partial sums of the parameter gradients over a range of rows.
pub struct Partial {
    pub lora_vocab: Vec<f64>,
    pub lora_hidden: Vec<f64>,
    pub w: Option<Vec<f64>>,
}

/// The head backward for any source of G rows. `g_row(t, g)` fills `g` [V] with
/// ∂L/∂z_t. Writes `dh` [T, d] and adds the parameter gradients into the
/// f32 accumulators (one rounding per element).
#[allow(clippy::too_many_arguments)]
pub fn backward_from_rows<T: Element, F>(
    cfg: &LoraConfig,
    threads: usize,
    w: &[T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    h: &[T],
    dh: &mut [T],
    grad_lora_vocab: &mut [f32],
    grad_lora_hidden: &mut [f32],
    grad_w: Option<&mut [f32]>,
    g_row: F,
) where
    F: Fn(usize, &[f64], &[f64], &mut [f64]) + Sync,
{
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let s = cfg.scale();
    let want_w = grad_w.is_some();
    let partials = for_row_chunks(dh, d, threads, |rows, chunk| {
        let mut part = Partial {
            lora_vocab: vec![0f64; v * r],
            lora_hidden: vec![0f64; r * d],
            w: want_w.then(|| vec![0f64; v * d]),
        };
        let mut p = vec![0f64; r];
        let mut g = vec![0f64; v];
        let mut gu = vec![0f64; r];
        for (t, dh_row) in rows.zip(chunk.chunks_exact_mut(d)) {
            let h_row = widen(&h[t * d..(t + 1) * d]);
            project_hidden(&h_row, lora_hidden, r, &mut p);
            g_row(t, &h_row, &p, &mut g);
            // gU = G_t · U  (r values)
            gu.iter_mut().for_each(|x| *x = 0.0);
            for (vi, &gv) in g.iter().enumerate() {
                for j in 0..r {
                    gu[j] += gv * lora_vocab[vi * r + j] as f64;
                }
            }
            // dh_t = G_t W + s (G_t U) Vh
            for (k, o) in dh_row.iter_mut().enumerate() {
                let base: f64 = g.iter().enumerate().map(|(vi, &gv)| gv * w[vi * d + k].to_f64()).sum();
                let lora: f64 = (0..r).map(|j| gu[j] * lora_hidden[j * d + k] as f64).sum();
                *o = T::from_f64(base + s * lora);
            }
            // dU[v] += s G_t[v] p_t ; dVh[j] += s gU[j] h_t ; dW[v] += G_t[v] h_t
            for (vi, &gv) in g.iter().enumerate() {
                for j in 0..r {
                    part.lora_vocab[vi * r + j] += s * gv * p[j];
                }
            }
            for j in 0..r {
                for k in 0..d {
                    part.lora_hidden[j * d + k] += s * gu[j] * h_row[k];
                }
            }
            if let Some(pw) = part.w.as_mut() {
                for (vi, &gv) in g.iter().enumerate() {
                    for k in 0..d {
                        pw[vi * d + k] += gv * h_row[k];
                    }
                }
            }
        }
        part
    });
    // Combine the partials in row order, then round once into the f32 buffers.
    let mut total =
        Partial { lora_vocab: vec![0f64; v * r], lora_hidden: vec![0f64; r * d], w: want_w.then(|| vec![0f64; v * d]) };
    for part in &partials {
        sum_into(&mut total.lora_vocab, &part.lora_vocab);
        sum_into(&mut total.lora_hidden, &part.lora_hidden);
        if let (Some(tw), Some(pw)) = (total.w.as_mut(), part.w.as_ref()) {
            sum_into(tw, pw);
        }
    }
    add_into(grad_lora_vocab, &total.lora_vocab);
    add_into(grad_lora_hidden, &total.lora_hidden);
    if let (Some(gw), Some(tw)) = (grad_w, total.w) {
        add_into(gw, &tw);
    }
}

fn sum_into(acc: &mut [f64], part: &[f64]) {
    for (a, &p) in acc.iter_mut().zip(part) {
        *a += p;
    }
}
