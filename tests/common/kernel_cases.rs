//! Cases the kernel test files share: the peak scratch of the fused
//! cross-entropy, and every op on misaligned buffers.

use super::golden::rel_err;
use super::harness::{widen, Harness, HostGrads, HostWeights};
use super::rand_inputs::{fresh_rng, normal};
use tiedlora::kernels::CpuKernels;
use tiedlora::{bf16, f16, Backend, CpuReference, DType, LoraConfig};

/// Peak scratch of one fused cross-entropy forward and one backward on the
/// shim (the most bytes live at once, as `Cuda::scratch_peak_bytes` on a GPU).
pub fn xent_peaks<T: tiedlora::Element>(k: &CpuKernels, cfg: &LoraConfig, t: usize, seed: &str) -> (usize, usize) {
    use tiedlora::kernels::host::{reset_thread_scratch_peak, thread_scratch_peak};
    let mut rng = fresh_rng(seed);
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let w: Vec<T> = normal(&mut rng, v * d, 0.5);
    let u: Vec<f32> = normal(&mut rng, v * r, 0.1);
    let vh: Vec<f32> = normal(&mut rng, r * d, 0.5);
    let h: Vec<T> = normal(&mut rng, t * d, 1.0);
    let targets = super::rand_inputs::ids(&mut rng, t, v);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    reset_thread_scratch_peak();
    let (_, lse) = Harness::xent_forward(k, cfg, wt, &h, &targets).unwrap();
    let fwd = reset_thread_scratch_peak();
    let mut g = HostGrads::zeros(cfg, false);
    Harness::xent_backward(k, cfg, wt, &h, &targets, &lse, 1.0, &mut g).unwrap();
    (fwd, thread_scratch_peak())
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

/// `ops_on_placed_buffers` on aligned and on misaligned buffers, bit for bit equal.
pub fn assert_placed_buffers_bitwise_equal(k: &CpuKernels) {
    let seed = rand::Rng::random::<u64>(&mut fresh_rng(&format!("placed buffers, {}", Backend::name(k))));
    let (aligned, misaligned) = (ops_on_placed_buffers(k, seed, false), ops_on_placed_buffers(k, seed, true));
    for (i, (a, m)) in aligned.iter().zip(&misaligned).enumerate() {
        let diff = a.iter().zip(m).filter(|(x, y)| x != y).count();
        assert_eq!(diff, 0, "{}: output {i}: {diff} of {} values differ when misaligned", Backend::name(k), a.len());
    }
}

/// The peak scratch of one fused cross-entropy forward and backward equals
/// the published formulas on every case, and blocks of 128 x 128 hold less
/// than the logits.
pub fn assert_xent_memory_matches_formula(cases: &[(&str, DType, CpuKernels, &LoraConfig)], t: usize) {
    use tiedlora::kernels::{head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes};
    for (name, dt, k, cfg) in cases {
        let clock = std::time::Instant::now();
        let (fwd, bwd) = match dt {
            DType::F32 => xent_peaks::<f32>(k, cfg, t, name),
            DType::F16 => xent_peaks::<f16>(k, cfg, t, name),
            DType::BF16 => xent_peaks::<bf16>(k, cfg, t, name),
        };
        let opts = k.options();
        // The shim reports 2 multiprocessors.
        let (fwd_formula, bwd_formula) = (
            head_xent_forward_scratch_bytes(cfg, *dt, t, 2, &opts),
            head_xent_backward_scratch_bytes(cfg, *dt, t, 2, &opts),
        );
        println!(
            "{name} {dt:?}: forward {fwd} B (formula {fwd_formula}), backward {bwd} B (formula {bwd_formula}); {:.1} s",
            clock.elapsed().as_secs_f64()
        );
        assert_eq!(fwd, fwd_formula, "{name} {dt:?}: forward peak");
        assert_eq!(bwd, bwd_formula, "{name} {dt:?}: backward peak");
        if opts.xent_chunk_bytes == 1 && Backend::name(k) != "kernels-on-cpu-cublas" {
            assert!(bwd < t * cfg.vocab() * dt.size(), "{name}: 128 x 128 blocks hold less than the logits");
        }
    }
}

/// The formulas at the Gemma-2-2B shape with `opts`: far below the logits,
/// no T·V or V·d term (doubling V adds at most U in the storage dtype) and
/// no T·d term (the backward is O(T) + O(T·r) plus bounded blocks).
pub fn assert_xent_memory_formula_scales(opts: &tiedlora::kernels::KernelOptions) {
    use tiedlora::kernels::{head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes};
    let gemma = LoraConfig::builder(256_000, 2304, 16).build().unwrap();
    let (tg, sms) = (8192, 132);
    let logits = tg * 256_000 * 2;
    let fwd = head_xent_forward_scratch_bytes(&gemma, DType::BF16, tg, sms, opts);
    let bwd = head_xent_backward_scratch_bytes(&gemma, DType::BF16, tg, sms, opts);
    println!("Gemma-2-2B shape, bf16, {opts:?}: forward {fwd} B, backward {bwd} B, logits {logits} B");
    assert!(bwd * 40 < logits && fwd * 50 < logits);
    let gemma2v = LoraConfig::builder(512_000, 2304, 16).build().unwrap();
    let v_r = 256_000 * 16 * 2;
    assert!(head_xent_backward_scratch_bytes(&gemma2v, DType::BF16, tg, sms, opts) <= bwd + v_r);
    assert!(head_xent_forward_scratch_bytes(&gemma2v, DType::BF16, tg, sms, opts) <= fwd + v_r);
    // For any T the backward is O(T) + O(T·r) (targets, p, gu) plus blocks of
    // at most the chunk bytes each (the dh accumulator, G, cuBLAS's f32
    // logits), U packed (V·r), and bounded partials (dVh: at most 4 per
    // multiprocessor; the tile flags and dU splits of one block): no T·d term.
    for tokens in [tg, 8 * tg, 128 * tg] {
        let bwd = head_xent_backward_scratch_bytes(&gemma, DType::BF16, tokens, sms, opts);
        let bound = tokens * (4 + 16 * 2 + 16 * 4)
            + 3 * tiedlora::kernels::XENT_CHUNK_BYTES
            + v_r
            + 4 * sms as usize * 16 * 2304 * 4
            + (8 << 20); // one block's tile flags and dU split partials
        assert!(bwd <= bound, "T = {tokens}: {bwd} B over {bound} B");
    }
}

/// The upstream gradient in f32 for bf16 weights (mixed precision) on `k`.
pub fn head_f32_gradients_for_half_weights(k: &CpuKernels) {
    let mut rng = fresh_rng("f32 grads");
    let cfg = LoraConfig::builder(150, 40, 8).alpha(16.0).build().unwrap();
    let w: Vec<bf16> = normal(&mut rng, 150 * 40, 0.5);
    let u: Vec<f32> = normal(&mut rng, 150 * 8, 0.5);
    let vh: Vec<f32> = normal(&mut rng, 8 * 40, 0.5);
    let h: Vec<bf16> = normal(&mut rng, 3 * 40, 1.0);
    let g: Vec<f32> = normal(&mut rng, 3 * 150, 1.0);
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let mut gr = HostGrads::zeros(&cfg, false);
    let dh_ref = Harness::head_backward(&CpuReference::new(), &cfg, wt, &h, &g, &mut gr).unwrap();
    let mut gk = HostGrads::zeros(&cfg, false);
    let dh = Harness::head_backward(k, &cfg, wt, &h, &g, &mut gk).unwrap();
    let tol = DType::BF16.tolerance();
    assert!(rel_err(&widen(&dh), &widen(&dh_ref)) < tol);
    assert!(rel_err(&widen(&gk.lora_vocab), &widen(&gr.lora_vocab)) < tol);
    assert!(rel_err(&widen(&gk.lora_hidden), &widen(&gr.lora_hidden)) < tol);
}
