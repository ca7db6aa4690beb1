//! The kernel variants of the feature `experimental-kernels` (mma.sync,
//! Hopper wgmma, wide tiles, two-block grad_h, the cuBLAS path), executed on
//! the CPU through the shim against the CPU reference. They run on a GPU only
//! in the GPU check (scripts/gpu-check.sh), which measures them for
//! promotion to the default.
#![cfg(all(feature = "cpu-kernels", feature = "experimental-kernels"))]

mod common;

use common::harness::{Harness, HostGrads, HostWeights};
use common::kernel_cases::assert_placed_buffers_bitwise_equal;
use common::parity::{assert_all, head_case};
use common::rand_inputs::{fresh_rng, normal};
use tiedlora::kernels::{CpuKernels, KernelOptions};
use tiedlora::{bf16, f16, Backend, DType, LoraConfig};

fn kernels(options: KernelOptions) -> CpuKernels {
    CpuKernels::new(options)
}

fn defaults() -> KernelOptions {
    KernelOptions::default()
}

/// The wide-tile head forward (`_w256`: 128 x 256 blocks, 3-stage ring):
/// shapes off the tile in both directions, r = 1 and 64, with the GEMM's
/// other ops on the default kernels.
#[test]
fn head_forward_wide_tiles() {
    let k = CpuKernels::new(KernelOptions { wide_tiles: true, ..KernelOptions::default() });
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
        let k = CpuKernels::new(KernelOptions { mma: true, wide_tiles, ..KernelOptions::default() });
        assert_all(head_case::<bf16, _>(&k, 300, 40, 16, 130, false));
        assert_all(head_case::<f16, _>(&k, 257, 24, 1, 3, false));
        assert_all(head_case::<bf16, _>(&k, 70, 48, 64, 1, false));
        assert_all(head_case::<f16, _>(&k, 264, 136, 8, 150, true));
    }
    let k = CpuKernels::new(KernelOptions { mma: true, ..KernelOptions::default() });
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
        let k = CpuKernels::new(KernelOptions { wgmma: true, wide_tiles, ..KernelOptions::default() });
        assert_all(head_case::<bf16, _>(&k, 300, 200, 16, 130, false));
        assert_all(head_case::<f16, _>(&k, 257, 136, 1, 3, false));
        assert_all(head_case::<bf16, _>(&k, 70, 37, 64, 1, false));
        assert_all(head_case::<f16, _>(&k, 264, 256, 8, 150, false));
    }
    // grad_h (G in the storage dtype): every extra-column width (r = 1, 16,
    // 17, 33, 64), d off the 128 tile and not a multiple of 8 (general path
    // only), V over several K steps with a partial last one.
    let k = CpuKernels::new(KernelOptions { wgmma: true, ..KernelOptions::default() });
    assert_all(head_case::<bf16, _>(&k, 264, 136, 16, 150, true));
    assert_all(head_case::<bf16, _>(&k, 200, 72, 17, 130, false));
    assert_all(head_case::<f16, _>(&k, 300, 40, 33, 20, false));
    assert_all(head_case::<bf16, _>(&k, 150, 37, 64, 9, false));
    // The whole-atom fallback (`Cuda::with_wgmma_whole_atoms`): RX = 64 at
    // r = 16 and 17, the U columns past r zero.
    let k = CpuKernels::new(KernelOptions { wgmma: true, wgmma_whole_atoms: true, ..KernelOptions::default() });
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
        let k = CpuKernels::new(KernelOptions { wgmma: true, wgmma_whole_atoms: whole, ..KernelOptions::default() });
        let mut grads = HostGrads::zeros(&cfg, false);
        let s0 = thread_scratch_bytes();
        Harness::head_backward(&k, &cfg, HostWeights { w: &w, u: &u, vh: &vh }, &h, &g, &mut grads).unwrap();
        thread_scratch_bytes() - s0
    };
    assert_eq!(scratch(true) - scratch(false), v * (64 - 16) * 2);
}

/// The cuBLAS paths (`Cuda::with_cublas`; on the CPU a host f32 GEMM
/// stands in for cuBLAS, so this checks the op sequences around it: operand
/// layouts and leading dimensions, U packed to the storage dtype, beta, the
/// dU / dW scale, the chunk epilogue kernels, the running logsumexp pairs),
/// with the cases of `common::parity::assert_gemm_engine_paths`. (G in f32
/// under bf16 storage, which the engine leaves to the fused kernels:
/// `head_f32_gradients_for_half_weights`.)
#[test]
fn gemm_engine_paths() {
    let k = CpuKernels::new(KernelOptions { cublas: true, ..KernelOptions::default() });
    let chunked = CpuKernels::new(KernelOptions { cublas: true, xent_chunk_bytes: 1, ..KernelOptions::default() });
    common::parity::assert_gemm_engine_paths(&k, &chunked);
}

/// The cp.async ring's steady-state path (the `_mma` kernels' main loop) in
/// every operand layout of the head
/// GEMMs: V, d multiples of 8 (16-byte rows) with several whole K steps and a
/// partial last one, T off the tiles (grad_param's K = T ends mid-step), and
/// d not a multiple of 8 (no steady state: the general path only).
#[test]
fn head_ring_steady_state_layouts() {
    let k = kernels(KernelOptions { mma: true, ..defaults() });
    assert_all(head_case::<bf16, _>(&k, 264, 136, 16, 150, true));
    assert_all(head_case::<f16, _>(&k, 136, 72, 8, 70, false));
    assert_all(head_case::<bf16, _>(&k, 136, 36, 16, 33, false));
}

