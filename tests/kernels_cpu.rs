//! The `kernels/*.cu` sources executed on the CPU through the shim, against the
//! CPU reference: every golden case and randomized shapes on the default
//! kernels (the variants of the feature `experimental-kernels` have their
//! own file, tests/kernels_experimental.rs). Runs in CI.
#![cfg(feature = "cpu-kernels")]

mod common;

use common::golden::all_cases;
use common::harness::run_case;
use common::kernel_cases::assert_placed_buffers_bitwise_equal;
use common::parity::{assert_all, bad_ids_are_errors, embed_case, head_case};
use common::rand_inputs::{fresh_rng, normal};
use tiedlora::kernels::{CpuKernels, KernelOptions};
use tiedlora::{bf16, f16, Backend, DType, LoraConfig};

/// The default kernels, and the same with the smallest cross-entropy blocks
/// (several token blocks and vocabulary chunks on small shapes).
fn small_blocks() -> CpuKernels {
    CpuKernels::new(KernelOptions::default().with_xent_chunk_bytes(1))
}

#[test]
fn goldens_kernels_on_cpu() {
    let cases = all_cases().expect("golden discovery");
    let mut failures = Vec::new();
    let k = &CpuKernels::default();
    for (label, case) in &cases {
        match run_case(k, case, label) {
            Ok(checks) => {
                for c in &checks {
                    println!("{c}");
                }
                if checks.iter().any(|c| !c.passed()) {
                    failures.push(format!("{} {label}/{}", Backend::name(k), case.name()));
                }
            }
            Err(e) => {
                println!("{label}/{}: ERROR {e}", case.name());
                failures.push(format!("{} {label}/{}: {e}", Backend::name(k), case.name()));
            }
        }
    }

    assert!(failures.is_empty(), "kernel golden failures: {failures:?}");
}

#[test]
fn head_random_shapes_not_multiples_of_tiles() {
    let k = &CpuKernels::default();
    assert_all(head_case::<f32, _>(k, 131, 37, 3, 5, true));
    assert_all(head_case::<bf16, _>(k, 141, 40, 16, 9, false));
    assert_all(head_case::<f16, _>(k, 133, 24, 5, 3, true));
}

#[test]
fn head_t1_r1_and_r64() {
    // With T = 1 and r = 1, dVh is one dot product over V times h: its relative
    // error is that of a single sum with operands rounded for the tensor cores,
    // which no norm can average out. Check that shape exactly in f32, and the
    // half types at T = 1 (r = 4) and r = 1 (T = 7).
    let k = &CpuKernels::default();
    assert_all(head_case::<f32, _>(k, 70, 32, 1, 1, true));
    assert_all(head_case::<bf16, _>(k, 70, 32, 4, 1, false));
    assert_all(head_case::<bf16, _>(k, 300, 32, 1, 7, false));
    assert_all(head_case::<f16, _>(k, 65, 48, 64, 2, false));
    assert_all(head_case::<f32, _>(k, 40, 16, 33, 2, false));
}

/// The upstream gradient may be f32 for bf16 weights (mixed precision).
#[test]
fn head_f32_gradients_for_half_weights() {
    common::kernel_cases::head_f32_gradients_for_half_weights(&CpuKernels::default());
}

#[test]
fn embed_random_shapes_heavy_duplicates_and_odd_sizes() {
    let k = CpuKernels::default();
    assert_all(embed_case::<f32, _>(&k, 37, 29, 1, 5, 0));
    assert_all(embed_case::<bf16, _>(&k, 301, 72, 16, 40, 0));
    assert_all(embed_case::<f16, _>(&k, 50, 48, 64, 1, 0));
    assert_all(embed_case::<bf16, _>(&k, 97, 40, 5, 300, 250));
    assert_all(embed_case::<f32, _>(&k, 64, 24, 100, 9, 3));
}

#[test]
fn kernels_reject_out_of_range_ids() {
    bad_ids_are_errors(&CpuKernels::default());
}

