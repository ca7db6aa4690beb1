//! The candle integration's cases, run on candle's CPU device
//! (tests/candle_parity.rs) and CUDA device (tests/candle_gpu.rs): the ops
//! through `tiedlora::candle` against candle's own unfused autograd (index_select,
//! matmul, log_softmax, gather) in f64 on the CPU: the loss and the gradients of
//! U, Vh (LoRA mode) or W (full mode) and of the hidden states, with the
//! embedding and head paths in one graph. Fresh random inputs each run (the
//! seed is printed); relative norm errors within DESIGN.md §3's tolerance of
//! the storage dtype.

use candle_core::{DType, Device, Tensor, Var, D};
use tiedlora::candle::TiedLora;
use tiedlora::rand::rngs::StdRng;
use tiedlora::rand::{Rng, SeedableRng};
use tiedlora::{LoraConfig, LoraConfigBuilder};

type R<T> = candle_core::Result<T>;

fn seed() -> u64 {
    let s: u64 = tiedlora::rand::random();
    eprintln!("seed {s}");
    s
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => tiedlora::DType::F32.tolerance(),
        DType::F16 => tiedlora::DType::F16.tolerance(),
        _ => tiedlora::DType::BF16.tolerance(),
    }
}

/// `t` in f64 on the CPU, where every reference runs.
fn cpu64(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
}

/// Rounds to the storage dtype and back to f64, as the pipeline under test
/// rounds its intermediate tensors (casts pass gradients through).
fn round(x: &Tensor, dt: DType) -> R<Tensor> {
    x.to_dtype(dt)?.to_dtype(DType::F64)
}

/// The unfused tied embedding in f64: c·(W[ids] + s·U[ids]·Vh).
fn ref_embed(cfg: &LoraConfig, w: &Tensor, u: &Tensor, vh: &Tensor, ids: &Tensor) -> R<Tensor> {
    let flat = ids.flatten_all()?;
    let e = (w.index_select(&flat, 0)? + (u.index_select(&flat, 0)?.matmul(vh)? * cfg.scale())?)?;
    let mut dims = ids.dims().to_vec();
    dims.push(cfg.hidden());
    (e * cfg.embed_scale())?.reshape(dims)
}

/// The unfused head in f64: h Wᵀ + s·(h Vhᵀ) Uᵀ on h [N, d].
fn ref_logits(cfg: &LoraConfig, w: &Tensor, u: &Tensor, vh: &Tensor, h: &Tensor) -> R<Tensor> {
    h.matmul(&w.t()?)? + (h.matmul(&vh.t()?)?.matmul(&u.t()?)? * cfg.scale())?
}

/// The unfused cross-entropy in f64 (softcap, ignore_index, mean over valid
/// targets, 0 when none is valid).
fn ref_loss(cfg: &LoraConfig, w: &Tensor, u: &Tensor, vh: &Tensor, h: &Tensor, targets: &[i64]) -> R<Tensor> {
    let h = h.reshape(((), cfg.hidden()))?;
    let mut z = ref_logits(cfg, w, u, vh, &h)?;
    if let Some(k) = cfg.logit_softcap() {
        z = ((z / k)?.tanh()? * k)?;
    }
    let lsm = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let valid: Vec<f64> = targets.iter().map(|&t| if t == cfg.ignore_index() { 0.0 } else { 1.0 }).collect();
    let idx: Vec<u32> = targets.iter().map(|&t| if t == cfg.ignore_index() { 0 } else { t as u32 }).collect();
    let n = targets.len();
    let idx = Tensor::from_vec(idx, (n, 1), &Device::Cpu)?;
    let picked = lsm.gather(&idx, 1)?.squeeze(1)?;
    let mask = Tensor::from_vec(valid.clone(), n, &Device::Cpu)?;
    let count = valid.iter().sum::<f64>().max(1.0);
    (picked * mask)?.sum_all()?.neg()? / count
}

pub struct Case {
    pub v: usize,
    pub d: usize,
    pub r: usize,
    pub b: usize,
    pub t: usize,
    pub dtype: DType,
    pub softcap: Option<f64>,
    /// Which targets are ignored / repeated is set by `targets`.
    pub targets: fn(usize, usize, &mut StdRng) -> i64,
}

