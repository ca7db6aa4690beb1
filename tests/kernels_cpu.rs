//! The `kernels/*.cu` sources executed on the CPU through the shim, against the
//! CPU reference: every golden case and randomized shapes, with both head GEMM
//! main loops. Runs in CI (`cargo test --features cpu-kernels`).
#![cfg(feature = "cpu-kernels")]

mod common;

use common::golden::{all_cases, rel_err};
use common::harness::{run_case, widen, Harness, HostGrads, HostWeights};
use common::parity::{assert_all, bad_ids_are_errors, embed_case, head_case};
use common::rand_inputs::{fresh_rng, normal};
use tiedlora::kernels::CpuKernels;
use tiedlora::{bf16, f16, Backend, Cpu, DType, LoraConfig};

/// Both head GEMM main loops: register-staged and the cp.async ring.
const BACKENDS: [CpuKernels; 2] = [
    CpuKernels {
        pipelined: false,
        xent_chunk_bytes: 0,
        wide_tiles: false,
        mma: false,
        wgmma: false,
        wgmma_whole_atoms: false,
        cublas: false,
    },
    CpuKernels {
        pipelined: true,
        xent_chunk_bytes: 0,
        wide_tiles: false,
        mma: false,
        wgmma: false,
        wgmma_whole_atoms: false,
        cublas: false,
    },
];

#[test]
fn goldens_kernels_on_cpu() {
    let cases = all_cases().expect("golden discovery");
    let mut failures = Vec::new();
    for k in &BACKENDS {
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
    }
    assert!(failures.is_empty(), "kernel golden failures: {failures:?}");
}

#[test]
fn head_random_shapes_not_multiples_of_tiles() {
    for k in &BACKENDS {
        assert_all(head_case::<f32, _>(k, 131, 37, 3, 5, true));
        assert_all(head_case::<bf16, _>(k, 141, 40, 16, 9, false));
        assert_all(head_case::<f16, _>(k, 133, 24, 5, 3, true));
    }
}

/// The wide-tile head forward (`_w256`: 128 x 256 blocks, 3-stage ring):
/// shapes off the tile in both directions, r = 1 and 64, with the GEMM's
/// other ops on the default kernels.
#[test]
fn head_forward_wide_tiles() {
    let k = CpuKernels { wide_tiles: true, ..CpuKernels::default() };
    assert_all(head_case::<bf16, _>(&k, 300, 40, 16, 130, false));
    assert_all(head_case::<f16, _>(&k, 257, 24, 1, 3, false));
    assert_all(head_case::<bf16, _>(&k, 70, 48, 64, 1, false));
}

/// The ldmatrix + mma.sync kernels (`_mma`; forward also `_w256_mma`):
/// forward, grad_h (every extra-column width: r = 1, 16, 17, 64) and
/// grad_param (dU and dW), shapes off the tile, and V, d multiples of 8 over
/// several K steps so the ring's steady-state path (StageStream) runs, with
/// partial row and column tiles zero-filled by it. Every operand layout:
/// ldmatrix plain (row-major A, column-major B) and transposed (A = Gᵀ,
/// row-major B, the U columns of grad_h).
#[test]
fn head_mma() {
    for wide_tiles in [false, true] {
        let k = CpuKernels { mma: true, wide_tiles, ..CpuKernels::default() };
        assert_all(head_case::<bf16, _>(&k, 300, 40, 16, 130, false));
        assert_all(head_case::<f16, _>(&k, 257, 24, 1, 3, false));
        assert_all(head_case::<bf16, _>(&k, 70, 48, 64, 1, false));
        assert_all(head_case::<f16, _>(&k, 264, 136, 8, 150, true));
    }
    let k = CpuKernels { mma: true, ..CpuKernels::default() };
    assert_all(head_case::<bf16, _>(&k, 136, 72, 17, 70, true));
}

