//! The fast CPU backend (`Cpu`) against candle-core's own CPU ops on the same
//! computation, and optionally the f64 reference (`CpuReference`), at the four
//! shapes of the CPU benchmark table (BENCHMARKS.md):
//!
//! ```text
//! cargo run --release --features candle --example cpu_vs_candle                        # a few minutes on 2 cores
//! cargo run --release --features candle --example cpu_vs_candle -- --with-reference   # + the f64 reference, xent only (~15 min)
//! cargo run --release --features candle --example cpu_vs_candle -- --small            # the two small shapes only
//! cargo run --release --features candle --example cpu_vs_candle -- --reps 5 --ops xent,head,embed
//! ```
//!
//! f32 weights and hidden states, s = 2 (alpha = 2r), mean loss, no softcap,
//! no ignored targets, W frozen (no dW). Every op is timed forward and
//! backward, the backends interleaved within each repetition (so machine load
//! hits them alike), and the median of the repetitions is printed after one
//! untimed warm-up run of each. Times include allocating the outputs and
//! gradients. The baselines:
//!
//! - **head + cross-entropy** (`head_xent_forward` + `head_xent_backward`):
//!   candle's autograd of the unfused computation, `z = h·Wᵀ + s·(h·Vhᵀ)·Uᵀ`,
//!   `log_softmax`, `gather`, `mean`, `backward()` to the `Var`s U, Vh and h.
//! - **head** (`head_forward`, `head_backward` from a given ∂L/∂z): candle's
//!   matmuls, the ones its autograd issues for this graph (with s on the
//!   small operands): `z = h·Wᵀ + (h·Vhᵀ)·(s·U)ᵀ`; `gU = s·G·U`,
//!   `dh = G·W + gU·Vh`, `dU = s·Gᵀ·(h·Vhᵀ)`, `dVh = gUᵀ·h`.
//! - **embedding** (`embed_forward`, `embed_backward` from a given ∂L/∂e):
//!   `e = W[ids] + s·U[ids]·Vh` with `Tensor::embedding` (what
//!   `candle_nn::Embedding` calls) and `matmul`; backward as candle's
//!   autograd does it: `a = s·dE·Vhᵀ`, `dU = zeros.index_add(ids, a)`,
//!   `dVh = s·U[ids]ᵀ·dE`.
//!
//! Candle runs its matmuls on its own thread pool (`gemm` on rayon, one
//! thread per core); `Cpu` uses one scoped thread per core. A sanity line per
//! shape gives the relative difference of the outputs of the backends
//! (loss, logits, gradients), so the comparison is of the same computation.

use candle_core::{DType as CDType, Device, Tensor, Var, D};
use std::time::Instant;
use tiedlora::host::{HostBackend, HostGrads, HostWeights};
use tiedlora::rand::rngs::StdRng;
use tiedlora::rand::{Rng, SeedableRng};
use tiedlora::{Cpu, CpuReference, Grads, LoraConfig, Weights};

/// T, V, d, r.
type Shape = (usize, usize, usize, usize);

const SHAPES: [Shape; 4] = [(1024, 256, 128, 8), (2048, 8192, 256, 16), (1024, 32000, 512, 16), (512, 50257, 768, 16)];

struct Opts {
    small: bool,
    with_reference: bool,
    reps: usize,
    ops: Vec<String>,
}

fn parse() -> Opts {
    let mut o =
        Opts { small: false, with_reference: false, reps: 3, ops: vec!["xent".into(), "head".into(), "embed".into()] };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--small" => o.small = true,
            "--with-reference" => o.with_reference = true,
            "--reps" => o.reps = args.next().and_then(|s| s.parse().ok()).filter(|&n| n > 0).expect("--reps N"),
            "--ops" => o.ops = args.next().expect("--ops xent,head,embed").split(',').map(str::to_string).collect(),
            other => panic!("unknown argument {other:?} (see the example's docs)"),
        }
    }
    o
}

