//! Randomized parity of a kernel backend against the CPU reference, shared by
//! the kernels-on-CPU and the GPU tests.

use super::golden::{rel_err, Check};
use super::harness::{widen, Harness, HostGrads, HostWeights};
use super::rand_inputs::{fresh_rng, normal};
use tiedlora::{bf16, f16, CpuReference, Element, LoraConfig};

/// One randomized head case through the kernels and the reference.
pub fn head_case<T: Element, H: Harness>(k: &H, v: usize, d: usize, r: usize, t: usize, with_w: bool) -> Vec<Check> {
    let mut rng = fresh_rng(&format!("head {} V={v} d={d} r={r} T={t}", T::DTYPE));
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).build().unwrap();
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, 1.0);
    let g: Vec<T> = normal(&mut rng, t * v, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let tol = T::DTYPE.tolerance();
    // dVh = s·(G·U)ᵀ·h: with few tokens (T = 1, r = 1: one sum over V) G·U
    // can cancel, and no kernel computes a cancelled sum to the dtype's
    // tolerance. Its tolerance also allows the rounding of the sum's operands
    // to the tensor-core dtype (unit u: 0 for f32, 2⁻¹¹ f16, 2⁻⁸ bf16) and of
    // its f32 accumulation, as random errors: (2u + 8·2⁻²⁴·√V)·cond with
    // cond = ‖(Σ_v (G·U)²)^½‖ / ‖Σ_v G·U‖ (about 1 unless the sums cancel).
    let gu_cond = {
        let (mut num, mut den) = (0f64, 0f64);
        for ti in 0..t {
            for j in 0..r {
                let (mut sq, mut sum) = (0f64, 0f64);
                for vi in 0..v {
                    let x = g[ti * v + vi].to_f64() * u[vi * r + j] as f64;
                    sq += x * x;
                    sum += x;
                }
                num += sq;
                den += sum * sum;
            }
        }
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    };
    let tol_dvh = cond_tol(tol, operand_unit(T::DTYPE), v, gu_cond * gu_cond, 1.0);
    let mut checks = Vec::new();
    let mut push = |tensor: &str, got: Vec<f64>, want: Vec<f64>| {
        checks.push(Check {
            case: format!("random V={v} d={d} r={r} T={t}"),
            op: "head",
            backend: format!("{} {}", k.name(), T::DTYPE),
            tensor: tensor.into(),
            err: rel_err(&got, &want),
            tol: if tensor == "dVh" { tol_dvh } else { tol },
            skipped: false,
        })
    };
    let z_ref = Harness::head_forward(&CpuReference::new(), &cfg, wt, &h).unwrap();
    let z = Harness::head_forward(k, &cfg, wt, &h).unwrap();
    push("logits", widen(&z), widen(&z_ref));

    let mut g_ref = HostGrads::zeros(&cfg, with_w);
    let dh_ref = Harness::head_backward(&CpuReference::new(), &cfg, wt, &h, &g, &mut g_ref).unwrap();
    let mut g_k = HostGrads::zeros(&cfg, with_w);
    let dh = Harness::head_backward(k, &cfg, wt, &h, &g, &mut g_k).unwrap();
    push("dh", widen(&dh), widen(&dh_ref));
    push("dU", widen(&g_k.lora_vocab), widen(&g_ref.lora_vocab));
    push("dVh", widen(&g_k.lora_hidden), widen(&g_ref.lora_hidden));
    if with_w {
        push("dW", widen(g_k.w.as_ref().unwrap()), widen(g_ref.w.as_ref().unwrap()));
    }
    // Determinism: a second run gives identical bits.
    let mut g_k2 = HostGrads::zeros(&cfg, with_w);
    let dh2 = Harness::head_backward(k, &cfg, wt, &h, &g, &mut g_k2).unwrap();
    assert_eq!(bytemuck::cast_slice::<T, u8>(&dh), bytemuck::cast_slice::<T, u8>(&dh2), "dh not deterministic");
    assert_eq!(g_k.lora_vocab, g_k2.lora_vocab, "dU not deterministic");
    assert_eq!(g_k.lora_hidden, g_k2.lora_hidden, "dVh not deterministic");
    checks
}

