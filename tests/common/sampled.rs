//! Float64 references of selected rows of the head ops' outputs, for shapes
//! too large to recompute whole on the host (the GPU's 64-bit indexing test:
//! T·V past 2^31 elements). Each returns the relative norm error of the
//! selected rows against the reference.
// Index loops mirror the math's subscripts.
#![allow(clippy::needless_range_loop)]

use super::golden::rel_err;
use super::harness::{widen, HostWeights};
use tiedlora::{Element, LoraConfig};

/// p[t] = s·h[t]·Vhᵀ in f64.
fn lora_down_row<T: Element>(cfg: &LoraConfig, vh: &[f32], h_row: &[T]) -> Vec<f64> {
    let (d, r, s) = (cfg.hidden(), cfg.rank(), cfg.scale());
    (0..r).map(|j| s * (0..d).map(|k| h_row[k].to_f64() * vh[j * d + k] as f64).sum::<f64>()).collect()
}

/// Token rows `rows` of `logits` [T, V] against `h Wᵀ + s·(h Vhᵀ) Uᵀ`.
pub fn logits_rows_err<T: Element>(cfg: &LoraConfig, wt: HostWeights<T>, h: &[T], logits: &[T], rows: &[usize]) -> f64 {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &t in rows {
        let hr = &h[t * d..(t + 1) * d];
        let p = lora_down_row(cfg, wt.vh, hr);
        for vi in 0..v {
            let base: f64 = (0..d).map(|k| hr[k].to_f64() * wt.w[vi * d + k].to_f64()).sum();
            let lora: f64 = (0..r).map(|j| p[j] * wt.u[vi * r + j] as f64).sum();
            want.push(base + lora);
        }
        got.extend(widen(&logits[t * v..(t + 1) * v]));
    }
    rel_err(&got, &want)
}

/// Token rows `rows` of `dh` [T, d] against `G W + s (G U) Vh`, G [T, V].
pub fn dh_rows_err<T: Element, G: Element>(
    cfg: &LoraConfig,
    wt: HostWeights<T>,
    g: &[G],
    dh: &[T],
    rows: &[usize],
) -> f64 {
    let (v, d, r, s) = (cfg.vocab(), cfg.hidden(), cfg.rank(), cfg.scale());
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &t in rows {
        let gr = &g[t * v..(t + 1) * v];
        let mut row = vec![0f64; d];
        let mut gu = vec![0f64; r];
        for vi in 0..v {
            let gv = gr[vi].to_f64();
            for k in 0..d {
                row[k] += gv * wt.w[vi * d + k].to_f64();
            }
            for j in 0..r {
                gu[j] += gv * wt.u[vi * r + j] as f64;
            }
        }
        for k in 0..d {
            want.push(row[k] + s * (0..r).map(|j| gu[j] * wt.vh[j * d + k] as f64).sum::<f64>());
        }
        got.extend(widen(&dh[t * d..(t + 1) * d]));
    }
    rel_err(&got, &want)
}

/// Vocabulary rows `rows` of `du` [V, r] (the gradient of one call, added
/// into zeros) against `Gᵀ (s h Vhᵀ)`.
pub fn du_rows_err<T: Element, G: Element>(
    cfg: &LoraConfig,
    wt: HostWeights<T>,
    h: &[T],
    g: &[G],
    du: &[f32],
    rows: &[usize],
) -> f64 {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let tokens = h.len() / d;
    let p: Vec<Vec<f64>> = (0..tokens).map(|t| lora_down_row(cfg, wt.vh, &h[t * d..(t + 1) * d])).collect();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &vi in rows {
        let mut acc = vec![0f64; r];
        for (t, pt) in p.iter().enumerate() {
            let gv = g[t * v + vi].to_f64();
            for j in 0..r {
                acc[j] += gv * pt[j];
            }
        }
        want.extend(acc);
        got.extend(du[vi * r..(vi + 1) * r].iter().map(|&x| x as f64));
    }
    rel_err(&got, &want)
}