/// The inputs of one shape, shared by every backend.
struct Data {
    cfg: LoraConfig,
    t: usize,
    v: usize,
    d: usize,
    r: usize,
    w: Vec<f32>,
    u: Vec<f32>,
    vh: Vec<f32>,
    h: Vec<f32>,
    targets: Vec<u32>,
    /// ∂L/∂logits [T, V] for the head backward.
    d_logits: Vec<f32>,
    /// ∂L/∂e [T, d] for the embedding backward.
    d_embed: Vec<f32>,
}

impl Data {
    fn new((t, v, d, r): Shape, with_head: bool) -> Data {
        let cfg = LoraConfig::builder(v, d, r).alpha(2.0 * r as f64).build().expect("config");
        let mut rng = StdRng::seed_from_u64(0x7133d);
        let mut uniform = |n: usize, amp: f64| -> Vec<f32> {
            (0..n).map(|_| (amp * (rng.random::<f64>() * 2.0 - 1.0)) as f32).collect()
        };
        let w = uniform(v * d, 0.05);
        let u = uniform(v * r, 0.05);
        let vh = uniform(r * d, 0.05);
        let h = uniform(t * d, 1.0);
        let d_logits = if with_head { uniform(t * v, 1.0 / (t * v) as f64) } else { Vec::new() };
        let d_embed = uniform(t * d, 1.0);
        let targets = (0..t).map(|i| ((i * 7919) % v) as u32).collect();
        Data { cfg, t, v, d, r, w, u, vh, h, targets, d_logits, d_embed }
    }

    fn weights(&self) -> HostWeights<'_, f32> {
        Weights::host(&self.w, &self.u, &self.vh)
    }
}

/// One timed run: forward seconds, backward seconds, and the outputs the
/// sanity line compares (the first is the loss or the forward output).
struct Run {
    fwd: f64,
    bwd: f64,
    out: Vec<Vec<f32>>,
}

fn secs(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

// ---------------------------------------------------------------- tiedlora

fn tl_xent<B: HostBackend>(b: &B, x: &Data) -> Run {
    let wt = x.weights();
    let t0 = Instant::now();
    let mut loss = [0f32];
    let mut lse = vec![0f32; x.t];
    b.head_xent_forward(&x.cfg, &wt, &x.h, &x.targets, &mut loss, &mut lse).expect("xent forward");
    let t1 = Instant::now();
    let (mut du, mut dvh, mut dh) = (vec![0f32; x.v * x.r], vec![0f32; x.r * x.d], vec![0f32; x.t * x.d]);
    let mut grads: HostGrads<'_> = Grads::host(&mut du, &mut dvh, None);
    b.head_xent_backward(&x.cfg, &wt, &x.h, &x.targets, &lse, 1.0, &mut dh, &mut grads).expect("xent backward");
    let t2 = Instant::now();
    Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![loss.to_vec(), du, dvh, dh] }
}

fn tl_head<B: HostBackend>(b: &B, x: &Data) -> Run {
    let wt = x.weights();
    let t0 = Instant::now();
    let mut z = vec![0f32; x.t * x.v];
    b.head_forward(&x.cfg, &wt, &x.h, &mut z).expect("head forward");
    let t1 = Instant::now();
    let (mut du, mut dvh, mut dh) = (vec![0f32; x.v * x.r], vec![0f32; x.r * x.d], vec![0f32; x.t * x.d]);
    let mut grads: HostGrads<'_> = Grads::host(&mut du, &mut dvh, None);
    b.head_backward(&x.cfg, &wt, &x.h, &x.d_logits, &mut dh, &mut grads).expect("head backward");
    let t2 = Instant::now();
    Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![z, du, dvh, dh] }
}