#[test]
fn u32_and_i64_ids_give_identical_results() {
    use tiedlora::{Grads, Weights};
    let mut rng = fresh_rng("u32 ids");
    let (v, d, r, t) = (211, 40, 8, 33);
    let cfg = LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let de: Vec<bf16> = normal(&mut rng, t * d, 1.0);
    let ids64 = common::rand_inputs::ids(&mut rng, t, v);
    let ids32: Vec<u32> = ids64.iter().map(|&i| i as u32).collect();
    let k = CpuKernels::default();
    let wt = Weights::<CpuKernels, bf16> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let (mut e32, mut e64) = (vec![bf16::NAN; t * d], vec![bf16::NAN; t * d]);
    Backend::embed_forward(&k, &cfg, &wt, &ids32, &mut e32).unwrap();
    Backend::embed_forward(&k, &cfg, &wt, &ids64, &mut e64).unwrap();
    assert_eq!(e32, e64);
    let (mut du32, mut dvh32, mut du64, mut dvh64) =
        (vec![0f32; v * r], vec![0f32; r * d], vec![0f32; v * r], vec![0f32; r * d]);
    Backend::embed_backward(
        &k,
        &cfg,
        &wt,
        &ids32,
        &de,
        &mut Grads { lora_vocab: &mut du32, lora_hidden: &mut dvh32, w: None },
    )
    .unwrap();
    Backend::embed_backward(
        &k,
        &cfg,
        &wt,
        &ids64,
        &de,
        &mut Grads { lora_vocab: &mut du64, lora_hidden: &mut dvh64, w: None },
    )
    .unwrap();
    assert_eq!((du32, dvh32), (du64, dvh64));
    // Two bad ids: the error quotes the first.
    let mut bad = ids32.clone();
    bad[7] = v as u32;
    *bad.last_mut().unwrap() = u32::MAX;
    assert!(bad.len() > 8);
    let err = Backend::embed_forward(&k, &cfg, &wt, &bad, &mut e32).unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 7, value: v as i64, vocab: v });
}

