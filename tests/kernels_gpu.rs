//! The CUDA backend on a real GPU, against the CPU reference: every golden
//! case, randomized shapes, determinism, bad input. The GPU tests are ignored
//! without a device; run them with `cargo test --features cuda --test
//! kernels_gpu -- --ignored` (scripts/gpu-check.sh does, plus
//! compute-sanitizer on the `gpu_small_*` ones).
#![cfg(feature = "cuda")]

mod common;

use common::golden::all_cases;
use common::harness::run_case;
use common::parity::{assert_all, bad_ids_are_errors, embed_case, head_case};
use tiedlora::cuda::Cuda;
use tiedlora::{bf16, f16, Backend};

fn gpu() -> Cuda {
    Cuda::new(0).expect("this test needs a CUDA device")
}

/// Both head GEMM main loops: register-staged and the cp.async ring.
fn gpus() -> [Cuda; 1] {
    [gpu()]
}

#[test]
fn no_driver_or_device_is_an_error_not_a_panic() {
    match Cuda::new(0) {
        Ok(gpu) => println!("CUDA device present: {gpu:?}"),
        Err(e) => {
            let msg = e.to_string();
            println!("no CUDA backend here: {msg}");
            assert!(msg.contains("driver") || msg.contains("GPU"), "unhelpful error: {msg}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_goldens() {
    let cases = all_cases().expect("golden discovery");
    let mut failures = Vec::new();
    for g in &gpus() {
        for (label, case) in &cases {
            match run_case(g, case, label) {
                Ok(checks) => {
                    for c in &checks {
                        println!("{c}");
                    }
                    if checks.iter().any(|c| !c.passed()) {
                        failures.push(format!("{} {label}/{}", Backend::name(g), case.name()));
                    }
                }
                Err(e) => failures.push(format!("{} {label}/{}: {e}", Backend::name(g), case.name())),
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_random_shapes() {
    for g in &gpus() {
        assert_all(head_case::<f32, _>(g, 131, 37, 3, 5, true));
        assert_all(head_case::<bf16, _>(g, 141, 40, 16, 9, false));
        assert_all(head_case::<f16, _>(g, 133, 24, 5, 3, true));
        assert_all(head_case::<f32, _>(g, 70, 32, 1, 1, true));
        assert_all(head_case::<bf16, _>(g, 70, 32, 4, 1, false));
        assert_all(head_case::<f16, _>(g, 65, 48, 64, 2, false));
    }
}

/// Ranks above 64: G·W and G·U as two GEMMs in both head backward ops
/// (tests/kernels_cpu.rs::head_backward_ops_take_ranks_above_64 on the device).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_backward_ranks_above_64() {
    common::parity::assert_wide_rank_cases(&gpu(), &gpu().with_xent_chunk_bytes(1));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_forward_wide_tiles() {
    let g = gpu().with_wide_tiles(true);
    assert_all(head_case::<bf16, _>(&g, 300, 40, 16, 130, false));
    assert_all(head_case::<f16, _>(&g, 257, 24, 1, 3, false));
}

/// The two-blocks-per-SM grad_h (`Cuda::with_grad_h_two_blocks`, `_2blocks`:
/// rank <= 16, half precision, no gradient filter), G in the storage dtype
/// and (through the fused cross-entropy backward's accumulate mode) per chunk.
#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_grad_h_two_blocks() {
    let g = gpu().with_grad_h_two_blocks(true);
    assert_all(head_case::<bf16, _>(&g, 300, 40, 16, 130, true));
    assert_all(head_case::<f16, _>(&g, 257, 24, 1, 3, false));
    use common::parity::{xent_backward_case, XentCase};
    assert_all(xent_backward_case::<bf16, _>(&g.with_xent_chunk_bytes(1), XentCase::SOFTCAP_SUM));
}

#[cfg(feature = "experimental-kernels")]
/// The ldmatrix + mma.sync kernels (`Cuda::with_mma`): forward (128 x 128 and
/// wide tiles), grad_h at every extra-column width, grad_param for dU and dW
/// (tests/kernels_cpu.rs::head_mma on the device, plus a larger shape).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_mma() {
    for wide in [false, true] {
        let g = gpu().with_mma(true).with_wide_tiles(wide);
        assert_all(head_case::<bf16, _>(&g, 300, 40, 16, 130, false));
        assert_all(head_case::<f16, _>(&g, 257, 24, 1, 3, false));
        assert_all(head_case::<bf16, _>(&g, 70, 48, 64, 1, false));
        assert_all(head_case::<f16, _>(&g, 264, 136, 8, 150, true));
    }
    assert_all(head_case::<bf16, _>(&gpu().with_mma(true), 136, 72, 17, 70, true));
}

#[cfg(feature = "experimental-kernels")]
/// The Hopper warpgroup-MMA head kernels, forward and grad_h
/// (tests/kernels_cpu.rs::head_wgmma on the device: the hardware's swizzle,
/// descriptors and accumulator layout).
/// Needs compute capability 9.0 (`with_wgmma` is an `Err` elsewhere).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_wgmma() {
    for wide in [false, true] {
        let g = gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU").with_wide_tiles(wide);
        assert_all(head_case::<bf16, _>(&g, 300, 200, 16, 130, false));
        assert_all(head_case::<f16, _>(&g, 257, 136, 1, 3, false));
        assert_all(head_case::<bf16, _>(&g, 70, 37, 64, 1, false));
        assert_all(head_case::<f16, _>(&g, 264, 256, 8, 150, false));
    }
    let g = gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU");
    assert_all(head_case::<bf16, _>(&g, 264, 136, 16, 150, true));
    assert_all(head_case::<bf16, _>(&g, 200, 72, 17, 130, false));
    assert_all(head_case::<f16, _>(&g, 300, 40, 33, 20, false));
    assert_all(head_case::<bf16, _>(&g, 150, 37, 64, 9, false));
}

#[cfg(feature = "experimental-kernels")]
/// The wgmma grad_h with 64 extra columns at r = 16 and 17
/// (`with_wgmma_whole_atoms`: W's N-major tile in whole 64-column atoms).
/// A test of its own so that it reports even when the partial-atom n144 /
/// n160 kernels of `gpu_small_head_wgmma` fail: that pair of results says
/// whether the partial atoms are the cause.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_head_wgmma_whole_atoms() {
    let g = gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU").with_wgmma_whole_atoms(true);
    assert_all(head_case::<bf16, _>(&g, 264, 136, 16, 150, true));
    assert_all(head_case::<f16, _>(&g, 200, 72, 17, 130, false));
}

#[cfg(feature = "experimental-kernels")]
/// The cuBLAS paths on cuBLAS (`Cuda::with_cublas`):
/// tests/kernels_cpu.rs::gemm_engine_paths on the device (there a host GEMM
/// stands in for cuBLAS; here the transposes, leading dimensions and data
/// types of the real `cublasGemmEx` calls are checked).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_gemm_engine_paths() {
    let g = gpu().with_cublas(true).expect("cuBLAS must load on the GPU machine");
    let chunked = gpu().with_cublas(true).expect("cuBLAS").with_xent_chunk_bytes(1);
    common::parity::assert_gemm_engine_paths(&g, &chunked);
}

#[cfg(feature = "experimental-kernels")]
/// One optional family at larger shapes (kept out of the `gpu_small_*` set
/// that scripts/gpu-check.sh runs under compute-sanitizer): the head ops in
/// bf16 and f16 on each backend, then the fused cross-entropy on `xent`.
/// One test per family, named so gpu-check.sh's family filters (`wide_tiles`,
/// `_mma`, `wgmma`, `gemm_engine`) run each in its family's own process.
fn larger_shapes(heads: &[Cuda], xent: Option<&Cuda>) {
    use common::parity::{xent_backward_case, xent_forward_case, XentCase};
    for g in heads {
        assert_all(head_case::<bf16, _>(g, 3001, 264, 16, 300, false));
        assert_all(head_case::<f16, _>(g, 1000, 200, 33, 257, true));
    }
    if let Some(g) = xent {
        assert_all(xent_forward_case::<bf16, _>(g, 5000, 264, 16, 700, Some(30.0), 1.0));
        let base = XentCase { v: 5000, d: 264, t: 700, with_w: false, ..XentCase::SOFTCAP_SUM };
        assert_all(xent_backward_case::<bf16, _>(g, base));
    }
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_larger_shapes_wide_tiles() {
    larger_shapes(&[gpu().with_wide_tiles(true)], None);
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_larger_shapes_mma() {
    let g = gpu().with_mma(true);
    larger_shapes(&[gpu().with_mma(true), gpu().with_mma(true).with_wide_tiles(true)], Some(&g));
}

#[cfg(feature = "experimental-kernels")]
/// Needs compute capability 9.0 (`with_wgmma` is an `Err` elsewhere).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_larger_shapes_wgmma() {
    let wgmma = |wide: bool| gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU").with_wide_tiles(wide);
    larger_shapes(&[wgmma(false), wgmma(true)], Some(&wgmma(false)));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_larger_shapes_gemm_engine() {
    let g = gpu().with_cublas(true).expect("cuBLAS must load on the GPU machine");
    larger_shapes(std::slice::from_ref(&g), Some(&g));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_head_larger_shapes() {
    for g in &gpus() {
        assert_all(head_case::<bf16, _>(g, 3001, 264, 16, 300, false));
        assert_all(head_case::<f16, _>(g, 1000, 200, 33, 257, true));
        assert_all(head_case::<f32, _>(g, 777, 130, 8, 129, true));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_embed_random_and_duplicates() {
    let g = gpu();
    assert_all(embed_case::<f32, _>(&g, 37, 29, 1, 5, 0));
    assert_all(embed_case::<bf16, _>(&g, 301, 72, 16, 40, 0));
    assert_all(embed_case::<f16, _>(&g, 50, 48, 64, 1, 0));
    assert_all(embed_case::<bf16, _>(&g, 97, 40, 5, 300, 250));
    assert_all(embed_case::<f32, _>(&g, 64, 24, 100, 9, 3));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_embed_heavy_duplicates_large() {
    let g = gpu();
    assert_all(embed_case::<bf16, _>(&g, 32000, 2304, 16, 8192, 6000));
    assert_all(embed_case::<f16, _>(&g, 5000, 2050, 33, 20000, 0));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_bad_ids_are_errors() {
    bad_ids_are_errors(&gpu());
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_xent_forward() {
    let g = gpu();
    assert_all(common::parity::xent_forward_case::<f32, _>(&g, 301, 37, 3, 5, None, 1.0));
    assert_all(common::parity::xent_forward_case::<bf16, _>(&g, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(common::parity::xent_forward_case::<f16, _>(&g, 300, 24, 1, 1, None, 1.0));
    assert_all(common::parity::xent_forward_case::<f32, _>(&g, 260, 16, 4, 3, Some(30.0), 2000.0));
    assert_all(common::parity::xent_forward_case::<bf16, _>(&g, 5000, 264, 16, 700, Some(30.0), 1.0));
}

/// Deferred id errors on the device: the embedding ops return Ok, bad rows
/// are NaN, `take_id_error` reports the first bad id once, and the default
/// backend still fails at the call.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_deferred_id_errors() {
    use tiedlora::Weights;
    let (v, d, r, t) = (50usize, 24usize, 4usize, 40usize);
    let cfg = tiedlora::LoraConfig::builder(v, d, r).alpha(8.0).build().unwrap();
    let g = gpu().with_deferred_id_errors(true).expect("record allocation");
    let s = g.stream().clone();
    let w = s.clone_htod(&vec![0.25f32; v * d]).unwrap();
    let u = s.clone_htod(&vec![0.5f32; v * r]).unwrap();
    let vh = s.clone_htod(&vec![0.125f32; r * d]).unwrap();
    let mut ids: Vec<u32> = (0..t as u32).map(|i| i % v as u32).collect();
    ids[7] = v as u32 + 3;
    ids[20] = u32::MAX;
    let ids_d = s.clone_htod(&ids).unwrap();
    let mut out = s.alloc_zeros::<f32>(t * d).unwrap();
    let wt = Weights::<Cuda, f32> { w: w.as_view(), lora_vocab: u.as_view(), lora_hidden: vh.as_view() };
    g.embed_forward(&cfg, &wt, ids_d.as_view(), out.as_view_mut()).expect("deferred: Ok at the call");
    let err = g.take_id_error().unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 7, value: v as i64 + 3, vocab: v });
    g.take_id_error().expect("the record was cleared");
    let host = s.clone_dtoh(&out).unwrap();
    assert!(host[7 * d..8 * d].iter().all(|x| x.is_nan()) && host[..d].iter().all(|x| x.is_finite()));
    let checked = gpu();
    let err = checked.embed_forward(&cfg, &wt, ids_d.as_view(), out.as_view_mut()).unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 7, value: v as i64 + 3, vocab: v });
}

/// The deferred forward records its bad ids in its one launch: the last
/// block to finish folds them in. Many blocks run at once here (bf16, d =
/// 2048: 8 column blocks; 50000 tokens), the smallest bad index of the FIRST
/// call is reported (the second call's bad index is smaller), and the record
/// is clean for the call after. (Not a `gpu_small_` test: the sanitizer
/// steps run those, and this one writes 200 MB four times.)
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_deferred_id_errors_many_blocks() {
    use tiedlora::Weights;
    let g = gpu().with_deferred_id_errors(true).expect("record allocation");
    let s = g.stream().clone();
    let (v, d, t) = (1000usize, 2048usize, 50_000usize);
    let cfg = tiedlora::LoraConfig::builder(v, d, 16).build().unwrap();
    let w = s.clone_htod(&vec![bf16::from_f32(0.25); v * d]).unwrap();
    let u = s.clone_htod(&vec![0.5f32; v * 16]).unwrap();
    let vh = s.clone_htod(&vec![0.125f32; 16 * d]).unwrap();
    let wt = Weights::<Cuda, bf16> { w: w.as_view(), lora_vocab: u.as_view(), lora_hidden: vh.as_view() };
    let good: Vec<i64> = (0..t as i64).map(|i| i * 7919 % v as i64).collect();
    let mut first = good.clone();
    (first[40_000], first[31_337], first[45_000]) = (v as i64, -5, i64::MAX);
    let mut second = good.clone();
    second[5] = v as i64 + 1;
    let mut out = s.alloc_zeros::<bf16>(t * d).unwrap();
    for ids in [&first, &second] {
        let ids_d = s.clone_htod(ids).unwrap();
        g.embed_forward(&cfg, &wt, ids_d.as_view(), out.as_view_mut()).expect("deferred: Ok at the call");
    }
    let err = g.take_id_error().unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 31_337, value: -5, vocab: v });
    let ids_d = s.clone_htod(&good).unwrap();
    g.embed_forward(&cfg, &wt, ids_d.as_view(), out.as_view_mut()).unwrap();
    g.take_id_error().expect("no bad id since the last take");
    let ids_d = s.clone_htod(&first).unwrap();
    g.embed_forward(&cfg, &wt, ids_d.as_view(), out.as_view_mut()).unwrap();
    let host = s.clone_dtoh(&out).unwrap();
    for (tt, row) in host.chunks(d).enumerate() {
        let bad = [31_337, 40_000, 45_000].contains(&tt);
        assert!(row.iter().all(|x| x.to_f32().is_nan() == bad), "row {tt}");
    }
    let err = g.take_id_error().unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 31_337, value: -5, vocab: v });
}

#[cfg(feature = "experimental-kernels")]
/// The fused cross-entropy on the `_mma` kernels (logit partials, per-chunk
/// G, and the backward's grad_h / grad_param).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_xent_mma() {
    use common::parity::{xent_backward_case, xent_forward_case, XentCase};
    let g = gpu().with_mma(true);
    assert_all(xent_forward_case::<bf16, _>(&g, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&g, 264, 136, 1, 150, None, 1.0));
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(&gpu().with_mma(true).with_xent_chunk_bytes(1), base));
    assert_all(xent_backward_case::<f16, _>(&g, XentCase { v: 264, d: 136, r: 8, t: 70, softcap: None, ..base }));
}

#[cfg(feature = "experimental-kernels")]
/// tests/kernels_cpu.rs::xent_wgmma_forward_and_backward on the device (compute capability 9.0).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_xent_wgmma() {
    use common::parity::xent_forward_case;
    let g = gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU");
    assert_all(xent_forward_case::<bf16, _>(&g, 517, 40, 16, 9, Some(30.0), 1.0));
    assert_all(xent_forward_case::<f16, _>(&g, 264, 136, 1, 150, None, 1.0));
    assert_all(xent_forward_case::<bf16, _>(&g, 300, 64, 4, 3, Some(30.0), 2000.0));
    assert_all(xent_forward_case::<bf16, _>(&g, 517, 40, 16, 9, None, 0.01));
    use common::parity::{xent_backward_case, XentCase};
    let chunked = gpu().with_wgmma(true).expect("wgmma needs an sm_90 GPU").with_xent_chunk_bytes(1);
    let base = XentCase::SOFTCAP_SUM;
    assert_all(xent_backward_case::<bf16, _>(&chunked, base));
    assert_all(xent_backward_case::<f16, _>(&g, XentCase { v: 264, d: 136, r: 8, t: 70, softcap: None, ..base }));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_u32_ids_match_i64_and_are_checked() {
    use common::harness::{Harness, HostWeights};
    use common::rand_inputs::{fresh_rng, ids, normal};
    let g = gpu();
    let mut rng = fresh_rng("gpu u32 ids");
    let (v, d, r, t) = (211, 40, 8, 33);
    let cfg = tiedlora::LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.5);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let ids64 = ids(&mut rng, t, v);
    let ids32: Vec<u32> = ids64.iter().map(|&i| i as u32).collect();
    let e64 = Harness::embed_forward(&g, &cfg, wt, &ids64).unwrap();
    let e32 = common::gpu_harness::embed_forward_u32(&g, &cfg, wt, &ids32).unwrap();
    assert_eq!(e32, e64);
    let mut bad = ids32.clone();
    bad[5] = u32::MAX;
    let err = common::gpu_harness::embed_forward_u32(&g, &cfg, wt, &bad).unwrap_err();
    assert_eq!(err, tiedlora::Error::TokenOutOfRange { arg: "ids", index: 5, value: u32::MAX as i64, vocab: v });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_xent_backward() {
    use common::parity::{xent_backward_case, XentCase};
    let base =
        XentCase { v: 600, d: 40, r: 3, t: 130, softcap: None, sum: false, with_w: true, logit_scale: 1.0, tol: None };
    let bf = XentCase { v: 300, d: 24, r: 16, t: 150, softcap: Some(30.0), sum: true, ..base };
    for g in gpus() {
        let chunked = g.with_xent_chunk_bytes(1);
        assert_all(xent_backward_case::<f32, _>(&chunked, base));
        assert_all(xent_backward_case::<bf16, _>(&chunked, bf));
        assert_all(xent_backward_case::<f16, _>(
            &chunked,
            XentCase { v: 300, d: 24, r: 1, t: 1, with_w: false, ..base },
        ));
    }
    let g = gpu();
    assert_all(xent_backward_case::<bf16, _>(&g, bf));
    assert_all(xent_backward_case::<f32, _>(&g, XentCase { v: 200, d: 33, r: 64, t: 9, softcap: Some(5.0), ..base }));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_xent_backward_larger_shapes() {
    use common::parity::{xent_backward_case, XentCase};
    let g = gpu();
    let base = XentCase {
        v: 5000,
        d: 264,
        r: 16,
        t: 700,
        softcap: Some(30.0),
        sum: false,
        with_w: false,
        logit_scale: 1.0,
        tol: None,
    };
    assert_all(xent_backward_case::<bf16, _>(&g, base));
    assert_all(xent_backward_case::<f16, _>(
        &gpu().with_xent_chunk_bytes(700 * 2 * 1024),
        XentCase { with_w: true, ..base },
    ));
    assert_all(xent_backward_case::<f32, _>(&g, XentCase { v: 3001, d: 130, r: 8, t: 257, softcap: None, ..base }));
    // Extreme logits, large V (tolerances as in tests/kernels_cpu.rs::xent_backward_extreme_logits).
    let extreme = XentCase { v: 5000, d: 16, r: 4, t: 3, with_w: true, logit_scale: 2000.0, tol: Some(5e-3), ..base };
    assert_all(xent_backward_case::<f32, _>(&g, extreme));
    assert_all(xent_backward_case::<f32, _>(&g, XentCase { softcap: None, ..extreme }));
    assert_all(xent_backward_case::<bf16, _>(&g, XentCase { tol: Some(f64::INFINITY), ..extreme }));
}

/// The memory bound at the Gemma-2-2B shape (T = 8192, V = 256000,
/// d = 2304, r = 16, bf16) on backend `g`: the peak scratch of the fused
/// forward and backward is exactly what the published formulas say, and at
/// least 10x below the logits alone (T·V·2 bytes = 3.9 GiB).
fn xent_memory_gemma_shape(g: &Cuda) {
    use tiedlora::kernels::{head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes};
    let mut rng = common::rand_inputs::fresh_rng("gpu xent memory");
    let (v, d, r, t) = (256_000, 2304, 16, 8192);
    let cfg = tiedlora::LoraConfig::builder(v, d, r).alpha(32.0).logit_softcap(30.0).build().unwrap();
    let (fwd, bwd, loss, dh) = common::gpu_harness::xent_scratch_at::<bf16>(g, &cfg, t, &mut rng).unwrap();
    let (sms, opts) = (g.multiprocessors(), g.kernel_options());
    assert_eq!(fwd, head_xent_forward_scratch_bytes(&cfg, tiedlora::DType::BF16, t, sms, &opts));
    assert_eq!(bwd, head_xent_backward_scratch_bytes(&cfg, tiedlora::DType::BF16, t, sms, &opts));
    let logits = t * v * 2;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "{g:?}: extra memory: forward {:.1} MiB, backward {:.1} MiB; logits alone {:.1} MiB; loss {loss}",
        mib(fwd),
        mib(bwd),
        mib(logits)
    );
    assert!(fwd.max(bwd) * 10 <= logits, "extra memory above a tenth of the logits");
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(dh.iter().all(|x| x.to_f32().is_finite()), "dh has non-finite values");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_xent_memory_gemma_shape() {
    xent_memory_gemma_shape(&gpu());
}

#[cfg(feature = "experimental-kernels")]
/// The same bound on the cuBLAS path (own test: it runs in gpu-check.sh's
/// `kg_engine` process).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_xent_memory_gemma_shape_gemm_engine() {
    xent_memory_gemma_shape(&gpu().with_cublas(true).expect("cuBLAS"));
}

/// A bf16 head case large enough that its ops are still running when the
/// host gets back (V = 32768, d = 1024, r = 16, T = 2048: 2·T·V·(d + r) =
/// 140 GFLOP per head GEMM): its config and device inputs on stream `s`.
struct MsCase {
    cfg: tiedlora::LoraConfig,
    w: cudarc::driver::CudaSlice<bf16>,
    u: cudarc::driver::CudaSlice<f32>,
    vh: cudarc::driver::CudaSlice<f32>,
    h: cudarc::driver::CudaSlice<bf16>,
    rng: rand::rngs::StdRng,
}

impl MsCase {
    const SHAPE: (usize, usize, usize, usize) = (32_768, 1024, 16, 2048);

    fn new(s: &std::sync::Arc<cudarc::driver::CudaStream>, test: &str) -> Self {
        use common::rand_inputs::{fresh_rng, normal};
        let mut rng = fresh_rng(test);
        let (v, d, r, t) = Self::SHAPE;
        let cfg = tiedlora::LoraConfig::builder(v, d, r).alpha(32.0).build().unwrap();
        let w = s.clone_htod(&normal::<bf16>(&mut rng, v * d, 0.05)).unwrap();
        let u = s.clone_htod(&normal::<f32>(&mut rng, v * r, 0.05)).unwrap();
        let vh = s.clone_htod(&normal::<f32>(&mut rng, r * d, 0.1)).unwrap();
        let h = s.clone_htod(&normal::<bf16>(&mut rng, t * d, 1.0)).unwrap();
        MsCase { cfg, w, u, vh, h, rng }
    }

    fn weights(&self) -> tiedlora::Weights<'_, Cuda, bf16> {
        tiedlora::Weights { w: self.w.as_view(), lora_vocab: self.u.as_view(), lora_hidden: self.vh.as_view() }
    }
}

