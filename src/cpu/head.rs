//! The LM head on f32 GEMMs, one vocabulary block at a time:
//! `z_b = [h | s·p]·[W_b | U_b]ᵀ`, and the backward shared with the fused
//! cross-entropy (`xent.rs`), which only differs in where G comes from.

use super::blocks::{blocks, hidden_aug, par_map, split_rows, vocab_block, weight_aug, TOKEN_BLOCK};
use super::convert::{narrow_into, widen_into};
use super::gemm::{gemm, Mat, MatMut};
use crate::config::LoraConfig;
use crate::dtype::{DType, Element};
use crate::host::parallel::{for_row_chunks, ranges};
use std::ops::Range;

/// `logits = h Wᵀ + s·(h Vhᵀ) Uᵀ`, token rows split over the threads.
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
    let k = d + r;
    let hp = hidden_aug(cfg, h, lora_hidden);
    let vblock = vocab_block(cfg);
    for_row_chunks(logits, v, threads, |rows, out| {
        let mut wa = Vec::new();
        // The staging tile for narrowing to f16 / bf16 (f32 logits need none),
        // no larger than the work: a small op does not fault in a megabyte of
        // fresh pages per call.
        let mut z = Vec::new();
        if T::DTYPE != DType::F32 {
            z.resize(TOKEN_BLOCK.min(rows.len()) * vblock.min(v), 0f32);
        }
        for vb in blocks(0..v, vblock) {
            weight_aug(cfg, w, lora_vocab, vb.clone(), &mut wa);
            for tb in blocks(rows.clone(), TOKEN_BLOCK) {
                let (tn, vn) = (tb.len(), vb.len());
                let a = Mat::rows(&hp[tb.start * k..], tn, k, k);
                let b = Mat::rows(&wa, vn, k, k).t();
                let o = (tb.start - rows.start) * v + vb.start;
                if T::DTYPE == DType::F32 {
                    // f32 logits: the GEMM writes the tile where it belongs
                    // (row stride V), no staging copy.
                    let out32: &mut [f32] = bytemuck::cast_slice_mut(&mut out[o..]);
                    gemm(1.0, a, b, 0.0, MatMut::rows(out32, tn, vn, v));
                    continue;
                }
                gemm(1.0, a, b, 0.0, MatMut::rows(&mut z, tn, vn, vn));
                for (i, zr) in z[..tn * vn].chunks_exact(vn).enumerate() {
                    narrow_into(&mut out[o + i * v..o + i * v + vn], zr);
                }
            }
        }
    });
}

/// Fills the G tile `[tb.len(), vb.len()]` (row-major, f32) for tokens `tb`
/// and vocabulary entries `vb`, given the augmented hidden rows `hp` and the
/// block's augmented weights `wa` `[vb.len(), d + r]`.
pub trait GradTile: Sync {
    /// Writes ∂L/∂z for the tile into `g`.
    fn fill(&self, tb: Range<usize>, vb: Range<usize>, hp: &[f32], wa: &[f32], g: &mut [f32]);

    /// The tile in place, as a slice starting at its first element and its
    /// row stride, when G already exists as f32 (then `fill` is never called
    /// for the tile: the GEMMs read it where it is, no copy).
    fn borrowed(&self, _tb: Range<usize>, _vb: Range<usize>) -> Option<(&[f32], usize)> {
        None
    }
}

