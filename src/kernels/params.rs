//! `#[repr(C)]` mirrors of the params structs in `kernels/params.h`, field for
//! field; pointers are `u64` (a device address on the GPU, a host address in
//! the shim). Sizes are asserted here and by `TL_CHECK_PARAMS` in C++.

use bytemuck::{Pod, Zeroable};

/// Marker for a kernel params struct: plain old data, passed by value.
pub trait KernelParams: Pod {}

macro_rules! params {
    ($(#[$doc:meta] $name:ident ($bytes:expr) { $($field:ident : $ty:ty),* $(,)? })*) => {$(
        #[$doc]
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
        #[allow(missing_docs)]
        pub struct $name { $(pub $field: $ty),* }
        impl KernelParams for $name {}
        const _: () = assert!(std::mem::size_of::<$name>() == $bytes);
    )*};
}

params! {
    /// `ids.cu`: validate and narrow ids/targets to int32 (status, record: 0 for none).
    PrepareIdsParams (56) {
        ids: u64, out: u64, status: u64, record: u64, ignore_index: i64,
        n: i32, vocab: i32, allow_ignore: i32, arg: i32,
    }
    /// `lora_small.cu`: `out[t, j] = scale · Σ_k x[t, k] · Vh[j, k]`.
    LoraProjectParams (40) {
        x: u64, vh: u64, out: u64,
        rows: i32, hidden: i32, rank: i32, scale: f32,
    }
    /// `lora_small.cu`: per-chunk partial sums of `X[row(t)]ᵀ Y[t]`.
    LoraHiddenGradPartialParams (48) {
        x: u64, ids: u64, y: u64, partial: u64,
        tokens: i32, hidden: i32, rank: i32, chunk: i32,
    }
    /// `lora_small.cu`: `out += scale · Σ_s partial[s]` in chunk order.
    SumPartialsParams (32) {
        partial: u64, out: u64,
        chunks: i32, count: i32, scale: f32, _pad: u32,
    }
    /// `lora_small.cu`: U rows in the storage dtype (or their low parts), zero-padded to `ld_out` columns.
    LoraPackParams (32) {
        u: u64, out: u64,
        rows: i32, cols: i32, ld_out: i32, lo: i32,
    }
    /// `lora_small.cu`: rows `[x | y]` in the storage dtype (y f32 or storage).
    ConcatRowsParams (40) {
        x: u64, y: u64, out: u64,
        rows: i32, d: i32, r: i32, y_f32: i32,
    }
    /// `head.cu`: `logits = [h | p] · [W | U]ᵀ`.
    HeadForwardParams (56) {
        h: u64, p: u64, w: u64, u: u64, out: u64,
        tokens: i32, vocab: i32, hidden: i32, rank: i32,
    }
    /// `head.cu`: `dh = G W + s (G U) Vh`, `gu = G U`.
    HeadGradHParams (88) {
        g: u64, w: u64, u: u64, vh: u64, dh: u64, gu: u64, live: u64,
        tokens: i32, vocab: i32, hidden: i32, rank: i32, scale: f32, accumulate: i32, live_ld: i32, _pad: u32,
    }
    /// `head.cu`: `grad[v, :] += scale · Σ_t G[t, v] · B[t, :]`.
    HeadGradParamParams (56) {
        g: u64, b: u64, grad: u64, live: u64, tokens: i32, vocab: i32, ncols: i32, scale: f32, live_ld: i32, k_split: i32,
    }
    /// `embed.cu`: `out[t] = c·(W[ids[t]] + s·U[ids[t]]·Vh)`.
    EmbedForwardParams (80) {
        ids: u64, w: u64, u: u64, vh: u64, out: u64, record: u64,
        tokens: i32, vocab: i32, hidden: i32, rank: i32, scale: f32, embed_scale: f32,
        id_bytes: i32, arg: i32,
    }
    /// `merge.cu`: `W ± s·U·Vh` in place.
    MergeParams (48) {
        w: u64, u: u64, vh: u64,
        rows: i32, hidden: i32, rank: i32, scale: f32, subtract: i32, _pad: u32,
    }
    /// `sort_ids.cu`: one LSD radix pass (hist, scan, scatter).
    SortPassParams (56) {
        keys_in: u64, vals_in: u64, keys_out: u64, vals_out: u64, hist: u64,
        n: i32, vocab: i32, shift: i32, nblocks: i32,
    }
    /// `xent.cu`: per (token tile, vocabulary split) online logsumexp.
    XentPartialParams (88) {
        h: u64, p: u64, w: u64, u: u64, targets: u64, part_max: u64, part_sum: u64, target_logit: u64,
        tokens: i32, vocab: i32, hidden: i32, rank: i32, split_cols: i32, softcap: f32,
    }
    /// `xent.cu`: merge the splits, per-row losses, fixed-order loss sum.
    XentCombineParams (72) {
        part_max: u64, part_sum: u64, target_logit: u64, targets: u64, lse: u64, row_loss: u64, loss: u64,
        tokens: i32, splits: i32, scale: f32, _pad: u32,
    }
    /// `xent_grad.cu`: G of one vocabulary chunk, from recomputed logits.
    XentGradLogitsParams (104) {
        h: u64, p: u64, w: u64, u: u64, targets: u64, lse: u64, g: u64, live: u64,
        tokens: i32, vocab: i32, hidden: i32, rank: i32, col0: i32, cols: i32, softcap: f32, g_unit: f32,
        filter: f32, _pad: u32,
    }
    /// `xent_grad.cu`: dh from the f32 accumulators, plus the LoRA term.
    XentGradFinishParams (56) {
        dh_acc: u64, gu: u64, vh: u64, dh: u64,
        tokens: i32, hidden: i32, rank: i32, scale: f32, g_scale: f32, _pad: u32,
    }
    /// `xent.cu`: online logsumexp partials of one f32 logits chunk.
    XentChunkPartialParams (64) {
        z: u64, targets: u64, part_max: u64, part_sum: u64, target_logit: u64,
        tokens: i32, cols: i32, col0: i32, chunk: i32, softcap: f32, _pad: u32,
    }
    /// `xent_grad.cu`: G' of one f32 logits chunk (one block of tokens).
    XentChunkGradParams (56) {
        z: u64, targets: u64, lse: u64, g: u64,
        tokens: i32, cols: i32, col0: i32, softcap: f32, g_unit: f32, _pad: u32,
    }
    /// `embed.cu`: deterministic grouped row sum over the sorted ids.
    GroupRowsParams (56) {
        keys: u64, perm: u64, x: u64, out: u64, partial: u64,
        n: i32, vocab: i32, ncols: i32, scale: f32,
    }
}

/// `TL_SORT_TILE` in `kernels/embed_params.h`: keys per sort block.
pub const SORT_TILE: usize = 4096;
/// `TL_SORT_THREADS` in `kernels/embed_params.h`: threads of every sort kernel.
pub const SORT_THREADS: u32 = 512;
/// `TL_SORT_RADIX_BITS` in `kernels/embed_params.h`: bits per radix pass.
pub const SORT_RADIX_BITS: u32 = 9;
/// `TL_GROUP_CHUNK`: sorted positions per grouped-sum chunk.
pub const GROUP_CHUNK: usize = 64;
/// `TL_EMBED_BLOCK_X` and the 128-thread launch bound of `embed_forward`.
pub const EMBED_BLOCK: (u32, u32) = (32, 4);