pub fn assert_all(checks: Vec<Check>) {
    for c in &checks {
        println!("{c}");
    }
    assert!(checks.iter().all(Check::passed), "tolerance exceeded");
}

/// One randomized embedding case (forward, backward with dW, merge) through
/// backend `k` and the reference; `dup` tokens all share one id.
pub fn embed_case<T: Element, H: Harness>(k: &H, v: usize, d: usize, r: usize, t: usize, dup: usize) -> Vec<Check> {
    let mut rng = fresh_rng(&format!("embed {} V={v} d={d} r={r} T={t} dup={dup}", T::DTYPE));
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).embed_scale(1.5).build().unwrap();
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let mut ids = super::rand_inputs::ids(&mut rng, t, v);
    for id in ids.iter_mut().take(dup) {
        *id = (v / 2) as i64;
    }
    let de: Vec<T> = normal(&mut rng, t * d, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let tol = T::DTYPE.tolerance();
    let case = format!("random V={v} d={d} r={r} T={t} dup={dup}");
    let mut checks = Vec::new();
    let mut push = |tensor: &str, got: Vec<f64>, want: Vec<f64>| {
        checks.push(Check {
            case: case.clone(),
            op: "embed",
            backend: format!("{} {}", k.name(), T::DTYPE),
            tensor: tensor.into(),
            err: rel_err(&got, &want),
            tol,
            skipped: false,
        })
    };
    let e_ref = Harness::embed_forward(&CpuReference::new(), &cfg, wt, &ids).unwrap();
    let e = Harness::embed_forward(k, &cfg, wt, &ids).unwrap();
    push("embed_out", widen(&e), widen(&e_ref));
    let mut g_ref = HostGrads::zeros(&cfg, true);
    Harness::embed_backward(&CpuReference::new(), &cfg, wt, &ids, &de, &mut g_ref).unwrap();
    let mut g_k = HostGrads::zeros(&cfg, true);
    Harness::embed_backward(k, &cfg, wt, &ids, &de, &mut g_k).unwrap();
    push("dU", widen(&g_k.lora_vocab), widen(&g_ref.lora_vocab));
    push("dVh", widen(&g_k.lora_hidden), widen(&g_ref.lora_hidden));
    push("dW", widen(g_k.w.as_ref().unwrap()), widen(g_ref.w.as_ref().unwrap()));
    // Deterministic: a second run gives identical bits.
    let mut g_k2 = HostGrads::zeros(&cfg, true);
    Harness::embed_backward(k, &cfg, wt, &ids, &de, &mut g_k2).unwrap();
    assert_eq!(g_k.lora_vocab, g_k2.lora_vocab, "dU not deterministic");
    assert_eq!(g_k.lora_hidden, g_k2.lora_hidden, "dVh not deterministic");
    assert_eq!(g_k.w, g_k2.w, "dW not deterministic");
    // merge / unmerge against the reference.
    let (mut m_ref, mut m_k) = (w.clone(), w.clone());
    Harness::merge(&CpuReference::new(), &cfg, &mut m_ref, &u, &vh, 1.0).unwrap();
    Harness::merge(k, &cfg, &mut m_k, &u, &vh, 1.0).unwrap();
    push("merged w", widen(&m_k), widen(&m_ref));
    Harness::merge(k, &cfg, &mut m_k, &u, &vh, -1.0).unwrap();
    push("unmerged w", widen(&m_k), widen(&w));
    checks
}

/// Out-of-range ids and targets are an `Err` naming the index and value, on any backend.
pub fn bad_ids_are_errors<H: Harness>(k: &H) {
    let cfg = LoraConfig::builder(10, 8, 2).build().unwrap();
    let w = vec![0.5f32; 80];
    let u = vec![0.25f32; 20];
    let vh = vec![0.125f32; 16];
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    for bad in [10i64, -1, i64::MAX] {
        let ids = [1i64, 2, bad, 3];
        let err = Harness::embed_forward(k, &cfg, wt, &ids).unwrap_err();
        assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 2, value: bad, vocab: 10 }, "{err}");
        let mut g = HostGrads::zeros(&cfg, false);
        let err = Harness::embed_backward(k, &cfg, wt, &ids, &[1f32; 32], &mut g).unwrap_err();
        assert!(matches!(err, tiedlora::Error::TokenOutOfRange { index: 2, .. }), "{err}");
    }
}

