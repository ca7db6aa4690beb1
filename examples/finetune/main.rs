//! A real fine-tune of a small tied GPT-2 through `tiedlora::candle`, in
//! about two minutes on two CPU cores:
//!
//! 1. **full tied fine-tune** of a fresh byte-level GPT-2 on the State of the
//!    Union addresses of 1790–1809: W (embedding = head) is the trainable
//!    `Var` of `TiedLora::full`, its one gradient summing both paths, trained
//!    with the rest of the model by AdamW;
//! 2. **tied LoRA** on the addresses of 1961–1965: the whole base frozen (W
//!    included), only U and Vh train, with LoRA+ learning rates
//!    (lr(U) = 16 · lr(Vh)).
//!
//! It prints the progress and the held-out loss before / after each phase,
//! samples some text, and writes to `--out` (default `target/finetune`):
//! `base/` (the phase-1 model as an HF `GPT2LMHeadModel` checkpoint),
//! `adapter/` (the PEFT adapter) and `check.safetensors` (held-out
//! `input_ids` and the LoRA model's `logits`), for
//! `scripts/peft_check.py --finetune <out>`.
//!
//! Exit code 0; 1 if a phase did not lower its held-out loss (or on an
//! error); 2 on bad arguments.
//!
//! ```sh
//! cargo run --release --features candle --example finetune [-- --steps1 N --steps2 N --seed S --out DIR --device cpu|cuda]
//! ```

mod data;
mod model;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tiedlora::LoraConfig;

use data::{Corpus, TEXT1, TEXT2, VOCAB};
use model::{Gpt, GptConfig};
use train::{Optim, Schedule};

pub use tiedlora::candle::TiedLora;

type Error = Box<dyn std::error::Error>;

const USAGE: &str = "usage: finetune [--out DIR] [--device cpu|cuda] [--steps1 N] [--steps2 N] [--seed N]
  --out DIR        where base/, adapter/ and check.safetensors go (default target/finetune)
  --device D       cpu (default) or cuda (needs the `cuda` feature)
  --steps1 N       phase 1 (full tied fine-tune) steps (default 300)
  --steps2 N       phase 2 (tied LoRA) steps (default 100)
  --seed N         seed of the weights, the batches and the sample (default 0)";

/// The model: small enough for a clear loss drop in ~2 minutes on 2 cores.
const GPT: GptConfig =
    GptConfig { vocab_size: VOCAB, n_embd: 96, n_layer: 3, n_head: 4, n_positions: 64, layer_norm_epsilon: 1e-5 };
/// Many small batches: in a short run the number of updates matters most.
const BATCH: usize = 16;
/// Phase 1 AdamW: peak learning rate; weight decay on the matrices only.
const LR1: f64 = 1e-3;
const WEIGHT_DECAY: f64 = 0.1;
/// Phase 2: the LoRA rank and alpha (s = alpha / r), lr(Vh), and LoRA+'s ratio.
const RANK: usize = 16;
const ALPHA: f64 = 16.0;
const LR_VH: f64 = 6e-4;
const LORA_PLUS_RATIO: f64 = 16.0;
/// Held-out windows per evaluation (of `n_positions` bytes each).
const VAL_WINDOWS: usize = 96;
const PROMPT: &[u8] = b"Members of the Congress, ";

#[derive(Debug)]
struct Args {
    out: PathBuf,
    device: String,
    steps1: usize,
    steps2: usize,
    seed: u64,
}

/// `Ok(None)` for `--help`.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args { out: PathBuf::from("target/finetune"), device: "cpu".into(), steps1: 300, steps2: 100, seed: 0 };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{flag} needs a value"));
        let count = |v: String, min: usize| -> Result<usize, String> {
            match v.parse::<usize>() {
                Ok(n) if n >= min => Ok(n),
                _ => Err(format!("{flag} takes an integer >= {min}, not `{v}`")),
            }
        };
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--device" => {
                a.device = value()?;
                if a.device != "cpu" && a.device != "cuda" {
                    return Err(format!("--device takes cpu or cuda, not `{}`", a.device));
                }
            }
            "--steps1" => a.steps1 = count(value()?, 1)?,
            "--steps2" => a.steps2 = count(value()?, 1)?,
            "--seed" => {
                let v = value()?;
                a.seed = v.parse().map_err(|_| format!("--seed takes a non-negative integer, not `{v}`"))?;
            }
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    Ok(Some(a))
}