pub fn random_target(_: usize, v: usize, rng: &mut StdRng) -> i64 {
    rng.random_range(0..v as i64)
}

fn cfg_of(c: &Case) -> LoraConfig {
    let b: LoraConfigBuilder = LoraConfig::builder(c.v, c.d, c.r).alpha(2.0 * c.r as f64).embed_scale(1.5);
    b.logit_softcap_opt(c.softcap).build().unwrap()
}

/// Embedding → (+ a leaf h0) → fused loss, through TiedLora in LoRA mode, against
/// the f64 unfused graph: loss, dU, dVh, dh0.
pub fn lora_case(dev: &Device, c: &Case) {
    let s = seed();
    let mut rng = StdRng::seed_from_u64(s);
    let cfg = cfg_of(c);
    let (v, d, r, n) = (c.v, c.d, c.r, c.b * c.t);
    let w = Tensor::from_vec(randn(&mut rng, v * d, 0.5), (v, d), dev).unwrap().to_dtype(c.dtype).unwrap();
    let w64 = cpu64(&w);
    let (u0, vh0) = (randn(&mut rng, v * r, 0.3), randn(&mut rng, r * d, 0.3));
    let ids: Vec<u32> = (0..n).map(|i| if i % 3 == 1 { 0 } else { rng.random_range(0..v as u32) }).collect();
    let targets: Vec<i64> = (0..n).map(|i| (c.targets)(i, v, &mut rng)).collect();
    let h0 = Tensor::from_vec(randn(&mut rng, n * d, 0.5), (c.b, c.t, d), dev).unwrap();

    // Under test.
    let tied = TiedLora::with_factors(w, cfg.clone(), u0.clone(), vh0.clone()).unwrap();
    let ids_t = Tensor::from_vec(ids.clone(), (c.b, c.t), dev).unwrap();
    let tg_t = Tensor::from_vec(targets.clone(), (c.b, c.t), dev).unwrap();
    let h0v = Var::from_tensor(&h0.to_dtype(c.dtype).unwrap()).unwrap();
    let e = tied.embed(&ids_t).unwrap();
    assert_eq!(e.dims(), &[c.b, c.t, d]);
    assert_eq!(e.dtype(), c.dtype);
    let h = (&e + h0v.as_tensor()).unwrap();
    let loss = tied.loss(&h, &tg_t).unwrap();
    assert_eq!(loss.dims(), &[] as &[usize]);
    let g = loss.backward().unwrap();
    let (u, vh) = tied.lora_vars().unwrap();

    // f64 unfused, rounding e and h where the pipeline does.
    let cpu = Device::Cpu;
    let u64v = Var::from_tensor(&cpu64(&Tensor::from_vec(u0, (v, r), &cpu).unwrap())).unwrap();
    let vh64v = Var::from_tensor(&cpu64(&Tensor::from_vec(vh0, (r, d), &cpu).unwrap())).unwrap();
    let h064 = Var::from_tensor(&round(&cpu64(&h0), c.dtype).unwrap()).unwrap();
    let ids64 = ids_t.to_device(&cpu).unwrap();
    let e64 = round(&ref_embed(&cfg, &w64, &u64v, &vh64v, &ids64).unwrap(), c.dtype).unwrap();
    let h64 = round(&(e64 + h064.as_tensor()).unwrap(), c.dtype).unwrap();
    let loss64 = ref_loss(&cfg, &w64, &u64v, &vh64v, &h64, &targets).unwrap();
    let g64 = loss64.backward().unwrap();

    let tl = tol(c.dtype);
    let lerr = rel(&loss, &loss64);
    assert!(lerr <= tl, "loss {lerr:.2e} > {tl:.0e} (seed {s})");
    for (name, got, want) in [
        ("dU", g.get(u.as_tensor()), g64.get(u64v.as_tensor())),
        ("dVh", g.get(vh.as_tensor()), g64.get(vh64v.as_tensor())),
        ("dh0", g.get(h0v.as_tensor()), g64.get(h064.as_tensor())),
    ] {
        match (got, want) {
            (Some(got), Some(want)) => {
                let e = rel(got, want);
                assert!(e <= tl, "{name}: {e:.2e} > {tl:.0e} (seed {s})");
            }
            (got, want) => panic!("{name}: gradient present here {} / in candle {}", got.is_some(), want.is_some()),
        }
    }
}

