//! The fast CPU backend (`Cpu`) against the f64 reference: every golden
//! case, randomized shapes (several vocabulary and token blocks, partial last
//! blocks, 1 to 3 threads), bitwise determinism, errors before any output is
//! touched, and IEEE propagation of NaN.

mod common;

use common::golden::all_cases;
use common::harness::{golden_failures, run_case, Harness, HostGrads, HostWeights};
use common::parity::{
    assert_all, bad_ids_are_errors, embed_case, head_case, xent_backward_case, xent_forward_case, XentCase,
};
use common::rand_inputs::{fresh_rng, ids, normal};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tiedlora::{bf16, f16, Backend, Cpu, Error, Grads, LoraConfig, Weights};

#[test]
fn goldens_cpu_fast() {
    let cases = all_cases().expect("golden discovery");
    assert!(cases.len() >= 4, "expected the four built-in cases, found {}", cases.len());
    for k in [Cpu::new(), Cpu::with_threads(3)] {
        for (label, case) in &cases {
            for c in run_case(&k, case, label).expect("golden case runs") {
                println!("{c}");
            }
        }
        let failures = golden_failures(&k);
        assert!(failures.is_empty(), "cpu-fast golden failures ({} threads): {failures:#?}", k.threads());
    }
}

#[test]
fn head_random_shapes_and_blocks() {
    for k in [Cpu::with_threads(1), Cpu::with_threads(3)] {
        assert_all(head_case::<f32, _>(&k, 131, 37, 3, 5, true));
        assert_all(head_case::<bf16, _>(&k, 141, 40, 16, 9, false));
        assert_all(head_case::<f16, _>(&k, 133, 24, 5, 3, true));
        assert_all(head_case::<f32, _>(&k, 70, 32, 1, 1, true));
        assert_all(head_case::<f32, _>(&k, 2, 16, 33, 2, false));
        // d + r = 608: vocabulary blocks of 431 rows (3 blocks, the last
        // partial); 300 tokens: 3 token blocks.
        assert_all(head_case::<f32, _>(&k, 1000, 600, 8, 300, true));
        assert_all(head_case::<bf16, _>(&k, 1000, 600, 8, 130, false));
    }
}

#[test]
fn embed_random_shapes_and_duplicates() {
    for k in [Cpu::with_threads(1), Cpu::with_threads(3)] {
        assert_all(embed_case::<f32, _>(&k, 37, 29, 1, 5, 0));
        assert_all(embed_case::<bf16, _>(&k, 301, 72, 16, 40, 0));
        assert_all(embed_case::<f16, _>(&k, 50, 48, 64, 1, 0));
        assert_all(embed_case::<bf16, _>(&k, 97, 40, 5, 300, 250));
        assert_all(embed_case::<f32, _>(&k, 64, 24, 100, 9, 3));
    }
}

#[test]
fn xent_forward_random_shapes_edges_and_extreme_logits() {
    for k in [Cpu::with_threads(1), Cpu::with_threads(3)] {
        assert_all(xent_forward_case::<f32, _>(&k, 301, 37, 3, 5, None, 1.0));
        assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
        assert_all(xent_forward_case::<f16, _>(&k, 300, 24, 1, 1, None, 1.0));
        assert_all(xent_forward_case::<f32, _>(&k, 260, 16, 4, 3, None, 2000.0));
        assert_all(xent_forward_case::<f32, _>(&k, 260, 16, 4, 3, Some(30.0), 2000.0));
        assert_all(xent_forward_case::<f32, _>(&k, 1500, 600, 8, 140, Some(30.0), 0.2));
    }
}

#[test]
fn xent_backward_random_shapes_and_edges() {
    let base =
        XentCase { v: 600, d: 40, r: 3, t: 130, softcap: None, sum: false, with_w: true, logit_scale: 1.0, tol: None };
    for k in [Cpu::with_threads(1), Cpu::with_threads(3)] {
        assert_all(xent_backward_case::<f32, _>(&k, base));
        assert_all(xent_backward_case::<bf16, _>(&k, XentCase::SOFTCAP_SUM));
        assert_all(xent_backward_case::<f16, _>(&k, XentCase { v: 300, d: 24, r: 1, t: 1, with_w: false, ..base }));
        assert_all(xent_backward_case::<f32, _>(
            &k,
            XentCase { v: 200, d: 33, r: 64, t: 9, softcap: Some(5.0), ..base },
        ));
        // Several vocabulary blocks (d + r = 608) and token blocks.
        assert_all(xent_backward_case::<f32, _>(
            &k,
            XentCase { v: 1500, d: 600, r: 8, t: 140, logit_scale: 0.2, ..base },
        ));
        // Flat softmax, mean over many tokens: tiny G entries in f16 storage.
        let flat = XentCase { v: 700, d: 32, r: 4, t: 300, logit_scale: 0.05, ..base };
        assert_all(xent_backward_case::<f16, _>(&k, flat));
    }
}

