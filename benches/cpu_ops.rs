//! Criterion benchmarks of the CPU backends' ops (the fast `Cpu` and the f64
//! `CpuReference`) at two shapes and two dtypes, and the fused head +
//! cross-entropy forward + backward at the two small shapes of the CPU table
//! in BENCHMARKS.md, where with the `candle` feature candle's unfused CPU
//! autograd of the same loss joins (the large shapes, and the ratios, are
//! `examples/cpu_vs_candle.rs`). Benchmark ids are
//! `<op>/<backend>-<dtype>/<shape>`, so GPU backends join the same groups later.
//! Run: `cargo bench --bench cpu_ops` (add `--features candle` for candle).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use tiedlora::host::HostBackend;
use tiedlora::{bf16, Cpu, CpuReference, Element, Grads, LoraConfig, Weights};

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

fn bench_dtype<T: Element, B: HostBackend>(c: &mut Criterion, cpu: &B) {
    let dt = T::DTYPE.name();
    let backend = cpu.name();
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
        let id = |op: &str| BenchmarkId::new(op, format!("{backend}-{dt}/{}", s.name));
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

/// The two small shapes of the CPU table (T, V, d, r).
const TABLE_SHAPES: [(usize, usize, usize, usize); 2] = [(1024, 256, 128, 8), (2048, 8192, 256, 16)];

/// `head_xent_forward` + `head_xent_backward`, f32, s = 2, no softcap.
fn bench_xent_table<B: HostBackend>(c: &mut Criterion, b: &B, shapes: &[(usize, usize, usize, usize)]) {
    for &(t, v, d, r) in shapes {
        let x = TableInputs::new(t, v, d, r);
        let wt = Weights::host(&x.w, &x.u, &x.vh);
        let mut g = c.benchmark_group("xent_fwd_bwd");
        g.sample_size(10);
        g.bench_function(BenchmarkId::new(b.name(), x.name()), |bch| {
            bch.iter(|| {
                let (mut loss, mut lse) = ([0f32], vec![0f32; t]);
                b.head_xent_forward(&x.cfg, &wt, black_box(&x.h), &x.targets, &mut loss, &mut lse).unwrap();
                let (mut du, mut dvh, mut dh) = (vec![0f32; v * r], vec![0f32; r * d], vec![0f32; t * d]);
                let mut grads = Grads::host(&mut du, &mut dvh, None);
                b.head_xent_backward(&x.cfg, &wt, &x.h, &x.targets, &lse, 1.0, &mut dh, &mut grads).unwrap();
                (loss, du, dvh, dh)
            })
        });
        g.finish();
    }
}

/// The seeded f32 inputs of one table shape.
struct TableInputs {
    cfg: LoraConfig,
    w: Vec<f32>,
    u: Vec<f32>,
    vh: Vec<f32>,
    h: Vec<f32>,
    targets: Vec<u32>,
}

impl TableInputs {
    fn new(t: usize, v: usize, d: usize, r: usize) -> Self {
        let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).build().unwrap();
        let mut rng = StdRng::seed_from_u64(0x7133d);
        let mut uniform =
            |n: usize, amp: f32| -> Vec<f32> { (0..n).map(|_| amp * rng.random_range(-1.0..1.0f32)).collect() };
        let (w, u, vh, h) = (uniform(v * d, 0.05), uniform(v * r, 0.05), uniform(r * d, 0.05), uniform(t * d, 1.0));
        let targets = (0..t).map(|i| ((i * 7919) % v) as u32).collect();
        TableInputs { cfg, w, u, vh, h, targets }
    }

    fn name(&self) -> String {
        let c = &self.cfg;
        format!("T{}-V{}-d{}-r{}", self.targets.len(), c.vocab(), c.hidden(), c.rank())
    }
}

/// Candle's CPU autograd of the unfused loss: `z = h·Wᵀ + s·(h·Vhᵀ)·Uᵀ`,
/// `log_softmax`, `gather`, `mean`, `backward()` to U, Vh and h.
#[cfg(feature = "candle")]
fn bench_xent_table_candle(c: &mut Criterion) {
    use candle_core::{Device, Tensor, Var, D};
    for (t, v, d, r) in TABLE_SHAPES {
        let x = TableInputs::new(t, v, d, r);
        let dev = Device::Cpu;
        let w = Tensor::from_slice(&x.w, (v, d), &dev).unwrap();
        let u = Var::from_tensor(&Tensor::from_slice(&x.u, (v, r), &dev).unwrap()).unwrap();
        let vh = Var::from_tensor(&Tensor::from_slice(&x.vh, (r, d), &dev).unwrap()).unwrap();
        let h = Var::from_tensor(&Tensor::from_slice(&x.h, (t, d), &dev).unwrap()).unwrap();
        let targets = Tensor::from_slice(&x.targets, (t, 1), &dev).unwrap();
        let s = x.cfg.scale();
        let step = || -> candle_core::Result<_> {
            let (h, u, vh) = (h.as_tensor(), u.as_tensor(), vh.as_tensor());
            let z = (h.matmul(&w.t()?)? + (h.matmul(&vh.t()?)?.matmul(&u.t()?)? * s)?)?;
            let loss = candle_nn::ops::log_softmax(&z, D::Minus1)?.gather(&targets, 1)?.neg()?.mean_all()?;
            loss.backward()
        };
        let mut g = c.benchmark_group("xent_fwd_bwd");
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("candle-unfused", x.name()), |b| b.iter(|| step().unwrap()));
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    let (fast, reference) = (Cpu::new(), CpuReference::new());
    bench_xent_table(c, &fast, &TABLE_SHAPES);
    #[cfg(feature = "candle")]
    bench_xent_table_candle(c);
    // The reference only at the smallest shape: at 2048×8192 one iteration
    // takes tens of seconds (`examples/cpu_vs_candle.rs --with-reference` times it).
    bench_xent_table(c, &reference, &TABLE_SHAPES[..1]);
    bench_dtype::<f32, _>(c, &fast);
    bench_dtype::<bf16, _>(c, &fast);
    bench_dtype::<f32, _>(c, &reference);
    bench_dtype::<bf16, _>(c, &reference);
}

criterion_group!(cpu_ops, benches);
criterion_main!(cpu_ops);
