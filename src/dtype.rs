//! Storage dtypes (`f32`, `f16`, `bf16`) and token-id types (`u32`, `i64`).

use half::{bf16, f16};
use std::fmt;

/// The storage dtype of `w`, `h`, `e` and `dh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Relative-norm tolerance of a kernel result in this storage dtype
    /// (DESIGN.md §3): f32 1e-5, f16 2e-3, bf16 8e-3.
    pub const fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 8e-3,
        }
    }

    /// Short lower-case name, as in golden metadata (`f32`, `f16`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses `f32`/`f16`/`bf16` (also `float32`, `float16`, `bfloat16`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for u32 {}
    impl Sealed for i64 {}
}

/// A floating-point storage element. Sealed: implemented for `f32`, `f16`, `bf16`.
pub trait Element:
    sealed::Sealed + Copy + Default + Send + Sync + PartialEq + fmt::Debug + bytemuck::Pod + 'static
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Round-to-nearest-even narrowing from f64 (NaN stays NaN, overflow to ±inf).
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        // Direct f64 -> f16 rounding: going through f32 first could round twice.
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// A token id / target type. Sealed: implemented for `u32` and `i64`.
pub trait TokenId: sealed::Sealed + Copy + Send + Sync + PartialEq + fmt::Debug + bytemuck::Pod + 'static {
    /// Name for messages (`u32` or `i64`).
    const NAME: &'static str;
    /// The id as a signed 64-bit integer (`u32` widens exactly).
    fn to_i64(self) -> i64;
}

impl TokenId for u32 {
    const NAME: &'static str = "u32";
    #[inline]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl TokenId for i64 {
    const NAME: &'static str = "i64";
    #[inline]
    fn to_i64(self) -> i64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(f16::from_f64(1.0 + 2f64.powi(-11)), f16::from_f64(1.0));
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert!(<f16 as Element>::from_f64(1e10).is_infinite());
        assert_eq!(DType::parse("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("f64"), None);
    }
}