pub fn lora_f32_batched_odd_vocab(dev: &Device) {
    lora_case(dev, &Case { v: 37, d: 24, r: 4, b: 3, t: 5, dtype: DType::F32, softcap: None, targets: random_target });
}

pub fn lora_f32_rank_one_one_token_softcap(dev: &Device) {
    lora_case(
        dev,
        &Case { v: 29, d: 16, r: 1, b: 1, t: 1, dtype: DType::F32, softcap: Some(3.0), targets: random_target },
    );
}

pub fn lora_f32_rank_256(dev: &Device) {
    lora_case(
        dev,
        &Case { v: 41, d: 40, r: 256, b: 2, t: 3, dtype: DType::F32, softcap: None, targets: random_target },
    );
}

pub fn lora_f32_some_targets_ignored(dev: &Device) {
    lora_case(
        dev,
        &Case {
            v: 53,
            d: 20,
            r: 8,
            b: 2,
            t: 7,
            dtype: DType::F32,
            softcap: Some(30.0),
            targets: |i, v, rng| if i % 3 == 0 { -100 } else { random_target(i, v, rng) },
        },
    );
}

pub fn lora_bf16(dev: &Device) {
    lora_case(dev, &Case { v: 61, d: 32, r: 8, b: 2, t: 6, dtype: DType::BF16, softcap: None, targets: random_target });
}

pub fn lora_f16(dev: &Device) {
    lora_case(
        dev,
        &Case { v: 45, d: 32, r: 4, b: 2, t: 4, dtype: DType::F16, softcap: Some(30.0), targets: random_target },
    );
}

pub fn all_targets_ignored_gives_zero_loss_and_embedding_only_gradients(dev: &Device) {
    // With every target ignored, the loss is 0 and the head sends no gradient:
    // the factor gradients are zero too (the loss does not depend on e).
    let cfg = LoraConfig::builder(17, 8, 2).build().unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    let w = Tensor::from_vec(randn(&mut rng, 17 * 8, 0.5), (17, 8), dev).unwrap();
    let tied = TiedLora::with_factors(w, cfg, randn(&mut rng, 34, 0.3), randn(&mut rng, 16, 0.3)).unwrap();
    let e = tied.embed(&Tensor::new(&[[1u32, 2, 3]], dev).unwrap()).unwrap();
    let loss = tied.loss(&e, &Tensor::new(&[[-100i64, -100, -100]], dev).unwrap()).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let g = loss.backward().unwrap();
    let (u, vh) = tied.lora_vars().unwrap();
    for t in [g.get(u.as_tensor()).unwrap(), g.get(vh.as_tensor()).unwrap()] {
        assert!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&x| x == 0.0));
    }
}