/// The Hopper warpgroup-MMA forward (`_wgmma`: 128 x 128 blocks on a 3-slot
/// ring; `_w256_wgmma`: 128 x 256 on 4 slots), its swizzled tiles and
/// descriptors evaluated by the shim, which also fails if a tile changes
/// while an MMA may still read it. Shapes: d a multiple of 8 with several
/// whole 64-wide K steps and a tail step mixing the last base columns with
/// the LoRA ones (d = 200, 136), d a multiple of 64 (the LoRA columns alone in
/// the tail), unaligned rows (d = 37: the general path only), T and V off
/// the tiles (partial row and column tiles zero-filled), r = 1, 8, 16, 64.
#[test]
fn head_wgmma() {
    for wide_tiles in [false, true] {
        let k = CpuKernels { wgmma: true, wide_tiles, ..CpuKernels::default() };
        assert_all(head_case::<bf16, _>(&k, 300, 200, 16, 130, false));
        assert_all(head_case::<f16, _>(&k, 257, 136, 1, 3, false));
        assert_all(head_case::<bf16, _>(&k, 70, 37, 64, 1, false));
        assert_all(head_case::<f16, _>(&k, 264, 256, 8, 150, false));
    }
    // grad_h (G in the storage dtype): every extra-column width (r = 1, 16,
    // 17, 33, 64), d off the 128 tile and not a multiple of 8 (general path
    // only), V over several K steps with a partial last one.
    let k = CpuKernels { wgmma: true, ..CpuKernels::default() };
    assert_all(head_case::<bf16, _>(&k, 264, 136, 16, 150, true));
    assert_all(head_case::<bf16, _>(&k, 200, 72, 17, 130, false));
    assert_all(head_case::<f16, _>(&k, 300, 40, 33, 20, false));
    assert_all(head_case::<bf16, _>(&k, 150, 37, 64, 9, false));
    // The whole-atom fallback (`Cuda::with_wgmma_whole_atoms`): RX = 64 at
    // r = 16 and 17, the U columns past r zero.
    let k = CpuKernels { wgmma: true, wgmma_whole_atoms: true, ..CpuKernels::default() };
    assert_all(head_case::<bf16, _>(&k, 264, 136, 16, 150, true));
    assert_all(head_case::<f16, _>(&k, 200, 72, 17, 130, false));
    // ... and it takes effect: the packed U it stages is [V, 64] instead of
    // [V, 16] (bf16), the only scratch that differs.
    use tiedlora::kernels::host::thread_scratch_bytes;
    let (v, d, r, t) = (130, 24, 16, 5);
    let cfg = LoraConfig::builder(v, d, r).build().unwrap();
    let mut rng = fresh_rng("whole atoms scratch");
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<bf16> = normal(&mut rng, t * d, 1.0);
    let g: Vec<bf16> = normal(&mut rng, t * v, 1.0);
    let scratch = |whole: bool| {
        let k = CpuKernels { wgmma: true, wgmma_whole_atoms: whole, ..CpuKernels::default() };
        let mut grads = HostGrads::zeros(&cfg, false);
        let s0 = thread_scratch_bytes();
        Harness::head_backward(&k, &cfg, HostWeights { w: &w, u: &u, vh: &vh }, &h, &g, &mut grads).unwrap();
        thread_scratch_bytes() - s0
    };
    assert_eq!(scratch(true) - scratch(false), v * (64 - 16) * 2);
}

/// The GEMM-engine paths (`Cuda::with_cublas`; on the CPU a host f32 GEMM
/// stands in for cuBLAS, so this checks the op sequences around it: operand
/// layouts and leading dimensions, U packed to the storage dtype, beta, the
/// dU / dW scale, the chunk epilogue kernels, the running logsumexp pairs),
/// with the cases of `common::parity::assert_gemm_engine_paths`. (G in f32
/// under bf16 storage, which the engine leaves to the fused kernels:
/// `head_f32_gradients_for_half_weights`.)
#[test]
fn gemm_engine_paths() {
    let k = CpuKernels { cublas: true, ..CpuKernels::default() };
    let chunked = CpuKernels { cublas: true, xent_chunk_bytes: 1, ..CpuKernels::default() };
    common::parity::assert_gemm_engine_paths(&k, &chunked);
}

