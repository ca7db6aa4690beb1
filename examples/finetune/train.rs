//! The training loop, the held-out evaluation and sampling, shared by both
//! phases: the model is always `tied.embed → gpt → tied.loss / tied.logits`.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::{self, Batcher, Corpus};
use crate::model::Gpt;
use crate::TiedLora;

/// AdamW parameter groups, each with its own peak learning rate (decay /
/// no-decay in phase 1; U / Vh for LoRA+ in phase 2), on one schedule.
pub struct Optim {
    groups: Vec<(AdamW, f64)>,
}

impl Optim {
    pub fn new() -> Optim {
        Optim { groups: Vec::new() }
    }

    pub fn group(mut self, vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Optim> {
        let params = ParamsAdamW { lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay };
        self.groups.push((AdamW::new(vars, params)?, lr));
        Ok(self)
    }

    fn step(&mut self, grads: &GradStore, lr_mult: f64) -> Result<()> {
        for (opt, lr) in &mut self.groups {
            opt.set_learning_rate(*lr * lr_mult);
            opt.step(grads)?;
        }
        Ok(())
    }
}

/// How one phase trains.
pub struct Schedule {
    pub steps: usize,
    pub batch: usize,
    pub ctx: usize,
    pub warmup: usize,
    pub log_every: usize,
    /// Seeds the batch order.
    pub seed: u64,
}

impl Schedule {
    /// Linear warmup, then cosine decay to 10% of the peak: a short run
    /// still ends on small steps.
    fn lr_mult(&self, step: usize) -> f64 {
        if step <= self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let p = (step - self.warmup) as f64 / (self.steps - self.warmup).max(1) as f64;
        0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Mean next-byte loss of a batch: the tied embedding, the decoder, the
/// fused tied head + cross-entropy.
fn batch_loss(gpt: &Gpt, tied: &TiedLora, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let h = gpt.forward(&tied.embed(ids)?)?;
    tied.loss(&h, targets)
}

/// Trains `opt`'s vars on random windows of `corpus.train`, printing the
/// progress.
pub fn train(
    label: &str,
    gpt: &Gpt,
    tied: &TiedLora,
    corpus: &Corpus,
    opt: &mut Optim,
    sched: &Schedule,
    dev: &Device,
) -> Result<()> {
    let mut batches = Batcher::new(corpus.train, sched.batch, sched.ctx, sched.seed);
    let t0 = Instant::now();
    let mut window = 0.0f64;
    for step in 1..=sched.steps {
        let (ids, targets) = batches.next_batch(dev)?;
        let loss = batch_loss(gpt, tied, &ids, &targets)?;
        let grads = loss.backward()?;
        opt.step(&grads, sched.lr_mult(step))?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            candle_core::bail!("{label}: the training loss is {l} at step {step}");
        }
        window += f64::from(l);
        let n = if step % sched.log_every == 0 { sched.log_every } else { step % sched.log_every };
        if step % sched.log_every == 0 || step == sched.steps {
            let secs = t0.elapsed().as_secs_f64();
            let tok_s = (step * sched.batch * sched.ctx) as f64 / secs;
            println!(
                "{label} step {step:>4}/{}  loss {:.4}  lr x{:.2}  {tok_s:>6.0} tok/s  {secs:>6.1} s",
                sched.steps,
                window / n as f64,
                sched.lr_mult(step)
            );
            window = 0.0;
        }
    }
    Ok(())
}

/// Mean loss over the held-out windows of `val` (at most `max_windows`
/// of them, the same ones every call).
pub fn evaluate(
    gpt: &Gpt,
    tied: &TiedLora,
    val: &[u8],
    ctx: usize,
    batch: usize,
    max_windows: usize,
    dev: &Device,
) -> Result<f32> {
    let mut starts = data::val_windows(val, ctx);
    starts.truncate(max_windows);
    if starts.is_empty() {
        candle_core::bail!("the held-out text is shorter than one window of {} bytes", ctx + 1);
    }
    let mut sum = 0.0f64;
    for chunk in starts.chunks(batch) {
        let (ids, targets) = data::windows(val, chunk, ctx, dev)?;
        // The loss is a mean over the chunk's tokens: weight it by them.
        sum += f64::from(batch_loss(gpt, tied, &ids, &targets)?.to_scalar::<f32>()?) * chunk.len() as f64;
    }
    Ok((sum / starts.len() as f64) as f32)
}

/// `n` bytes sampled after `prompt` at `temperature` (seeded: the same
/// text every run on a given machine), using the last `ctx` bytes as context.
pub fn generate(
    gpt: &Gpt,
    tied: &TiedLora,
    prompt: &[u8],
    n: usize,
    temperature: f64,
    seed: u64,
    dev: &Device,
) -> Result<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = prompt.to_vec();
    for _ in 0..n {
        let start = out.len().saturating_sub(gpt.cfg.n_positions);
        let ids: Vec<u32> = out[start..].iter().map(|&b| u32::from(b)).collect();
        let t = ids.len();
        let ids = Tensor::from_vec(ids, (1, t), dev)?;
        let h = gpt.forward(&tied.embed(&ids)?)?.narrow(1, t - 1, 1)?;
        let z = tied.logits(&h)?.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let p = candle_nn::ops::softmax(&(z / temperature)?, D::Minus1)?.to_vec1::<f32>()?;
        let r: f32 = rng.random();
        let mut acc = 0.0;
        let next = p.iter().position(|&pi| {
            acc += pi;
            acc > r
        });
        out.push(next.unwrap_or(p.len() - 1) as u8);
    }
    Ok(out)
}