/// Fused cross-entropy forward (loss, lse) of backend `k` against the
/// reference: softcap, ignored targets, all-ignored and one-valid rows, and
/// `logit_scale` times larger hidden states for extreme logits.
pub fn xent_forward_case<T: Element, H: Harness>(
    k: &H,
    v: usize,
    d: usize,
    r: usize,
    t: usize,
    softcap: Option<f64>,
    logit_scale: f64,
) -> Vec<Check> {
    let mut rng = fresh_rng(&format!("xent {} V={v} d={d} r={r} T={t} softcap={softcap:?}", T::DTYPE));
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).logit_softcap_opt(softcap).build().unwrap();
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    // A LoRA delta smaller than the base, as in training and as in
    // `xent_backward_case`: the kernels stage p = s·h·Vhᵀ in the storage
    // dtype, so a delta several times the base (U ~ 0.5 here gave LoRA logits
    // ~4x the base's) moves a logit by ~2⁻⁹·|p·Uᵀ| in bf16, and one row's
    // loss = lse − z_y (no other rows to average) by ~1e-2 relative.
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, logit_scale);
    let mut targets = super::rand_inputs::ids(&mut rng, t, v);
    targets[0] = -100;
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let tol = T::DTYPE.tolerance();
    let case = format!("random V={v} d={d} r={r} T={t} softcap={softcap:?} x{logit_scale}");
    let mut checks = Vec::new();
    let mut one = |label: &str, targets: &[i64]| {
        let (loss_ref, lse_ref) = Harness::xent_forward(&CpuReference::new(), &cfg, wt, &h, targets).unwrap();
        let (loss, lse) = Harness::xent_forward(k, &cfg, wt, &h, targets).unwrap();
        for (tensor, got, want) in
            [("loss", vec![loss as f64], vec![loss_ref as f64]), ("lse", widen(&lse), widen(&lse_ref))]
        {
            checks.push(Check {
                case: case.clone(),
                op: "head_xent_forward",
                backend: format!("{} {}", k.name(), T::DTYPE),
                tensor: format!("{tensor} ({label})"),
                err: rel_err(&got, &want),
                tol,
                skipped: false,
            });
        }
        (loss, loss_ref)
    };
    one("random targets", &targets);
    let all_ignored = vec![-100i64; t];
    let (loss, _) = one("all ignored", &all_ignored);
    assert_eq!(loss, 0.0, "no valid target must give loss 0");
    let mut single = all_ignored.clone();
    single[t - 1] = (v - 1) as i64;
    one("one valid target", &single);
    checks
}

/// Unit roundoff of the tensor-core operands of dtype `dt` (0 for f32: FMA).
fn operand_unit(dt: tiedlora::DType) -> f64 {
    match dt {
        tiedlora::DType::F32 => 0.0,
        tiedlora::DType::F16 => 2f64.powi(-11),
        tiedlora::DType::BF16 => 2f64.powi(-8),
    }
}

/// Tolerance of one sum-of-products output: the dtype's, or, when the sums
/// cancel, the rounding a kernel cannot avoid, as random errors: operands to
/// unit `unit` and an f32 accumulation over `k` terms, times the condition
/// number `‖(Σ terms²)^½‖ / ‖Σ terms‖` (about 1 unless the sums cancel).
fn cond_tol(tol: f64, unit: f64, k: usize, sq: f64, result_sq: f64) -> f64 {
    let cond = (sq / result_sq.max(f64::MIN_POSITIVE)).sqrt();
    tol.max((2.0 * unit + 8.0 * 2f64.powi(-24) * (k as f64).sqrt()) * cond)
}