/// Extreme logits (|z| ~ 1e3..1e4): finite and close to the reference within
/// the logits' own f32 resolution (see tests/kernels_cpu.rs for the bound).
#[test]
fn xent_backward_extreme_logits() {
    let k = Cpu::new();
    let base = XentCase::EXTREME;
    assert_all(xent_backward_case::<f32, _>(&k, base));
    assert_all(xent_backward_case::<f32, _>(&k, XentCase { softcap: None, ..base }));
    assert_all(xent_backward_case::<bf16, _>(&k, base));
}

struct Run {
    logits: Vec<bf16>,
    dh_head: Vec<bf16>,
    loss: f32,
    lse: Vec<f32>,
    dh_xent: Vec<bf16>,
    grads: HostGrads,
    e: Vec<bf16>,
    merged: Vec<bf16>,
}

/// Every op once, on fixed inputs, into fresh NaN-poisoned outputs.
fn run_all(k: &Cpu, seed: u64) -> Run {
    let mut rng = StdRng::seed_from_u64(seed);
    let (v, d, r, t) = (1300, 520, 8, 200);
    let cfg = LoraConfig::builder(v, d, r).alpha(16.0).logit_softcap(30.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.1);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<bf16> = normal(&mut rng, t * d, 1.0);
    let g: Vec<bf16> = normal(&mut rng, t * v, 1.0);
    let targets = ids(&mut rng, t, v);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let mut grads = HostGrads::zeros(&cfg, true);
    let logits = Harness::head_forward(k, &cfg, wt, &h).unwrap();
    let dh_head = Harness::head_backward(k, &cfg, wt, &h, &g, &mut grads).unwrap();
    let (loss, lse) = Harness::xent_forward(k, &cfg, wt, &h, &targets).unwrap();
    let dh_xent = Harness::xent_backward(k, &cfg, wt, &h, &targets, &lse, 0.5, &mut grads).unwrap();
    let e = Harness::embed_forward(k, &cfg, wt, &targets).unwrap();
    Harness::embed_backward(k, &cfg, wt, &targets, &e, &mut grads).unwrap();
    let mut merged = w.clone();
    Harness::merge(k, &cfg, &mut merged, &u, &vh, 1.0).unwrap();
    Run { logits, dh_head, loss, lse, dh_xent, grads, e, merged }
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Two runs with the same thread count give the same bits, for every output.
#[test]
fn bitwise_deterministic_for_a_thread_count() {
    for threads in [1, 2, 3] {
        let k = Cpu::with_threads(threads);
        let seed: u64 = rand::random();
        println!("determinism, {threads} threads: seed {seed}");
        let a = run_all(&k, seed);
        let b = run_all(&k, seed);
        assert!(a.loss.is_finite() && a.lse.iter().all(|x| x.is_finite()));
        assert_eq!(bits(&a.logits), bits(&b.logits), "head_forward, {threads} threads");
        assert_eq!(bits(&a.dh_head), bits(&b.dh_head), "head_backward dh");
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "loss");
        assert_eq!(bits(&a.lse), bits(&b.lse), "lse");
        assert_eq!(bits(&a.dh_xent), bits(&b.dh_xent), "xent dh");
        assert_eq!(bits(&a.grads.lora_vocab), bits(&b.grads.lora_vocab), "dU");
        assert_eq!(bits(&a.grads.lora_hidden), bits(&b.grads.lora_hidden), "dVh");
        assert_eq!(bits(a.grads.w.as_deref().unwrap()), bits(b.grads.w.as_deref().unwrap()), "dW");
        assert_eq!(bits(&a.e), bits(&b.e), "embed_forward");
        assert_eq!(bits(&a.merged), bits(&b.merged), "merge");
    }
}

#[test]
fn out_of_range_ids_are_errors() {
    bad_ids_are_errors(&Cpu::new());
}

