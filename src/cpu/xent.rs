//! Fused head + cross-entropy over vocabulary blocks with an online
//! log-sum-exp: never a [T, V] buffer, only `[T_b, V_b]` tiles.
//!
//! `z' = κ·tanh(z/κ)` (or z), `loss_t = lse(z'_t) − z'_t[y_t]`,
//! `G_t = (softmax(z'_t) − onehot(y_t)) · (1 − tanh²(z_t/κ)) · grad_loss / N`.
//! Logits and exponentials are f32 (vectorised `exp` and `tanh`, `expf.rs`,
//! AVX-512 / AVX2 where the CPU has them); the
//! per-token sums of exponentials, the log-sum-exp and the loss sum are f64.

use super::blocks::{blocks, hidden_aug, par_map, vocab_block, weight_aug, TOKEN_BLOCK};
use super::expf::{row_max, softcap_row, softmax_grad_row, softmax_grad_row_capped, sum_exp, tanh};
use super::gemm::{gemm, Mat, MatMut};
use super::head::GradTile;
use crate::config::LoraConfig;
use crate::dtype::{Element, TokenId};
use crate::host::parallel::ranges;
use crate::validate::is_ignored;
use std::ops::Range;

/// Online log-sum-exp state of one token: running max `m` (NaN ignored),
/// `sum` of `exp(z − m)`, and whether a NaN was seen.
#[derive(Clone, Copy)]
struct Lse {
    m: f64,
    sum: f64,
    nan: bool,
}

impl Lse {
    const EMPTY: Lse = Lse { m: f64::NEG_INFINITY, sum: 0.0, nan: false };

    /// Merges another partial state into this one.
    fn merge(&mut self, o: Lse) {
        self.nan |= o.nan;
        if o.m == f64::NEG_INFINITY {
            return;
        }
        if self.m == f64::NEG_INFINITY {
            self.m = o.m;
            self.sum = o.sum;
            return;
        }
        let m = self.m.max(o.m);
        if m.is_infinite() {
            // +inf max: the result is +inf (or NaN); the sum no longer matters.
            self.m = m;
            self.sum = 1.0;
            return;
        }
        self.sum = self.sum * (self.m - m).exp() + o.sum * (o.m - m).exp();
        self.m = m;
    }

    /// State of one row of (softcapped) logits.
    fn of_row(z: &[f32]) -> Lse {
        let (m, nan) = row_max(z);
        if !m.is_finite() {
            return Lse { m: m as f64, sum: 1.0, nan };
        }
        Lse { m: m as f64, sum: sum_exp(z, m), nan }
    }

    fn value(self) -> f64 {
        if self.nan {
            f64::NAN
        } else if self.m.is_infinite() {
            self.m
        } else {
            self.m + self.sum.ln()
        }
    }
}

/// Applies the softcap in place.
fn softcap(kappa: Option<f64>, z: &mut [f32]) {
    if let Some(k) = kappa {
        softcap_row(z, k as f32);
    }
}

/// `z = [h | s·p]·[W_b | U_b]ᵀ` for the tile.
fn logits_tile(k: usize, tb: &Range<usize>, vn: usize, hp: &[f32], wa: &[f32], z: &mut [f32]) {
    let tn = tb.len();
    gemm(1.0, Mat::rows(&hp[tb.start * k..], tn, k, k), Mat::rows(wa, vn, k, k).t(), 0.0, MatMut::rows(z, tn, vn, vn));
}

/// Number of targets that count (not `ignore_index`).
fn valid_count<I: TokenId>(cfg: &LoraConfig, targets: &[I]) -> usize {
    targets.iter().filter(|&&t| !is_ignored(t, cfg.ignore_index())).count()
}