/// Condition-aware tolerances of the fused cross-entropy backward's dh, dU,
/// dVh and dW (see [`cond_tol`]), from G recomputed in f64 on the host.
#[allow(clippy::too_many_arguments)]
fn xent_backward_tols<T: Element>(
    cfg: &LoraConfig,
    tol: f64,
    w: &[T],
    u: &[f32],
    vh: &[f32],
    h: &[T],
    targets: &[i64],
    grad_loss: f64,
) -> [f64; 4] {
    let (v, d, r, t) = (cfg.vocab(), cfg.hidden(), cfg.rank(), targets.len());
    let s = cfg.scale();
    let hh: Vec<f64> = h.iter().map(|x| x.to_f64()).collect();
    let ww: Vec<f64> = w.iter().map(|x| x.to_f64()).collect();
    let p: Vec<f64> =
        (0..t * r).map(|i| s * (0..d).map(|kk| hh[i / r * d + kk] * vh[i % r * d + kk] as f64).sum::<f64>()).collect();
    let valid = targets.iter().filter(|&&y| y != cfg.ignore_index()).count();
    let factor = grad_loss * cfg.loss_scale(valid);
    let mut g = vec![0f64; t * v];
    for ti in 0..t {
        if targets[ti] == cfg.ignore_index() {
            continue;
        }
        let row: Vec<(f64, f64)> = (0..v)
            .map(|vi| {
                let z = (0..d).map(|kk| hh[ti * d + kk] * ww[vi * d + kk]).sum::<f64>()
                    + (0..r).map(|j| p[ti * r + j] * u[vi * r + j] as f64).sum::<f64>();
                match cfg.logit_softcap() {
                    Some(k) => ((z / k).tanh() * k, 1.0 - (z / k).tanh().powi(2)),
                    None => (z, 1.0),
                }
            })
            .collect();
        let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(x.0));
        let lse = m + row.iter().map(|x| (x.0 - m).exp()).sum::<f64>().ln();
        for (vi, (zc, slope)) in row.iter().enumerate() {
            let onehot = if vi as i64 == targets[ti] { 1.0 } else { 0.0 };
            g[ti * v + vi] = ((zc - lse).exp() - onehot) * slope * factor;
        }
    }
    let w_eff = |vi: usize, kk: usize| {
        ww[vi * d + kk] + s * (0..r).map(|j| u[vi * r + j] as f64 * vh[j * d + kk] as f64).sum::<f64>()
    };
    let unit = operand_unit(T::DTYPE);
    let (mut sq, mut res) = ([0f64; 4], [0f64; 4]);
    for ti in 0..t {
        for kk in 0..d {
            let (mut a, mut b) = (0f64, 0f64);
            for vi in 0..v {
                let x = g[ti * v + vi] * w_eff(vi, kk);
                a += x * x;
                b += x;
            }
            sq[0] += a;
            res[0] += b * b;
        }
    }
    let mut gu = vec![(0f64, 0f64); t * r]; // (sum, sum of squares) of G·U
    for ti in 0..t {
        for j in 0..r {
            for vi in 0..v {
                let x = g[ti * v + vi] * u[vi * r + j] as f64;
                gu[ti * r + j].0 += x;
                gu[ti * r + j].1 += x * x;
            }
        }
    }
    for vi in 0..v {
        for j in 0..r {
            let (mut a, mut b) = (0f64, 0f64);
            for ti in 0..t {
                let x = g[ti * v + vi] * p[ti * r + j];
                a += x * x;
                b += x;
            }
            sq[1] += a;
            res[1] += b * b;
        }
        for kk in 0..d {
            let (mut a, mut b) = (0f64, 0f64);
            for ti in 0..t {
                let x = g[ti * v + vi] * hh[ti * d + kk];
                a += x * x;
                b += x;
            }
            sq[3] += a;
            res[3] += b * b;
        }
    }
    for j in 0..r {
        for kk in 0..d {
            let (mut a, mut b) = (0f64, 0f64);
            for ti in 0..t {
                let (sum, sumsq) = gu[ti * r + j];
                let hv = hh[ti * d + kk];
                a += (sum * hv).powi(2) + sumsq * hv * hv;
                b += sum * hv;
            }
            sq[2] += s * s * a;
            res[2] += s * s * b * b;
        }
    }
    [
        cond_tol(tol, unit, v, sq[0], res[0]),
        cond_tol(tol, unit, t, sq[1], res[1]),
        cond_tol(tol, unit, v, sq[2], res[2]),
        cond_tol(tol, unit, t, sq[3], res[3]),
    ]
}

