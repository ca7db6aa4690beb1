//! The CPU reference checked against the math itself, independent of the
//! goldens: finite differences of every backward op, the shared-gradient
//! contract, merge/unmerge, cross-entropy edge cases, determinism.

mod common;

use common::golden::rel_err;
use common::harness::{widen, Harness, HostGrads, HostWeights};
use common::rand_inputs::{fresh_rng, ids, normal};
use rand::rngs::StdRng;
use tiedlora::{bf16, f16, CpuReference, Element, LoraConfig, Reduction};

struct Case {
    cfg: LoraConfig,
    w: Vec<f32>,
    u: Vec<f32>,
    vh: Vec<f32>,
    h: Vec<f32>,
    ids: Vec<i64>,
    targets: Vec<i64>,
}

fn case(rng: &mut StdRng, v: usize, d: usize, r: usize, t: usize, softcap: Option<f64>, reduction: Reduction) -> Case {
    let cfg = LoraConfig::builder(v, d, r)
        .alpha(2.0 * r as f64)
        .embed_scale(1.5)
        .logit_softcap_opt(softcap)
        .reduction(reduction)
        .build()
        .unwrap();
    let mut targets = ids(rng, t, v);
    targets[t / 2] = -100;
    Case {
        w: normal(rng, v * d, 0.5),
        u: normal(rng, v * r, 0.5),
        vh: normal(rng, r * d, 0.5),
        h: normal(rng, t * d, 1.0),
        ids: ids(rng, t, v),
        targets,
        cfg,
    }
}

impl Case {
    fn wt(&self) -> HostWeights<'_, f32> {
        HostWeights { w: &self.w, u: &self.u, vh: &self.vh }
    }
}

/// Central difference of `f` with respect to each element of `x`.
fn fd(x: &mut [f32], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let up = f(x);
            x[i] = orig - eps;
            let down = f(x);
            x[i] = orig;
            // Divide by the step actually taken in f32.
            (up - down) / ((orig + eps) as f64 - (orig - eps) as f64)
        })
        .collect()
}

const FD_TOL: f64 = 1e-3;

#[test]
fn xent_backward_matches_finite_differences() {
    let mut rng = fresh_rng("xent_fd");
    let cpu = CpuReference::new();
    for (softcap, reduction) in [(None, Reduction::Mean), (Some(3.0), Reduction::Sum)] {
        let mut c = case(&mut rng, 13, 7, 3, 6, softcap, reduction);
        let mut g = HostGrads::zeros(&c.cfg, true);
        let (_, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &c.targets).unwrap();
        let dh = cpu.xent_backward(&c.cfg, c.wt(), &c.h, &c.targets, &lse, 0.7, &mut g).unwrap();
        let cfg = c.cfg.clone();
        let loss = |w: &[f32], u: &[f32], vh: &[f32], h: &[f32], t: &[i64]| -> f64 {
            0.7 * cpu.xent_forward(&cfg, HostWeights { w, u, vh }, h, t).unwrap().0 as f64
        };
        let (w, vh, h, t) = (c.w.clone(), c.vh.clone(), c.h.clone(), c.targets.clone());
        let fd_u = fd(&mut c.u, 1e-2, |u| loss(&w, u, &vh, &h, &t));
        let u = c.u.clone();
        let fd_vh = fd(&mut c.vh, 1e-2, |vh| loss(&w, &u, vh, &h, &t));
        let fd_h = fd(&mut c.h, 1e-2, |h| loss(&w, &u, &vh, h, &t));
        let fd_w = fd(&mut c.w, 1e-2, |w| loss(w, &u, &vh, &h, &t));
        for (name, got, want) in [
            ("dU", widen(&g.lora_vocab), fd_u),
            ("dVh", widen(&g.lora_hidden), fd_vh),
            ("dh", widen(&dh), fd_h),
            ("dW", widen(g.w.as_ref().unwrap()), fd_w),
        ] {
            let e = rel_err(&got, &want);
            println!("xent {softcap:?} {reduction}: {name} vs finite difference rel_err {e:.2e}");
            assert!(e < FD_TOL, "{name}: {e}");
        }
    }
}