fn tl_embed<B: HostBackend>(b: &B, x: &Data) -> Run {
    let wt = x.weights();
    let t0 = Instant::now();
    let mut e = vec![0f32; x.t * x.d];
    b.embed_forward(&x.cfg, &wt, &x.targets, &mut e).expect("embed forward");
    let t1 = Instant::now();
    let (mut du, mut dvh) = (vec![0f32; x.v * x.r], vec![0f32; x.r * x.d]);
    let mut grads: HostGrads<'_> = Grads::host(&mut du, &mut dvh, None);
    b.embed_backward(&x.cfg, &wt, &x.targets, &x.d_embed, &mut grads).expect("embed backward");
    let t2 = Instant::now();
    Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![e, du, dvh] }
}

// ---------------------------------------------------------------- candle

/// The inputs as candle tensors on the CPU (U, Vh and h as `Var`s).
struct CandleData {
    w: Tensor,
    u: Var,
    vh: Var,
    h: Var,
    targets: Tensor,
    d_logits: Tensor,
    d_embed: Tensor,
    s: f64,
}

impl CandleData {
    fn new(x: &Data) -> candle_core::Result<CandleData> {
        let dev = Device::Cpu;
        let d_logits = if x.d_logits.is_empty() {
            Tensor::zeros((1, 1), CDType::F32, &dev)?
        } else {
            Tensor::from_slice(&x.d_logits, (x.t, x.v), &dev)?
        };
        Ok(CandleData {
            w: Tensor::from_slice(&x.w, (x.v, x.d), &dev)?,
            u: Var::from_tensor(&Tensor::from_slice(&x.u, (x.v, x.r), &dev)?)?,
            vh: Var::from_tensor(&Tensor::from_slice(&x.vh, (x.r, x.d), &dev)?)?,
            h: Var::from_tensor(&Tensor::from_slice(&x.h, (x.t, x.d), &dev)?)?,
            targets: Tensor::from_slice(&x.targets, x.t, &dev)?,
            d_logits,
            d_embed: Tensor::from_slice(&x.d_embed, (x.t, x.d), &dev)?,
            s: x.cfg.scale(),
        })
    }
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn candle_xent(c: &CandleData) -> candle_core::Result<Run> {
    let t0 = Instant::now();
    let (h, u, vh) = (c.h.as_tensor(), c.u.as_tensor(), c.vh.as_tensor());
    let z = (h.matmul(&c.w.t()?)? + (h.matmul(&vh.t()?)?.matmul(&u.t()?)? * c.s)?)?;
    let logp = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let loss = logp.gather(&c.targets.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let loss_v = loss.to_vec0::<f32>()?;
    let t1 = Instant::now();
    let grads = loss.backward()?;
    let get = |v: &Var| grads.get(v).expect("gradient of a Var").clone();
    let (du, dvh, dh) = (get(&c.u), get(&c.vh), get(&c.h));
    let t2 = Instant::now();
    Ok(Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![vec![loss_v], flat(&du)?, flat(&dvh)?, flat(&dh)?] })
}

fn candle_head(c: &CandleData) -> candle_core::Result<Run> {
    let (h, u, vh, w) = (c.h.as_tensor(), c.u.as_tensor(), c.vh.as_tensor(), &c.w);
    let t0 = Instant::now();
    let z = (h.matmul(&w.t()?)? + h.matmul(&vh.t()?)?.matmul(&(u * c.s)?.t()?)?)?;
    let t1 = Instant::now();
    let g = &c.d_logits;
    let gu = (g.matmul(u)? * c.s)?;
    let dh = (g.matmul(w)? + gu.matmul(vh)?)?;
    let du = (g.t()?.matmul(&h.matmul(&vh.t()?)?)? * c.s)?;
    let dvh = gu.t()?.matmul(h)?;
    let t2 = Instant::now();
    Ok(Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![flat(&z)?, flat(&du)?, flat(&dvh)?, flat(&dh)?] })
}