#[test]
fn xent_forward_random_shapes_edges_and_extreme_logits() {
    let k = CpuKernels::default();
    assert_all(common::parity::xent_forward_case::<f32, _>(&k, 301, 37, 3, 5, None, 1.0));
    assert_all(common::parity::xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(common::parity::xent_forward_case::<f16, _>(&k, 300, 24, 1, 1, None, 1.0));
    // |z| ~ 1e3..1e4 before the softcap / without one: no overflow.
    assert_all(common::parity::xent_forward_case::<f32, _>(&k, 260, 16, 4, 3, None, 2000.0));
    assert_all(common::parity::xent_forward_case::<f32, _>(&k, 260, 16, 4, 3, Some(30.0), 2000.0));
}

/// Fused cross-entropy backward: shapes off the 128 tile; blocks of 128
/// tokens × 128 vocabulary columns (the smallest, so several token blocks and
/// chunks, each with a partial last one) and the default single block; rank 1, 3, 16 and 64;
/// softcap, sum and mean, dW on and off.
#[test]
fn xent_backward_random_shapes_and_edges() {
    use common::parity::{xent_backward_case, XentCase};
    let chunked = small_blocks();
    let whole = CpuKernels::default();
    let base =
        XentCase { v: 600, d: 40, r: 3, t: 130, softcap: None, sum: false, with_w: true, logit_scale: 1.0, tol: None };
    assert_all(xent_backward_case::<f32, _>(&chunked, base));
    let bf = XentCase { v: 300, d: 24, r: 16, t: 150, softcap: Some(30.0), sum: true, ..base };
    assert_all(xent_backward_case::<bf16, _>(&chunked, bf));
    assert_all(xent_backward_case::<bf16, _>(&whole, bf));
    assert_all(xent_backward_case::<f16, _>(&chunked, XentCase { v: 300, d: 24, r: 1, t: 1, with_w: false, ..base }));
    assert_all(xent_backward_case::<f32, _>(
        &whole,
        XentCase { v: 200, d: 33, r: 64, t: 9, softcap: Some(5.0), ..base },
    ));
}

/// f16 backward at a flat softmax with the mean over many tokens: every G
/// entry is ~1/(V·N) ≈ 4e-6 here, a subnormal f16 number resolved to only ~1.5 %
/// (at the Gemma shape, 1/(V·N) ≈ 5e-10 is 0 in f16). The kernels store G
/// without the loss factor and times 2¹⁵ (`kernels/xent_grad.cu`), so the
/// dtype's tolerance holds; storing G itself fails it (checked by mutation).
/// (The mma.sync and wgmma logit kernels: tests/kernels_experimental.rs.)
#[test]
fn xent_backward_f16_keeps_tiny_gradients() {
    use common::parity::{xent_backward_case, XentCase};
    let flat =
        XentCase { v: 700, d: 32, r: 4, t: 300, softcap: None, sum: false, with_w: true, logit_scale: 0.05, tol: None };
    assert_all(xent_backward_case::<f16, _>(&small_blocks(), flat));
}

/// The extra memory of the fused cross-entropy is exactly what the published
/// formulas say (the measured peak of live scratch) on the default kernels,
/// with and without the gradient filter, in one block and in several token
/// blocks; and the formulas have no T·V, V·d or T·d term. (The experimental
/// paths: tests/kernels_experimental.rs.)
#[test]
fn xent_extra_memory_matches_its_formula_and_has_no_tv_term() {
    use common::kernel_cases::{assert_xent_memory_formula_scales, assert_xent_memory_matches_formula};
    use tiedlora::kernels::xent_backward_block;
    let (v, d, r, t) = (300, 24, 8, 140);
    let exact = LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let filtered = LoraConfig::builder(v, d, r).alpha(16.0).xent_grad_filter(1e-3).build().unwrap();
    // 1 byte per block: the 128-row / 128-column minimum, 3 token blocks.
    assert_eq!(xent_backward_block(&exact, DType::BF16, t, 1), (128, 128));
    assert_eq!(xent_backward_block(&exact, DType::BF16, t, 0).0, t);
    let cases = [
        ("default", DType::F32, small_blocks(), &exact),
        ("default, one block", DType::F32, CpuKernels::default(), &exact),
        ("default", DType::BF16, small_blocks(), &exact),
        ("filter", DType::BF16, small_blocks(), &filtered),
    ];
    assert_xent_memory_matches_formula(&cases, t);
    assert_xent_memory_formula_scales(&KernelOptions::default());
}

/// Extreme logits (|z| ~ 1e3..1e4 before the softcap, or without one; V =
/// 600, 5000 in the GPU tests): the backward stays finite (no overflow) and close to the reference. The f32
/// tolerance is the logits' own resolution: at |z| ~ 1e4 an f32 logit is
/// resolved to ~1e-3 (its ulp; the K-term dot product adds a few), and the
/// softmax's relative error equals the logits' absolute error, so no f32
/// implementation can promise 1e-5 here. In bf16 the kernels stage
/// p = s·h·Vhᵀ (|p| ~ 1e4 here) in bf16, a logit error of several units, so the
/// bf16 case checks only that everything stays finite (rel_err of a
/// non-finite output is NaN, which fails even an infinite tolerance).
#[test]
fn xent_backward_extreme_logits() {
    use common::parity::{xent_backward_case, XentCase};
    let k = CpuKernels::default();
    let base = XentCase::EXTREME;
    assert_all(xent_backward_case::<f32, _>(&k, base));
    assert_all(xent_backward_case::<f32, _>(&k, XentCase { softcap: None, ..base }));
    assert_all(xent_backward_case::<bf16, _>(&k, XentCase { tol: Some(f64::INFINITY), ..base }));
}

/// The optional gradient filter: drops tiles on peaked logits, within the
/// documented bounds.
#[test]
fn xent_backward_gradient_filter() {
    let k = small_blocks();
    assert_all(common::parity::xent_filter_case(&k, 1000, 40, 4, 130, 1e-3));
    assert_all(common::parity::xent_filter_case(&k, 2000, 24, 16, 9, 2f64.powi(-12)));
}

/// Ranks above the 64 U columns a grad_h tile holds: both head backward
/// ops take G·W and G·U as two GEMMs of the same kernels.
#[test]
fn head_backward_ops_take_ranks_above_64() {
    common::parity::assert_wide_rank_cases(&CpuKernels::default(), &small_blocks());
}

/// Every op on buffers one element past 16-byte alignment, as a trainer's
/// sub-views can be: the kernels take their general paths there (the shim
/// traps a misaligned vector access, as a GPU faults: build.rs compiles it
/// with `-fsanitize=alignment`), and every output equals, bit for bit, the
/// same ops' on aligned buffers (which take the 16-byte paths).
#[test]
fn ops_take_buffers_one_element_past_alignment() {
    assert_placed_buffers_bitwise_equal(&CpuKernels::default());
}