/// A buffer of another CUDA context (here a second, non-primary context on
/// the same GPU; another GPU is the same case) is refused with a typed error
/// naming the argument, before any launch: cudarc would give out its address,
/// and our kernels would fault on it. The output stays as it was.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_buffers_of_another_context_are_refused() {
    use tiedlora::Weights;
    let (v, d, r, t) = (64usize, 32usize, 4usize, 8usize);
    let cfg = tiedlora::LoraConfig::builder(v, d, r).build().unwrap();
    let g = gpu();
    let s = g.stream().clone();
    let other = cudarc::driver::CudaContext::new_non_primary(0, 0).expect("a second context on device 0");
    let so = other.default_stream();
    let w = s.clone_htod(&vec![0.5f32; v * d]).unwrap();
    let u = s.clone_htod(&vec![0.25f32; v * r]).unwrap();
    let vh = s.clone_htod(&vec![0.125f32; r * d]).unwrap();
    let wt = Weights::<Cuda, f32> { w: w.as_view(), lora_vocab: u.as_view(), lora_hidden: vh.as_view() };
    let h_other = so.clone_htod(&vec![1.0f32; t * d]).unwrap();
    let mut logits = s.clone_htod(&vec![7.0f32; t * v]).unwrap();
    let err = g.head_forward(&cfg, &wt, h_other.as_view(), logits.as_view_mut()).unwrap_err();
    assert!(matches!(err, tiedlora::Error::WrongDevice { arg: "h", .. }), "{err}");
    assert!(err.to_string().contains("context"), "{err}");
    let ids_other = so.clone_htod(&vec![1u32; t]).unwrap();
    let mut out = s.clone_htod(&vec![7.0f32; t * d]).unwrap();
    let err = g.embed_forward(&cfg, &wt, ids_other.as_view(), out.as_view_mut()).unwrap_err();
    assert!(matches!(err, tiedlora::Error::WrongDevice { arg: "ids", .. }), "{err}");
    g.synchronize().expect("the backend's context is still usable");
    assert!(s.clone_dtoh(&logits).unwrap().iter().chain(&s.clone_dtoh(&out).unwrap()).all(|&x| x == 7.0));
    // The same op with buffers of the backend's own context runs.
    let h = s.clone_htod(&vec![1.0f32; t * d]).unwrap();
    g.head_forward(&cfg, &wt, h.as_view(), logits.as_view_mut()).unwrap();
}

