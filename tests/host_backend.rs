//! Trainer code written once for every host backend ([`HostBackend`]): no
//! bounds on the backends' buffer types, no turbofish, the factors initialised
//! through the crate's re-exported `rand`. The same generic step on the CPU
//! reference and (with `cpu-kernels`) on the kernels gives the same gradients.

use tiedlora::host::{HostBackend, HostGrads, HostWeights};
use tiedlora::rand::SeedableRng;
use tiedlora::{CpuReference, DType, Grads, LoraConfig, Weights};

/// One tied step, embed → head + cross-entropy, written as a trainer would:
/// returns the loss and the shared gradients dU, dVh.
fn tied_step<B: HostBackend>(
    b: &B,
    cfg: &LoraConfig,
    weights: &HostWeights<'_, f32>,
    ids: &[u32],
    targets: &[i64],
) -> tiedlora::Result<(f32, Vec<f32>, Vec<f32>)> {
    let (t, d) = (ids.len(), cfg.hidden());
    let mut e = vec![f32::NAN; t * d];
    b.embed_forward(cfg, weights, ids, &mut e)?;
    let (mut loss, mut lse) = ([f32::NAN], vec![f32::NAN; t]);
    b.head_xent_forward(cfg, weights, &e, targets, &mut loss, &mut lse)?;
    let (mut du, mut dvh) = (vec![0.0; cfg.vocab() * cfg.rank()], vec![0.0; cfg.rank() * d]);
    let mut grads: HostGrads<'_> = Grads::host(&mut du, &mut dvh, None);
    let mut de = vec![f32::NAN; t * d];
    b.head_xent_backward(cfg, weights, &e, targets, &lse, 1.0, &mut de, &mut grads)?;
    b.embed_backward(cfg, weights, ids, &de, &mut grads)?;
    Ok((loss[0], du, dvh))
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn one_generic_step_runs_on_every_host_backend() {
    let cfg = LoraConfig::builder(300, 24, 4).alpha(8.0).build().unwrap();
    let mut rng = tiedlora::rand::rngs::StdRng::seed_from_u64(7);
    let mut f = tiedlora::init::init_lora(&cfg, &mut rng);
    // PEFT starts U at zero; give it values so dVh is not trivially zero.
    f.lora_vocab.iter_mut().enumerate().for_each(|(i, x)| *x = ((i * 37 % 101) as f32 - 50.0) / 500.0);
    let w: Vec<f32> = (0..300 * 24).map(|i| ((i * 7919 % 997) as f32 - 498.0) / 2000.0).collect();
    let weights = Weights::host(&w, &f.lora_vocab, &f.lora_hidden);
    let ids: Vec<u32> = (0..40u32).map(|t| (t * 13 + 5) % 300).collect();
    let targets: Vec<i64> = ids.iter().map(|&i| i64::from((i + 1) % 300)).collect();

    let (loss, du, dvh) = tied_step(&CpuReference::new(), &cfg, &weights, &ids, &targets).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert!(du.iter().any(|&x| x != 0.0) && dvh.iter().any(|&x| x != 0.0));

    #[cfg(feature = "cpu-kernels")]
    {
        let k = tiedlora::kernels::CpuKernels::default();
        let (loss_k, du_k, dvh_k) = tied_step(&k, &cfg, &weights, &ids, &targets).unwrap();
        let tol = DType::F32.tolerance();
        assert!(((loss_k - loss) / loss).abs() < tol as f32, "loss {loss_k} vs {loss}");
        assert!(rel_err(&du_k, &du) < tol, "dU {}", rel_err(&du_k, &du));
        assert!(rel_err(&dvh_k, &dvh) < tol, "dVh {}", rel_err(&dvh_k, &dvh));
    }
    #[cfg(not(feature = "cpu-kernels"))]
    let _ = (rel_err as fn(&[f32], &[f32]) -> f64, DType::F32);
}

/// A bad id is the same typed error through the host trait as through `Backend`.
#[test]
fn host_backend_errors_are_the_backend_errors() {
    let cfg = LoraConfig::builder(10, 4, 2).build().unwrap();
    let (w, u, vh) = (vec![0.0f32; 40], vec![0.0f32; 20], vec![0.0f32; 8]);
    let mut e = vec![0.0f32; 8];
    let err = HostBackend::embed_forward(&CpuReference::new(), &cfg, &Weights::host(&w, &u, &vh), &[1u32, 10], &mut e);
    assert_eq!(err, Err(tiedlora::Error::TokenOutOfRange { arg: "ids", index: 1, value: 10, vocab: 10 }));
}