/// Shape and options of one fused cross-entropy backward case.
#[derive(Debug, Clone, Copy)]
pub struct XentCase {
    pub v: usize,
    pub d: usize,
    pub r: usize,
    pub t: usize,
    pub softcap: Option<f64>,
    pub sum: bool,
    pub with_w: bool,
    /// Standard deviation of h (large values give extreme logits).
    pub logit_scale: f64,
    /// Tolerance instead of the storage dtype's (extreme-logit cases).
    pub tol: Option<f64>,
}

impl XentCase {
    /// V = 300, d = 24, r = 16, T = 150, softcap 30, sum, dW on: the
    /// half-precision case the kernel-variant tests start from.
    pub const SOFTCAP_SUM: XentCase = XentCase {
        v: 300,
        d: 24,
        r: 16,
        t: 150,
        softcap: Some(30.0),
        sum: true,
        with_w: true,
        logit_scale: 1.0,
        tol: None,
    };

    /// Extreme logits (|z| ~ 1e3..1e4 before a softcap of 30): V = 600,
    /// d = 16, r = 4, T = 3, dW on, an f32 tolerance of 5e-3 (the logits' own
    /// resolution at that magnitude).
    pub const EXTREME: XentCase = XentCase {
        v: 600,
        d: 16,
        r: 4,
        t: 3,
        softcap: Some(30.0),
        sum: false,
        with_w: true,
        logit_scale: 2000.0,
        tol: Some(5e-3),
    };
}

