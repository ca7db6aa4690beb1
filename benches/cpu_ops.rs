//! Criterion benchmarks of the CPU reference ops at two shapes and two dtypes.
//! Benchmark ids are `<op>/<backend>-<dtype>/<shape>`, so GPU backends join the
//! same groups later. Run: `cargo bench --bench cpu_ops`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use tiedlora::{bf16, Backend, CpuReference, Element, Grads, LoraConfig, Weights};

struct Shape {
    name: &'static str,
    v: usize,
    d: usize,
    r: usize,
    t: usize,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "V512-d64-r8-T32", v: 512, d: 64, r: 8, t: 32 },
    Shape { name: "V4096-d128-r16-T64", v: 4096, d: 128, r: 16, t: 64 },
];

fn random<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.random_range(-1.0..1.0))).collect()
}

fn bench_dtype<T: Element>(c: &mut Criterion) {
    let cpu = CpuReference::new();
    let dt = T::DTYPE.name();
    let mut rng = StdRng::seed_from_u64(7);
    for s in &SHAPES {
        let cfg = LoraConfig::builder(s.v, s.d, s.r).alpha(16.0).logit_softcap(30.0).build().unwrap();
        let w: Vec<T> = random(&mut rng, s.v * s.d);
        let u: Vec<f32> = random(&mut rng, s.v * s.r);
        let vh: Vec<f32> = random(&mut rng, s.r * s.d);
        let h: Vec<T> = random(&mut rng, s.t * s.d);
        let ids: Vec<u32> = (0..s.t).map(|_| rng.random_range(0..s.v as u32)).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let d_embed: Vec<T> = random(&mut rng, s.t * s.d);
        let d_logits: Vec<T> = random(&mut rng, s.t * s.v);
        let wt = Weights::host(&w, &u, &vh);
        let (mut du, mut dvh) = (vec![0f32; s.v * s.r], vec![0f32; s.r * s.d]);
        let mut e = vec![T::default(); s.t * s.d];
        let mut z = vec![T::default(); s.t * s.v];
        let mut dh = vec![T::default(); s.t * s.d];
        let (mut loss, mut lse) = ([0f32], vec![0f32; s.t]);
        let id = |op: &str| BenchmarkId::new(op, format!("cpu-{dt}/{}", s.name));
        let head_flop = (2 * s.t * s.v * (s.d + s.r)) as u64;

        let mut g = c.benchmark_group("embed");
        g.throughput(Throughput::Elements(s.t as u64));
        g.bench_function(id("forward"), |b| b.iter(|| cpu.embed_forward(&cfg, &wt, black_box(&ids), &mut e).unwrap()));
        g.bench_function(id("backward"), |b| {
            b.iter(|| {
                cpu.embed_backward(&cfg, &wt, &ids, black_box(&d_embed), &mut Grads::host(&mut du, &mut dvh, None))
                    .unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group("head");
        g.sample_size(10);
        g.throughput(Throughput::Elements(head_flop));
        g.bench_function(id("forward"), |b| b.iter(|| cpu.head_forward(&cfg, &wt, black_box(&h), &mut z).unwrap()));
        g.bench_function(id("backward"), |b| {
            b.iter(|| {
                cpu.head_backward(
                    &cfg,
                    &wt,
                    &h,
                    black_box(&d_logits),
                    &mut dh,
                    &mut Grads::host(&mut du, &mut dvh, None),
                )
                .unwrap()
            })
        });
        g.bench_function(id("xent_forward"), |b| {
            b.iter(|| cpu.head_xent_forward(&cfg, &wt, black_box(&h), &targets, &mut loss, &mut lse).unwrap())
        });
        g.bench_function(id("xent_backward"), |b| {
            b.iter(|| {
                cpu.head_xent_backward(
                    &cfg,
                    &wt,
                    black_box(&h),
                    &targets,
                    &lse,
                    1.0,
                    &mut dh,
                    &mut Grads::host(&mut du, &mut dvh, None),
                )
                .unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group("merge");
        g.sample_size(10);
        let mut w2 = w.clone();
        g.bench_function(id("merge+unmerge"), |b| {
            b.iter(|| {
                cpu.merge(&cfg, &mut w2, &u, &vh).unwrap();
                cpu.unmerge(&cfg, &mut w2, &u, &vh).unwrap();
            })
        });
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c);
    bench_dtype::<bf16>(c);
}

criterion_group!(cpu_ops, benches);
criterion_main!(cpu_ops);
