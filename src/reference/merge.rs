//! Reference merge / unmerge: `W ± s·U·Vh`, computed in f64 and rounded once to W's dtype.

use crate::config::LoraConfig;
use crate::dtype::Element;
use crate::host::parallel::for_row_chunks;

/// `sign` = +1 merges, −1 unmerges.
pub fn apply<T: Element>(
    cfg: &LoraConfig,
    threads: usize,
    sign: f64,
    w: &mut [T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
) {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let s = sign * cfg.scale();
    for_row_chunks(w, d, threads, |rows, chunk| {
        for (v, w_row) in rows.zip(chunk.chunks_exact_mut(d)) {
            let u_row = &lora_vocab[v * r..(v + 1) * r];
            for (k, wk) in w_row.iter_mut().enumerate() {
                let delta: f64 = (0..r).map(|j| u_row[j] as f64 * lora_hidden[j * d + k] as f64).sum();
                *wk = T::from_f64(wk.to_f64() + s * delta);
            }
        }
    });
}
