//! The op sequences: which kernels each op launches, in which order, with
//! which plans, params and scratch buffers. Written once over [`Executor`],
//! so the GPU and the CPU shim replay exactly the same launches.
//!
//! Inputs are addresses of buffers whose lengths the caller (a [`crate::Backend`]
//! impl) has already checked against the config.

#[cfg(feature = "experimental-kernels")]
use super::dense::{DenseGemm, Operand};
use super::exec::{Executor, KernelOptions};
use super::params::*;
use super::plan::LaunchPlan;
use super::select::{self, Gemm, HeadOp, Site};
use crate::config::LoraConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Element type of an id buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// `u32` ids.
    U32,
    /// `i64` ids.
    I64,
}

/// The [`IdKind`] of a token-id type.
pub fn id_kind<I: crate::dtype::TokenId>() -> IdKind {
    if I::NAME == "u32" {
        IdKind::U32
    } else {
        IdKind::I64
    }
}

impl IdKind {
    fn size(self) -> usize {
        match self {
            IdKind::U32 => 4,
            IdKind::I64 => 8,
        }
    }
}

/// Device addresses of the tied parameters.
#[derive(Debug, Clone, Copy)]
pub struct WeightAddrs {
    /// W [V, d], storage dtype.
    pub w: u64,
    /// U [V, r], f32.
    pub u: u64,
    /// Vh [r, d], f32.
    pub vh: u64,
}

/// Device addresses of the gradient accumulators (f32, added into).
#[derive(Debug, Clone, Copy)]
pub struct GradAddrs {
    /// dU [V, r].
    pub u: u64,
    /// dVh [r, d].
    pub vh: u64,
    /// dW [V, d], full tied fine-tune only.
    pub w: Option<u64>,
}

const THREADS: u32 = 256;
const GEMM_TILE: u32 = 128;
/// Fewest tokens per partial sum in the deterministic dVh reduction.
const UP_CHUNK: usize = 256;

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::ShapeMismatch(format!("{what} = {v} does not fit the kernels' 32-bit sizes")))
}

fn blocks(n: usize, per: u32) -> u32 {
    LaunchPlan::blocks_for(n, per)
}

/// An element-wise launch over a [rows, cols] matrix: one grid row per
/// matrix row, 256 columns per block.
fn row_plan(kernel: &'static str, rows: usize, cols: usize) -> LaunchPlan {
    LaunchPlan { kernel, grid: (rows as u32, blocks(cols, THREADS), 1), block: (THREADS, 1, 1), shared_bytes: 0 }
}

/// `base + index · bytes`: the address of element `index` of `bytes` each.
fn at(base: u64, index: usize, bytes: usize) -> u64 {
    base + (index * bytes) as u64
}

#[cfg(feature = "experimental-kernels")]
mod cublas;
mod embed;
mod head;
mod head_grads;
mod ids;
mod lora_small;
mod merge;
mod shared_mem;
mod xent_backward;
mod xent_forward;
mod xent_memory;

#[cfg(all(test, feature = "cpu-kernels"))]
pub use embed::sort_ids;
pub use embed::{embed_backward, embed_forward};
pub use head::{head_backward, head_forward};
pub use ids::prepare_ids;
#[cfg_attr(not(any(feature = "cuda", test)), allow(unused_imports))]
pub use ids::{DEFERRED_ARG_IDS, ID_RECORD_LEN};
pub use lora_small::{lora_hidden_grad, lora_project};
pub use merge::merge;
pub use xent_backward::head_xent_backward;
pub use xent_forward::head_xent_forward;
pub use xent_memory::{
    head_xent_backward_scratch_bytes, head_xent_forward_scratch_bytes, xent_backward_block, XENT_CHUNK_BYTES,
};

// The pieces the op files share.
use head_grads::{grad_finish, grad_h, grad_h_wide_rank, grad_param, grad_plain, GradH, GradParam};
use ids::{check_ids, prepare_embed_ids};
#[cfg(feature = "experimental-kernels")]
use lora_small::concat_rows;
use lora_small::{lo_unit, pack_parts, pack_u};
use shared_mem::gemm_shared_bytes;
#[cfg(feature = "experimental-kernels")]
use shared_mem::{wg_mn_shared_bytes, wg_nmajor_shared_bytes, wg_shared_bytes};
use xent_forward::xent_logits_shared_bytes;
use xent_memory::{backward_block_shape, chunk_cols, xent_du_partial_bytes, xent_du_split, xent_splits};