/// A trainer's second stream sees the op's writes: cudarc makes another
/// stream of the same context wait for a buffer's last recorded use, so the
/// backend must record its uses after its launches are enqueued, not when it
/// takes the addresses. Stream B copies dU right after `head_backward` was
/// enqueued on stream A (140 GFLOP of GEMMs); recorded too early, B
/// would copy dU before the kernels wrote it.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_other_stream_waits_for_the_ops_writes() {
    let ctx = cudarc::driver::CudaContext::new(0).expect("this test needs a CUDA device");
    let (sa, sb) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
    let g = Cuda::with_stream(sa.clone()).unwrap();
    let mut c = MsCase::new(&sa, "gpu other stream");
    let (v, d, r, t) = MsCase::SHAPE;
    let dlogits = sa.clone_htod(&common::rand_inputs::normal::<bf16>(&mut c.rng, t * v, 1e-3)).unwrap();
    let mut dh = sa.alloc_zeros::<bf16>(t * d).unwrap();
    let (mut du, mut dvh) = (sa.alloc_zeros::<f32>(v * r).unwrap(), sa.alloc_zeros::<f32>(r * d).unwrap());
    sa.synchronize().unwrap();
    let mut grads = tiedlora::Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
    g.head_backward(&c.cfg, &c.weights(), c.h.as_view(), dlogits.as_view(), dh.as_view_mut(), &mut grads).unwrap();
    let seen_by_b = sb.clone_dtoh(&du).unwrap();
    sa.synchronize().unwrap();
    let after = sa.clone_dtoh(&du).unwrap();
    assert!(after.iter().any(|&x| x != 0.0), "the backward wrote dU");
    let same = seen_by_b.iter().zip(&after).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "stream B read dU before stream A's kernels had written it");
}

