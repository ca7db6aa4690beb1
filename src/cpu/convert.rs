//! Storage dtype ↔ f32 conversion of host slices (f32 is a plain copy; f16
//! and bf16 widen exactly and narrow with one round-to-nearest-even).

use crate::dtype::{DType, Element};

/// `dst[i] = src[i]` as f32 (exact for every storage dtype).
#[inline]
pub fn widen_into<T: Element>(dst: &mut [f32], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len());
    if T::DTYPE == DType::F32 {
        dst.copy_from_slice(bytemuck::cast_slice(src));
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f64() as f32;
        }
    }
}

/// `dst[i] = src[i]` rounded once to `T`.
#[inline]
pub fn narrow_into<T: Element>(dst: &mut [T], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    if T::DTYPE == DType::F32 {
        dst.copy_from_slice(bytemuck::cast_slice(src));
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = T::from_f64(s as f64);
        }
    }
}

/// A fresh f32 copy of `src`.
pub fn widen<T: Element>(src: &[T]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    widen_into(&mut out, src);
    out
}