/// Fused cross-entropy backward of backend `k` against the reference, each
/// from its own forward's lse, with an upstream gradient ≠ 1, gradient buffers
/// that already hold values (the op adds into them; the added part is
/// compared), poisoned dh, random / all-ignored / one-valid targets, and a
/// bitwise determinism check. Returns the checks and the kernel's dh.
pub fn xent_backward_case<T: Element, H: Harness>(k: &H, c: XentCase) -> Vec<Check> {
    let XentCase { v, d, r, t, softcap, sum, with_w, logit_scale, tol } = c;
    let mut rng = fresh_rng(&format!("xent backward {} {c:?}", T::DTYPE));
    let reduction = if sum { tiedlora::Reduction::Sum } else { tiedlora::Reduction::Mean };
    let cfg = LoraConfig::builder(v, d, r)
        .alpha(2.0 * r as f64)
        .logit_softcap_opt(softcap)
        .reduction(reduction)
        .build()
        .unwrap();
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    // A LoRA delta smaller than the base (here its logits are ~0.3-0.8x the
    // base's), as in training: the kernels stage p = s·h·Vhᵀ in the storage
    // dtype, so in bf16 a delta several times the base moves a single row's
    // softmax by ~1e-2 (the one-valid-target check has no other rows to average).
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, logit_scale);
    let mut targets = super::rand_inputs::ids(&mut rng, t, v);
    targets[0] = -100;
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let init = HostGrads {
        lora_vocab: normal(&mut rng, v * r, 0.01),
        lora_hidden: normal(&mut rng, r * d, 0.01),
        w: with_w.then(|| normal(&mut rng, v * d, 0.01)),
    };
    let added = |after: &[f32], before: &[f32]| -> Vec<f64> {
        after.iter().zip(before).map(|(a, b)| *a as f64 - *b as f64).collect()
    };
    let tol = tol.unwrap_or(T::DTYPE.tolerance());
    let case = format!("random {c:?}");
    let mut checks = Vec::new();
    let grad_loss = 0.75f32;
    let mut one = |label: &str, targets: &[i64]| {
        // Each backend's backward takes its own forward's lse, as documented
        // (Backend::head_xent_backward): in f16 / bf16 the kernels' logits
        // carry the rounding of p and U, consistently in both passes, so it
        // cancels in softmax − onehot; with the exact lse it would not (an
        // absolute logit error is a relative error of G: up to ~3e-3 on one
        // f16 row at this case's |p·Uᵀ|).
        let (_, lse_ref) = Harness::xent_forward(&CpuReference::new(), &cfg, wt, &h, targets).unwrap();
        let (_, lse) = Harness::xent_forward(k, &cfg, wt, &h, targets).unwrap();
        let mut g_ref = init.clone();
        let dh_ref =
            Harness::xent_backward(&CpuReference::new(), &cfg, wt, &h, targets, &lse_ref, grad_loss, &mut g_ref)
                .unwrap();
        let mut g_k = init.clone();
        let dh = Harness::xent_backward(k, &cfg, wt, &h, targets, &lse, grad_loss, &mut g_k).unwrap();
        let mut tensors = vec![
            ("dh", widen(&dh), widen(&dh_ref)),
            ("dU", added(&g_k.lora_vocab, &init.lora_vocab), added(&g_ref.lora_vocab, &init.lora_vocab)),
            ("dVh", added(&g_k.lora_hidden, &init.lora_hidden), added(&g_ref.lora_hidden, &init.lora_hidden)),
        ];
        if let (Some(kw), Some(rw), Some(iw)) = (&g_k.w, &g_ref.w, &init.w) {
            tensors.push(("dW", added(kw, iw), added(rw, iw)));
        }
        let tols = xent_backward_tols(&cfg, tol, &w, &u, &vh, &h, targets, grad_loss as f64);
        // The vocabulary rows no target hits get only the softmax's small
        // entries (~1/V each, times 1/N for the mean): in the full tensors the
        // target rows (~1 each) hide them, so they are compared on their own,
        // with random targets (many rows: each such row sums many tokens'
        // entries). Not with one valid row: there each row is one entry, and
        // the largest few, whose logits carry the rounding of p and U (bf16:
        // ~2⁻⁹·|p·Uᵀ|), make the whole norm. Not at extreme logits either,
        // where those entries are below f32's range.
        let untargeted: Vec<usize> = (0..v).filter(|vi| !targets.contains(&(*vi as i64))).collect();
        let rows_of = |x: &[f64], n: usize| -> Vec<f64> {
            untargeted.iter().flat_map(|&vi| x[vi * n..(vi + 1) * n].iter().copied()).collect()
        };
        let mut sub = Vec::new();
        if label == "random targets" && c.tol.is_none() && !untargeted.is_empty() {
            for (i, n) in [(1, r), (3, d)] {
                if let Some((name, got, want)) = tensors.get(i) {
                    let tensor = format!("{name} untargeted rows");
                    sub.push((tensor, rows_of(got, n), rows_of(want, n), tols[i]));
                }
            }
        }
        let full = tensors.into_iter().zip(tols).map(|((name, got, want), tol)| (name.to_string(), got, want, tol));
        for (tensor, got, want, tol) in full.chain(sub) {
            checks.push(Check {
                case: case.clone(),
                op: "head_xent_backward",
                backend: format!("{} {}", k.name(), T::DTYPE),
                tensor: format!("{tensor} ({label})"),
                err: rel_err(&got, &want),
                tol,
                skipped: false,
            });
        }
        // Bitwise deterministic run to run.
        let mut g_k2 = init.clone();
        let dh2 = Harness::xent_backward(k, &cfg, wt, &h, targets, &lse, grad_loss, &mut g_k2).unwrap();
        assert_eq!(bytemuck::cast_slice::<T, u8>(&dh), bytemuck::cast_slice::<T, u8>(&dh2), "dh not deterministic");
        assert_eq!(g_k.lora_vocab, g_k2.lora_vocab, "dU not deterministic");
        assert_eq!(g_k.lora_hidden, g_k2.lora_hidden, "dVh not deterministic");
        assert_eq!(g_k.w, g_k2.w, "dW not deterministic");
        (dh, g_k)
    };
    one("random targets", &targets);
    // No valid target: zero gradient, buffers untouched.
    let all_ignored = vec![-100i64; t];
    let (dh, g) = one("all ignored", &all_ignored);
    assert!(dh.iter().all(|x| x.to_f64() == 0.0), "all targets ignored: dh must be 0");
    assert_eq!(g.lora_vocab, init.lora_vocab, "all targets ignored: dU must be unchanged");
    assert_eq!(g.lora_hidden, init.lora_hidden, "all targets ignored: dVh must be unchanged");
    assert_eq!(g.w, init.w, "all targets ignored: dW must be unchanged");
    let mut single = all_ignored.clone();
    single[t - 1] = (v - 1) as i64;
    one("one valid target", &single);
    checks
}

