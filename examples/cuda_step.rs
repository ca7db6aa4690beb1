//! One tied-LoRA training step on the GPU with the fused kernels, checked
//! against the CPU reference: `embed → tanh → head + cross-entropy` forward
//! (the logits never exist whole), then the backward of both paths into ONE
//! pair of device gradient buffers.
//!
//! ```text
//! cargo run --release --features cuda --example cuda_step [-- --cublas]
//! ```
//!
//! `--cublas` runs the head's GEMMs on cuBLAS (`Cuda::with_cublas`, feature
//! `experimental-kernels`).
//!
//! The trainer's side is plain cudarc: its own stream (`Cuda::with_stream`
//! would take it), its own buffers, viewed in place. Exits 0 when every
//! tensor matches the reference within the bf16 tolerance, 1 when one does
//! not, 2 when there is no usable GPU.

use cudarc::driver::CudaSlice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use tiedlora::cuda::Cuda;
use tiedlora::{bf16, Backend, CpuReference, Grads, LoraConfig, Weights};

const V: usize = 16_000;
const D: usize = 512;
const R: usize = 16;
const T: usize = 512;
/// DESIGN.md §3: relative-norm tolerance of bf16 results.
const TOL: f64 = 8e-3;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut d2, mut r2) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d2 += (*x as f64 - *y as f64).powi(2);
        r2 += (*y as f64).powi(2);
    }
    if r2 > 0.0 {
        (d2 / r2).sqrt()
    } else {
        d2.sqrt()
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n).map(|_| std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)).collect()
    };
    let cfg = LoraConfig::builder(V, D, R).alpha(32.0).logit_softcap(30.0).build()?;
    // bf16 weights (rounded once; the reference reads the same rounded values).
    let w: Vec<bf16> = normal(V * D, 0.05).into_iter().map(bf16::from_f32).collect();
    let u = normal(V * R, 0.02);
    let vh = normal(R * D, 0.1);
    let mut rng = StdRng::seed_from_u64(8);
    let ids: Vec<u32> = (0..T).map(|_| rng.random_range(0..V as u32)).collect();
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push((-100i32) as u32); // no next token: ignored (u32 pattern of ignore_index)

    let gpu = Cuda::new(0)?;
    #[cfg(feature = "experimental-kernels")]
    let gpu = if std::env::args().any(|a| a == "--cublas") { gpu.with_cublas(true)? } else { gpu };
    #[cfg(not(feature = "experimental-kernels"))]
    if std::env::args().any(|a| a == "--cublas") {
        return Err(tiedlora::Error::UnsupportedCombination(
            "--cublas needs the feature `experimental-kernels`".into(),
        )
        .into());
    }
    let s = gpu.stream().clone();
    let (w_d, u_d, vh_d) = (s.clone_htod(&w)?, s.clone_htod(&u)?, s.clone_htod(&vh)?);
    let (ids_d, tg_d) = (s.clone_htod(&ids)?, s.clone_htod(&targets)?);
    let weights = Weights::<Cuda, bf16> { w: w_d.as_view(), lora_vocab: u_d.as_view(), lora_hidden: vh_d.as_view() };

    // Forward: embedding, tanh (host here; a trainer's model runs there), fused head + loss.
    let mut e_d: CudaSlice<bf16> = s.alloc_zeros(T * D)?;
    gpu.embed_forward(&cfg, &weights, ids_d.as_view(), e_d.as_view_mut())?;
    let e = s.clone_dtoh(&e_d)?;
    let h: Vec<bf16> = e.iter().map(|x| bf16::from_f32(x.to_f32().tanh())).collect();
    let h_d = s.clone_htod(&h)?;
    let (mut loss_d, mut lse_d) = (s.alloc_zeros::<f32>(1)?, s.alloc_zeros::<f32>(T)?);
    gpu.reset_scratch_peak();
    gpu.head_xent_forward(&cfg, &weights, h_d.as_view(), tg_d.as_view(), loss_d.as_view_mut(), lse_d.as_view_mut())?;

    // Backward: the head path, then the embedding path, into the same buffers.
    let (mut du_d, mut dvh_d) = (s.alloc_zeros::<f32>(V * R)?, s.alloc_zeros::<f32>(R * D)?);
    let mut dh_d: CudaSlice<bf16> = s.alloc_zeros(T * D)?;
    {
        let mut grads = Grads::<Cuda> { lora_vocab: du_d.as_view_mut(), lora_hidden: dvh_d.as_view_mut(), w: None };
        gpu.head_xent_backward(
            &cfg,
            &weights,
            h_d.as_view(),
            tg_d.as_view(),
            lse_d.as_view(),
            1.0,
            dh_d.as_view_mut(),
            &mut grads,
        )?;
    }
    let scratch = gpu.scratch_peak_bytes();
    let dh = s.clone_dtoh(&dh_d)?;
    let de: Vec<bf16> =
        dh.iter().zip(&h).map(|(g, y)| bf16::from_f32(g.to_f32() * (1.0 - y.to_f32().powi(2)))).collect();
    let de_d = s.clone_htod(&de)?;
    {
        let mut grads = Grads::<Cuda> { lora_vocab: du_d.as_view_mut(), lora_hidden: dvh_d.as_view_mut(), w: None };
        gpu.embed_backward::<bf16, bf16, u32>(&cfg, &weights, ids_d.as_view(), de_d.as_view(), &mut grads)?;
    }
    let (loss, du, dvh) = (s.clone_dtoh(&loss_d)?[0], s.clone_dtoh(&du_d)?, s.clone_dtoh(&dvh_d)?);

    // The same step on the CPU reference (f64 math on the same bf16 inputs).
    let cpu = CpuReference::new();
    let cw = Weights::host(&w, &u, &vh);
    let (mut loss_c, mut lse_c) = ([0f32], vec![0f32; T]);
    cpu.head_xent_forward(&cfg, &cw, &h, &targets, &mut loss_c, &mut lse_c)?;
    let (mut du_c, mut dvh_c, mut dh_c) = (vec![0f32; V * R], vec![0f32; R * D], vec![bf16::ZERO; T * D]);
    cpu.head_xent_backward(
        &cfg,
        &cw,
        &h,
        &targets,
        &lse_c,
        1.0,
        &mut dh_c,
        &mut Grads::host(&mut du_c, &mut dvh_c, None),
    )?;
    cpu.embed_backward(&cfg, &cw, &ids, &de, &mut Grads::host(&mut du_c, &mut dvh_c, None))?;

    let f = |x: &[bf16]| x.iter().map(|y| y.to_f32()).collect::<Vec<f32>>();
    let rows = [
        ("loss", rel(&[loss], &[loss_c[0]])),
        ("dh", rel(&f(&dh), &f(&dh_c))),
        ("dU (both paths)", rel(&du, &du_c)),
        ("dVh (both paths)", rel(&dvh, &dvh_c)),
    ];
    println!("tied-LoRA step on {gpu:?} ({}): V={V} d={D} r={R} T={T}, softcap 30, bf16", gpu.name());
    println!(
        "loss {loss:.6} (reference {:.6}); fused cross-entropy scratch {:.1} MiB, logits would be {:.1} MiB",
        loss_c[0],
        scratch as f64 / 1048576.0,
        (T * V * 2) as f64 / 1048576.0
    );
    let mut ok = true;
    for (name, err) in rows {
        let pass = err <= TOL;
        ok &= pass;
        println!("  {name:<18} rel err {err:.2e}  {}", if pass { "ok" } else { "FAIL" });
    }
    Ok(ok)
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("cuda_step: {e}");
            let no_gpu = e
                .downcast_ref::<tiedlora::Error>()
                .is_some_and(|e| matches!(e, tiedlora::Error::BackendUnavailable(_)));
            std::process::exit(if no_gpu { 2 } else { 1 });
        }
    }
}
