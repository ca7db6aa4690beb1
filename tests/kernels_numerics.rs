//! Numerics of the kernels (run on the CPU through the shim) against the
//! reference at the edges: NaN and infinity in the fused cross-entropy, and
//! the head backward on ill-conditioned cases whose sums cancel.
#![cfg(feature = "cpu-kernels")]

mod common;

use common::golden::{rel_err, Check};
use common::harness::{widen, Harness, HostGrads, HostWeights};
use common::parity::assert_all;
use common::rand_inputs::{fresh_rng, ids, normal};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use tiedlora::kernels::CpuKernels;
use tiedlora::{bf16, f16, CpuReference, Element, LoraConfig};

/// The kernel variants of the fused cross-entropy: the default tile kernels
/// and, with the feature `experimental-kernels`, `_mma`, `_wgmma`, and the
/// cuBLAS path with one and with several vocabulary chunks.
fn xent_variants() -> Vec<(&'static str, CpuKernels)> {
    #[allow(unused_mut)]
    let mut v = vec![("default", CpuKernels::default())];
    #[cfg(feature = "experimental-kernels")]
    {
        use tiedlora::kernels::KernelOptions;
        let d = KernelOptions::default();
        v.extend([
            ("mma", CpuKernels::new(KernelOptions { mma: true, ..d })),
            ("wgmma", CpuKernels::new(KernelOptions { wgmma: true, ..d })),
            ("cublas", CpuKernels::new(KernelOptions { cublas: true, ..d })),
            ("cublas chunked", CpuKernels::new(KernelOptions { cublas: true, xent_chunk_bytes: 1, ..d })),
        ]);
    }
    v
}

/// 0 finite, 1 NaN, 2 +inf, 3 -inf.
fn class(x: f64) -> u8 {
    if x.is_nan() {
        1
    } else if x == f64::INFINITY {
        2
    } else if x == f64::NEG_INFINITY {
        3
    } else {
        0
    }
}

/// Two checks of `got` against `want`: the positions whose class (finite,
/// NaN, +inf, -inf) differs (tolerance 0), and the relative error over the
/// positions finite in both.
fn nonfinite_checks(case: &str, backend: &str, tensor: &str, got: &[f64], want: &[f64], tol: f64) -> [Check; 2] {
    let mismatched = got.iter().zip(want).filter(|(a, b)| class(**a) != class(**b)).count();
    if mismatched > 0 && got.len() <= 16 {
        println!("{case} {backend} {tensor}: got {got:?}, reference {want:?}");
    }
    let (g, w): (Vec<f64>, Vec<f64>) =
        got.iter().zip(want).filter(|(a, b)| a.is_finite() && b.is_finite()).map(|(a, b)| (*a, *b)).unzip();
    let check = |tensor: String, err: f64, tol: f64| Check {
        case: case.to_string(),
        op: "nonfinite",
        backend: backend.to_string(),
        tensor,
        err,
        tol,
        skipped: false,
    };
    [
        check(format!("{tensor} class mismatches"), mismatched as f64, 0.0),
        check(format!("{tensor} finite part"), rel_err(&g, &w), tol),
    ]
}

/// How the hidden states of one token are made non-finite.
#[derive(Debug, Clone, Copy)]
enum Poison {
    /// One NaN entry: every logit of the row is NaN.
    Nan,
    /// One +inf entry with random weights: ±inf and NaN logits (inf − inf).
    Inf,
    /// One +inf entry where W, U and Vh are positive in that column: every
    /// logit of the row is +inf and none is NaN (lse = +inf).
    InfNoNan,
}