/// The gradient filter of the fused cross-entropy backward
/// (`LoraConfigBuilder::xent_grad_filter`): on peaked logits it drops some G
/// tiles (the result changes), and the change stays within the documented
/// element-wise bounds. `t` tokens, f32.
pub fn xent_filter_case<H: Harness>(k: &H, v: usize, d: usize, r: usize, t: usize, eps: f64) -> Vec<Check> {
    let mut rng = fresh_rng(&format!("xent filter V={v} d={d} r={r} T={t} eps={eps}"));
    let exact = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).build().unwrap();
    let filtered = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).xent_grad_filter(eps).build().unwrap();
    let mut w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    let mut u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    // Peaked softmax (logits with a standard deviation of ~30), as in a
    // trained model: outside a few columns per token every |G| is tiny. The
    // last 256 vocabulary rows are never a target and have logits about half
    // the others' (no LoRA part): their maximum (~40) is far below every
    // row's (~100), so their tiles are filtered, while their largest G
    // (~e⁻⁶⁰, nonzero in f32) still moves dU: the case always drops a tile.
    assert!(v >= 512, "the filter case needs V >= 512");
    w[(v - 256) * d..].iter_mut().for_each(|x| *x *= 0.5);
    u[(v - 256) * r..].iter_mut().for_each(|x| *x = 0.0);
    let h: Vec<f32> = normal(&mut rng, t * d, 10.0);
    let targets = super::rand_inputs::ids(&mut rng, t, v - 256);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let grad_loss = 1.0f32;
    let (_, lse) = Harness::xent_forward(&CpuReference::new(), &exact, wt, &h, &targets).unwrap();
    let run = |cfg: &LoraConfig| {
        let mut g = HostGrads::zeros(cfg, true);
        let dh = Harness::xent_backward(k, cfg, wt, &h, &targets, &lse, grad_loss, &mut g).unwrap();
        (dh, g)
    };
    let (dh_e, g_e) = run(&exact);
    let (dh_f, g_f) = run(&filtered);
    assert!(dh_f != dh_e || g_f.lora_vocab != g_e.lora_vocab, "ε = {eps} dropped no tile: the case tests nothing");

    // Documented bounds, in f64 from the inputs.
    let s = exact.scale();
    let f = grad_loss as f64 / t as f64; // mean over t valid targets
    let be = eps * f;
    let p: Vec<f64> = (0..t * r)
        .map(|i| s * (0..d).map(|k| h[i / r * d + k] as f64 * vh[i % r * d + k] as f64).sum::<f64>())
        .collect();
    let w_eff = |vi: usize, kk: usize| {
        w[vi * d + kk] as f64 + s * (0..r).map(|j| u[vi * r + j] as f64 * vh[j * d + kk] as f64).sum::<f64>()
    };
    let col_w: Vec<f64> = (0..d).map(|kk| (0..v).map(|vi| w_eff(vi, kk).abs()).sum()).collect();
    let col_p: Vec<f64> = (0..r).map(|j| (0..t).map(|ti| p[ti * r + j].abs()).sum()).collect();
    let col_h: Vec<f64> = (0..d).map(|kk| (0..t).map(|ti| (h[ti * d + kk] as f64).abs()).sum()).collect();
    let col_u: Vec<f64> = (0..r).map(|j| (0..v).map(|vi| (u[vi * r + j] as f64).abs()).sum()).collect();
    let bound_dh = |i: usize| be * col_w[i % d];
    let bound_du = |i: usize| be * col_p[i % r];
    let bound_dw = |i: usize| be * col_h[i % d];
    let bound_dvh = |i: usize| s * be * col_u[i / d] * col_h[i % d];
    let mut checks = Vec::new();
    let mut within = |tensor: &str, got: &[f32], exact: &[f32], bound: &dyn Fn(usize) -> f64| {
        // Slack for the f32 rounding of a different summation order.
        let scale = exact.iter().fold(0f64, |m, x| m.max((*x as f64).abs()));
        let worst = got
            .iter()
            .zip(exact)
            .enumerate()
            .map(|(i, (a, b))| (*a as f64 - *b as f64).abs() / (bound(i) + 1e-5 * scale))
            .fold(0f64, f64::max);
        checks.push(Check {
            case: format!("filter V={v} d={d} r={r} T={t} eps={eps}"),
            op: "head_xent_backward",
            backend: format!("{} f32", k.name()),
            tensor: format!("{tensor}: |filtered - exact| / bound"),
            err: worst,
            tol: 1.0,
            skipped: false,
        });
    };
    within("dh", &dh_f, &dh_e, &bound_dh);
    within("dU", &g_f.lora_vocab, &g_e.lora_vocab, &bound_du);
    within("dW", g_f.w.as_ref().unwrap(), g_e.w.as_ref().unwrap(), &bound_dw);
    within("dVh", &g_f.lora_hidden, &g_e.lora_hidden, &bound_dvh);
    checks
}