fn candle_embed(c: &CandleData) -> candle_core::Result<Run> {
    let (u, vh, w) = (c.u.as_tensor(), c.vh.as_tensor(), &c.w);
    let t0 = Instant::now();
    let e = (w.embedding(&c.targets)? + (u.embedding(&c.targets)?.matmul(vh)? * c.s)?)?;
    let t1 = Instant::now();
    let de = &c.d_embed;
    let a = (de.matmul(&vh.t()?)? * c.s)?;
    let du = u.zeros_like()?.index_add(&c.targets, &a, 0)?;
    let dvh = (u.embedding(&c.targets)?.t()?.matmul(de)? * c.s)?;
    let t2 = Instant::now();
    Ok(Run { fwd: secs(t0, t1), bwd: secs(t1, t2), out: vec![flat(&e)?, flat(&du)?, flat(&dvh)?] })
}

// ---------------------------------------------------------------- report

/// The medians of one backend at one shape.
#[derive(Clone, Copy)]
struct Med {
    fwd: f64,
    bwd: f64,
    total: f64,
}

fn medians(runs: &[Run]) -> Med {
    Med {
        fwd: median(runs.iter().map(|r| r.fwd).collect()),
        bwd: median(runs.iter().map(|r| r.bwd).collect()),
        total: median(runs.iter().map(|r| r.fwd + r.bwd).collect()),
    }
}

