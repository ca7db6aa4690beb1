//! One training step of LoRA on a tied embedding / LM head, over raw slices.
//!
//! Builds a small random tied model, runs
//! `embed → tanh → head + cross-entropy` forward on the CPU backend
//! (`tiedlora::Cpu`), then the backward of BOTH paths into ONE pair of
//! gradient buffers, and checks that shared gradient against central finite
//! differences of the f64 reference's loss (`CpuReference`). Prints a short
//! table and exits non-zero if the check fails.
//!
//! ```text
//! cargo run --release --example tied_step
//! ```

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;
use tiedlora::{Backend, Cpu, CpuReference, Grads, LoraConfig, Weights};

const V: usize = 512;
const D: usize = 64;
const R: usize = 8;
const T: usize = 48;

/// The step's loss in f64: mean cross-entropy of `head(tanh(embed(ids)))` against `targets`.
fn loss(
    cpu: &CpuReference,
    cfg: &LoraConfig,
    wt: &Weights<'_, CpuReference, f32>,
    ids: &[u32],
    targets: &[i64],
) -> tiedlora::Result<f32> {
    let mut e = vec![0f32; T * D];
    cpu.embed_forward(cfg, wt, ids, &mut e)?;
    let h: Vec<f32> = e.iter().map(|x| x.tanh()).collect();
    let (mut l, mut lse) = ([0f32], vec![0f32; T]);
    cpu.head_xent_forward(cfg, wt, &h, targets, &mut l, &mut lse)?;
    Ok(l[0])
}

fn main() -> tiedlora::Result<()> {
    let seed = 20261128;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n).map(|_| std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng)).collect()
    };
    let cfg = LoraConfig::builder(V, D, R).alpha(16.0).build()?;
    let w = normal(V * D, 0.3);
    // A trained-looking adapter (PEFT starts U at zero; a zero U would hide the head path's dVh).
    let u = normal(V * R, 0.1);
    let vh = normal(R * D, 0.1);
    let mut rng = StdRng::seed_from_u64(seed + 1);
    let ids: Vec<u32> = (0..T).map(|_| rng.random_range(0..V as u32)).collect();
    let mut targets: Vec<i64> = ids[1..].iter().map(|&x| x as i64).collect();
    targets.push(-100); // the last position has no next token
    let cpu = Cpu::new();
    let reference = CpuReference::new();
    let wt = Weights::host(&w, &u, &vh);

    // Forward.
    let started = Instant::now();
    let mut e = vec![0f32; T * D];
    cpu.embed_forward(&cfg, &wt, &ids, &mut e)?;
    let h: Vec<f32> = e.iter().map(|x| x.tanh()).collect();
    let (mut l, mut lse) = ([0f32], vec![0f32; T]);
    cpu.head_xent_forward(&cfg, &wt, &h, &targets, &mut l, &mut lse)?;

    // Backward: the head path, then the embedding path, into the SAME buffers.
    let (mut du, mut dvh) = (vec![0f32; V * R], vec![0f32; R * D]);
    let mut dh = vec![0f32; T * D];
    cpu.head_xent_backward(&cfg, &wt, &h, &targets, &lse, 1.0, &mut dh, &mut Grads::host(&mut du, &mut dvh, None))?;
    let head_only_dvh = dvh.clone();
    let de: Vec<f32> = dh.iter().zip(&h).map(|(g, y)| g * (1.0 - y * y)).collect();
    cpu.embed_backward(&cfg, &wt, &ids, &de, &mut Grads::host(&mut du, &mut dvh, None))?;
    let elapsed = started.elapsed();

    println!(
        "tied LoRA step: V={V} d={D} r={R} T={T} scale={} loss={:.6} ({:.1} ms on {} threads)",
        cfg.scale(),
        l[0],
        elapsed.as_secs_f64() * 1e3,
        cpu.threads()
    );
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let embed_part: Vec<f32> = dvh.iter().zip(&head_only_dvh).map(|(a, b)| a - b).collect();
    println!(
        "|dVh| from the head path {:.3e}, from the embedding path {:.3e}: one buffer holds their sum\n",
        norm(&head_only_dvh),
        norm(&embed_part)
    );

    // Finite-difference check of the shared gradient at a few entries, including
    // U rows of tokens that appear both as inputs and as targets.
    let mut probes: Vec<(&str, usize)> = Vec::new();
    for &i in ids.iter().take(4) {
        probes.push(("lora_vocab", i as usize * R));
        probes.push(("lora_vocab", i as usize * R + R - 1));
    }
    for k in [0, 7, D + 3, 3 * D + 11, (R - 1) * D + D - 1] {
        probes.push(("lora_hidden", k));
    }
    println!("{:<12} {:>6} {:>14} {:>14} {:>10}", "param", "index", "analytic", "finite diff", "rel diff");
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for (param, idx) in probes {
        let analytic = if param == "lora_vocab" { du[idx] } else { dvh[idx] };
        let eval = |delta: f32| -> tiedlora::Result<f64> {
            let (mut u2, mut vh2) = (u.clone(), vh.clone());
            match param {
                "lora_vocab" => u2[idx] += delta,
                _ => vh2[idx] += delta,
            }
            Ok(loss(&reference, &cfg, &Weights::host(&w, &u2, &vh2), &ids, &targets)? as f64)
        };
        let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps as f64);
        let rel = (analytic as f64 - fd).abs() / fd.abs().max(1e-4);
        worst = worst.max(rel);
        println!("{param:<12} {idx:>6} {analytic:>14.6e} {fd:>14.6e} {rel:>10.2e}");
    }
    let ok = worst < 2e-2;
    println!("\nworst relative difference {worst:.2e}: {}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