/// The fused cross-entropy forward and backward of `k` against the reference
/// with token 2's hidden state poisoned (target valid) and token 4's too
/// (target ignored): lse, loss, dh, dU, dVh and dW must be NaN / ±inf exactly
/// where the reference's are, and the finite values within tolerance.
fn xent_nonfinite<T: Element>(name: &str, k: &CpuKernels, poison: Poison, softcap: Option<f64>) -> Vec<Check> {
    let (v, d, r, t) = (300, 24, 4, 6);
    let mut rng = fresh_rng(&format!("xent nonfinite {name} {} {poison:?} softcap={softcap:?}", T::DTYPE));
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).logit_softcap_opt(softcap).build().unwrap();
    let mut w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    let mut u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let mut vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let mut h: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let mut targets = ids(&mut rng, t, v);
    targets[4] = -100;
    let bad = match poison {
        Poison::Nan => f32::NAN,
        Poison::Inf | Poison::InfNoNan => f32::INFINITY,
    };
    if let Poison::InfNoNan = poison {
        (0..v).for_each(|vi| w[vi * d] = w[vi * d].abs() + 0.1);
        u.iter_mut().for_each(|x| *x = x.abs() + 0.01);
        (0..r).for_each(|j| vh[j * d] = vh[j * d].abs() + 0.1);
    }
    h[2 * d] = bad;
    h[4 * d + 5] = bad;
    let w: Vec<T> = w.iter().map(|&x| T::from_f64(x as f64)).collect();
    let h: Vec<T> = h.iter().map(|&x| T::from_f64(x as f64)).collect();
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let tol = T::DTYPE.tolerance();
    let case = format!("{poison:?} softcap={softcap:?}");
    let backend = format!("{name} {}", T::DTYPE);
    let mut checks = Vec::new();
    let (loss_ref, lse_ref) = Harness::xent_forward(&CpuReference::new(), &cfg, wt, &h, &targets).unwrap();
    let (loss, lse) = Harness::xent_forward(k, &cfg, wt, &h, &targets).unwrap();
    if let Poison::InfNoNan = poison {
        if softcap.is_none() {
            assert_eq!(lse_ref[2], f32::INFINITY, "the case must give the reference an lse of +inf");
        }
    }
    checks.extend(nonfinite_checks(&case, &backend, "lse", &widen(&lse), &widen(&lse_ref), tol));
    checks.extend(nonfinite_checks(&case, &backend, "loss", &[loss as f64], &[loss_ref as f64], tol));
    // Without token 2 (token 4's target is ignored): a finite loss.
    let mut rest = targets.clone();
    rest[2] = -100;
    let (loss_ref, _) = Harness::xent_forward(&CpuReference::new(), &cfg, wt, &h, &rest).unwrap();
    let (loss, _) = Harness::xent_forward(k, &cfg, wt, &h, &rest).unwrap();
    checks.extend(nonfinite_checks(&case, &backend, "loss w/o token 2", &[loss as f64], &[loss_ref as f64], tol));
    // Backward, each backend from its own forward's lse.
    let mut g_ref = HostGrads::zeros(&cfg, true);
    let dh_ref =
        Harness::xent_backward(&CpuReference::new(), &cfg, wt, &h, &targets, &lse_ref, 1.0, &mut g_ref).unwrap();
    let mut g_k = HostGrads::zeros(&cfg, true);
    let dh = Harness::xent_backward(k, &cfg, wt, &h, &targets, &lse, 1.0, &mut g_k).unwrap();
    checks.extend(nonfinite_checks(&case, &backend, "dh", &widen(&dh), &widen(&dh_ref), tol));
    let pairs = [
        ("dU", &g_k.lora_vocab, &g_ref.lora_vocab),
        ("dVh", &g_k.lora_hidden, &g_ref.lora_hidden),
        ("dW", g_k.w.as_ref().unwrap(), g_ref.w.as_ref().unwrap()),
    ];
    for (tensor, got, want) in pairs {
        checks.extend(nonfinite_checks(&case, &backend, tensor, &widen(got), &widen(want), tol));
    }
    checks
}