/// The head backward for any source of G: writes `dh` [T, d] and adds the
/// parameter gradients into the f32 accumulators.
///
/// The vocabulary is split over the threads (each owns its rows of dU and
/// dW); each thread sums `G·[W_b | U_b]` over its blocks into its own
/// `[T, d + r]` partial, and the partials are summed in thread order, so
/// results depend only on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, F: GradTile>(
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
    tile: &F,
) {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let k = d + r;
    let t = h.len() / d;
    let s = cfg.scale() as f32;
    let hp = hidden_aug(cfg, h, lora_hidden);
    let vblock = vocab_block(cfg);
    let want_w = grad_w.is_some();
    // Columns of [h | s·p] the parameter gradient needs: all for dW and dU, the
    // last r (s·p) for dU alone.
    let (col0, kk) = if want_w { (0, k) } else { (d, r) };

    let parts = ranges(v, threads);
    let du_parts = split_rows(grad_lora_vocab, r, &parts);
    let dw_parts: Vec<Option<&mut [f32]>> = match grad_w {
        Some(gw) => split_rows(gw, d, &parts).into_iter().map(Some).collect(),
        None => parts.iter().map(|_| None).collect(),
    };
    let items: Vec<_> = parts.into_iter().zip(du_parts).zip(dw_parts).collect();
    let partials = par_map(items, |((range, du), mut dw)| {
        let mut acc = vec![0f32; t * k];
        let mut wa = Vec::new();
        let vmax = vblock.min(range.len());
        let mut g = vec![0f32; TOKEN_BLOCK.min(t) * vmax];
        let mut dwa = vec![0f32; vmax * kk];
        for vb in blocks(range.clone(), vblock) {
            let vn = vb.len();
            weight_aug(cfg, w, lora_vocab, vb.clone(), &mut wa);
            dwa[..vn * kk].iter_mut().for_each(|x| *x = 0.0);
            for tb in blocks(0..t, TOKEN_BLOCK) {
                let tn = tb.len();
                let (gt, ld) = match tile.borrowed(tb.clone(), vb.clone()) {
                    Some(view) => view,
                    None => {
                        tile.fill(tb.clone(), vb.clone(), &hp, &wa, &mut g[..tn * vn]);
                        (&g[..tn * vn], vn)
                    }
                };
                // [dh | G·U] += G·[W_b | U_b]
                gemm(
                    1.0,
                    Mat::rows(gt, tn, vn, ld),
                    Mat::rows(&wa, vn, k, k),
                    1.0,
                    MatMut::rows(&mut acc[tb.start * k..], tn, k, k),
                );
                // [dW_b | dU_b] += Gᵀ·[h | s·p]
                gemm(
                    1.0,
                    Mat::rows(gt, tn, vn, ld).t(),
                    Mat::rows(&hp[tb.start * k + col0..], tn, kk, k),
                    1.0,
                    MatMut::rows(&mut dwa, vn, kk, kk),
                );
            }
            let off = vb.start - range.start;
            for (i, row) in dwa[..vn * kk].chunks_exact(kk).enumerate() {
                let vi = off + i;
                for (a, &b) in du[vi * r..(vi + 1) * r].iter_mut().zip(&row[kk - r..]) {
                    *a += b;
                }
                if let Some(dw) = dw.as_deref_mut() {
                    for (a, &b) in dw[vi * d..(vi + 1) * d].iter_mut().zip(&row[..d]) {
                        *a += b;
                    }
                }
            }
        }
        acc
    });
    // Fixed order: partial 0, then 1, ...
    let mut parts = partials.into_iter();
    let mut acc = parts.next().expect("at least one vocabulary range");
    for p in parts {
        for (a, b) in acc.iter_mut().zip(&p) {
            *a += b;
        }
    }
    // dVh += s·(G·U)ᵀ·h
    gemm(s, Mat::rows(&acc[d..], t, r, k).t(), Mat::rows(&hp, t, d, k), 1.0, MatMut::rows(grad_lora_hidden, r, d, d));
    // dh = G·W + s·(G·U)·Vh
    let mut dh32 = vec![0f32; t * d];
    for (dst, src) in dh32.chunks_exact_mut(d).zip(acc.chunks_exact(k)) {
        dst.copy_from_slice(&src[..d]);
    }
    gemm(s, Mat::rows(&acc[d..], t, r, k), Mat::rows(lora_hidden, r, d, d), 1.0, MatMut::rows(&mut dh32, t, d, d));
    narrow_into(dh, &dh32);
}

/// G from an upstream `d_logits` [T, V] of any storage dtype.
pub struct GivenGrad<'a, G> {
    /// ∂L/∂logits, row-major [T, V].
    pub d_logits: &'a [G],
    /// V.
    pub vocab: usize,
}

impl<G: Element> GradTile for GivenGrad<'_, G> {
    fn fill(&self, tb: Range<usize>, vb: Range<usize>, _hp: &[f32], _wa: &[f32], g: &mut [f32]) {
        let vn = vb.len();
        for (row, t) in g.chunks_exact_mut(vn).zip(tb) {
            let o = t * self.vocab + vb.start;
            widen_into(row, &self.d_logits[o..o + vn]);
        }
    }

    fn borrowed(&self, tb: Range<usize>, vb: Range<usize>) -> Option<(&[f32], usize)> {
        (G::DTYPE == DType::F32).then(|| {
            let all: &[f32] = bytemuck::cast_slice(self.d_logits);
            (&all[tb.start * self.vocab + vb.start..], self.vocab)
        })
    }
}
