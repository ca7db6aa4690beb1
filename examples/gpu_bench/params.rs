//! `#[repr(C)]` mirrors of `kernels/baseline_params.h`.

use bytemuck::{Pod, Zeroable};

macro_rules! params {
    ($($name:ident ($bytes:expr) { $($field:ident : $ty:ty),* $(,)? })*) => {$(
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $bytes);
    )*};
}

params! {
    FillParams (32) { out: u64, n: u64, scale: f32, offset: f32, seed: u32, _pad: u32 }
    CastParams (24) { x: u64, out: u64, n: u64 }
    AxpbyParams (40) { x: u64, y: u64, out: u64, n: u64, alpha: f32, beta: f32 }
    GatherParams (32) { ids: u64, src: u64, out: u64, tokens: i32, ncols: i32 }
    ScatterAddParams (40) { ids: u64, src: u64, out: u64, tokens: i32, ncols: i32, scale: f32, _pad: u32 }
    DiffNormParams (32) { a: u64, b: u64, partial: u64, n: u64 }
    XentRowsParams (40) { logits: u64, targets: u64, row_loss: u64, tokens: i32, vocab: i32, softcap: f32, scale: f32 }
}