/// A token whose hidden state holds a NaN has lse NaN (and so the loss, and
/// its gradients), as in the reference and IEEE arithmetic; an infinite
/// entry gives what the reference gives (NaN where inf − inf meets, +inf for
/// an lse whose logits are +inf and none NaN); the other tokens are
/// unaffected. Every kernel variant of the fused cross-entropy.
#[test]
fn xent_nan_and_inf_propagate() {
    let mut checks = Vec::new();
    for (name, k) in xent_variants() {
        checks.extend(xent_nonfinite::<bf16>(name, &k, Poison::Nan, None));
        checks.extend(xent_nonfinite::<f16>(name, &k, Poison::Inf, None));
        checks.extend(xent_nonfinite::<bf16>(name, &k, Poison::InfNoNan, None));
    }
    let k = CpuKernels::default();
    checks.extend(xent_nonfinite::<f32>("default", &k, Poison::Nan, None));
    checks.extend(xent_nonfinite::<f32>("default", &k, Poison::InfNoNan, None));
    checks.extend(xent_nonfinite::<f16>("default", &k, Poison::Nan, Some(30.0)));
    checks.extend(xent_nonfinite::<f16>("default", &k, Poison::InfNoNan, Some(30.0)));
    assert_all(checks);
}

fn gauss(rng: &mut StdRng) -> f64 {
    <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)
}

/// Removes from `x` its components along the orthonormal vectors `basis`.
fn project_out(x: &mut [f64], basis: &[Vec<f64>]) {
    for b in basis {
        let dot: f64 = x.iter().zip(b).map(|(a, c)| a * c).sum();
        x.iter_mut().zip(b).for_each(|(a, c)| *a -= dot * c);
    }
}

/// An orthonormal basis of the span of `vectors` (modified Gram–Schmidt).
fn orthonormal(vectors: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for mut x in vectors {
        project_out(&mut x, &basis);
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-9 {
            x.iter_mut().for_each(|a| *a /= norm);
            basis.push(x);
        }
    }
    basis
}

/// A head backward case whose sums cancel, G = α·X + Y:
/// - every row of X is orthogonal to U's columns, and Y's component along
///   them has a fixed size (±1 on an orthonormal basis of their span, the
///   rest of Y ~ N(0, 1)): gu = G·U is Y·U, ~α times smaller than the norm of
///   its terms, so dVh = s·guᵀ·h (and dh's LoRA term) have condition ~α, with
///   no heavy tail from a gu that happens to be near 0 (one token, rank 1:
///   dVh is that one sum times h);
/// - with T > r, every column of X is also orthogonal to the columns of
///   p = s·h·Vhᵀ, so dU = Gᵀ·p has condition ~α too.
///
/// Every output of `k` against the f64 reference within the storage dtype's
/// tolerance (DESIGN.md §3), dh poisoned before the call.
fn head_cancel_case<T: Element, G: Element>(
    name: &str,
    k: &CpuKernels,
    (v, d, r, t): (usize, usize, usize, usize),
    alpha: f64,
    with_w: bool,
) -> Vec<Check> {
    let mut rng =
        fresh_rng(&format!("head cancel {name} {}/{} V={v} d={d} r={r} T={t} alpha={alpha}", T::DTYPE, G::DTYPE));
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).build().unwrap();
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, 1.0);
    // p = s·h·Vhᵀ as the reference forms it (f64 from the stored h).
    let s = cfg.scale();
    let p_cols: Vec<Vec<f64>> = (0..r)
        .map(|j| {
            (0..t).map(|ti| s * (0..d).map(|kk| h[ti * d + kk].to_f64() * vh[j * d + kk] as f64).sum::<f64>()).collect()
        })
        .collect();
    let u_cols: Vec<Vec<f64>> = (0..r).map(|j| (0..v).map(|vi| u[vi * r + j] as f64).collect()).collect();
    let (p_basis, u_basis) = (orthonormal(p_cols), orthonormal(u_cols));
    // X = (I − P_p)·Z·(I − P_U).
    let mut x: Vec<f64> = (0..t * v).map(|_| gauss(&mut rng)).collect();
    for row in x.chunks_exact_mut(v) {
        project_out(row, &u_basis);
    }
    if t > r {
        for vi in 0..v {
            let mut col: Vec<f64> = (0..t).map(|ti| x[ti * v + vi]).collect();
            project_out(&mut col, &p_basis);
            (0..t).for_each(|ti| x[ti * v + vi] = col[ti]);
        }
    }
    let mut y: Vec<f64> = (0..t * v).map(|_| gauss(&mut rng)).collect();
    for row in y.chunks_exact_mut(v) {
        project_out(row, &u_basis);
        for q in &u_basis {
            let b = if rng.random::<bool>() { 1.0 } else { -1.0 };
            row.iter_mut().zip(q).for_each(|(a, c)| *a += b * c);
        }
    }
    // G in the storage dtype's values (also when stored as f32: the kernels
    // round an f32 G to the tensor-core dtype, which no split of U or p undoes).
    let g: Vec<G> = x.iter().zip(&y).map(|(xv, yv)| G::from_f64(T::from_f64(alpha * xv + yv).to_f64())).collect();
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let mut g_ref = HostGrads::zeros(&cfg, with_w);
    let dh_ref = Harness::head_backward(&CpuReference::new(), &cfg, wt, &h, &g, &mut g_ref).unwrap();
    let mut g_k = HostGrads::zeros(&cfg, with_w);
    let dh = Harness::head_backward(k, &cfg, wt, &h, &g, &mut g_k).unwrap();
    let mut tensors = vec![
        ("dh", widen(&dh), widen(&dh_ref)),
        ("dU", widen(&g_k.lora_vocab), widen(&g_ref.lora_vocab)),
        ("dVh", widen(&g_k.lora_hidden), widen(&g_ref.lora_hidden)),
    ];
    if let (Some(kw), Some(rw)) = (&g_k.w, &g_ref.w) {
        tensors.push(("dW", widen(kw), widen(rw)));
    }
    tensors
        .into_iter()
        .map(|(tensor, got, want)| Check {
            case: format!("cancel V={v} d={d} r={r} T={t} a={alpha}"),
            op: "head_backward",
            backend: format!("{name} {}/{}", T::DTYPE, G::DTYPE),
            tensor: tensor.into(),
            err: rel_err(&got, &want),
            tol: T::DTYPE.tolerance(),
            skipped: false,
        })
        .collect()
}