#[test]
fn embed_and_head_backward_match_finite_differences() {
    let mut rng = fresh_rng("embed_head_fd");
    let cpu = CpuReference::new();
    let mut c = case(&mut rng, 9, 5, 2, 7, None, Reduction::Mean);
    c.ids[1] = c.ids[0]; // a duplicate id
    let t = c.ids.len();
    let (v, d) = (c.cfg.vocab(), c.cfg.hidden());
    let de: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let dz: Vec<f32> = normal(&mut rng, t * v, 1.0);
    let cfg = c.cfg.clone();
    // Linear functionals whose gradients are the backward ops' outputs.
    let embed_obj = |w: &[f32], u: &[f32], vh: &[f32]| -> f64 {
        let e = cpu.embed_forward(&cfg, HostWeights { w, u, vh }, &c.ids).unwrap();
        e.iter().zip(&de).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let head_obj = |w: &[f32], u: &[f32], vh: &[f32], h: &[f32]| -> f64 {
        let z = cpu.head_forward(&cfg, HostWeights { w, u, vh }, h).unwrap();
        z.iter().zip(&dz).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let mut ge = HostGrads::zeros(&cfg, true);
    cpu.embed_backward(&cfg, c.wt(), &c.ids, &de, &mut ge).unwrap();
    let mut gh = HostGrads::zeros(&cfg, true);
    let dh = cpu.head_backward(&cfg, c.wt(), &c.h, &dz, &mut gh).unwrap();
    let (w0, u0, vh0, h0) = (c.w.clone(), c.u.clone(), c.vh.clone(), c.h.clone());
    let checks = [
        ("embed dU", widen(&ge.lora_vocab), fd(&mut c.u.clone(), 1e-2, |u| embed_obj(&w0, u, &vh0))),
        ("embed dVh", widen(&ge.lora_hidden), fd(&mut c.vh.clone(), 1e-2, |vh| embed_obj(&w0, &u0, vh))),
        ("embed dW", widen(ge.w.as_ref().unwrap()), fd(&mut c.w.clone(), 1e-2, |w| embed_obj(w, &u0, &vh0))),
        ("head dU", widen(&gh.lora_vocab), fd(&mut c.u.clone(), 1e-2, |u| head_obj(&w0, u, &vh0, &h0))),
        ("head dVh", widen(&gh.lora_hidden), fd(&mut c.vh.clone(), 1e-2, |vh| head_obj(&w0, &u0, vh, &h0))),
        ("head dW", widen(gh.w.as_ref().unwrap()), fd(&mut c.w.clone(), 1e-2, |w| head_obj(w, &u0, &vh0, &h0))),
        ("head dh", widen(&dh), fd(&mut c.h, 1e-2, |h| head_obj(&w0, &u0, &vh0, h))),
    ];
    for (name, got, want) in checks {
        let e = rel_err(&got, &want);
        println!("{name} vs finite difference rel_err {e:.2e}");
        assert!(e < FD_TOL, "{name}: {e}");
    }
}

#[test]
fn both_paths_add_into_one_shared_gradient() {
    let mut rng = fresh_rng("shared_grad");
    let cpu = CpuReference::new();
    let c = case(&mut rng, 31, 12, 4, 9, Some(5.0), Reduction::Mean);
    let d = c.cfg.hidden();
    let de: Vec<f32> = normal(&mut rng, c.ids.len() * d, 1.0);
    let (_, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &c.targets).unwrap();
    let mut only_embed = HostGrads::zeros(&c.cfg, true);
    cpu.embed_backward(&c.cfg, c.wt(), &c.ids, &de, &mut only_embed).unwrap();
    let mut only_head = HostGrads::zeros(&c.cfg, true);
    cpu.xent_backward(&c.cfg, c.wt(), &c.h, &c.targets, &lse, 1.0, &mut only_head).unwrap();
    // Start from a non-zero gradient to check the ops add rather than overwrite.
    let start: Vec<f32> = normal(&mut rng, c.u.len(), 1.0);
    let mut shared = HostGrads::zeros(&c.cfg, true);
    shared.lora_vocab.copy_from_slice(&start);
    cpu.embed_backward(&c.cfg, c.wt(), &c.ids, &de, &mut shared).unwrap();
    cpu.xent_backward(&c.cfg, c.wt(), &c.h, &c.targets, &lse, 1.0, &mut shared).unwrap();
    let sum = |a: &[f32], b: &[f32]| -> Vec<f64> { a.iter().zip(b).map(|(&x, &y)| x as f64 + y as f64).collect() };
    let want_u: Vec<f64> =
        sum(&only_embed.lora_vocab, &only_head.lora_vocab).iter().zip(&start).map(|(a, &s)| a + s as f64).collect();
    assert!(rel_err(&widen(&shared.lora_vocab), &want_u) < 1e-6);
    let want_vh = sum(&only_embed.lora_hidden, &only_head.lora_hidden);
    assert!(rel_err(&widen(&shared.lora_hidden), &want_vh) < 1e-6);
    let want_w = sum(only_embed.w.as_ref().unwrap(), only_head.w.as_ref().unwrap());
    assert!(rel_err(&widen(shared.w.as_ref().unwrap()), &want_w) < 1e-6);
    // And the embedding path really contributes (the test would be vacuous otherwise).
    assert!(rel_err(&widen(&only_head.lora_vocab), &want_u) > 1e-3);
}

fn ulp<T: Element>(x: f64) -> f64 {
    let mant = match T::DTYPE {
        tiedlora::DType::F32 => 23,
        tiedlora::DType::F16 => 10,
        tiedlora::DType::BF16 => 7,
    };
    let e = x.abs().max(f64::MIN_POSITIVE).log2().floor();
    2f64.powf(e - mant as f64)
}

fn merge_roundtrip<T: Element>(rng: &mut StdRng) {
    let cpu = CpuReference::with_threads(2);
    let cfg = LoraConfig::builder(23, 10, 3).alpha(6.0).build().unwrap();
    let w: Vec<T> = normal(rng, 230, 1.0);
    let u: Vec<f32> = normal(rng, 69, 0.3);
    let vh: Vec<f32> = normal(rng, 30, 0.3);
    let mut merged = w.clone();
    cpu.merge(&cfg, &mut merged, &u, &vh, 1.0).unwrap();
    // merged = round(W + s U Vh)
    for vi in 0..23 {
        for k in 0..10 {
            let delta: f64 = (0..3).map(|j| u[vi * 3 + j] as f64 * vh[j * 10 + k] as f64).sum();
            let exact = w[vi * 10 + k].to_f64() + cfg.scale() * delta;
            assert_eq!(merged[vi * 10 + k], T::from_f64(exact), "merge rounds once");
        }
    }
    let mut restored = merged.clone();
    cpu.merge(&cfg, &mut restored, &u, &vh, -1.0).unwrap();
    let mut changed = 0;
    for i in 0..w.len() {
        let (a, b, m) = (restored[i].to_f64(), w[i].to_f64(), merged[i].to_f64());
        assert!((a - b).abs() <= 0.5 * ulp::<T>(m) + 0.5 * ulp::<T>(b), "{i}: {a} vs {b} (merged {m})");
        changed += usize::from(merged[i] != w[i]);
    }
    assert!(changed > 0, "merge changed nothing");
}

#[test]
fn merge_then_unmerge_restores_w_up_to_one_rounding() {
    let mut rng = fresh_rng("merge");
    merge_roundtrip::<f32>(&mut rng);
    merge_roundtrip::<f16>(&mut rng);
    merge_roundtrip::<bf16>(&mut rng);
}

#[test]
fn cross_entropy_edge_cases() {
    let mut rng = fresh_rng("xent_edges");
    let cpu = CpuReference::new();
    let mut c = case(&mut rng, 40, 8, 2, 6, None, Reduction::Mean);
    // All targets ignored: loss 0 and zero gradients, not NaN.
    let all_ignored = vec![-100i64; 6];
    let (loss, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &all_ignored).unwrap();
    assert_eq!(loss, 0.0);
    assert!(lse.iter().all(|x| x.is_finite()));
    let mut g = HostGrads::zeros(&c.cfg, true);
    let dh = cpu.xent_backward(&c.cfg, c.wt(), &c.h, &all_ignored, &lse, 1.0, &mut g).unwrap();
    assert!(dh.iter().chain(&g.lora_vocab).chain(&g.lora_hidden).all(|&x| x == 0.0));
    // One valid target: mean = that token's loss = lse - z[y].
    let mut one = all_ignored.clone();
    one[4] = 7;
    let (loss, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &one).unwrap();
    let z = cpu.head_forward(&c.cfg, c.wt(), &c.h).unwrap();
    let v = c.cfg.vocab();
    let row: Vec<f64> = z[4 * v..5 * v].iter().map(|&x| x as f64).collect();
    let want = tiedlora::reference::logsumexp(&row) - row[7];
    assert!((loss as f64 - want).abs() <= 1e-5 * want.abs(), "{loss} vs {want}");
    assert!((lse[4] as f64 - tiedlora::reference::logsumexp(&row)).abs() < 1e-5);
    // Extreme logits (|z| ~ 1e4): no overflow.
    c.h.iter_mut().for_each(|x| *x *= 3000.0);
    let (loss, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &c.targets).unwrap();
    let zmax = cpu.head_forward(&c.cfg, c.wt(), &c.h).unwrap().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(zmax > 1e3, "logits not extreme: {zmax}");
    assert!(loss.is_finite() && lse.iter().all(|x| x.is_finite()), "{loss}");
    let mut g = HostGrads::zeros(&c.cfg, false);
    let dh = cpu.xent_backward(&c.cfg, c.wt(), &c.h, &c.targets, &lse, 1.0, &mut g).unwrap();
    assert!(dh.iter().chain(&g.lora_vocab).all(|x| x.is_finite()));
}

#[test]
fn results_are_deterministic_and_independent_of_threads() {
    let mut rng = fresh_rng("determinism");
    let c = case(&mut rng, 57, 16, 4, 11, Some(10.0), Reduction::Mean);
    let run = |cpu: &CpuReference| {
        let (loss, lse) = cpu.xent_forward(&c.cfg, c.wt(), &c.h, &c.targets).unwrap();
        let mut g = HostGrads::zeros(&c.cfg, true);
        let dh = cpu.xent_backward(&c.cfg, c.wt(), &c.h, &c.targets, &lse, 1.0, &mut g).unwrap();
        (loss, lse, dh, g.lora_vocab, g.lora_hidden, g.w.unwrap())
    };
    let a = run(&CpuReference::with_threads(3));
    let b = run(&CpuReference::with_threads(3));
    assert_eq!(format!("{a:?}"), format!("{b:?}"), "same thread count must give identical bits");
    let one = run(&CpuReference::with_threads(1));
    assert!(rel_err(&widen(&one.3), &widen(&a.3)) < 1e-7);
    assert!(rel_err(&widen(&one.5), &widen(&a.5)) < 1e-7);
}

/// The sampled-row references the GPU's 64-bit indexing test relies on
/// (`tests/common/sampled.rs`) agree with the CPU reference's whole outputs,
/// and a wrong value in a sampled row fails them.
#[test]
fn sampled_row_checks_agree_with_the_reference_and_catch_a_wrong_row() {
    use common::sampled::{dh_rows_err, du_rows_err, logits_rows_err};
    let mut rng = fresh_rng("sampled row checks");
    let (v, d, r, t) = (53, 12, 3, 7);
    let cfg = LoraConfig::builder(v, d, r).alpha(6.0).build().unwrap();
    let w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let g: Vec<f32> = normal(&mut rng, t * v, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let cpu = CpuReference::new();
    let mut logits = Harness::head_forward(&cpu, &cfg, wt, &h).unwrap();
    let mut grads = HostGrads::zeros(&cfg, false);
    let mut dh = Harness::head_backward(&cpu, &cfg, wt, &h, &g, &mut grads).unwrap();
    let (rows, vocab_rows) = ([0, 3, t - 1], [0, 17, v - 1]);
    assert!(logits_rows_err(&cfg, wt, &h, &logits, &rows) < 1e-6);
    assert!(dh_rows_err(&cfg, wt, &g, &dh, &rows) < 1e-6);
    assert!(du_rows_err(&cfg, wt, &h, &g, &grads.lora_vocab, &vocab_rows) < 1e-6);
    // One wrong element in a sampled row of each output.
    logits[3 * v + 5] += 1.0;
    dh[(t - 1) * d + 2] += 1.0;
    grads.lora_vocab[17 * r + 1] += 1.0;
    assert!(logits_rows_err(&cfg, wt, &h, &logits, &rows) > 1e-3);
    assert!(dh_rows_err(&cfg, wt, &g, &dh, &rows) > 1e-3);
    assert!(du_rows_err(&cfg, wt, &h, &g, &grads.lora_vocab, &vocab_rows) > 1e-3);
}
