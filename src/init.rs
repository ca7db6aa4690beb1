//! LoRA initialisation as PEFT does it for an embedding: `lora_vocab` (U, PEFT's
//! `lora_embedding_A`ᵀ) zeros, `lora_hidden` (Vh, `lora_embedding_B`ᵀ) N(0, 1).
//! The delta U·Vh therefore starts at exactly zero.

use crate::config::LoraConfig;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Freshly initialised LoRA factors.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    /// U [V, r], zeros.
    pub lora_vocab: Vec<f32>,
    /// Vh [r, d], standard normal.
    pub lora_hidden: Vec<f32>,
}

/// Initialises the factors for `cfg` from `rng` (e.g. `StdRng::seed_from_u64(seed)`
/// for a reproducible run).
///
/// ```
/// use rand::SeedableRng;
/// let cfg = tiedlora::LoraConfig::builder(100, 16, 4).build()?;
/// let f = tiedlora::init::init_lora(&cfg, &mut rand::rngs::StdRng::seed_from_u64(0));
/// assert!(f.lora_vocab.iter().all(|&x| x == 0.0));
/// assert_eq!(f.lora_hidden.len(), 4 * 16);
/// # Ok::<(), tiedlora::Error>(())
/// ```
pub fn init_lora<R: Rng + ?Sized>(cfg: &LoraConfig, rng: &mut R) -> LoraFactors {
    let lora_vocab = vec![0f32; cfg.vocab() * cfg.rank()];
    let lora_hidden = (0..cfg.rank() * cfg.hidden())
        .map(|_| <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
        .collect();
    LoraFactors { lora_vocab, lora_hidden }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn zeros_and_standard_normal_reproducible_by_seed() {
        let cfg = LoraConfig::builder(50, 200, 16).build().unwrap();
        let seed: u64 = rand::random();
        let a = init_lora(&cfg, &mut StdRng::seed_from_u64(seed));
        let b = init_lora(&cfg, &mut StdRng::seed_from_u64(seed));
        assert_eq!(a, b, "same seed, same factors");
        let c = init_lora(&cfg, &mut StdRng::seed_from_u64(seed ^ 1));
        assert_ne!(a.lora_hidden, c.lora_hidden, "another seed, other factors");
        assert!(a.lora_vocab.iter().all(|&x| x == 0.0));
        let n = a.lora_hidden.len() as f64;
        let mean = a.lora_hidden.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.lora_hidden.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // 3200 samples: the mean's standard error is ~0.018, the variance's ~0.025.
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean}, var {var}");
    }
}