/// Full mode: W is the Var; its one gradient sums both paths (logits op and
/// embedding), against the f64 unfused graph.
pub fn full_mode_w_gradient_sums_both_paths_through_logits(dev: &Device) {
    let s = seed();
    let mut rng = StdRng::seed_from_u64(s);
    let (v, d, b, t) = (31, 12, 2, 5);
    let cfg = LoraConfig::builder(v, d, 1).embed_scale(2.0).build().unwrap();
    let w0 = Tensor::from_vec(randn(&mut rng, v * d, 0.5), (v, d), dev).unwrap();
    let wv = Var::from_tensor(&w0).unwrap();
    let tied = TiedLora::full(wv.clone(), cfg.clone()).unwrap();
    assert_eq!(tied.vars().len(), 1);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..v as u32)).collect();
    let ids = Tensor::from_vec(ids, (b, t), dev).unwrap();
    let a = Var::from_tensor(&Tensor::from_vec(randn(&mut rng, d * d, 0.4), (d, d), dev).unwrap()).unwrap();
    let rmat = Tensor::from_vec(randn(&mut rng, b * t * v, 1.0), (b, t, v), dev).unwrap();

    // Under test: e → tanh(e·A) → logits → Σ logits ⊙ R.
    let e = tied.embed(&ids).unwrap();
    let h = e.broadcast_matmul(a.as_tensor()).unwrap().tanh().unwrap();
    let z = tied.logits(&h).unwrap();
    assert_eq!(z.dims(), &[b, t, v]);
    let obj = (z * &rmat).unwrap().sum_all().unwrap();
    let g = obj.backward().unwrap();

    let cpu = Device::Cpu;
    let w64 = Var::from_tensor(&cpu64(&w0)).unwrap();
    let a64 = Var::from_tensor(&cpu64(a.as_tensor())).unwrap();
    let (u64, vh64) =
        (Tensor::zeros((v, 1), DType::F64, &cpu).unwrap(), Tensor::zeros((1, d), DType::F64, &cpu).unwrap());
    let e64 = ref_embed(&cfg, &w64, &u64, &vh64, &ids.to_device(&cpu).unwrap()).unwrap();
    let h64 = e64.broadcast_matmul(a64.as_tensor()).unwrap().tanh().unwrap().reshape((b * t, d)).unwrap();
    let z64 = ref_logits(&cfg, &w64, &u64, &vh64, &h64).unwrap().reshape((b, t, v)).unwrap();
    let obj64 = (z64 * cpu64(&rmat)).unwrap().sum_all().unwrap();
    let g64 = obj64.backward().unwrap();
    let tl = tol(DType::F32);
    let ew = rel(g.get(wv.as_tensor()).unwrap(), g64.get(w64.as_tensor()).unwrap());
    let ea = rel(g.get(a.as_tensor()).unwrap(), g64.get(a64.as_tensor()).unwrap());
    assert!(ew <= tl && ea <= tl, "dW {ew:.2e}, dA {ea:.2e} > {tl:.0e} (seed {s})");
}

pub fn full_mode_fused_loss_matches_unfused(dev: &Device) {
    let s = seed();
    let mut rng = StdRng::seed_from_u64(s);
    let (v, d, n) = (23, 16, 9);
    let cfg = LoraConfig::builder(v, d, 2).logit_softcap(5.0).build().unwrap();
    let w0 = Tensor::from_vec(randn(&mut rng, v * d, 0.5), (v, d), dev).unwrap();
    let wv = Var::from_tensor(&w0).unwrap();
    let tied = TiedLora::full(wv.clone(), cfg.clone()).unwrap();
    let ids: Vec<i64> = (0..n).map(|_| rng.random_range(0..v as i64)).collect();
    let targets: Vec<i64> = ids.iter().rev().copied().collect();
    let ids_t = Tensor::from_vec(ids, n, dev).unwrap();
    let loss = tied.loss(&tied.embed(&ids_t).unwrap(), &Tensor::from_vec(targets.clone(), n, dev).unwrap()).unwrap();
    let g = loss.backward().unwrap();

    let cpu = Device::Cpu;
    let w64 = Var::from_tensor(&cpu64(&w0)).unwrap();
    let (u64, vh64) =
        (Tensor::zeros((v, 2), DType::F64, &cpu).unwrap(), Tensor::zeros((2, d), DType::F64, &cpu).unwrap());
    let e64 = ref_embed(&cfg, &w64, &u64, &vh64, &ids_t.to_device(&cpu).unwrap()).unwrap();
    let loss64 = ref_loss(&cfg, &w64, &u64, &vh64, &e64, &targets).unwrap();
    let g64 = loss64.backward().unwrap();
    let tl = tol(DType::F32);
    let (el, ew) = (rel(&loss, &loss64), rel(g.get(wv.as_tensor()).unwrap(), g64.get(w64.as_tensor()).unwrap()));
    assert!(el <= tl && ew <= tl, "loss {el:.2e}, dW {ew:.2e} > {tl:.0e} (seed {s})");
}