/// The cp.async ring's steady-state path in every operand layout of the head
/// GEMMs: V, d multiples of 8 (16-byte rows) with several whole K steps and a
/// partial last one, T off the tiles (grad_param's K = T ends mid-step), and
/// d not a multiple of 8 (no steady state: the general path only).
#[test]
fn head_ring_steady_state_layouts() {
    let k = CpuKernels { pipelined: true, ..CpuKernels::default() };
    assert_all(head_case::<bf16, _>(&k, 264, 136, 16, 150, true));
    assert_all(head_case::<f16, _>(&k, 136, 72, 8, 70, false));
    assert_all(head_case::<bf16, _>(&k, 136, 36, 16, 33, false));
}

#[test]
fn head_t1_r1_and_r64() {
    // With T = 1 and r = 1, dVh is one dot product over V times h: its relative
    // error is that of a single sum with operands rounded for the tensor cores,
    // which no norm can average out. Check that shape exactly in f32, and the
    // half types at T = 1 (r = 4) and r = 1 (T = 7).
    for k in &BACKENDS {
        assert_all(head_case::<f32, _>(k, 70, 32, 1, 1, true));
        assert_all(head_case::<bf16, _>(k, 70, 32, 4, 1, false));
        assert_all(head_case::<bf16, _>(k, 300, 32, 1, 7, false));
        assert_all(head_case::<f16, _>(k, 65, 48, 64, 2, false));
        assert_all(head_case::<f32, _>(k, 40, 16, 33, 2, false));
    }
}

#[test]
fn head_f32_gradients_for_half_weights() {
    // The upstream gradient may be f32 for bf16 weights (mixed precision).
    let mut rng = fresh_rng("f32 grads");
    let cfg = LoraConfig::builder(150, 40, 8).alpha(16.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, 150 * 40, 0.5);
    let u: Vec<f32> = normal(&mut rng, 150 * 8, 0.5);
    let vh: Vec<f32> = normal(&mut rng, 8 * 40, 0.5);
    let h: Vec<bf16> = normal(&mut rng, 3 * 40, 1.0);
    let g: Vec<f32> = normal(&mut rng, 3 * 150, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let mut gr = HostGrads::zeros(&cfg, false);
    let dh_ref = Harness::head_backward(&Cpu::new(), &cfg, wt, &h, &g, &mut gr).unwrap();
    let engine = CpuKernels { cublas: true, ..CpuKernels::default() };
    for k in BACKENDS.iter().chain([&engine]) {
        let mut gk = HostGrads::zeros(&cfg, false);
        let dh = Harness::head_backward(k, &cfg, wt, &h, &g, &mut gk).unwrap();
        let tol = DType::BF16.tolerance();
        assert!(rel_err(&widen(&dh), &widen(&dh_ref)) < tol);
        assert!(rel_err(&widen(&gk.lora_vocab), &widen(&gr.lora_vocab)) < tol);
        assert!(rel_err(&widen(&gk.lora_hidden), &widen(&gr.lora_hidden)) < tol);
    }
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

/// The gradient filter on the wgmma G kernel (its per-element test is its
/// own; the tile flag is shared with the other kernels and covered by
/// `xent_backward_gradient_filter`): with near-uniform probabilities every
/// |G| / f is at most 1 - 1/V < ε = 0.999, so every tile is dropped and the
/// backward adds nothing; with the filter off the same call moves dh and dU.
#[test]
fn xent_wgmma_filter_drops_tiles_below_the_threshold() {
    use tiedlora::{Grads, Weights};
    let mut rng = fresh_rng("wgmma filter");
    let (v, d, r, t) = (300, 72, 8, 140);
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.01);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.01);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.01);
    let h: Vec<bf16> = normal(&mut rng, t * d, 0.01);
    let targets: Vec<u32> = common::rand_inputs::ids(&mut rng, t, v).iter().map(|&i| i as u32).collect();
    let k = CpuKernels { wgmma: true, ..CpuKernels::default() };
    let wt = Weights::<CpuKernels, bf16> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let run = |eps: Option<f64>| {
        let mut b = LoraConfig::builder(v, d, r).alpha(16.0);
        if let Some(eps) = eps {
            b = b.xent_grad_filter(eps);
        }
        let cfg = b.build().unwrap();
        let (mut loss, mut lse) = ([f32::NAN], vec![f32::NAN; t]);
        Backend::head_xent_forward(&k, &cfg, &wt, &h, &targets, &mut loss, &mut lse).unwrap();
        let (mut du, mut dvh, mut dh) = (vec![0f32; v * r], vec![0f32; r * d], vec![bf16::NAN; t * d]);
        let mut g = Grads::<CpuKernels> { lora_vocab: &mut du[..], lora_hidden: &mut dvh[..], w: None };
        Backend::head_xent_backward(&k, &cfg, &wt, &h, &targets, &lse, 1.0, &mut dh, &mut g).unwrap();
        (dh, du)
    };
    let (dh, du) = run(Some(0.999));
    assert!(dh.iter().all(|x| x.to_f32() == 0.0), "a tile survived the filter (dh)");
    assert!(du.iter().all(|&x| x == 0.0), "a tile survived the filter (dU)");
    let (dh, du) = run(None);
    assert!(dh.iter().any(|x| x.to_f32() != 0.0) && du.iter().any(|&x| x != 0.0), "the unfiltered case moves nothing");
}

