//! Small f64 helpers the reference ops share.

use crate::dtype::Element;

/// Σ a[k]·b[k] in f64.
#[inline]
pub fn dot<A: Element>(a: &[A], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.to_f64() * y).sum()
}

/// Widens a storage-dtype slice to f64.
pub fn widen<A: Element>(a: &[A]) -> Vec<f64> {
    a.iter().map(|x| x.to_f64()).collect()
}

/// `p = h_row · Vhᵀ` (r values): the LoRA "down" projection of one hidden row.
pub fn project_hidden(h_row: &[f64], lora_hidden: &[f32], rank: usize, p: &mut [f64]) {
    let d = h_row.len();
    for (j, pj) in p.iter_mut().enumerate().take(rank) {
        *pj = dot(&lora_hidden[j * d..(j + 1) * d], h_row);
    }
}

/// Adds an f64 accumulator into an f32 gradient buffer (one rounding per element).
pub fn add_into(grad: &mut [f32], acc: &[f64]) {
    for (g, &a) in grad.iter_mut().zip(acc) {
        *g = (*g as f64 + a) as f32;
    }
}