/// The two-blocks-per-SM grad_h (`_2blocks`: rank <= 16, half precision, no
/// gradient filter; the same math as the default kernel), G in the storage
/// dtype and in f32.
#[test]
fn head_grad_h_two_blocks() {
    let k = kernels(KernelOptions { grad_h_two_blocks: true, ..defaults() });
    assert_all(head_case::<bf16, _>(&k, 300, 40, 16, 130, true));
    assert_all(head_case::<f16, _>(&k, 257, 24, 1, 3, false));
    common::kernel_cases::head_f32_gradients_for_half_weights(&k);
}

/// f32 gradients for bf16 weights on the cuBLAS backend (which leaves that
/// combination to the fused kernels).
#[test]
fn cublas_f32_gradients_for_half_weights() {
    common::kernel_cases::head_f32_gradients_for_half_weights(&kernels(KernelOptions { cublas: true, ..defaults() }));
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
    let k = CpuKernels::new(KernelOptions { wgmma: true, ..KernelOptions::default() });
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
    let k = CpuKernels::new(KernelOptions { mma: true, ..KernelOptions::default() });
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&k, 264, 136, 1, 150, None, 1.0));
    let chunked = CpuKernels::new(KernelOptions { mma: true, xent_chunk_bytes: 1, ..KernelOptions::default() });
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
    let k = CpuKernels::new(KernelOptions { wgmma: true, ..KernelOptions::default() });
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&k, 264, 136, 1, 150, None, 1.0));
    assert_all(xent_forward_case::<bf16, _>(&k, 300, 64, 4, 3, Some(30.0), 2000.0));
    // Small logits: the zero-filled columns past V would visibly raise the lse
    // if the partial last tile were not masked.
    assert_all(xent_forward_case::<bf16, _>(&k, 517, 40, 16, 9, None, 0.01));
    use common::parity::{xent_backward_case, XentCase};
    let chunked = CpuKernels::new(KernelOptions { wgmma: true, xent_chunk_bytes: 1, ..KernelOptions::default() });
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(&chunked, base));
    assert_all(xent_backward_case::<f16, _>(&k, XentCase { v: 264, d: 136, r: 8, t: 70, softcap: None, ..base }));
}

/// f16 backward at a flat softmax (see `xent_backward_f16_keeps_tiny_gradients`
/// in tests/kernels_cpu.rs) on the mma.sync and wgmma logit kernels.
#[test]
fn xent_backward_f16_keeps_tiny_gradients_on_mma_and_wgmma() {
    use common::parity::{xent_backward_case, XentCase};
    let flat =
        XentCase { v: 700, d: 32, r: 4, t: 300, softcap: None, sum: false, with_w: true, logit_scale: 0.05, tol: None };
    for k in [kernels(KernelOptions { mma: true, ..defaults() }), kernels(KernelOptions { wgmma: true, ..defaults() })]
    {
        assert_all(xent_backward_case::<f16, _>(&k, flat));
    }
}

/// The extra memory of the fused cross-entropy equals its formula on every
/// experimental path (mma, wgmma with and without whole atoms, cuBLAS, the
/// gradient filter with cuBLAS and with wgmma), and the formulas scale as on
/// the default path.
#[test]
fn experimental_xent_extra_memory_matches_its_formula() {
    use common::kernel_cases::{assert_xent_memory_formula_scales, assert_xent_memory_matches_formula};
    let (v, d, r, t) = (300, 24, 8, 140);
    let exact = LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let filtered = LoraConfig::builder(v, d, r).alpha(16.0).xent_grad_filter(1e-3).build().unwrap();
    let base = KernelOptions { xent_chunk_bytes: 1, ..defaults() };
    let k = |o: KernelOptions| kernels(o);
    let cases = [
        ("mma", DType::BF16, k(KernelOptions { mma: true, ..base }), &exact),
        ("wgmma", DType::BF16, k(KernelOptions { wgmma: true, ..base }), &exact),
        ("wgmma, whole atoms", DType::BF16, k(KernelOptions { wgmma: true, wgmma_whole_atoms: true, ..base }), &exact),
        ("cublas", DType::F32, k(KernelOptions { cublas: true, ..base }), &exact),
        ("cublas", DType::BF16, k(KernelOptions { cublas: true, ..base }), &exact),
        ("cublas, one block", DType::BF16, k(KernelOptions { cublas: true, ..defaults() }), &exact),
        ("filter + cublas", DType::F16, k(KernelOptions { cublas: true, ..base }), &filtered),
        ("filter + wgmma", DType::BF16, k(KernelOptions { wgmma: true, ..base }), &filtered),
    ];
    assert_xent_memory_matches_formula(&cases, t);
    assert_xent_memory_formula_scales(&KernelOptions { cublas: true, ..defaults() });
}

/// Every op on misaligned buffers, bit for bit equal to aligned ones, on
/// every experimental kernel family.
#[test]
fn experimental_ops_take_buffers_one_element_past_alignment() {
    for o in [
        KernelOptions { mma: true, wide_tiles: true, ..defaults() },
        KernelOptions { wgmma: true, ..defaults() },
        KernelOptions { cublas: true, ..defaults() },
        KernelOptions { grad_h_two_blocks: true, ..defaults() },
    ] {
        assert_placed_buffers_bitwise_equal(&kernels(o));
    }
}
