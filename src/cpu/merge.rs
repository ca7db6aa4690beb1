//! Merge / unmerge: `W ± s·U·Vh`, the product on f32 GEMMs per block of rows,
//! the sum rounded once to W's dtype.

use super::blocks::blocks;
use super::gemm::{gemm, Mat, MatMut};
use crate::config::LoraConfig;
use crate::dtype::Element;
use crate::host::parallel::for_row_chunks;

/// Rows of W per GEMM.
const ROW_BLOCK: usize = 256;

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
        let mut delta = vec![0f32; ROW_BLOCK * d];
        for b in blocks(rows.clone(), ROW_BLOCK) {
            let n = b.len();
            gemm(
                1.0,
                Mat::rows(&lora_vocab[b.start * r..], n, r, r),
                Mat::rows(lora_hidden, r, d, d),
                0.0,
                MatMut::rows(&mut delta, n, d, d),
            );
            let o = (b.start - rows.start) * d;
            for (wk, &dl) in chunk[o..o + n * d].iter_mut().zip(&delta) {
                *wk = T::from_f64(wk.to_f64() + s * dl as f64);
            }
        }
    });
}