pub fn bad_inputs_are_errors_not_panics(dev: &Device) {
    let cfg = LoraConfig::builder(10, 4, 2).build().unwrap();
    let w = Tensor::zeros((10, 4), DType::F32, dev).unwrap();
    let tied = TiedLora::lora(w.clone(), cfg.clone(), 1).unwrap();
    let msg = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();

    let e = msg(tied.embed(&Tensor::new(&[3u32, 10], dev).unwrap()));
    assert!(e.contains("`ids[1]` = 10 is out of range 0..10"), "{e}");
    let e = msg(tied.embed(&Tensor::new(&[1f32], dev).unwrap()));
    assert!(e.contains("u32 or i64"), "{e}");
    let e = msg(tied.logits(&Tensor::zeros((2, 4), DType::BF16, dev).unwrap()));
    assert!(e.contains("BF16") && e.contains("F32"), "{e}");
    let e = msg(tied.logits(&Tensor::zeros((2, 5), DType::F32, dev).unwrap()));
    assert!(e.contains("last dimension must be d = 4"), "{e}");
    let h = Tensor::zeros((2, 3, 4), DType::F32, dev).unwrap();
    let e = msg(tied.loss(&h, &Tensor::new(&[1i64, 2], dev).unwrap()));
    assert!(e.contains("do not match"), "{e}");
    let e = msg(tied.loss(&h, &Tensor::new(&[[1i64, 2, 3], [4, 5, 11]], dev).unwrap()));
    assert!(e.contains("`targets[5]` = 11 is out of range 0..10"), "{e}");

    let e = TiedLora::lora(Tensor::zeros((10, 5), DType::F32, dev).unwrap(), cfg.clone(), 1).unwrap_err().to_string();
    assert!(e.contains("[V=10, d=4]"), "{e}");
    let e = TiedLora::lora(Tensor::zeros((10, 4), DType::F64, dev).unwrap(), cfg.clone(), 1).unwrap_err().to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    let e = TiedLora::with_factors(w, cfg, vec![0.0; 3], vec![0.0; 8]).unwrap_err().to_string();
    assert!(e.contains("`lora_vocab` has 3 elements"), "{e}");
}

pub fn non_contiguous_inputs_are_made_contiguous(dev: &Device) {
    let cfg = LoraConfig::builder(10, 4, 2).build().unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    let w = Tensor::from_vec(randn(&mut rng, 40, 0.5), (10, 4), dev).unwrap();
    let tied = TiedLora::with_factors(w, cfg, randn(&mut rng, 20, 0.3), randn(&mut rng, 8, 0.3)).unwrap();
    let h = Tensor::from_vec(randn(&mut rng, 24, 0.5), (4, 6), dev).unwrap();
    let ht = h.t().unwrap(); // [6, 4], strided
    assert!(!ht.is_contiguous());
    let a = tied.logits(&ht).unwrap();
    let b = tied.logits(&ht.contiguous().unwrap()).unwrap();
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

pub fn merged_weight_adds_the_delta_once_and_peft_round_trips(dev: &Device) {
    let (v, d, r) = (12, 6, 3);
    let cfg = LoraConfig::builder(v, d, r).alpha(6.0).build().unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    let (w0, u0, vh0) = (randn(&mut rng, v * d, 0.5), randn(&mut rng, v * r, 0.3), randn(&mut rng, r * d, 0.3));
    let w = Tensor::from_vec(w0.clone(), (v, d), dev).unwrap();
    let tied = TiedLora::with_factors(w.clone(), cfg.clone(), u0.clone(), vh0.clone()).unwrap();
    let merged = tied.merged_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..v {
        for j in 0..d {
            let delta: f64 = (0..r).map(|k| u0[i * r + k] as f64 * vh0[k * d + j] as f64).sum::<f64>() * cfg.scale();
            let want = w0[i * d + j] as f64 + delta;
            assert!((merged[i * d + j] as f64 - want).abs() < 1e-5, "({i}, {j})");
        }
    }
    // The merged weight's embedding equals the LoRA embedding.
    let ids = Tensor::new(&[0u32, 5, 11], dev).unwrap();
    let e_lora = tied.embed(&ids).unwrap();
    let e_merged = tied.merged_weight().unwrap().index_select(&ids, 0).unwrap();
    assert!(rel(&e_lora, &e_merged) < 1e-6);

    let dir = std::env::temp_dir().join(format!("tiedlora-candle-peft-{}", std::process::id()));
    tied.save_peft(&dir, "transformer.wte").unwrap();
    let back = TiedLora::from_peft(w, cfg, &dir).unwrap();
    assert_eq!(back.factors().unwrap(), (u0, vh0));
    std::fs::remove_dir_all(&dir).ok();
}
