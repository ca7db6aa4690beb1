//! Fresh random inputs. Each test draws a new seed and prints it, so a failure
//! can be replayed with `TIEDLORA_SEED=<seed>`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use tiedlora::Element;

/// A new seed (or `$TIEDLORA_SEED`), printed for replay.
pub fn fresh_rng(test: &str) -> StdRng {
    let seed =
        std::env::var("TIEDLORA_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random::<u64>());
    println!("{test}: seed {seed} (replay with TIEDLORA_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

pub fn normal<T: Element>(rng: &mut StdRng, n: usize, std: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f64(std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng))).collect()
}

pub fn ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n).map(|_| rng.random_range(0..vocab as i64)).collect()
}
