//! Reference fused head + cross-entropy, one token row at a time: memory O(V)
//! per worker, never [T, V].
//!
//! `z' = κ·tanh(z/κ)` (or z), `loss_t = lse(z'_t) − z'_t[y_t]`,
//! `G_t = (softmax(z'_t) − onehot(y_t)) · (1 − tanh²(z_t/κ)) · grad_loss / N`.

use super::head::{backward_from_rows, logit_row};
use super::math::{project_hidden, widen};
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::host::parallel::for_row_chunks;
use crate::validate::is_ignored;

/// Applies the softcap in place; returns nothing, `z` becomes z'.
fn softcap(kappa: Option<f64>, z: &mut [f64]) {
    if let Some(k) = kappa {
        for x in z.iter_mut() {
            *x = k * (*x / k).tanh();
        }
    }
}

/// logsumexp with max-shift. NaN anywhere gives NaN; an infinite max gives that max.
pub fn logsumexp(z: &[f64]) -> f64 {
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if m.is_infinite() {
        return if z.iter().any(|x| x.is_nan()) { f64::NAN } else { m };
    }
    m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// Number of targets that count (not `ignore_index`).
pub fn valid_count<I: TokenId>(cfg: &LoraConfig, targets: &[I]) -> usize {
    targets.iter().filter(|&&t| !is_ignored(t, cfg.ignore_index())).count()
}

/// Writes `lse` [T] (every row, ignored ones included) and returns the reduced loss.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element, I: TokenId>(
    cfg: &LoraConfig,
    threads: usize,
    w: &[T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    h: &[T],
    targets: &[I],
    lse: &mut [f32],
) -> f32 {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let partial_sums = for_row_chunks(lse, 1, threads, |rows, chunk| {
        let mut p = vec![0f64; r];
        let mut z = vec![0f64; v];
        let mut sum = 0f64;
        for (t, lse_t) in rows.zip(chunk.iter_mut()) {
            let h_row = widen(&h[t * d..(t + 1) * d]);
            project_hidden(&h_row, lora_hidden, r, &mut p);
            logit_row(cfg, w, lora_vocab, &h_row, &p, &mut z);
            softcap(cfg.logit_softcap(), &mut z);
            let l = logsumexp(&z);
            *lse_t = l as f32;
            if !is_ignored(targets[t], cfg.ignore_index()) {
                sum += l - z[targets[t].to_i64() as usize];
            }
        }
        sum
    });
    let total: f64 = partial_sums.iter().sum();
    (total * cfg.loss_scale(valid_count(cfg, targets))) as f32
}

/// Recomputes each logit row, forms G_t and runs the shared head backward.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, I: TokenId>(
    cfg: &LoraConfig,
    threads: usize,
    w: &[T],
    lora_vocab: &[f32],
    lora_hidden: &[f32],
    h: &[T],
    targets: &[I],
    lse: &[f32],
    grad_loss: f32,
    dh: &mut [T],
    grad_lora_vocab: &mut [f32],
    grad_lora_hidden: &mut [f32],
    grad_w: Option<&mut [f32]>,
) {
    let n = valid_count(cfg, targets);
    let factor = grad_loss as f64 * cfg.loss_scale(n);
    let kappa = cfg.logit_softcap();
    let g_row = |t: usize, h_row: &[f64], p: &[f64], g: &mut [f64]| {
        let target = targets[t];
        if n == 0 || is_ignored(target, cfg.ignore_index()) {
            g.iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        logit_row(cfg, w, lora_vocab, h_row, p, g);
        let (lse_t, y) = (lse[t] as f64, target.to_i64() as usize);
        for (v, gv) in g.iter_mut().enumerate() {
            let (capped, slope) = match kappa {
                Some(k) => {
                    let th = (*gv / k).tanh();
                    (k * th, 1.0 - th * th)
                }
                None => (*gv, 1.0),
            };
            let onehot = if v == y { 1.0 } else { 0.0 };
            *gv = ((capped - lse_t).exp() - onehot) * slope * factor;
        }
    };
    backward_from_rows(
        cfg,
        threads,
        w,
        lora_vocab,
        lora_hidden,
        h,
        dh,
        grad_lora_vocab,
        grad_lora_hidden,
        grad_w,
        g_row,
    );
}
