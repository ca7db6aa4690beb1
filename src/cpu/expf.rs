//! Branch-free f32 `exp` and `tanh` the compiler vectorises, and the row
//! kernels of the cross-entropy built on them, each compiled for AVX-512,
//! AVX2 and SSE2 and picked at run time (`multiversion!`). `exp` and `tanh`
//! are written the way the compiler vectorises (the library
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

/// Defines `pub fn $name` whose body is compiled three times, for AVX-512,
/// for AVX2 + FMA and for the baseline (SSE2), the widest the CPU supports
/// picked at run time (the check is a cached atomic load). The loops here are
/// elementwise or use a fixed number of accumulators, and Rust never fuses a
/// multiply and an add into an FMA on its own, so all three compute the same
/// bits: only the vector width changes.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature `avx512` enables
                    // (AVX-512F/DQ/BW/VL imply AVX2 and FMA), checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// The largest element of `z` (NaN skipped; −∞ for an empty or all-NaN
    /// row) and whether `z` holds a NaN. 16 lanes, merged in a fixed order.
    pub fn row_max(z: &[f32]) -> (f32, bool) {
        let mut mx = [f32::NEG_INFINITY; 16];
        let mut nan = [false; 16];
        let mut chunks = z.chunks_exact(16);
        for c in &mut chunks {
            for j in 0..16 {
                mx[j] = if c[j] > mx[j] { c[j] } else { mx[j] };
                nan[j] |= c[j].is_nan();
            }
        }
        let mut m = f32::NEG_INFINITY;
        let mut any_nan = false;
        for (&x, &n) in mx.iter().zip(&nan).chain(chunks.remainder().iter().map(|x| (x, &false))) {
            if x > m {
                m = x;
            }
            any_nan |= n || x.is_nan();
        }
        (m, any_nan)
    }
}

multiversion! {
    /// Σ exp(x − m) over `z`, in f64, with 16 independent partial sums
    /// combined in a fixed order (deterministic, and the exponentials vectorise).
    pub fn sum_exp(z: &[f32], m: f32) -> f64 {
        let mut acc = [0f64; 16];
        let mut chunks = z.chunks_exact(16);
        for c in &mut chunks {
            let mut e = [0f32; 16];
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
}

multiversion! {
    /// The softcap in place: `x ← κ·tanh(x/κ)`.
    pub fn softcap_row(z: &mut [f32], kappa: f32) {
        for x in z.iter_mut() {
            *x = kappa * tanh(*x / kappa);
        }
    }
}

multiversion! {
    /// A row of logits into the softmax part of its gradient:
    /// `x ← exp(x − lse)·factor`.
    pub fn softmax_grad_row(row: &mut [f32], lse: f32, factor: f32) {
        for x in row.iter_mut() {
            *x = exp(*x - lse) * factor;
        }
    }
}

multiversion! {
    /// As [`softmax_grad_row`] through the softcap κ (`row` holds raw logits):
    /// `x ← exp(κ·tanh(x/κ) − lse)·(1 − tanh²(x/κ))·factor`.
    pub fn softmax_grad_row_capped(row: &mut [f32], kappa: f32, lse: f32, factor: f32) {
        for x in row.iter_mut() {
            let th = tanh(*x / kappa);
            *x = exp(kappa * th - lse) * (1.0 - th * th) * factor;
        }
    }
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
        let mut z: Vec<f32> = (0..53).map(|i| (i as f32 * 0.7).sin()).collect();
        assert_eq!(row_max(&z), (z.iter().copied().fold(f32::NEG_INFINITY, f32::max), false));
        z[40] = f32::NAN;
        z[50] = 3.0;
        assert_eq!(row_max(&z), (3.0, true));
        assert_eq!(row_max(&[]), (f32::NEG_INFINITY, false));
    }

    /// The row kernels (AVX-512 / AVX2 where the CPU has them) give the bits
    /// of the scalar loop, so results do not depend on the vector width.
    #[test]
    fn row_kernels_match_the_scalar_loop_bitwise() {
        let z: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.731).sin() * 40.0 - 3.0).collect();
        let (lse, factor, kappa) = (2.5f32, 0.37f32, 30f32);
        let mut got = z.clone();
        softmax_grad_row(&mut got, lse, factor);
        let want: Vec<f32> = z.iter().map(|&x| std::hint::black_box(exp(x - lse)) * factor).collect();
        assert_eq!(bits(&got), bits(&want));
        let mut got = z.clone();
        softmax_grad_row_capped(&mut got, kappa, lse, factor);
        let want: Vec<f32> = z
            .iter()
            .map(|&x| {
                let th = std::hint::black_box(tanh(x / kappa));
                std::hint::black_box(exp(kappa * th - lse)) * (1.0 - th * th) * factor
            })
            .collect();
        assert_eq!(bits(&got), bits(&want));
        let mut got = z.clone();
        softcap_row(&mut got, kappa);
        let want: Vec<f32> = z.iter().map(|&x| kappa * std::hint::black_box(tanh(x / kappa))).collect();
        assert_eq!(bits(&got), bits(&want));
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