/// The cuBLAS-path checks (`cublas` on; `chunked` also with 1-byte chunks:
/// 128-column logit chunks, 128 × 128 backward blocks): head ops in all three
/// dtypes, one and several chunks, r = 1, 16, 64, dW on and off; every golden
/// case; the fused cross-entropy forward (several chunks, softcap, extreme
/// logits) and backward (2 × 3 blocks with partial last ones; softcap, sum,
/// dW, the f16 tiny-gradient case, the gradient filter). Panics on a failure.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn assert_gemm_engine_paths<H: Harness>(k: &H, chunked: &H) {
    use tiedlora::{bf16, f16};
    assert_all(head_case::<bf16, _>(chunked, 300, 40, 16, 130, true));
    assert_all(head_case::<f16, _>(k, 257, 24, 1, 3, false));
    assert_all(head_case::<f32, _>(chunked, 131, 37, 64, 5, true));
    let failures = super::harness::golden_failures(k);
    assert!(failures.is_empty(), "cuBLAS-path golden failures: {failures:?}");
    assert_all(xent_forward_case::<bf16, _>(chunked, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(chunked, 264, 136, 1, 150, None, 1.0));
    assert_all(xent_forward_case::<f32, _>(k, 260, 16, 4, 3, Some(30.0), 2000.0));
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(chunked, base));
    assert_all(xent_backward_case::<f32, _>(k, XentCase { v: 200, d: 33, r: 64, t: 9, ..base }));
    let flat =
        XentCase { v: 700, d: 32, r: 4, t: 300, softcap: None, sum: false, with_w: true, logit_scale: 0.05, tol: None };
    assert_all(xent_backward_case::<f16, _>(chunked, flat));
    assert_all(xent_filter_case(chunked, 1000, 40, 4, 130, 1e-3));
}

/// Ranks above the 64 U columns a grad_h tile holds (PEFT's r = 128 and 256
/// among them), in every dtype, with dW: both head backward ops, the fused
/// one on `chunked` too (several vocabulary chunks).
pub fn assert_wide_rank_cases<H: Harness>(k: &H, chunked: &H) {
    assert_all(head_case::<f32, _>(k, 150, 40, 65, 7, true));
    assert_all(head_case::<bf16, _>(k, 140, 24, 130, 5, true));
    assert_all(head_case::<f16, _>(k, 131, 16, 256, 3, false));
    let base = XentCase {
        v: 300,
        d: 24,
        r: 96,
        t: 20,
        softcap: Some(30.0),
        sum: false,
        with_w: true,
        logit_scale: 1.0,
        tol: None,
    };
    assert_all(xent_backward_case::<f32, _>(chunked, base));
    assert_all(xent_backward_case::<bf16, _>(chunked, XentCase { r: 130, t: 9, with_w: false, ..base }));
    assert_all(xent_backward_case::<f16, _>(k, XentCase { v: 140, r: 128, t: 3, softcap: None, sum: true, ..base }));
}