/// Writes `lse` [T] (every row, ignored ones included) and returns the
/// reduced loss. The vocabulary is split over the threads; their partial
/// log-sum-exp states are merged in thread order.
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
    let k = d + r;
    let t = targets.len();
    let hp = hidden_aug(cfg, h, lora_hidden);
    let vblock = vocab_block(cfg);
    let kappa = cfg.logit_softcap();
    let target = |ti: usize| -> Option<usize> {
        let y = targets[ti];
        (!is_ignored(y, cfg.ignore_index())).then(|| y.to_i64() as usize)
    };
    let partials = par_map(ranges(v, threads), |range| {
        let mut state = vec![Lse::EMPTY; t];
        let mut zy = vec![0f64; t];
        let mut wa = Vec::new();
        let mut z = vec![0f32; TOKEN_BLOCK.min(t) * vblock.min(range.len())];
        for vb in blocks(range, vblock) {
            let vn = vb.len();
            weight_aug(cfg, w, lora_vocab, vb.clone(), &mut wa);
            for tb in blocks(0..t, TOKEN_BLOCK) {
                let z = &mut z[..tb.len() * vn];
                logits_tile(k, &tb, vn, &hp, &wa, z);
                softcap(kappa, z);
                for (row, ti) in z.chunks_exact(vn).zip(tb) {
                    state[ti].merge(Lse::of_row(row));
                    if let Some(y) = target(ti) {
                        if vb.contains(&y) {
                            zy[ti] = row[y - vb.start] as f64;
                        }
                    }
                }
            }
        }
        (state, zy)
    });
    let mut total = 0f64;
    for ti in 0..t {
        let mut s = Lse::EMPTY;
        let mut zy = 0f64;
        for (state, zys) in &partials {
            s.merge(state[ti]);
            zy += zys[ti]; // exactly one partial holds the target's logit
        }
        let l = s.value();
        lse[ti] = l as f32;
        if target(ti).is_some() {
            total += l - zy;
        }
    }
    (total * cfg.loss_scale(valid_count(cfg, targets))) as f32
}

/// G of the cross-entropy, recomputed tile by tile from the forward's `lse`.
pub struct XentGrad<'a, I> {
    cfg: &'a LoraConfig,
    targets: &'a [I],
    lse: &'a [f32],
    factor: f32,
    valid: usize,
}

impl<'a, I: TokenId> XentGrad<'a, I> {
    /// G for `targets` scaled by `grad_loss` and the loss reduction.
    pub fn new(cfg: &'a LoraConfig, targets: &'a [I], lse: &'a [f32], grad_loss: f32) -> Self {
        let valid = valid_count(cfg, targets);
        let factor = (grad_loss as f64 * cfg.loss_scale(valid)) as f32;
        XentGrad { cfg, targets, lse, factor, valid }
    }
}

impl<I: TokenId> GradTile for XentGrad<'_, I> {
    fn fill(&self, tb: Range<usize>, vb: Range<usize>, hp: &[f32], wa: &[f32], g: &mut [f32]) {
        let vn = vb.len();
        let k = self.cfg.hidden() + self.cfg.rank();
        let all_ignored = tb.clone().all(|ti| self.valid == 0 || is_ignored(self.targets[ti], self.cfg.ignore_index()));
        if all_ignored {
            g.iter_mut().for_each(|x| *x = 0.0);
            return;
        }
        logits_tile(k, &tb, vn, hp, wa, g);
        let factor = self.factor;
        let kappa = self.cfg.logit_softcap().map(|x| x as f32);
        for (row, ti) in g.chunks_exact_mut(vn).zip(tb) {
            let y = self.targets[ti];
            if is_ignored(y, self.cfg.ignore_index()) {
                row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let lse_t = self.lse[ti];
            let y = y.to_i64() as usize;
            // The target's raw logit, before the row is turned into G.
            let target_z = vb.contains(&y).then(|| row[y - vb.start]);
            match kappa {
                Some(kp) => softmax_grad_row_capped(row, kp, lse_t, factor),
                None => softmax_grad_row(row, lse_t, factor),
            }
            if let Some(z) = target_z {
                let slope = match kappa {
                    Some(kp) => {
                        let th = tanh(z / kp);
                        1.0 - th * th
                    }
                    None => 1.0,
                };
                row[y - vb.start] -= slope * factor;
            }
        }
    }
}