/// The fused cross-entropy on the `_mma` logit kernels (forward partials
/// with the logit tile over the drained ring, backward G per chunk).
#[test]
fn xent_mma_forward_and_backward() {
    use common::parity::{xent_backward_case, xent_forward_case, XentCase};
    let k = CpuKernels { mma: true, ..CpuKernels::default() };
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&k, 264, 136, 1, 150, None, 1.0));
    let chunked = CpuKernels { mma: true, xent_chunk_bytes: 1, ..CpuKernels::default() };
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(&chunked, base));
    assert_all(xent_backward_case::<f16, _>(&k, XentCase { v: 264, d: 136, r: 8, t: 70, softcap: None, ..base }));
}

/// The fused cross-entropy forward on the Hopper warpgroup-MMA partials
/// (`_wgmma`: logit tile in registers, row reductions over lane quads):
/// several vocabulary splits with a partial last tile and split (targets in
/// every split), d with and without a tail K step, r = 1 and 16, softcap on
/// and off, large and small logits; and the backward with the wgmma G kernel
/// (several vocabulary chunks, and one).
#[test]
fn xent_wgmma_forward_and_backward() {
    use common::parity::xent_forward_case;
    let k = CpuKernels { wgmma: true, ..CpuKernels::default() };
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&k, 264, 136, 1, 150, None, 1.0));
    assert_all(xent_forward_case::<bf16, _>(&k, 300, 64, 4, 3, Some(30.0), 2000.0));
    // Small logits: the zero-filled columns past V would visibly raise the lse
    // if the partial last tile were not masked.
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, None, 0.01));
    use common::parity::{xent_backward_case, XentCase};
    let chunked = CpuKernels { wgmma: true, xent_chunk_bytes: 1, ..CpuKernels::default() };
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(&chunked, base));
    assert_all(xent_backward_case::<f16, _>(&k, XentCase { v: 264, d: 136, r: 8, t: 70, softcap: None, ..base }));
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
/// chunks, each with a partial last one) and the default single block; both GEMM main loops; rank 1, 3, 16 and 64;
/// softcap, sum and mean, dW on and off.
#[test]
fn xent_backward_random_shapes_and_edges() {
    use common::parity::{xent_backward_case, XentCase};
    let chunked = CpuKernels { pipelined: false, xent_chunk_bytes: 1, ..CpuKernels::default() };
    let chunked_s3 = CpuKernels { pipelined: true, xent_chunk_bytes: 1, ..CpuKernels::default() };
    let whole = CpuKernels::default();
    let base =
        XentCase { v: 600, d: 40, r: 3, t: 130, softcap: None, sum: false, with_w: true, logit_scale: 1.0, tol: None };
    assert_all(xent_backward_case::<f32, _>(&chunked, base));
    let bf = XentCase { v: 300, d: 24, r: 16, t: 150, softcap: Some(30.0), sum: true, ..base };
    assert_all(xent_backward_case::<bf16, _>(&chunked_s3, bf));
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
/// All three logit kernels (WMMA, mma.sync, wgmma).
#[test]
fn xent_backward_f16_keeps_tiny_gradients() {
    use common::parity::{xent_backward_case, XentCase};
    let flat =
        XentCase { v: 700, d: 32, r: 4, t: 300, softcap: None, sum: false, with_w: true, logit_scale: 0.05, tol: None };
    for k in [
        CpuKernels { xent_chunk_bytes: 1, ..CpuKernels::default() },
        CpuKernels { mma: true, ..CpuKernels::default() },
        CpuKernels { wgmma: true, ..CpuKernels::default() },
    ] {
        assert_all(xent_backward_case::<f16, _>(&k, flat));
    }
}

/// Peak scratch of one fused cross-entropy forward and one backward on the
/// shim (the most bytes live at once, as `Cuda::scratch_peak_bytes` on a GPU).
fn xent_peaks<T: tiedlora::Element>(k: &CpuKernels, cfg: &LoraConfig, t: usize, seed: &str) -> (usize, usize) {
    use tiedlora::kernels::host::{reset_thread_scratch_peak, thread_scratch_peak};
    let mut rng = fresh_rng(seed);
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, 1.0);
    let targets = common::rand_inputs::ids(&mut rng, t, v);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    reset_thread_scratch_peak();
    let (_, lse) = Harness::xent_forward(k, cfg, wt, &h, &targets).unwrap();
    let fwd = reset_thread_scratch_peak();
    let mut g = HostGrads::zeros(cfg, false);
    Harness::xent_backward(k, cfg, wt, &h, &targets, &lse, 1.0, &mut g).unwrap();
    (fwd, thread_scratch_peak())
}