fn device(name: &str) -> Result<Device, String> {
    match name {
        "cuda" if cfg!(feature = "cuda") => {
            Device::new_cuda(0).map_err(|e| format!("--device cuda: no usable CUDA device: {e}"))
        }
        "cuda" => Err("--device cuda needs a build with the `cuda` feature: \
                       cargo run --release --features candle,cuda --example finetune -- --device cuda"
            .into()),
        _ => Ok(Device::Cpu),
    }
}

fn main() -> ExitCode {
    // candle's element-wise ops run on a spin-barrier thread pool; on a small,
    // shared machine a descheduled worker leaves the main thread spinning
    // (measured here: a third fewer tokens/s). The GEMMs keep rayon's threads.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("finetune: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let dev = match device(&args.device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("finetune: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args, &dev) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("finetune: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Both phases and the outputs; `Ok(false)` if a held-out loss did not fall.
fn run(args: &Args, dev: &Device) -> Result<bool, Error> {
    let t0 = Instant::now();
    let (v, d, ctx, batch) = (GPT.vocab_size, GPT.n_embd, GPT.n_positions, BATCH);
    let text1 = Corpus::split("1790-1809", TEXT1, 0.1);
    let text2 = Corpus::split("1961-1965", TEXT2, 0.1);
    let eval = |gpt: &Gpt, tied: &TiedLora, c: &Corpus| train::evaluate(gpt, tied, c.val, ctx, batch, VAL_WINDOWS, dev);

    // The model: a fresh GPT-2 and its tied W, HF's N(0, 0.02) init.
    let (gpt, vars) = Gpt::new(GPT, dev, args.seed)?;
    let w = Var::from_tensor(&model::normal(&mut StdRng::seed_from_u64(args.seed ^ 0x5eed), (v, d), 0.02, dev)?)?;
    let cfg = LoraConfig::builder(v, d, RANK).alpha(ALPHA).build()?;
    let n_params = vars.iter().map(|(_, p)| p.elem_count()).sum::<usize>() + v * d;
    println!(
        "GPT-2: V={v} (bytes) d={d} layers={} heads={} ctx={ctx}, {n_params} parameters; batch {batch}x{ctx}; device {:?}",
        GPT.n_layer,
        GPT.n_head,
        dev.location()
    );
    println!(
        "text {}: {} train / {} held-out bytes; text {}: {} / {}",
        text1.name,
        text1.train.len(),
        text1.val.len(),
        text2.name,
        text2.train.len(),
        text2.val.len()
    );

    // Phase 1: full tied fine-tune. W and every other weight train; W gets
    // ONE gradient (embedding + head) from tiedlora's ops.
    let tied = TiedLora::full(w.clone(), cfg.clone())?;
    let before1 = eval(&gpt, &tied, &text1)?;
    println!("\nphase 1: full tied fine-tune on {} ({} steps)", text1.name, args.steps1);
    println!("phase 1 held-out loss before: {before1:.4}");
    // Weight decay on the matrices (W, wpe, the Conv1D weights), none on the
    // LayerNorm gains and the biases, as is usual for GPT-2.
    let (mut decay, mut no_decay): (Vec<Var>, Vec<Var>) = (tied.vars(), Vec::new());
    for (_, p) in &vars {
        if p.rank() == 2 {
            decay.push(p.clone());
        } else {
            no_decay.push(p.clone());
        }
    }
    let mut opt = Optim::new().group(decay, LR1, WEIGHT_DECAY)?.group(no_decay, LR1, 0.0)?;
    let sched =
        Schedule { steps: args.steps1, batch, ctx, warmup: args.steps1.div_ceil(10), log_every: 10, seed: args.seed };
    train::train("phase 1", &gpt, &tied, &text1, &mut opt, &sched, dev)?;
    drop(opt);
    let after1 = eval(&gpt, &tied, &text1)?;
    println!("phase 1 held-out loss after:  {after1:.4}  ({:+.4})", after1 - before1);
    let base_dir = args.out.join("base");
    gpt.export_hf(tied.weight(), &base_dir)?;
    println!("wrote {}", base_dir.display());
    let sample1 = train::generate(&gpt, &tied, PROMPT, 200, 0.8, args.seed, dev)?;

    // Phase 2: tied LoRA on the other era. The base (W included) is frozen:
    // detached tensors, so no gradient is even computed for it.
    let base = gpt.frozen()?;
    let tied = TiedLora::lora(tied.weight().detach(), cfg, args.seed)?;
    let before2 = eval(&base, &tied, &text2)?;
    println!("\nphase 2: tied LoRA r={RANK} alpha={ALPHA} on {} ({} steps)", text2.name, args.steps2);
    println!("phase 2 held-out loss before: {before2:.4}");
    let (u, vh) = tied.lora_vars().ok_or("TiedLora::lora gave no LoRA factors")?;
    // LoRA+: U (PEFT's lora_B, zero-initialised) learns RATIO times faster than Vh.
    let mut opt =
        Optim::new().group(vec![u.clone()], LORA_PLUS_RATIO * LR_VH, 0.0)?.group(vec![vh.clone()], LR_VH, 0.0)?;
    let sched = Schedule {
        steps: args.steps2,
        batch,
        ctx,
        warmup: args.steps2.div_ceil(10),
        log_every: 10,
        seed: args.seed + 1,
    };
    train::train("phase 2", &base, &tied, &text2, &mut opt, &sched, dev)?;
    let after2 = eval(&base, &tied, &text2)?;
    println!("phase 2 held-out loss after:  {after2:.4}  ({:+.4})", after2 - before2);

    let adapter_dir = args.out.join("adapter");
    tied.save_peft(&adapter_dir, "transformer.wte")?;
    println!("wrote {}", adapter_dir.display());
    write_check(&base, &tied, &text2, &args.out.join("check.safetensors"), dev)?;
    let sample2 = train::generate(&base, &tied, PROMPT, 200, 0.8, args.seed, dev)?;

    println!(
        "\nsample after phase 1 (base, temperature 0.8, seed {}):\n{}",
        args.seed,
        String::from_utf8_lossy(&sample1)
    );
    println!("\nsample after phase 2 (base + LoRA, same prompt and seed):\n{}", String::from_utf8_lossy(&sample2));
    let ok1 = after1 < before1;
    let ok2 = after2 < before2;
    println!(
        "\nheld-out loss  phase 1 (full tied): {before1:.4} -> {after1:.4} {}",
        if ok1 { "ok" } else { "DID NOT FALL" }
    );
    println!(
        "held-out loss  phase 2 (tied LoRA): {before2:.4} -> {after2:.4} {}",
        if ok2 { "ok" } else { "DID NOT FALL" }
    );
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(ok1 && ok2)
}

/// `check.safetensors`: held-out `input_ids` (I64 [1, T]) and the LoRA
/// model's `logits` (F32 [1, T, V]), for the HF + PEFT comparison.
fn write_check(gpt: &Gpt, tied: &TiedLora, c: &Corpus, path: &Path, dev: &Device) -> Result<(), Error> {
    let t = gpt.cfg.n_positions.min(c.val.len());
    let ids: Vec<i64> = c.val[..t].iter().map(|&b| i64::from(b)).collect();
    let ids = Tensor::from_vec(ids, (1, t), dev)?;
    let logits = tied.logits(&gpt.forward(&tied.embed(&ids)?)?)?.to_dtype(DType::F32)?;
    let tensors = [("input_ids", ids.to_device(&Device::Cpu)?), ("logits", logits.to_device(&Device::Cpu)?)];
    let tensors: std::collections::HashMap<&str, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, path)?;
    println!("wrote {}", path.display());
    Ok(())
}
