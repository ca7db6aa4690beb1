//! Branch-free f32 `exp` and `tanh` the compiler vectorises (the library
//! functions are a call per element), after Cephes. `exp`: range reduction
//! and a degree-6 polynomial, relative error about 2⁻²³; IEEE edges as
//! `f32::exp`: NaN → NaN, −∞ and anything below the smallest normal result
//! → 0, overflow → +∞. `tanh`: an odd polynomial below 0.625, `1 − 2/(e^{2x}+1)`
//! above; NaN → NaN, ±∞ → ±1.

/// e^x.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so n·C1 is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Round to nearest through the 1.5·2²³ trick (vectorises without SSE4.1).
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.33;
    const HI: f32 = 88.37;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n for n in -126..=127 (NaN gives 0 here; y carries the NaN).
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    let out = y * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        out
    }
}

/// tanh(x).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3f32;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * x + x;
    let large = (1.0 - 2.0 / (exp(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else if a >= 0.625 {
        large
    } else {
        x // NaN
    }
}

/// Σ exp(x − m) over `z`, in f64, with 8 independent partial sums combined in
/// a fixed order (deterministic, and the exponentials vectorise).
pub fn sum_exp(z: &[f32], m: f32) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = z.chunks_exact(8);
    for c in &mut chunks {
        let mut e = [0f32; 8];
        for (o, &x) in e.iter_mut().zip(c) {
            *o = exp(x - m);
        }
        for (a, &v) in acc.iter_mut().zip(&e) {
            *a += v as f64;
        }
    }
    let mut tail = 0f64;
    for &x in chunks.remainder() {
        tail += exp(x - m) as f64;
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_std_exp_and_its_edges() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let (got, want) = (tanh(x) as f64, (x as f64).tanh());
            worst = worst.max(((got - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 4e-7, "tanh: worst relative error {worst:e}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(1e-30), 1e-30);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(-100.0), -1.0);
        assert!(tanh(f32::NAN).is_nan());
        let z: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 2.0).collect();
        let want: f64 = z.iter().map(|&x| ((x - 1.0) as f64).exp()).sum();
        assert!((sum_exp(&z, 1.0) - want).abs() < 1e-6 * want);
    }
}