/// The extra memory of the fused cross-entropy is exactly what the published
/// formulas say (the measured peak of live scratch) on every path: default
/// kernels, mma, wgmma (+ whole atoms), the GEMM engine, the gradient filter
/// with and without the engine, in one block and in several token blocks.
/// And the formulas have no T·V, V·d or T·d term: at the Gemma-2-2B shape
/// they stay far below the logits.
#[test]
fn xent_extra_memory_matches_its_formula_and_has_no_tv_term() {
    use tiedlora::kernels::{head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes, xent_backward_block};
    let (v, d, r, t) = (300, 24, 8, 140);
    let exact = LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let filtered = LoraConfig::builder(v, d, r).alpha(16.0).xent_grad_filter(1e-3).build().unwrap();
    // 1 byte per block: the 128-row / 128-column minimum, 3 token blocks.
    assert_eq!(xent_backward_block(&exact, DType::BF16, t, 1), (128, 128));
    assert_eq!(xent_backward_block(&exact, DType::BF16, t, 0).0, t);
    let base = CpuKernels { xent_chunk_bytes: 1, ..CpuKernels::default() };
    let cases = [
        ("default", DType::F32, base, &exact),
        ("default, one block", DType::F32, CpuKernels { xent_chunk_bytes: 0, ..base }, &exact),
        ("default", DType::BF16, base, &exact),
        ("mma", DType::BF16, CpuKernels { mma: true, ..base }, &exact),
        ("wgmma", DType::BF16, CpuKernels { wgmma: true, ..base }, &exact),
        ("wgmma, whole atoms", DType::BF16, CpuKernels { wgmma: true, wgmma_whole_atoms: true, ..base }, &exact),
        ("engine", DType::F32, CpuKernels { cublas: true, ..base }, &exact),
        ("engine", DType::BF16, CpuKernels { cublas: true, ..base }, &exact),
        ("engine, one block", DType::BF16, CpuKernels { cublas: true, xent_chunk_bytes: 0, ..base }, &exact),
        ("filter", DType::BF16, base, &filtered),
        ("filter + engine", DType::F16, CpuKernels { cublas: true, ..base }, &filtered),
        ("filter + wgmma", DType::BF16, CpuKernels { wgmma: true, ..base }, &filtered),
    ];
    for (name, dt, k, cfg) in cases {
        let clock = std::time::Instant::now();
        let (fwd, bwd) = match dt {
            DType::F32 => xent_peaks::<f32>(&k, cfg, t, name),
            DType::F16 => xent_peaks::<f16>(&k, cfg, t, name),
            DType::BF16 => xent_peaks::<bf16>(&k, cfg, t, name),
        };
        let opts = k.kernel_options();
        // The shim reports 2 multiprocessors.
        let (fwd_formula, bwd_formula) = (
            head_xent_forward_scratch_bytes(cfg, dt, t, 2, &opts),
            head_xent_backward_scratch_bytes(cfg, dt, t, 2, &opts),
        );
        println!(
            "{name} {dt:?}: forward {fwd} B (formula {fwd_formula}), backward {bwd} B (formula {bwd_formula}); {:.1} s",
            clock.elapsed().as_secs_f64()
        );
        assert_eq!(fwd, fwd_formula, "{name} {dt:?}: forward peak");
        assert_eq!(bwd, bwd_formula, "{name} {dt:?}: backward peak");
        if k.xent_chunk_bytes == 1 && !k.cublas {
            assert!(bwd < t * v * dt.size(), "{name}: 128 x 128 blocks hold less than the logits");
        }
    }

    let gemma = LoraConfig::builder(256_000, 2304, 16).build().unwrap();
    let (tg, sms) = (8192, 132);
    let logits = tg * 256_000 * 2;
    for opts in
        [CpuKernels::default(), CpuKernels { cublas: true, ..CpuKernels::default() }].map(|k| k.kernel_options())
    {
        let fwd = head_xent_forward_scratch_bytes(&gemma, DType::BF16, tg, sms, &opts);
        let bwd = head_xent_backward_scratch_bytes(&gemma, DType::BF16, tg, sms, &opts);
        println!(
            "Gemma-2-2B shape, bf16, engine {}: forward {fwd} B, backward {bwd} B, logits {logits} B",
            opts.cublas
        );
        assert!(bwd * 40 < logits && fwd * 50 < logits);
        // Doubling V adds at most the V·r term of U in the storage dtype (no T·V or V·d) ...
        let gemma2v = LoraConfig::builder(512_000, 2304, 16).build().unwrap();
        let v_r = 256_000 * 16 * 2;
        assert!(head_xent_backward_scratch_bytes(&gemma2v, DType::BF16, tg, sms, &opts) <= bwd + v_r);
        assert!(head_xent_forward_scratch_bytes(&gemma2v, DType::BF16, tg, sms, &opts) <= fwd + v_r);
        // ... and for any T the backward is O(T) + O(T·r) (targets, p, gu)
        // plus blocks of at most the chunk bytes each (the dh accumulator, G,
        // the engine's f32 logits), U packed (V·r), and bounded partials
        // (dVh: at most 4 per multiprocessor; the tile flags and dU splits
        // of one block): no T·d term.
        for tokens in [tg, 8 * tg, 128 * tg] {
            let bwd = head_xent_backward_scratch_bytes(&gemma, DType::BF16, tokens, sms, &opts);
            let bound = tokens * (4 + 16 * 2 + 16 * 4)
                + 3 * tiedlora::kernels::XENT_CHUNK_BYTES
                + v_r
                + 4 * sms as usize * 16 * 2304 * 4
                + (8 << 20); // one block's tile flags and dU split partials
            assert!(bwd <= bound, "T = {tokens}: {bwd} B over {bound} B");
        }
    }
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
    let base = XentCase {
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
    assert_all(xent_backward_case::<f32, _>(&k, base));
    assert_all(xent_backward_case::<f32, _>(&k, XentCase { softcap: None, ..base }));
    assert_all(xent_backward_case::<bf16, _>(&k, XentCase { tol: Some(f64::INFINITY), ..base }));
}

/// The optional gradient filter: drops tiles on peaked logits, within the
/// documented bounds. Both GEMM main loops.
#[test]
fn xent_backward_gradient_filter() {
    for pipelined in [false, true] {
        let k = CpuKernels { pipelined, xent_chunk_bytes: 1, ..CpuKernels::default() };
        assert_all(common::parity::xent_filter_case(&k, 1000, 40, 4, 130, 1e-3));
        assert_all(common::parity::xent_filter_case(&k, 2000, 24, 16, 9, 2f64.powi(-12)));
    }
}

/// Rank above the head kernels' 64 extra columns: a clear error from both
/// head backward ops, before any output is touched.
#[test]
fn head_backward_ops_reject_rank_above_64() {
    let (v, d, r, t) = (130, 16, 65, 3);
    let cfg = LoraConfig::builder(v, d, r).build().unwrap();
    let mut rng = fresh_rng("rank 65");
    let w: Vec<f32> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<f32> = normal(&mut rng, t * d, 1.0);
    let k = CpuKernels::default();
    let wt = tiedlora::Weights::<CpuKernels, f32> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let (mut du, mut dvh) = (vec![0f32; v * r], vec![0f32; r * d]);
    let mut dh = vec![f32::NAN; t * d];
    let g = vec![0.5f32; t * v];
    let err = Backend::head_backward(
        &k,
        &cfg,
        &wt,
        &h,
        &g,
        &mut dh,
        &mut tiedlora::Grads::<CpuKernels> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None },
    );
    assert!(matches!(err, Err(tiedlora::Error::UnsupportedCombination(ref m)) if m.contains("rank 65")), "{err:?}");
    let (targets, lse) = (vec![1i64, 2, 3], vec![0f32; t]);
    let err = Backend::head_xent_backward(
        &k,
        &cfg,
        &wt,
        &h,
        &targets,
        &lse,
        1.0,
        &mut dh,
        &mut tiedlora::Grads::<CpuKernels> { lora_vocab: &mut du, lora_hidden: &mut dvh, w: None },
    );
    assert!(matches!(err, Err(tiedlora::Error::UnsupportedCombination(ref m)) if m.contains("rank 65")), "{err:?}");
    assert!(dh.iter().all(|x| x.is_nan()) && du.iter().all(|&x| x == 0.0) && dvh.iter().all(|&x| x == 0.0));
}