/// The head backward's kernel variants: the default tile kernels and, with
/// the feature `experimental-kernels`, the two-block grad_h, ldmatrix +
/// mma.sync, and Hopper warpgroup MMAs.
fn head_variants() -> Vec<(&'static str, CpuKernels)> {
    #[allow(unused_mut)]
    let mut v = vec![("default", CpuKernels::default())];
    #[cfg(feature = "experimental-kernels")]
    {
        use tiedlora::kernels::KernelOptions;
        let d = KernelOptions::default();
        v.extend([
            ("two blocks", CpuKernels::new(KernelOptions { grad_h_two_blocks: true, ..d })),
            ("mma", CpuKernels::new(KernelOptions { mma: true, ..d })),
            ("wgmma", CpuKernels::new(KernelOptions { wgmma: true, ..d })),
        ]);
    }
    v
}

/// One token, rank 1: dVh is one cancelling sum over V times h (the case
/// that missed the f16 tolerance by 4x when U was rounded for the MMAs).
#[test]
fn head_backward_cancelling_t1_r1() {
    let mut checks = Vec::new();
    for (name, k) in head_variants() {
        checks.extend(head_cancel_case::<f16, f16>(name, &k, (300, 40, 1, 1), 128.0, false));
        checks.extend(head_cancel_case::<bf16, bf16>(name, &k, (300, 40, 1, 1), 128.0, true));
    }
    assert_all(checks);
}

/// More tokens (dU cancels too), every extra-column width of grad_h (r = 16,
/// 33, 64), d off the 128 tile and over it, G in f32 for half weights.
#[test]
fn head_backward_cancelling_ranks() {
    let mut checks = Vec::new();
    for (name, k) in head_variants() {
        checks.extend(head_cancel_case::<f16, f16>(name, &k, (300, 40, 16, 150), 64.0, true));
        checks.extend(head_cancel_case::<bf16, bf16>(name, &k, (260, 136, 33, 70), 64.0, false));
        checks.extend(head_cancel_case::<f16, f16>(name, &k, (200, 24, 64, 90), 64.0, false));
    }
    let k = CpuKernels::default();
    checks.extend(head_cancel_case::<bf16, f32>("default", &k, (300, 40, 16, 150), 64.0, true));
    checks.extend(head_cancel_case::<f16, f32>("default", &k, (200, 24, 33, 90), 64.0, false));
    assert_all(checks);
}