/// Bad targets and bad lengths: the reference's typed error, and no output
/// or gradient touched.
#[test]
fn errors_leave_outputs_untouched() {
    let k = Cpu::new();
    let (v, d, r, t) = (50, 16, 4, 6);
    let cfg = LoraConfig::builder(v, d, r).build().unwrap();
    let mut rng = fresh_rng("errors");
    let w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let wt = Weights::<Cpu, f32> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let reference = tiedlora::CpuReference::new();
    let wt_ref = Weights::<tiedlora::CpuReference, f32> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let targets = [1i64, 2, -100, 50, 3, 4];
    let (mut loss, mut lse) = ([f32::NAN], vec![f32::NAN; t]);
    let err = Backend::head_xent_forward(&k, &cfg, &wt, &h, &targets, &mut loss, &mut lse).unwrap_err();
    let want = Backend::head_xent_forward(&reference, &cfg, &wt_ref, &h, &targets, &mut loss, &mut lse).unwrap_err();
    assert_eq!(err, want);
    assert_eq!(err, Error::TokenOutOfRange { arg: "targets", index: 3, value: 50, vocab: v });
    assert!(loss[0].is_nan() && lse.iter().all(|x| x.is_nan()));
    let (mut du, mut dvh, mut dw) = (vec![0.5f32; v * r], vec![0.5f32; r * d], vec![0.5f32; v * d]);
    let mut dh = vec![f32::NAN; t * d];
    let lse0 = vec![1f32; t];
    let mut g = Grads::<Cpu> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: Some(&mut dw) };
    let err = Backend::head_xent_backward(&k, &cfg, &wt, &h, &targets, &lse0, 1.0, &mut dh, &mut g).unwrap_err();
    assert_eq!(err, want);
    // A short dh: a length error naming `dh`.
    let mut short = vec![f32::NAN; t * d - 1];
    let good = [1i64, 2, -100, 5, 3, 4];
    let err = Backend::head_xent_backward(&k, &cfg, &wt, &h, &good, &lse0, 1.0, &mut short, &mut g).unwrap_err();
    assert!(err.to_string().contains("dh"), "{err}");
    let d_logits = vec![1f32; t * v - 1];
    let err = Backend::head_backward(&k, &cfg, &wt, &h, &d_logits, &mut dh, &mut g).unwrap_err();
    assert!(err.to_string().contains("d_logits"), "{err}");
    let mut ids = [0u32, 7, 49, 50];
    let mut e = vec![f32::NAN; 4 * d];
    assert!(matches!(
        Backend::embed_backward(&k, &cfg, &wt, &ids, &e, &mut g),
        Err(Error::TokenOutOfRange { index: 3, .. })
    ));
    ids[3] = 1;
    let mut w_bad = vec![0f32; v * d + 1];
    assert!(Backend::merge(&k, &cfg, &mut w_bad, &u, &vh).is_err());
    assert!(w_bad.iter().all(|&x| x == 0.0));
    assert!(dh.iter().all(|x| x.is_nan()) && short.iter().all(|x| x.is_nan()));
    assert!(du.iter().chain(&dvh).chain(&dw).all(|&x| x == 0.5));
    // The good call then writes everything.
    Backend::embed_forward(&k, &cfg, &wt, &ids, &mut e).unwrap();
    assert!(e.iter().all(|x| x.is_finite()));
}

/// A NaN in one weight row makes that row's logit NaN for every token, every
/// token's lse and the loss NaN (IEEE propagation, as in the reference).
#[test]
fn nan_weights_propagate() {
    let k = Cpu::new();
    let (v, d, r, t) = (700, 16, 4, 5);
    let cfg = LoraConfig::builder(v, d, r).build().unwrap();
    let mut rng = fresh_rng("nan");
    let mut w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    w[650 * d + 3] = f32::NAN;
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let logits = Harness::head_forward(&k, &cfg, wt, &h).unwrap();
    for ti in 0..t {
        let row = &logits[ti * v..(ti + 1) * v];
        assert!(row[650].is_nan());
        assert!(row.iter().enumerate().all(|(i, x)| i == 650 || x.is_finite()));
    }
    let (loss, lse) = Harness::xent_forward(&k, &cfg, wt, &h, &ids(&mut rng, t, v)).unwrap();
    assert!(loss.is_nan() && lse.iter().all(|x| x.is_nan()));
}
