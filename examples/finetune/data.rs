//! The shipped texts (byte-level tokens), their train / held-out split, and
//! the batches drawn from them.

use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Phase 1's text: the annual messages of 1790–1809 (data/README.md).
pub const TEXT1: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/sotu_1790_1809.txt"));
/// Phase 2's text: the addresses of 1961–1965, an era phase 1 never saw.
pub const TEXT2: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/sotu_1961_1965.txt"));

/// The vocabulary: one token per byte, so no tokenizer file has to travel
/// with the exported model.
pub const VOCAB: usize = 256;

/// A text split into a training part and the held-out tail (the last
/// addresses, never trained on).
pub struct Corpus {
    pub name: &'static str,
    pub train: &'static [u8],
    pub val: &'static [u8],
}

impl Corpus {
    /// The last `val_frac` of `text` is held out, cut at a line start so the
    /// held-out part begins cleanly.
    pub fn split(name: &'static str, text: &'static [u8], val_frac: f64) -> Corpus {
        let mut cut = ((text.len() as f64) * (1.0 - val_frac)) as usize;
        while cut < text.len() && cut > 0 && text[cut - 1] != b'\n' {
            cut += 1;
        }
        Corpus { name, train: &text[..cut], val: &text[cut..] }
    }
}

/// Random training windows: `batch` windows of `ctx + 1` bytes, drawn
/// uniformly from the training part with a seeded RNG (reproducible runs).
pub struct Batcher {
    data: &'static [u8],
    batch: usize,
    ctx: usize,
    rng: StdRng,
}

impl Batcher {
    pub fn new(data: &'static [u8], batch: usize, ctx: usize, seed: u64) -> Batcher {
        assert!(data.len() > ctx + 1, "the training text is shorter than one window");
        Batcher { data, batch, ctx, rng: StdRng::seed_from_u64(seed) }
    }

    /// (ids [B, T] u32, targets [B, T] i64): targets are the ids shifted by one.
    pub fn next_batch(&mut self, dev: &Device) -> Result<(Tensor, Tensor)> {
        let starts: Vec<usize> =
            (0..self.batch).map(|_| self.rng.random_range(0..self.data.len() - self.ctx - 1)).collect();
        windows(self.data, &starts, self.ctx, dev)
    }
}

/// The held-out windows: non-overlapping, in order, every full window of
/// the slice (the same ones before and after a phase, so the losses compare).
pub fn val_windows(data: &[u8], ctx: usize) -> Vec<usize> {
    match data.len().checked_sub(ctx + 1) {
        Some(last) => (0..=last / ctx).map(|i| i * ctx).collect(),
        None => Vec::new(),
    }
}

/// (ids [B, T] u32, targets [B, T] i64) for the windows starting at `starts`.
pub fn windows(data: &[u8], starts: &[usize], ctx: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(starts.len() * ctx);
    let mut tgt = Vec::with_capacity(starts.len() * ctx);
    for &s in starts {
        ids.extend(data[s..s + ctx].iter().map(|&b| u32::from(b)));
        tgt.extend(data[s + 1..s + ctx + 1].iter().map(|&b| i64::from(b)));
    }
    let shape = (starts.len(), ctx);
    Ok((Tensor::from_vec(ids, shape, dev)?, Tensor::from_vec(tgt, shape, dev)?))
}