/// `len` elements of `data` in a fresh buffer whose first element sits one
/// element past a 16-byte boundary (`misaligned`), or on one: a trainer's
/// sub-view can start anywhere.
struct Placed<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> Placed<T> {
    fn new(data: &[T], misaligned: bool) -> Self {
        let es = std::mem::size_of::<T>();
        let mut buf = vec![T::default(); data.len() + 32 / es + 1];
        let want = if misaligned { es % 16 } else { 0 };
        let start = (0..16 / es + 1).find(|&k| (buf.as_ptr() as usize + k * es) % 16 == want).unwrap();
        buf[start..start + data.len()].copy_from_slice(data);
        Placed { buf, start, len: data.len() }
    }
    fn get(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Every op's outputs (bits) with its floating-point buffers placed as asked.
fn ops_on_placed_buffers(k: &CpuKernels, seed: u64, misaligned: bool) -> Vec<Vec<u32>> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    // d and V multiples of 8: aligned bf16 rows take the 16-byte paths.
    let (v, d, r, t) = (264, 64, 8, 70);
    let cfg = LoraConfig::builder(v, d, r).alpha(16.0).embed_scale(1.5).logit_softcap(30.0).build().unwrap();
    let at = |x: &[bf16]| Placed::new(x, misaligned);
    let at32 = |x: &[f32]| Placed::new(x, misaligned);
    let w = at(&normal::<bf16>(&mut rng, v * d, 0.5));
    let (u, vh) = (at32(&normal::<f32>(&mut rng, v * r, 0.5)), at32(&normal::<f32>(&mut rng, r * d, 0.5)));
    let h = at(&normal::<bf16>(&mut rng, t * d, 1.0));
    let g = at(&normal::<bf16>(&mut rng, t * v, 1.0));
    let ids: Vec<u32> = (0..t).map(|i| ((i * 37 + 5) % v) as u32).collect();
    let targets: Vec<i64> = (0..t).map(|i| ((i * 53 + 1) % v) as i64).collect();
    let weights = tiedlora::Weights { w: w.get(), lora_vocab: u.get(), lora_hidden: vh.get() };
    let bits = |x: &[bf16]| x.iter().map(|y| u32::from(y.to_bits())).collect::<Vec<u32>>();
    let bits32 = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<u32>>();
    let mut out = Vec::new();
    let mut logits = at(&vec![bf16::NAN; t * v]);
    Backend::head_forward(k, &cfg, &weights, h.get(), logits.get_mut()).unwrap();
    out.push(bits(logits.get()));
    let (mut dh, mut du, mut dvh) = (at(&vec![bf16::NAN; t * d]), at32(&vec![0.0; v * r]), at32(&vec![0.0; r * d]));
    let mut grads = tiedlora::Grads { lora_vocab: du.get_mut(), lora_hidden: dvh.get_mut(), w: None };
    Backend::head_backward(k, &cfg, &weights, h.get(), g.get(), dh.get_mut(), &mut grads).unwrap();
    let mut e = at(&vec![bf16::NAN; t * d]);
    Backend::embed_forward(k, &cfg, &weights, &ids[..], e.get_mut()).unwrap();
    let mut grads = tiedlora::Grads { lora_vocab: du.get_mut(), lora_hidden: dvh.get_mut(), w: None };
    Backend::embed_backward(k, &cfg, &weights, &ids[..], h.get(), &mut grads).unwrap();
    out.extend([bits(dh.get()), bits(e.get()), bits32(du.get()), bits32(dvh.get())]);
    let (mut loss, mut lse) = (at32(&[f32::NAN]), at32(&vec![f32::NAN; t]));
    Backend::head_xent_forward(k, &cfg, &weights, h.get(), &targets[..], loss.get_mut(), lse.get_mut()).unwrap();
    let mut grads = tiedlora::Grads { lora_vocab: du.get_mut(), lora_hidden: dvh.get_mut(), w: None };
    Backend::head_xent_backward(k, &cfg, &weights, h.get(), &targets[..], lse.get(), 1.0, dh.get_mut(), &mut grads)
        .unwrap();
    out.extend([bits32(loss.get()), bits32(lse.get()), bits(dh.get()), bits32(du.get()), bits32(dvh.get())]);
    let mut merged = at(w.get());
    Backend::merge(k, &cfg, merged.get_mut(), u.get(), vh.get()).unwrap();
    out.push(bits(merged.get()));
    out
}

/// Every op on buffers one element past 16-byte alignment, as a trainer's
/// sub-views can be, on every kernel family: the kernels take their general
/// paths there (the shim traps a misaligned vector access, as a GPU faults:
/// build.rs compiles it with `-fsanitize=alignment`), and every output
/// equals, bit for bit, the same ops' on aligned buffers (which take the
/// 16-byte paths).
#[test]
fn ops_take_buffers_one_element_past_alignment() {
    let base = CpuKernels::default();
    for k in [
        base,
        CpuKernels { pipelined: true, ..base },
        CpuKernels { mma: true, wide_tiles: true, ..base },
        CpuKernels { wgmma: true, ..base },
        CpuKernels { cublas: true, ..base },
    ] {
        let seed = rand::Rng::random::<u64>(&mut fresh_rng(&format!("placed buffers, {}", Backend::name(&k))));
        let (aligned, misaligned) = (ops_on_placed_buffers(&k, seed, false), ops_on_placed_buffers(&k, seed, true));
        for (i, (a, m)) in aligned.iter().zip(&misaligned).enumerate() {
            let diff = a.iter().zip(m).filter(|(x, y)| x != y).count();
            assert_eq!(
                diff,
                0,
                "{}: output {i}: {diff} of {} values differ when misaligned",
                Backend::name(&k),
                a.len()
            );
        }
    }
}
