//! Fused head + cross-entropy forward and backward on the CPU: the fast
//! backend (`Cpu`) against the f64 reference (`CpuReference`), median of 3 timed
//! runs each, one table row per shape and backend, and the speed-up.
//!
//! ```text
//! cargo run --release --example cpu_bench                        # two small shapes, both backends
//! cargo run --release --example cpu_bench -- --large             # + 1024×32000×512 and 512×50257×768 (fast only)
//! cargo run --release --example cpu_bench -- --large --with-reference   # the reference there too (~1 min a run)
//! cargo run --release --example cpu_bench -- --dtype bf16        # bf16 weights and hidden states
//! cargo run --release --example cpu_bench -- --threads 1         # fixed worker count
//! cargo run --release --example cpu_bench -- --softcap 30        # logit softcap κ = 30 (Gemma)
//! ```

use std::time::Instant;
use tiedlora::host::{HostBackend, HostGrads, HostWeights};
use tiedlora::rand::rngs::StdRng;
use tiedlora::rand::{Rng, SeedableRng};
use tiedlora::{bf16, f16, Cpu, CpuReference, DType, Element, Grads, LoraConfig, Weights};

/// T, V, d, r.
type Shape = (usize, usize, usize, usize);

const SMALL: [Shape; 2] = [(1024, 256, 128, 8), (2048, 8192, 256, 16)];
const LARGE: [Shape; 2] = [(1024, 32000, 512, 16), (512, 50257, 768, 16)];

struct Opts {
    large: bool,
    with_reference: bool,
    dtype: DType,
    threads: Option<usize>,
    reps: usize,
    softcap: Option<f64>,
}

fn parse() -> Opts {
    let mut o = Opts { large: false, with_reference: false, dtype: DType::F32, threads: None, reps: 3, softcap: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--large" => o.large = true,
            "--with-reference" => o.with_reference = true,
            "--dtype" => o.dtype = args.next().and_then(|s| DType::parse(&s)).expect("--dtype f32|f16|bf16"),
            "--threads" => o.threads = Some(args.next().and_then(|s| s.parse().ok()).expect("--threads N")),
            "--softcap" => o.softcap = Some(args.next().and_then(|s| s.parse().ok()).expect("--softcap KAPPA")),
            "--reps" => o.reps = args.next().and_then(|s| s.parse().ok()).expect("--reps N"),
            other => panic!("unknown argument {other:?} (see the example's docs)"),
        }
    }
    o
}

/// Median seconds of `reps` runs of forward, backward and both.
struct Timing {
    fwd: f64,
    bwd: f64,
    total: f64,
    loss: f32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_xent<B: HostBackend, T: Element>(b: &B, shape: Shape, o: &Opts) -> Timing {
    let (t, v, d, r) = shape;
    let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).logit_softcap_opt(o.softcap).build().expect("config");
    let mut rng = StdRng::seed_from_u64(0x7133d);
    let mut normal =
        |n: usize, std: f64| -> Vec<f64> { (0..n).map(|_| std * (rng.random::<f64>() * 2.0 - 1.0)).collect() };
    let w: Vec<T> = normal(v * d, 0.05).into_iter().map(T::from_f64).collect();
    let u: Vec<f32> = normal(v * r, 0.05).into_iter().map(|x| x as f32).collect();
    let vh: Vec<f32> = normal(r * d, 0.05).into_iter().map(|x| x as f32).collect();
    let h: Vec<T> = normal(t * d, 1.0).into_iter().map(T::from_f64).collect();
    let targets: Vec<u32> = (0..t).map(|i| ((i * 7919) % v) as u32).collect();
    let weights: HostWeights<'_, T> = Weights::host(&w, &u, &vh);
    let (mut fwd, mut bwd, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss = [0f32];
    for _ in 0..o.reps {
        let mut lse = vec![0f32; t];
        let mut dh = vec![T::default(); t * d];
        let (mut du, mut dvh) = (vec![0f32; v * r], vec![0f32; r * d]);
        let start = Instant::now();
        b.head_xent_forward(&cfg, &weights, &h, &targets, &mut loss, &mut lse).expect("forward");
        let mid = Instant::now();
        let mut grads: HostGrads<'_> = Grads::host(&mut du, &mut dvh, None);
        b.head_xent_backward(&cfg, &weights, &h, &targets, &lse, 1.0, &mut dh, &mut grads).expect("backward");
        let end = Instant::now();
        fwd.push((mid - start).as_secs_f64());
        bwd.push((end - mid).as_secs_f64());
        total.push((end - start).as_secs_f64());
    }
    Timing { fwd: median(fwd), bwd: median(bwd), total: median(total), loss: loss[0] }
}

fn run<T: Element>(o: &Opts) {
    let fast = o.threads.map_or_else(Cpu::new, Cpu::with_threads);
    let reference = o.threads.map_or_else(CpuReference::new, CpuReference::with_threads);
    println!(
        "head_xent forward + backward, {} weights, softcap {:?}, median of {} runs, {} threads ({} cores available)",
        T::DTYPE,
        o.softcap,
        o.reps,
        fast.threads(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>6} {:>6} {:>5} {:>3}  {:<14} {:>10} {:>10} {:>10} {:>12}  {:>9}",
        "T", "V", "d", "r", "backend", "fwd s", "bwd s", "total s", "loss", "speed-up"
    );
    let mut shapes: Vec<(Shape, bool)> = SMALL.iter().map(|&s| (s, true)).collect();
    if o.large {
        shapes.extend(LARGE.iter().map(|&s| (s, o.with_reference)));
    }
    for (shape, with_reference) in shapes {
        let (t, v, d, r) = shape;
        let f = time_xent::<_, T>(&fast, shape, o);
        let row = |name: &str, x: &Timing, ratio: String| {
            println!(
                "{t:>6} {v:>6} {d:>5} {r:>3}  {name:<14} {:>10.4} {:>10.4} {:>10.4} {:>12.6}  {ratio:>9}",
                x.fwd, x.bwd, x.total, x.loss
            );
        };
        row(HostBackend::name(&fast), &f, String::new());
        if with_reference {
            let c = time_xent::<_, T>(&reference, shape, o);
            row(HostBackend::name(&reference), &c, format!("{:.1}x", c.total / f.total));
        }
    }
}

fn main() {
    let o = parse();
    match o.dtype {
        DType::F32 => run::<f32>(&o),
        DType::F16 => run::<f16>(&o),
        DType::BF16 => run::<bf16>(&o),
    }
}