/// NaN (0xFFFF in bf16) in every element of `buf`, so an element a kernel
/// never writes shows.
fn poison_bf16(s: &std::sync::Arc<cudarc::driver::CudaStream>, buf: &mut cudarc::driver::CudaSlice<bf16>) {
    use cudarc::driver::DevicePtrMut;
    let bytes = buf.len() * 2;
    let (ptr, _guard) = buf.device_ptr_mut(s);
    // SAFETY: `ptr` is the start of `buf`, `bytes` long, alive for the call;
    // the memset is ordered on `s` like the kernels that later write it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, s.cu_stream()) }.unwrap();
}

/// head_forward and head_backward where the [T, V] logits and G pass 2^31
/// elements (T = 8448, V = 256000: 16k-token batches at Gemma's vocabulary
/// go further), so a 32-bit index anywhere in their kernels would wrap. The
/// host recomputes, in f64, the token rows on both sides of element 2^31 and
/// the last, and dU rows (each a sum over every token row of G); every
/// logit must be written (poisoned with NaN first). G is the forward's own
/// logits.
fn indexing_past_2_31_elements(g: &Cuda) {
    use common::harness::HostWeights;
    use common::rand_inputs::{fresh_rng, normal};
    use common::sampled::{dh_rows_err, du_rows_err, logits_rows_err};
    use tiedlora::{DType, Grads, LoraConfig, Weights};
    let mut rng = fresh_rng("gpu indexing past 2^31");
    let (v, d, r, t) = (256_000, 64, 8, 8448);
    let cross = (1usize << 31) / v; // the token row holding element 2^31
    assert!(t * v > 1 << 31 && cross + 1 < t);
    let cfg = LoraConfig::builder(v, d, r).alpha(16.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, v * d, 0.1);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.1);
    let h: Vec<bf16> = normal(&mut rng, t * d, 1.0);
    let s = g.stream().clone();
    let (w_d, u_d, vh_d, h_d) =
        (s.clone_htod(&w).unwrap(), s.clone_htod(&u).unwrap(), s.clone_htod(&vh).unwrap(), s.clone_htod(&h).unwrap());
    let weights = Weights { w: w_d.as_view(), lora_vocab: u_d.as_view(), lora_hidden: vh_d.as_view() };
    // SAFETY: bf16 accepts any bits; every byte is poisoned before use.
    let mut logits = unsafe { s.alloc::<bf16>(t * v) }.unwrap();
    poison_bf16(&s, &mut logits);
    g.head_forward(&cfg, &weights, h_d.as_view(), logits.as_view_mut()).unwrap();
    let z = s.clone_dtoh(&logits).unwrap();
    let unwritten = z.iter().position(|x| !x.is_finite());
    assert!(unwritten.is_none(), "{g:?}: logit {unwritten:?} not written (or not finite)");
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let rows = [0, cross - 1, cross, cross + 1, t - 1];
    let tol = DType::BF16.tolerance();
    let e_z = logits_rows_err(&cfg, wt, &h, &z, &rows);
    // SAFETY: as above.
    let mut dh = unsafe { s.alloc::<bf16>(t * d) }.unwrap();
    poison_bf16(&s, &mut dh);
    let (mut du, mut dvh) = (s.alloc_zeros::<f32>(v * r).unwrap(), s.alloc_zeros::<f32>(r * d).unwrap());
    let mut grads = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
    g.head_backward(&cfg, &weights, h_d.as_view(), logits.as_view(), dh.as_view_mut(), &mut grads).unwrap();
    let (dh_h, du_h) = (s.clone_dtoh(&dh).unwrap(), s.clone_dtoh(&du).unwrap());
    let vocab_rows = [0, 1, v / 2, v - 2, v - 1];
    let e_dh = dh_rows_err(&cfg, wt, &z, &dh_h, &rows);
    let e_du = du_rows_err(&cfg, wt, &h, &z, &du_h, &vocab_rows);
    println!("{g:?}: T·V = {} elements; rel err logits {e_z:.2e}, dh {e_dh:.2e}, dU {e_du:.2e} (tol {tol:.0e})", t * v);
    assert!(e_z < tol && e_dh < tol && e_du < tol, "past 2^31: logits {e_z:.2e}, dh {e_dh:.2e}, dU {e_du:.2e}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_indexing_past_2_31_elements() {
    indexing_past_2_31_elements(&gpu());
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_indexing_past_2_31_elements_mma() {
    indexing_past_2_31_elements(&gpu().with_mma(true));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_indexing_past_2_31_elements_wgmma() {
    indexing_past_2_31_elements(&gpu().with_wgmma(true).expect("wgmma needs compute capability 9.0"));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_indexing_past_2_31_elements_gemm_engine() {
    indexing_past_2_31_elements(&gpu().with_cublas(true).expect("cuBLAS"));
}

/// Dropping the backend right after an op, its launches still queued: the
/// backend unloads its kernel modules when dropped, which must not break
/// those launches (it waits for its stream first). The stream, the caller's,
/// lives on; the op's output is complete and equals a second run's, bit for
/// bit.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_backend_dropped_after_an_op_lets_it_finish() {
    let ctx = cudarc::driver::CudaContext::new(0).expect("this test needs a CUDA device");
    let s = ctx.new_stream().unwrap();
    let c = MsCase::new(&s, "gpu backend dropped");
    let (v, _, _, t) = MsCase::SHAPE;
    let run = || {
        let mut logits = s.alloc_zeros::<bf16>(t * v).unwrap();
        let g = Cuda::with_stream(s.clone()).unwrap();
        g.head_forward(&c.cfg, &c.weights(), c.h.as_view(), logits.as_view_mut()).unwrap();
        drop(g);
        s.clone_dtoh(&logits).unwrap()
    };
    let (first, second) = (run(), run());
    assert!(first.iter().all(|x| x.is_finite()) && first.iter().any(|x| x.to_f32() != 0.0));
    assert!(first.iter().zip(&second).all(|(a, b)| a.to_bits() == b.to_bits()), "two runs differ");
}

/// `data` at element `off` of a fresh device allocation (256-byte aligned:
/// `off` = 1 puts it one element past 16-byte alignment).
fn placed<T: cudarc::driver::DeviceRepr + Copy + Default>(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    data: &[T],
    off: usize,
) -> cudarc::driver::CudaSlice<T> {
    let mut host = vec![T::default(); off + data.len()];
    host[off..].copy_from_slice(data);
    s.clone_htod(&host).unwrap()
}

/// Every op's outputs with its floating-point buffers at element `off`
/// of their allocations (as `ops_on_placed_buffers` in tests/kernels_cpu.rs).
fn gpu_ops_on_placed_buffers(g: &Cuda, seed: u64, off: usize) -> Vec<Vec<f64>> {
    use common::rand_inputs::normal;
    use tiedlora::{Grads, LoraConfig, Weights};
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let (v, d, r, t) = (264, 64, 8, 70);
    let cfg = LoraConfig::builder(v, d, r).alpha(16.0).embed_scale(1.5).logit_softcap(30.0).build().unwrap();
    let s = g.stream().clone();
    let w = placed(&s, &normal::<bf16>(&mut rng, v * d, 0.5), off);
    let (u, vh) =
        (placed(&s, &normal::<f32>(&mut rng, v * r, 0.5), off), placed(&s, &normal::<f32>(&mut rng, r * d, 0.5), off));
    let h = placed(&s, &normal::<bf16>(&mut rng, t * d, 1.0), off);
    let gl = placed(&s, &normal::<bf16>(&mut rng, t * v, 1.0), off);
    let ids = s.clone_htod(&(0..t).map(|i| ((i * 37 + 5) % v) as u32).collect::<Vec<u32>>()).unwrap();
    let targets = s.clone_htod(&(0..t).map(|i| ((i * 53 + 1) % v) as i64).collect::<Vec<i64>>()).unwrap();
    let weights = Weights { w: w.slice(off..), lora_vocab: u.slice(off..), lora_hidden: vh.slice(off..) };
    let down_bf16 = |x: &cudarc::driver::CudaSlice<bf16>| {
        s.clone_dtoh(&x.slice(off..)).unwrap().iter().map(|y| y.to_f64()).collect::<Vec<f64>>()
    };
    let down_f32 = |x: &cudarc::driver::CudaSlice<f32>| {
        s.clone_dtoh(&x.slice(off..)).unwrap().iter().map(|&y| f64::from(y)).collect::<Vec<f64>>()
    };
    let mut out = Vec::new();
    let mut logits = placed(&s, &vec![bf16::NAN; t * v], off);
    g.head_forward(&cfg, &weights, h.slice(off..), logits.slice_mut(off..)).unwrap();
    out.push(down_bf16(&logits));
    let mut dh = placed(&s, &vec![bf16::NAN; t * d], off);
    let (mut du, mut dvh) = (placed(&s, &vec![0f32; v * r], off), placed(&s, &vec![0f32; r * d], off));
    let mut grads = Grads { lora_vocab: du.slice_mut(off..), lora_hidden: dvh.slice_mut(off..), w: None };
    g.head_backward(&cfg, &weights, h.slice(off..), gl.slice(off..), dh.slice_mut(off..), &mut grads).unwrap();
    let mut e = placed(&s, &vec![bf16::NAN; t * d], off);
    g.embed_forward(&cfg, &weights, ids.as_view(), e.slice_mut(off..)).unwrap();
    let mut grads = Grads { lora_vocab: du.slice_mut(off..), lora_hidden: dvh.slice_mut(off..), w: None };
    g.embed_backward(&cfg, &weights, ids.as_view(), h.slice(off..), &mut grads).unwrap();
    out.extend([down_bf16(&dh), down_bf16(&e), down_f32(&du), down_f32(&dvh)]);
    let (mut loss, mut lse) = (placed(&s, &[f32::NAN], off), placed(&s, &vec![f32::NAN; t], off));
    g.head_xent_forward(&cfg, &weights, h.slice(off..), targets.as_view(), loss.slice_mut(off..), lse.slice_mut(off..))
        .unwrap();
    let mut grads = Grads { lora_vocab: du.slice_mut(off..), lora_hidden: dvh.slice_mut(off..), w: None };
    g.head_xent_backward(
        &cfg,
        &weights,
        h.slice(off..),
        targets.as_view(),
        lse.slice(off..),
        1.0,
        dh.slice_mut(off..),
        &mut grads,
    )
    .unwrap();
    out.extend([down_f32(&loss), down_f32(&lse), down_bf16(&dh), down_f32(&du), down_f32(&dvh)]);
    let mut merged = placed(&s, &s.clone_dtoh(&w.slice(off..)).unwrap(), off);
    g.merge(&cfg, merged.slice_mut(off..), u.slice(off..), vh.slice(off..)).unwrap();
    out.push(down_bf16(&merged));
    out
}

/// Every op with its buffers one element past 16-byte alignment (a trainer's
/// sub-view) on the GPU: no misaligned access (memcheck runs the
/// `gpu_small_*` tests) and the same bits as on aligned buffers; on the GEMM
/// engine, within the bf16 tolerance (cuBLAS may pick another kernel, and
/// with it another summation order, for unaligned operands).
fn misaligned_buffers(g: &Cuda) {
    let seed = rand::Rng::random::<u64>(&mut common::rand_inputs::fresh_rng(&format!("gpu placed, {g:?}")));
    let (aligned, misaligned) = (gpu_ops_on_placed_buffers(g, seed, 0), gpu_ops_on_placed_buffers(g, seed, 1));
    for (i, (a, m)) in aligned.iter().zip(&misaligned).enumerate() {
        if cfg!(feature = "experimental-kernels") && format!("{g:?}").contains("cuda-cublas") {
            let err = common::golden::rel_err(m, a);
            assert!(err < tiedlora::DType::BF16.tolerance(), "{g:?}: output {i}: rel err {err:.2e} when misaligned");
        } else {
            let diff = a.iter().zip(m).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(diff, 0, "{g:?}: output {i}: {diff} of {} values differ when misaligned", a.len());
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers() {
    misaligned_buffers(&gpu());
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers_mma() {
    misaligned_buffers(&gpu().with_mma(true));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers_wide_tiles() {
    misaligned_buffers(&gpu().with_wide_tiles(true));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers_wgmma() {
    misaligned_buffers(&gpu().with_wgmma(true).expect("wgmma needs compute capability 9.0"));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers_gemm_engine() {
    misaligned_buffers(&gpu().with_cublas(true).expect("cuBLAS"));
}

#[cfg(feature = "experimental-kernels")]
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_small_misaligned_buffers_two_blocks() {
    misaligned_buffers(&gpu().with_grad_h_two_blocks(true));
}