/// One op's table: its name, its targets (which column, the largest
/// Cpu/candle ratio) and its rows.
struct Table {
    title: &'static str,
    targets: Vec<(&'static str, f64)>,
    /// Shape, repetitions, medians of Cpu, candle and the reference.
    rows: Vec<(Shape, usize, Med, Med, Option<Med>)>,
    sanity: Vec<String>,
}

fn pick(m: &Med, col: &str) -> f64 {
    match col {
        "fwd" => m.fwd,
        "bwd" => m.bwd,
        _ => m.total,
    }
}

/// Milliseconds, three significant digits or more.
fn ms(secs: f64) -> String {
    let x = secs * 1e3;
    let prec = if x < 10.0 {
        2
    } else if x < 100.0 {
        1
    } else {
        0
    };
    format!("{x:.prec$} ms")
}

fn print_table(tb: &Table, ref_reps: usize) -> bool {
    println!("\n### {}\n", tb.title);
    println!("| T | V | d | r | runs | Cpu fwd | Cpu bwd | Cpu total | candle fwd | candle bwd | candle total | reference total | Cpu/candle fwd | bwd | total | target |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut all = true;
    for &((t, v, d, r), reps, c, k, rf) in &tb.rows {
        let verdict: Vec<String> = tb
            .targets
            .iter()
            .map(|&(col, max)| {
                let ratio = pick(&c, col) / pick(&k, col);
                let ok = ratio <= max;
                all &= ok;
                format!("{col} ≤ {max:.1}×: {}", if ok { "yes" } else { "**no**" })
            })
            .collect();
        let reference = rf.map_or("–".to_string(), |m| ms(m.total));
        println!(
            "| {t} | {v} | {d} | {r} | {reps} | {} | {} | {} | {} | {} | {} | {reference} | {:.2}× | {:.2}× | {:.2}× | {} |",
            ms(c.fwd),
            ms(c.bwd),
            ms(c.total),
            ms(k.fwd),
            ms(k.bwd),
            ms(k.total),
            c.fwd / k.fwd,
            c.bwd / k.bwd,
            c.total / k.total,
            verdict.join("; ")
        );
    }
    println!("\nTimes are medians over the runs (the reference: over {ref_reps} runs, where run).\n");
    for s in &tb.sanity {
        println!("{s}");
    }
    all
}

/// Sanity line: relative differences of each output against Cpu's.
fn sanity(shape: Shape, names: &[&str], cpu: &Run, others: &[(&str, &Run)]) -> String {
    let (t, v, d, r) = shape;
    let mut parts = Vec::new();
    for (who, run) in others {
        let diffs: Vec<String> = names
            .iter()
            .zip(cpu.out.iter().zip(&run.out))
            .map(|(n, (a, b))| format!("{n} {:.1e}", rel_diff(a, b)))
            .collect();
        parts.push(format!("vs {who}: {}", diffs.join(", ")));
    }
    format!("- sanity {t}×{v}×{d}×{r}: relative difference of Cpu's outputs {}", parts.join("; "))
}

type TlOp = fn(&Cpu, &Data) -> Run;
type RefOp = fn(&CpuReference, &Data) -> Run;
type CandleOp = fn(&CandleData) -> candle_core::Result<Run>;

fn main() {
    let o = parse();
    let cpu = Cpu::new();
    let reference = CpuReference::new();
    println!(
        "tiedlora::Cpu ({} threads) vs candle-core 0.11 CPU ({} rayon threads){}; f32, {} cores available",
        cpu.threads(),
        candle_core::utils::get_num_threads(),
        if o.with_reference { " vs tiedlora::CpuReference (f64)" } else { "" },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let shapes: Vec<Shape> = SHAPES.iter().copied().filter(|s| !o.small || s.1 <= 8192).collect();
    let mut all_ok = true;
    for op in &o.ops {
        let (title, targets, outs, tl, rf, ck): (_, _, &[&str], TlOp, RefOp, CandleOp) = match op.as_str() {
            "xent" => (
                "head_xent_forward + head_xent_backward vs candle's unfused autograd",
                vec![("total", 1.0)],
                &["loss", "dU", "dVh", "dh"],
                tl_xent::<Cpu>,
                tl_xent::<CpuReference>,
                candle_xent,
            ),
            "head" => (
                "head_forward / head_backward vs candle's matmuls",
                vec![("fwd", 1.2), ("bwd", 1.2)],
                &["logits", "dU", "dVh", "dh"],
                tl_head::<Cpu>,
                tl_head::<CpuReference>,
                candle_head,
            ),
            "embed" => (
                "embed_forward / embed_backward vs candle's embedding + matmul",
                vec![("fwd", 1.0), ("bwd", 1.0)],
                &["e", "dU", "dVh"],
                tl_embed::<Cpu>,
                tl_embed::<CpuReference>,
                candle_embed,
            ),
            other => panic!("unknown op {other:?}: xent, head or embed"),
        };
        let mut table = Table { title, targets, rows: Vec::new(), sanity: Vec::new() };
        for &shape in &shapes {
            let x = Data::new(shape, op == "head");
            let c = CandleData::new(&x).expect("candle tensors");
            // Warm-up (page faults, thread pools), untimed; it also sizes the
            // repetitions: at least --reps, more for the quick shapes (about
            // half a second per backend, at most 201), so a
            // millisecond-scale median is not one scheduler hiccup.
            let w0 = tl(&cpu, &x);
            let w1 = ck(&c).expect("candle");
            let quick = (w0.fwd + w0.bwd).max(w1.fwd + w1.bwd).max(1e-6);
            let reps = o.reps.max(((0.5 / quick) as usize).min(201)) | 1;
            let (mut runs_c, mut runs_k, mut runs_r) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..reps {
                runs_c.push(tl(&cpu, &x));
                runs_k.push(ck(&c).expect("candle"));
                if o.with_reference && op == "xent" && i < o.reps {
                    runs_r.push(rf(&reference, &x));
                }
            }
            let mut others = vec![("candle", &runs_k[0])];
            if let Some(r) = runs_r.first() {
                others.push(("reference", r));
            }
            table.sanity.push(sanity(shape, outs, &runs_c[0], &others));
            let rmed = (!runs_r.is_empty()).then(|| medians(&runs_r));
            table.rows.push((shape, reps, medians(&runs_c), medians(&runs_k), rmed));
            eprintln!("{op} {shape:?} done");
        }
        all_ok &= print_table(&table, o.reps);
    }
    println!("\nall targets hold: {}", if all_ok { "yes" } else { "no" });
}
