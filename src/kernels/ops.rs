//! The op sequences: which kernels each op launches, in which order, with
//! which plans, params and scratch buffers. Written once over [`Executor`],
//! so the GPU and the CPU shim replay exactly the same launches.
//!
//! Inputs are addresses of buffers whose lengths the caller (a [`crate::Backend`]
//! impl) has already checked against the config.

use super::dense::{DenseGemm, Operand};
use super::exec::{Executor, KernelOptions};
use super::params::*;
use super::plan::LaunchPlan;
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
/// Largest rank the fused head backward keeps in its extra tile columns.
pub const MAX_HEAD_RANK: usize = 64;

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

/// Dynamic shared memory of `tl::GemmShape` in `kernels/tile_gemm.cuh` (same formula).
#[allow(clippy::too_many_arguments)]
pub fn gemm_shared_bytes(
    elem: usize,
    bm: usize,
    bn: usize,
    bk: usize,
    a_col: bool,
    b_col: bool,
    rx: usize,
    stages: usize,
) -> u32 {
    let pad = 16 / elem;
    let (a_out, a_in) = if a_col { (bk, bm) } else { (bm, bk) };
    let (b_out, b_in) = if b_col { (bn, bk) } else { (bk, bn) };
    let x = if rx > 0 { bk * (rx + pad) } else { 0 };
    let tile = (a_out * (a_in + pad) + b_out * (b_in + pad) + x) * elem * stages;
    let epi = (bm * rx + 8 * 256) * 4;
    tile.max(epi) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel (kernels/wg_gemm.cuh,
/// `WgShape::SMEM_BYTES`): `stages` slots of a 128-row A tile and a `bn`-row B
/// tile, 128 bytes per row, plus 1024 bytes to align the slots.
pub fn wg_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 + bn) * 128 * stages + 1024) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel with an N-major B
/// (`WgBNMajor<CT, bn, RX>` on `stages` slots): a 128-row A tile and
/// `bn / 64 + 1` B atoms of 8 KiB per slot, plus 1024 bytes of alignment.
pub fn wg_nmajor_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 * 128 + (bn / 64 + 1) * 8192) * stages + 1024) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel with an M-major A and an
/// N-major B of `bn` columns (`WgShapeMN`): per slot a 128-column A tile (16
/// KiB) and `bn / 64` B atoms of 8 KiB, plus 1024 bytes of alignment.
pub fn wg_mn_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 * 128 + bn / 64 * 8192) * stages + 1024) as u32
}

macro_rules! by_dtype {
    ($dt:expr, $prefix:literal, $suffix:literal) => {
        match $dt {
            DType::F32 => concat!($prefix, "f32", $suffix),
            DType::F16 => concat!($prefix, "f16", $suffix),
            DType::BF16 => concat!($prefix, "bf16", $suffix),
        }
    };
}

/// A kernel name built at run time, as the `&'static str` a [`LaunchPlan`]
/// holds (each distinct name is allocated once and kept).
fn intern(name: String) -> &'static str {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut set = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&known) = set.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// `_s3` when the executor runs the cp.async pipeline, the weights are f16 or
/// bf16 and the gradient is in the same dtype (the combinations with an `_s3` kernel).
fn stage_suffix<E: Executor>(e: &E, t: DType, g: DType) -> &'static str {
    if e.options().gemm_stages == 3 && t == g && t != DType::F32 {
        "_s3"
    } else {
        ""
    }
}

/// Kernel-name suffix and ring depth of the head backward GEMMs (grad_h,
/// grad_param): `_mma` (ldmatrix + mma.sync, 3-stage ring) when the executor
/// asks for it and G is in the storage dtype (f16 / bf16), else as
/// [`stage_suffix`].
fn backward_gemm_variant<E: Executor>(e: &E, t: DType, g: DType) -> (&'static str, usize) {
    if e.options().mma && t == g && t != DType::F32 {
        return ("_mma", 3);
    }
    let sfx = stage_suffix(e, t, g);
    (sfx, if sfx.is_empty() { 1 } else { 3 })
}

/// `<storage>_<grad>` kernel-name infix; the gradient is the storage dtype or f32.
fn tg_name(t: DType, g: DType, names: [&'static str; 5]) -> Result<&'static str> {
    // names: f32_f32, f16_f16, f16_f32, bf16_bf16, bf16_f32
    Ok(match (t, g) {
        (DType::F32, DType::F32) => names[0],
        (DType::F16, DType::F16) => names[1],
        (DType::F16, DType::F32) => names[2],
        (DType::BF16, DType::BF16) => names[3],
        (DType::BF16, DType::F32) => names[4],
        _ => {
            return Err(Error::UnsupportedCombination(format!(
                "upstream gradient in {g} for {t} weights: the kernels take the storage dtype or f32"
            )))
        }
    })
}

/// Launches the id validation: returns the int32 ids (`-1` ignored, `-2`
/// invalid) and the status buffer `[bad count, i32::MAX - first bad index,
/// valid count, 0]` (zeroed scratch: no upload before the kernel).
fn launch_prepare_ids<E: Executor>(
    e: &E,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<(E::Scratch, E::Scratch)> {
    let out = e.scratch_uninit(n * 4)?;
    let status = e.scratch(16)?;
    let params = PrepareIdsParams {
        ids,
        out: e.addr(&out),
        status: e.addr(&status),
        ignore_index: ignore.unwrap_or(0),
        n: i32_of("tokens", n)?,
        vocab: i32_of("vocab", vocab)?,
        allow_ignore: i32::from(ignore.is_some()),
        _pad: 0,
    };
    let kernel = match kind {
        IdKind::U32 => "tl_prepare_ids_u32",
        IdKind::I64 => "tl_prepare_ids_i64",
    };
    let plan = LaunchPlan::linear(kernel, blocks(n, THREADS), THREADS);
    // SAFETY: `ids` holds n ids of `kind` (checked by the caller); `out` and
    // `status` are scratch buffers of n*4 and 16 bytes owned here.
    unsafe { e.launch(&plan, &params)? };
    Ok((out, status))
}

/// Validates ids (or targets, with `ignore`) on the device and narrows them
/// to int32. Returns the int32 buffer and the count of valid entries; an
/// out-of-range id is an [`Error::TokenOutOfRange`] quoting its index and value.
pub fn prepare_ids<E: Executor>(
    e: &E,
    arg: &'static str,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<(E::Scratch, usize)> {
    let (out, status) = launch_prepare_ids(e, ids, kind, n, vocab, ignore)?;
    let mut st = [0i32; 4];
    e.download(&status, bytemuck::cast_slice_mut(&mut st))?;
    if st[0] > 0 {
        let index = (i32::MAX - st[1]) as usize;
        let value = match kind {
            IdKind::U32 => {
                let mut b = [0u8; 4];
                e.read_at(ids + (index * kind.size()) as u64, &mut b)?;
                u32::from_le_bytes(b) as i64
            }
            IdKind::I64 => {
                let mut b = [0u8; 8];
                e.read_at(ids + (index * kind.size()) as u64, &mut b)?;
                i64::from_le_bytes(b)
            }
        };
        return Err(Error::TokenOutOfRange { arg, index, value, vocab });
    }
    Ok((out, st[2] as usize))
}

/// The embedding ops' ids as int32: checked at once ([`prepare_ids`]), or,
/// when the executor defers id errors, with no host round trip: bad ids
/// become `-2` (their rows are NaN in the forward and contribute nothing to
/// the backward, no memory is touched for them) and `tl_ids_defer` records
/// the first one for the backend to report later.
fn prepare_embed_ids<E: Executor>(e: &E, ids: u64, kind: IdKind, n: usize, vocab: usize) -> Result<E::Scratch> {
    let Some(record) = e.deferred_id_record() else {
        return prepare_ids(e, "ids", ids, kind, n, vocab, None).map(|(out, _)| out);
    };
    let (out, status) = launch_prepare_ids(e, ids, kind, n, vocab, None)?;
    let params = DeferIdsParams {
        status: e.addr(&status),
        ids,
        record,
        vocab: vocab as i64,
        id_bytes: kind.size() as i32,
        arg: DEFERRED_ARG_IDS,
    };
    let plan = LaunchPlan::linear("tl_ids_defer", 1, 32);
    // SAFETY: status is the 16-byte buffer the launch above fills; ids holds n
    // ids of `kind` (the kernel reads only the index status names, < n); the
    // record is the executor's own 5 × i64 buffer.
    unsafe { e.launch(&plan, &params)? };
    Ok(out)
}

/// `kRowsPerWarp` of `lora_down` in `kernels/lora_small.cu`.
const LORA_DOWN_ROWS_PER_WARP: u32 = 4;

/// Argument code of the deferred id-error record (`kernels/params.h`).
pub const DEFERRED_ARG_IDS: i32 = 0;

/// `out[rows, r] = scale · x[rows, d] · Vhᵀ`, `x` in `xt`, `out` in `ot` (xt or f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_down<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    xt: DType,
    ot: DType,
    x: u64,
    vh: u64,
    out: u64,
    rows: usize,
    scale: f64,
) -> Result<()> {
    let kernel = match (xt, ot) {
        (DType::F32, DType::F32) => "tl_lora_down_f32_f32",
        (DType::F16, DType::F16) => "tl_lora_down_f16_f16",
        (DType::F16, DType::F32) => "tl_lora_down_f16_f32",
        (DType::BF16, DType::BF16) => "tl_lora_down_bf16_bf16",
        (DType::BF16, DType::F32) => "tl_lora_down_bf16_f32",
        _ => return Err(Error::UnsupportedCombination(format!("lora_down from {xt} to {ot}"))),
    };
    let params = LoraDownParams {
        x,
        vh,
        out,
        rows: i32_of("tokens", rows)?,
        hidden: i32_of("hidden", cfg.hidden())?,
        rank: i32_of("rank", cfg.rank())?,
        scale: scale as f32,
    };
    // One warp per LORA_DOWN_ROWS_PER_WARP rows (kernels/lora_small.cu).
    let plan = LaunchPlan::linear(kernel, blocks(rows, THREADS / 32 * LORA_DOWN_ROWS_PER_WARP), THREADS);
    // SAFETY: x [rows, d] in xt, vh [r, d] f32 and out [rows, r] in ot are
    // checked (caller) or allocated (here) with those sizes.
    unsafe { e.launch(&plan, &params) }
}

/// `grad[r, d] += scale · Σ_t X[row(t)]ᵀ · Y[t]` with a fixed reduction order.
#[allow(clippy::too_many_arguments)]
pub fn lora_up<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    yt: DType,
    x: u64,
    ids: u64,
    y: u64,
    grad: u64,
    tokens: usize,
    scale: f64,
) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    // At least UP_CHUNK tokens per partial, and at most 4 partials per SM, so
    // the scratch ([chunks, r, d] f32) stays bounded for any T.
    let chunk = UP_CHUNK.max(tokens.div_ceil(4 * e.multiprocessors() as usize));
    let chunks = tokens.div_ceil(chunk);
    let partial = e.scratch_uninit(chunks * r * d * 4)?;
    let params = LoraUpPartialParams {
        x,
        ids,
        y,
        partial: e.addr(&partial),
        tokens: i32_of("tokens", tokens)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        chunk: i32_of("token chunk", chunk)?,
    };
    let kernel = by_dtype!(yt, "tl_lora_up_partial_", "");
    let mut plan = LaunchPlan::linear(kernel, blocks(d, THREADS), THREADS);
    plan.grid.1 = chunks as u32;
    // SAFETY: x rows addressed by ids (validated) or by t < tokens, y [T, d],
    // partial [chunks, r, d] allocated above.
    unsafe { e.launch(&plan, &params)? };
    let reduce = LoraUpReduceParams {
        partial: e.addr(&partial),
        out: grad,
        chunks: chunks as i32,
        count: i32_of("rank * hidden", r * d)?,
        scale: scale as f32,
        _pad: 0,
    };
    let plan = LaunchPlan::linear("tl_lora_up_reduce", blocks(r * d, THREADS), THREADS);
    // SAFETY: partial as above; grad is the caller's [r, d] f32 buffer.
    unsafe { e.launch(&plan, &reduce) }
}

/// `logits[T, V] = [h | s·h·Vhᵀ] · [W | U]ᵀ`, one K = d + r reduction.
pub fn head_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    h: u64,
    logits: u64,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    if e.options().cublas {
        // One K = d + r GEMM per vocabulary chunk, [h | p] · [W_c | U_c]ᵀ,
        // rounded once straight into the logits: the operands are
        // concatenated in scratch ([T, d + r] once, [C, d + r] per chunk).
        let (k, es) = (d + r, t.size());
        let hp = e.scratch_uninit(tokens * k * es)?;
        concat_rows(e, t, (h, e.addr(&p), false), e.addr(&hp), tokens, d, r)?;
        let cols_c = chunk_cols(cfg, k * es, e.options().xent_chunk_bytes);
        let wu = e.scratch_uninit(cols_c * k * es)?;
        for col0 in (0..v).step_by(cols_c) {
            let cols = cols_c.min(v - col0);
            let rows = (wt.w + (col0 * d * es) as u64, wt.u + (col0 * r * 4) as u64, true);
            concat_rows(e, t, rows, e.addr(&wu), cols, d, r)?;
            let g = DenseGemm {
                m: tokens,
                n: cols,
                k,
                a: Operand { addr: e.addr(&hp), ld: k, trans: false },
                b: Operand { addr: e.addr(&wu), ld: k, trans: true },
                ab: t,
                c: logits + (col0 * es) as u64,
                c_type: t,
                ldc: v,
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: hp [T, k] and wu [cols, k] written above; the logits'
            // columns [col0, col0 + cols) of [T, V] (caller) overlap neither.
            unsafe { e.gemm(&g)? };
        }
        return Ok(());
    }
    let params = HeadForwardParams {
        h,
        p: e.addr(&p),
        w: wt.w,
        u: wt.u,
        out: logits,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
    };
    let mma = if e.options().mma { "_mma" } else { "" };
    let plan = if e.options().wgmma && t != DType::F32 {
        let (wide, bn, stages) = if e.options().wide_tiles { ("_w256", 256, 4) } else { ("", 128, 3) };
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}{wide}_wgmma")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, bn), 1),
            block: (THREADS, 1, 1),
            shared_bytes: wg_shared_bytes(bn as usize, stages),
        }
    } else if e.options().wide_tiles && t != DType::F32 {
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}_w256{mma}")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, 2 * GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 256, 32, false, true, 0, 3),
        }
    } else if e.options().mma && t != DType::F32 {
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}_mma")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 3),
        }
    } else {
        let sfx = stage_suffix(e, t, t);
        let stages = if sfx.is_empty() { 1 } else { 3 };
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}{sfx}")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, stages),
        }
    };
    // SAFETY: h [T, d], p [T, r], W [V, d], U [V, r], logits [T, V] (checked
    // by the caller or allocated above).
    unsafe { e.launch(&plan, &params) }
}

/// The rank's extra-column count of the grad_h kernels (16, 32 or 64).
fn grad_h_rx(r: usize) -> Result<usize> {
    match r {
        0..=16 => Ok(16),
        17..=32 => Ok(32),
        33..=MAX_HEAD_RANK => Ok(64),
        _ => Err(Error::UnsupportedCombination(format!(
            "rank {r}: the fused head backward kernels support rank <= {MAX_HEAD_RANK}"
        ))),
    }
}

/// Operands of one grad_h launch over `rows` vocabulary rows: G [T, rows]
/// (dtype `gt`, row length `rows`), W / U starting at the first of those rows.
struct GradH {
    g: u64,
    w: u64,
    u: u64,
    vh: u64,
    /// `dh` [T, d]: storage dtype, or the f32 accumulator with `accumulate`.
    dh: u64,
    gu: u64,
    rows: usize,
    accumulate: bool,
    /// Tile flags of G (`kernels/params.h`) and their row length, if filtered.
    live: Option<(u64, usize)>,
}

/// `dh = G W + s (G U) Vh` and `gu = G U` (or, accumulating, f32 `dh += G W`, `gu += G U`).
fn grad_h<E: Executor>(e: &E, cfg: &LoraConfig, t: DType, gt: DType, op: GradH, tokens: usize) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let rx = grad_h_rx(r)?;
    let params = HeadGradHParams {
        g: op.g,
        w: op.w,
        u: op.u,
        vh: op.vh,
        dh: op.dh,
        gu: op.gu,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", op.rows)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        accumulate: i32::from(op.accumulate),
        live: op.live.map_or(0, |l| l.0),
        live_ld: op.live.map_or(0, |l| l.1 as i32),
        _pad: 0,
    };
    let tg = tg_name(t, gt, ["f32_f32", "f16_f16", "f16_f32", "bf16_bf16", "bf16_f32"])?;
    if e.options().wgmma && t == gt && t != DType::F32 && op.live.is_none() {
        // W read N-major with U's columns in the same MMAs (head.cu), U
        // packed to [rows, rx] in the storage dtype first.
        let rx = if e.options().wgmma_whole_atoms { MAX_HEAD_RANK } else { rx };
        let packed = pack_u(e, t, op.u, op.rows, r, rx)?;
        let params = HeadGradHParams { u: e.addr(&packed), ..params };
        let plan = LaunchPlan {
            kernel: intern(format!("tl_head_grad_h_{tg}_rx{rx}_wgmma")),
            grid: (blocks(tokens, GEMM_TILE), blocks(d, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: wg_nmajor_shared_bytes(128, 4),
        };
        // SAFETY: as below, with U packed [rows, rx] in t.
        return unsafe { e.launch(&plan, &params) };
    }
    let (mut sfx, stages) = backward_gemm_variant(e, t, gt);
    if sfx.is_empty() && rx == 16 && t != DType::F32 && op.live.is_none() && e.options().grad_h_two_blocks {
        sfx = "_o2"; // same math without the tile filter, two blocks per SM (head.cu)
    }
    let plan = LaunchPlan {
        kernel: intern(format!("tl_head_grad_h_{tg}_rx{rx}{sfx}")),
        grid: (blocks(tokens, GEMM_TILE), blocks(d, GEMM_TILE), 1),
        block: (THREADS, 1, 1),
        shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, false, rx, stages),
    };
    // SAFETY: G [T, rows] in gt, W / U rows [rows] from the given starts, Vh
    // [r, d], dh [T, d] (T or f32 when accumulating) and gu [T, r] f32: the
    // callers check or allocate these sizes.
    unsafe { e.launch(&plan, &params) }
}

/// Operands of one grad_param launch, `grad[v, :] += scale · Gᵀ[v, :] · b`
/// over `rows` vocabulary rows: G [T, rows] (dtype `gt`), `b` [T, ncols]
/// (storage dtype), `grad` [rows, ncols] f32.
struct GradParam {
    g: u64,
    b: u64,
    grad: u64,
    rows: usize,
    ncols: usize,
    /// Tile flags of G as in [`GradH`], if filtered.
    live: Option<(u64, usize)>,
    /// 0, or tokens per split (a multiple of 128): the token range is split
    /// over grid.z and each split WRITES its partial sums to
    /// `grad + z·rows·ncols` (the caller sums them in order).
    k_split: usize,
    scale: f32,
}

/// One grad_param launch (`dU += Gᵀ p`, `dW += Gᵀ h`), see [`GradParam`].
fn grad_param<E: Executor>(e: &E, t: DType, gt: DType, op: GradParam, tokens: usize) -> Result<()> {
    let GradParam { g, b, grad, rows, ncols, live, k_split, scale } = op;
    let splits = if k_split > 0 { tokens.div_ceil(k_split) } else { 1 };
    let params = HeadGradParamParams {
        g,
        b,
        grad,
        live: live.map_or(0, |l| l.0),
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", rows)?,
        ncols: i32_of("columns", ncols)?,
        scale,
        live_ld: live.map_or(0, |l| l.1 as i32),
        k_split: i32_of("token split", k_split)?,
    };
    let tg = tg_name(t, gt, ["f32_f32", "f16_f16", "f16_f32", "bf16_bf16", "bf16_f32"])?;
    // n64 for the rank columns of dU (8 warps along V), n128 for dW's d columns.
    let bn = if ncols <= 64 { 64 } else { 128 };
    if e.options().wgmma && t == gt && t != DType::F32 && live.is_none() {
        // Gᵀ read M-major, b N-major (head.cu).
        let plan = LaunchPlan {
            kernel: intern(format!("tl_head_grad_param_{tg}_n{bn}_wgmma")),
            grid: (blocks(rows, GEMM_TILE), blocks(ncols, bn as u32), splits as u32),
            block: (THREADS, 1, 1),
            shared_bytes: wg_mn_shared_bytes(bn, 4),
        };
        // SAFETY: as below.
        return unsafe { e.launch(&plan, &params) };
    }
    let (sfx, stages) = backward_gemm_variant(e, t, gt);
    let plan = LaunchPlan {
        kernel: intern(format!("tl_head_grad_param_{tg}_n{bn}{sfx}")),
        grid: (blocks(rows, GEMM_TILE), blocks(ncols, bn as u32), splits as u32),
        block: (THREADS, 1, 1),
        shared_bytes: gemm_shared_bytes(t.size(), 128, bn, 32, true, false, 0, stages),
    };
    // SAFETY: G [T, rows], b [T, ncols], grad [splits, rows, ncols] f32 (callers).
    unsafe { e.launch(&plan, &params) }
}

/// U's rows [rows, r] (f32) in the half-precision storage dtype `t`, each
/// row padded with zeros to `ld` columns: the operand the tensor-core GEMMs
/// that take U as a B matrix read.
fn pack_u<E: Executor>(e: &E, t: DType, u: u64, rows: usize, r: usize, ld: usize) -> Result<E::Scratch> {
    let packed = e.scratch_uninit(rows * ld * t.size())?;
    let pack = LoraPackParams {
        u,
        out: e.addr(&packed),
        rows: i32_of("vocab", rows)?,
        cols: i32_of("rank", r)?,
        ld_out: i32_of("packed rank", ld)?,
        _pad: 0,
    };
    let grid = blocks(rows * ld, THREADS).min(e.multiprocessors() * 8);
    let plan = LaunchPlan::linear(by_dtype!(t, "tl_lora_pack_", ""), grid.max(1), THREADS);
    // SAFETY: U rows [rows, r] f32 (caller), packed [rows, ld] allocated above.
    unsafe { e.launch(&plan, &pack)? };
    Ok(packed)
}

/// `out[i] = [x_i | y_i]` for `rows` rows, d + r elements each in the storage
/// dtype `t`; y is f32 when `y_f32` (U), else in `t` (p).
fn concat_rows<E: Executor>(
    e: &E,
    t: DType,
    (x, y, y_f32): (u64, u64, bool),
    out: u64,
    rows: usize,
    d: usize,
    r: usize,
) -> Result<()> {
    let params = ConcatRowsParams {
        x,
        y,
        out,
        rows: i32_of("rows", rows)?,
        d: i32_of("hidden", d)?,
        r: i32_of("rank", r)?,
        y_f32: i32::from(y_f32),
    };
    // One warp per row, rows grid-strided (lora_small.cu).
    let grid = blocks(rows, THREADS / 32).min(e.multiprocessors() * 16);
    let plan = LaunchPlan::linear(by_dtype!(t, "tl_concat_rows_", ""), grid.max(1), THREADS);
    // SAFETY: x [rows, d] and y [rows, r] (callers), out [rows, d + r] (the op's scratch).
    unsafe { e.launch(&plan, &params) }
}

/// U [rows, r] as the GEMM engine's operand, in the storage dtype `t`, row
/// length r (the tensor cores round U to it in the fused kernels too): U
/// itself for f32, else a packed copy, kept alive by the returned scratch.
fn engine_u<E: Executor>(e: &E, t: DType, u: u64, rows: usize, r: usize) -> Result<(Option<E::Scratch>, u64)> {
    if t == DType::F32 {
        return Ok((None, u));
    }
    let packed = pack_u(e, t, u, rows, r, r)?;
    let addr = e.addr(&packed);
    Ok((Some(packed), addr))
}

/// `z[rows, cols] = h · W_cᵀ + p · U_cᵀ` (f32, row length `cols`) on the GEMM
/// engine: the logits of `rows` tokens (h, p from their first row) for the
/// vocabulary rows W_c, U_c (U in the storage dtype, [`engine_u`]).
#[allow(clippy::too_many_arguments)]
fn engine_logits<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    (h, p): (u64, u64),
    (w_rows, u_rows): (u64, u64),
    z: u64,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let gemm = |k, a, b, beta| DenseGemm {
        m: rows,
        n: cols,
        k,
        a,
        b,
        ab: t,
        c: z,
        c_type: DType::F32,
        ldc: cols,
        alpha: 1.0,
        beta,
    };
    let rows_of = |addr, ld, trans| Operand { addr, ld, trans };
    // The thin K = r product first (it only writes z), then the K = d GEMM
    // adds onto it in its epilogue (beta = 1): reading z there hides under a
    // compute-bound GEMM, where the other order made the thin GEMM a
    // memory-bound read-modify-write of the whole chunk.
    // SAFETY: h [rows, d], p [rows, r], W_c [cols, d], U_c [cols, r] in t are
    // checked by the caller or allocated by the op; z [rows, cols] f32 is the
    // op's scratch.
    unsafe { e.gemm(&gemm(r, rows_of(p, r, false), rows_of(u_rows, r, true), 0.0))? };
    // SAFETY: as above.
    unsafe { e.gemm(&gemm(d, rows_of(h, d, false), rows_of(w_rows, d, true), 1.0)) }
}

/// Operands of the backward's plain GEMMs over one slice of G [T, rows]
/// (row length `rows`), run on the executor's GEMM engine
/// (`KernelOptions::cublas`), see [`engine_grads`].
struct EngineGrads {
    g: u64,
    /// W rows and U rows ([`engine_u`]: in the storage dtype, row length r)
    /// of the slice's vocabulary rows.
    w: u64,
    u: u64,
    h: u64,
    /// p = s·h·Vhᵀ [T, r], storage dtype.
    p: u64,
    /// f32 [T, d] and [T, r].
    dh_acc: u64,
    gu: u64,
    /// The slice's rows of dU [rows, r] and dW [rows, d] (f32, added into).
    du: u64,
    dw: Option<u64>,
    rows: usize,
    /// 0: `dh_acc`, `gu` are written (not read); 1: added into.
    beta: f32,
    /// Scale of the dU / dW products.
    scale: f32,
}

/// `dh_acc (+)= G W`, `gu (+)= G U`, `dU += scale·Gᵀ p`, `dW += scale·Gᵀ h` on
/// the GEMM engine.
fn engine_grads<E: Executor>(e: &E, cfg: &LoraConfig, t: DType, op: EngineGrads, tokens: usize) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let plain = |addr, ld| Operand { addr, ld, trans: false };
    let g = plain(op.g, op.rows);
    let gt = Operand { trans: true, ..g };
    let gemm = |m, n, k, a, b, c, ldc, alpha, beta| DenseGemm {
        m,
        n,
        k,
        a,
        b,
        ab: t,
        c,
        c_type: DType::F32,
        ldc,
        alpha,
        beta,
    };
    // SAFETY (every gemm below): G [T, rows], W / U rows [rows, d] / [rows, r],
    // h [T, d], p [T, r] are checked by the caller or allocated by the op;
    // dh_acc, gu (the op's scratch) and dU / dW (the caller's f32 gradients)
    // have the sizes above and overlap none of the operands.
    unsafe { e.gemm(&gemm(tokens, d, op.rows, g, plain(op.w, d), op.dh_acc, d, 1.0, op.beta))? };
    // SAFETY: as above.
    unsafe { e.gemm(&gemm(tokens, r, op.rows, g, plain(op.u, r), op.gu, r, 1.0, op.beta))? };
    // SAFETY: as above.
    unsafe { e.gemm(&gemm(op.rows, r, tokens, gt, plain(op.p, r), op.du, r, op.scale, 1.0))? };
    if let Some(dw) = op.dw {
        // SAFETY: as above.
        unsafe { e.gemm(&gemm(op.rows, d, tokens, gt, plain(op.h, d), dw, d, op.scale, 1.0))? };
    }
    Ok(())
}

/// `dh = g_scale · (dh_acc + s · gu · Vh)` in the storage dtype.
#[allow(clippy::too_many_arguments)]
fn grad_finish<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    dh_acc: u64,
    gu: u64,
    vh: u64,
    dh: u64,
    tokens: usize,
    g_scale: f32,
) -> Result<()> {
    let d = cfg.hidden();
    let finish = XentGradFinishParams {
        dh_acc,
        gu,
        vh,
        dh,
        tokens: i32_of("tokens", tokens)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", cfg.rank())?,
        scale: cfg.scale() as f32,
        g_scale,
        _pad: 0,
    };
    let plan = row_plan(by_dtype!(t, "tl_xent_grad_finish_", ""), tokens, d);
    // SAFETY: dh_acc [T, d] and gu [T, r] f32, Vh [r, d] and dh [T, d] (callers).
    unsafe { e.launch(&plan, &finish) }
}

/// Head backward: `dh = G W + s (G U) Vh`, `dU += Gᵀ (s h Vhᵀ)`, `dVh += s (G U)ᵀ h`, `dW += Gᵀ h`.
#[allow(clippy::too_many_arguments)]
pub fn head_backward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    gt: DType,
    wt: WeightAddrs,
    h: u64,
    g: u64,
    dh: u64,
    grads: GradAddrs,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    grad_h_rx(r)?;
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let gu = e.scratch_uninit(tokens * r * 4)?;
    if e.options().cublas && gt == t {
        // G·W and G·U into f32 on the GEMM engine, then dh's LoRA term and one rounding.
        let dh_acc = e.scratch_uninit(tokens * d * 4)?;
        let (p, gu) = (e.addr(&p), e.addr(&gu));
        let (_packed, u) = engine_u(e, t, wt.u, v, r)?;
        let op = EngineGrads {
            g,
            w: wt.w,
            u,
            h,
            p,
            dh_acc: e.addr(&dh_acc),
            gu,
            du: grads.u,
            dw: grads.w,
            rows: v,
            beta: 0.0,
            scale: 1.0,
        };
        engine_grads(e, cfg, t, op, tokens)?;
        grad_finish(e, cfg, t, e.addr(&dh_acc), gu, wt.vh, dh, tokens, 1.0)?;
        return lora_up(e, cfg, t, gu, 0, h, grads.vh, tokens, cfg.scale());
    }
    let op = GradH { g, w: wt.w, u: wt.u, vh: wt.vh, dh, gu: e.addr(&gu), rows: v, accumulate: false, live: None };
    grad_h(e, cfg, t, gt, op, tokens)?;
    // dU += Gᵀ p, p = s·h·Vhᵀ already carries the scale.
    let du = GradParam { g, b: e.addr(&p), grad: grads.u, rows: v, ncols: r, live: None, k_split: 0, scale: 1.0 };
    grad_param(e, t, gt, du, tokens)?;
    // dVh += s · guᵀ h.
    lora_up(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale())?;
    if let Some(dw) = grads.w {
        let dw = GradParam { g, b: h, grad: dw, rows: v, ncols: d, live: None, k_split: 0, scale: 1.0 };
        grad_param(e, t, gt, dw, tokens)?;
    }
    Ok(())
}

/// `(kernel, columns per thread, min blocks per SM, waves)` of `embed_forward`
/// for rank chunk RC (table in `kernels/embed.cu`).
fn embed_forward_kernel(t: DType, r: usize) -> (&'static str, usize, u32, u32) {
    let rc = match r {
        0..=8 => 0,
        9..=16 => 1,
        17..=32 => 2,
        _ => 3,
    };
    match (t, rc) {
        (DType::F32, 0) => ("tl_embed_forward_f32_r8", 4, 4, 4),
        (DType::F32, 1) => ("tl_embed_forward_f32_r16", 4, 4, 4),
        (DType::F32, 2) => ("tl_embed_forward_f32_r32", 4, 3, 2),
        (DType::F32, _) => ("tl_embed_forward_f32_r64", 2, 3, 2),
        (DType::F16, 0) => ("tl_embed_forward_f16_r8", 8, 4, 4),
        (DType::F16, 1) => ("tl_embed_forward_f16_r16", 8, 3, 2),
        (DType::F16, 2) => ("tl_embed_forward_f16_r32", 2, 4, 4),
        (DType::F16, _) => ("tl_embed_forward_f16_r64", 2, 3, 2),
        (DType::BF16, 0) => ("tl_embed_forward_bf16_r8", 8, 4, 4),
        (DType::BF16, 1) => ("tl_embed_forward_bf16_r16", 8, 3, 2),
        (DType::BF16, 2) => ("tl_embed_forward_bf16_r32", 2, 4, 4),
        (DType::BF16, _) => ("tl_embed_forward_bf16_r64", 2, 3, 2),
    }
}

/// `e[t] = c·(W[ids[t]] + s·U[ids[t]]·Vh)` after validating the ids on the device.
#[allow(clippy::too_many_arguments)]
pub fn embed_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    ids: u64,
    kind: IdKind,
    out: u64,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let ids32 = prepare_embed_ids(e, ids, kind, tokens, v)?;
    let (kernel, nc, minb, waves) = embed_forward_kernel(t, r);
    let (bx, by) = EMBED_BLOCK;
    let gx = blocks(d.div_ceil(nc), bx);
    let want = (waves * e.multiprocessors() * minb).div_ceil(gx).max(1);
    let gy = blocks(tokens, by).min(65535).min(want).max(1);
    let params = EmbedForwardParams {
        ids: e.addr(&ids32),
        w: wt.w,
        u: wt.u,
        vh: wt.vh,
        out,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        embed_scale: cfg.embed_scale() as f32,
    };
    let plan = LaunchPlan { kernel, grid: (gx, gy, 1), block: (bx, by, 1), shared_bytes: 0 };
    // SAFETY: ids32 [T] validated here; W [V, d], U [V, r], Vh [r, d] and out
    // [T, d] checked by the caller.
    unsafe { e.launch(&plan, &params) }
}

/// Stable sort of token positions by id: returns (keys, perm), skipped ids last.
pub(crate) fn sort_ids<E: Executor>(
    e: &E,
    ids32: u64,
    tokens: usize,
    vocab: usize,
) -> Result<(E::Scratch, E::Scratch)> {
    let bits = 32 - (vocab as u32).leading_zeros();
    let passes = bits.div_ceil(SORT_RADIX_BITS).max(1) as usize;
    let nblocks = tokens.div_ceil(SORT_TILE);
    let keys = e.scratch_uninit(tokens * 4)?;
    let perm = e.scratch_uninit(tokens * 4)?;
    let tmp_keys = e.scratch_uninit(tokens * 4)?;
    let tmp_vals = e.scratch_uninit(tokens * 4)?;
    let hist = e.scratch_uninit(nblocks * (1 << SORT_RADIX_BITS) * 4)?;
    let (mut k_in, mut v_in) = (ids32, 0u64);
    for p in 0..passes {
        let (k_out, v_out) = if (passes - 1 - p) % 2 == 0 {
            (e.addr(&keys), e.addr(&perm))
        } else {
            (e.addr(&tmp_keys), e.addr(&tmp_vals))
        };
        let params = SortPassParams {
            keys_in: k_in,
            vals_in: v_in,
            keys_out: k_out,
            vals_out: v_out,
            hist: e.addr(&hist),
            n: i32_of("tokens", tokens)?,
            vocab: i32_of("vocab", vocab)?,
            shift: (SORT_RADIX_BITS as usize * p) as i32,
            nblocks: nblocks as i32,
        };
        for (kernel, grid) in [("tl_sort_ids_hist", nblocks), ("tl_sort_ids_scan", 1), ("tl_sort_ids_scatter", nblocks)]
        {
            let plan = LaunchPlan::linear(kernel, grid as u32, SORT_THREADS);
            // SAFETY: keys/vals buffers of T ints, hist of nblocks * 2^RADIX_BITS ints, all
            // allocated here; ids32 is the validated [T] buffer.
            unsafe { e.launch(&plan, &params)? };
        }
        (k_in, v_in) = (k_out, v_out);
    }
    Ok((keys, perm))
}

/// `out[id] += scale · Σ_{t: ids[t] = id} x[t]` in a fixed order, `x` [T, ncols] of `xt`.
#[allow(clippy::too_many_arguments)]
fn group_rows<E: Executor>(
    e: &E,
    keys: &E::Scratch,
    perm: &E::Scratch,
    xt: DType,
    x: u64,
    out: u64,
    tokens: usize,
    vocab: usize,
    ncols: usize,
    scale: f64,
) -> Result<()> {
    let nchunks = tokens.div_ceil(GROUP_CHUNK);
    let partial = e.scratch_uninit(2 * nchunks * ncols * 4)?;
    let params = GroupRowsParams {
        keys: e.addr(keys),
        perm: e.addr(perm),
        x,
        out,
        partial: e.addr(&partial),
        n: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", vocab)?,
        ncols: i32_of("columns", ncols)?,
        scale: scale as f32,
    };
    let grid = (blocks(ncols, 32), blocks(nchunks, 4), 1);
    for kernel in [by_dtype!(xt, "tl_group_rows_partial_", ""), "tl_group_rows_combine"] {
        let plan = LaunchPlan { kernel, grid, block: (32, 4, 1), shared_bytes: 0 };
        // SAFETY: keys/perm [T] from sort_ids, x [T, ncols], out [vocab, ncols]
        // f32 (caller), partial allocated above.
        unsafe { e.launch(&plan, &params)? };
    }
    Ok(())
}

/// Embedding backward into the shared gradients, bitwise deterministic:
/// `dU[i] += c·s·Σ dE_t·Vhᵀ` (per-token rows, then a grouped sum over the
/// stably sorted ids), `dVh += c·s·Σ U[i_t]ᵀ dE_t`, `dW[i] += c·Σ dE_t`.
#[allow(clippy::too_many_arguments)]
pub fn embed_backward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    gt: DType,
    wt: WeightAddrs,
    ids: u64,
    kind: IdKind,
    d_embed: u64,
    grads: GradAddrs,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let cs = cfg.embed_scale() * cfg.scale();
    let ids32 = prepare_embed_ids(e, ids, kind, tokens, v)?;
    let gu = e.scratch_uninit(tokens * r * 4)?;
    lora_down(e, cfg, gt, DType::F32, d_embed, wt.vh, e.addr(&gu), tokens, cs)?;
    let (keys, perm) = sort_ids(e, e.addr(&ids32), tokens, v)?;
    group_rows(e, &keys, &perm, DType::F32, e.addr(&gu), grads.u, tokens, v, r, 1.0)?;
    lora_up(e, cfg, gt, wt.u, e.addr(&ids32), d_embed, grads.vh, tokens, cs)?;
    if let Some(dw) = grads.w {
        group_rows(e, &keys, &perm, gt, d_embed, dw, tokens, v, d, cfg.embed_scale())?;
    }
    Ok(())
}

/// `W ± s·U·Vh` in place, rounded once to W's dtype.
pub fn merge<E: Executor>(e: &E, cfg: &LoraConfig, t: DType, w: u64, u: u64, vh: u64, subtract: bool) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let params = MergeParams {
        w,
        u,
        vh,
        rows: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        subtract: i32::from(subtract),
        _pad: 0,
    };
    let plan = LaunchPlan {
        kernel: by_dtype!(t, "tl_merge_", ""),
        grid: (blocks(d, THREADS), blocks(v, 8).min(65535), 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: W [V, d], U [V, r], Vh [r, d] checked by the caller.
    unsafe { e.launch(&plan, &params) }
}

/// Vocabulary splits of the cross-entropy forward: `(columns per split,
/// splits)`, enough (token tile, split) blocks for two per multiprocessor.
fn xent_splits(cfg: &LoraConfig, tokens: usize, sms: u32) -> (usize, usize) {
    let tiles_m = tokens.div_ceil(GEMM_TILE as usize).max(1);
    let tiles_v = cfg.vocab().div_ceil(GEMM_TILE as usize);
    let want = (2 * sms as usize).div_ceil(tiles_m).clamp(1, tiles_v);
    let split_cols = tiles_v.div_ceil(want) * GEMM_TILE as usize;
    (split_cols, cfg.vocab().div_ceil(split_cols))
}

/// Peak extra device memory of `Backend::head_xent_forward` on the kernel
/// backends, in bytes, with the kernel variants `opts` on a device with `sms`
/// multiprocessors (see [`head_xent_backward_scratch_bytes`]): O(T) for the
/// targets, the vocabulary-split partials and the row losses, O(T·r) for p;
/// with `KernelOptions::cublas` one running pair per row instead of the
/// split partials, one f32 logits chunk [T, C] (at most the chunk bytes, or
/// 128 columns) and U in the storage dtype (V·r·elem, f16 / bf16). No term in
/// T·V or V·d.
pub fn head_xent_forward_scratch_bytes(
    cfg: &LoraConfig,
    t: DType,
    tokens: usize,
    sms: u32,
    opts: &KernelOptions,
) -> usize {
    let m = |b: usize| b.max(16);
    let (v, r, es) = (cfg.vocab(), cfg.rank(), t.size());
    // The id check's 16-byte status is freed before anything below exists.
    let base = m(tokens * 4) + m(tokens * r * es) + 2 * m(tokens * 4);
    if opts.cublas {
        let cols = chunk_cols(cfg, tokens.max(1) * 4, opts.xent_chunk_bytes);
        let packed_u = if t == DType::F32 { 0 } else { m(v * r * es) };
        base + 2 * m(tokens * 4) + m(tokens * cols * 4) + packed_u
    } else {
        let (_, splits) = xent_splits(cfg, tokens, sms);
        base + 2 * m(splits * tokens * 4)
    }
}

/// Fused head + cross-entropy forward, no [T, V] buffer: `loss` \[1\] and `lse`
/// \[T\] of the softcapped logits, from per-(token tile, vocabulary split)
/// online logsumexp partials merged in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn head_xent_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    h: u64,
    targets: u64,
    kind: IdKind,
    loss: u64,
    lse: u64,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let (t32, valid) = prepare_ids(e, "targets", targets, kind, tokens, v, Some(cfg.ignore_index()))?;
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let (split_cols, splits) = if e.options().cublas {
        // One running (max, sum) pair per row across the engine's chunks.
        (chunk_cols(cfg, tokens.max(1) * 4, e.options().xent_chunk_bytes), 1)
    } else {
        xent_splits(cfg, tokens, e.multiprocessors())
    };
    let part_max = e.scratch(splits * tokens * 4)?;
    let part_sum = e.scratch(splits * tokens * 4)?;
    let target_logit = e.scratch(tokens * 4)?;
    let row_loss = e.scratch(tokens * 4)?;
    if e.options().cublas {
        // Per vocabulary chunk: f32 logits on the GEMM engine (in L2), then
        // their logsumexp folded into the rows' running pairs, in order.
        let z = e.scratch_uninit(tokens * split_cols * 4)?;
        let (_packed, u) = engine_u(e, t, wt.u, v, r)?;
        for (chunk, col0) in (0..v).step_by(split_cols).enumerate() {
            let cols = split_cols.min(v - col0);
            let rows = (wt.w + (col0 * d * t.size()) as u64, u + (col0 * r * t.size()) as u64);
            engine_logits(e, cfg, t, (h, e.addr(&p)), rows, e.addr(&z), tokens, cols)?;
            let partial = XentChunkPartialParams {
                z: e.addr(&z),
                targets: e.addr(&t32),
                part_max: e.addr(&part_max),
                part_sum: e.addr(&part_sum),
                target_logit: e.addr(&target_logit),
                tokens: i32_of("tokens", tokens)?,
                cols: cols as i32,
                col0: col0 as i32,
                chunk: chunk as i32,
                softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
                _pad: 0,
            };
            // One warp per token row.
            let plan = LaunchPlan::linear("tl_xent_chunk_partial", blocks(tokens, THREADS / 32), THREADS);
            // SAFETY: z [T, cols] written above; targets [T], the running
            // pairs [T] and target_logit [T] allocated above.
            unsafe { e.launch(&plan, &partial)? };
        }
    } else {
        let tiles_m = tokens.div_ceil(GEMM_TILE as usize);
        let params = XentPartialParams {
            h,
            p: e.addr(&p),
            w: wt.w,
            u: wt.u,
            targets: e.addr(&t32),
            part_max: e.addr(&part_max),
            part_sum: e.addr(&part_sum),
            target_logit: e.addr(&target_logit),
            tokens: i32_of("tokens", tokens)?,
            vocab: i32_of("vocab", v)?,
            hidden: i32_of("hidden", d)?,
            rank: i32_of("rank", r)?,
            split_cols: i32_of("vocabulary split", split_cols)?,
            softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
        };
        let z_tile = (128 * 129 * 4) as u32;
        // The _mma kernels park the logit tile over the drained ring (xent.cu).
        let plan = if e.options().wgmma && t != DType::F32 {
            // The logit tile stays in registers (xent.cu).
            LaunchPlan {
                kernel: by_dtype!(t, "tl_xent_partial_", "_wgmma"),
                grid: (tiles_m as u32, splits as u32, 1),
                block: (THREADS, 1, 1),
                shared_bytes: wg_shared_bytes(128, 3),
            }
        } else if e.options().mma && t != DType::F32 {
            LaunchPlan {
                kernel: by_dtype!(t, "tl_xent_partial_", "_mma"),
                grid: (tiles_m as u32, splits as u32, 1),
                block: (THREADS, 1, 1),
                shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 3).max(z_tile),
            }
        } else {
            LaunchPlan {
                kernel: by_dtype!(t, "tl_xent_partial_", ""),
                grid: (tiles_m as u32, splits as u32, 1),
                block: (THREADS, 1, 1),
                shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 1) + z_tile,
            }
        };
        // SAFETY: h [T, d], p [T, r], W [V, d], U [V, r] (caller or above),
        // targets validated [T], partials [splits, T] and target_logit [T] above.
        unsafe { e.launch(&plan, &params)? };
    }
    let scale = cfg.loss_scale(valid) as f32;
    let combine = XentCombineParams {
        part_max: e.addr(&part_max),
        part_sum: e.addr(&part_sum),
        target_logit: e.addr(&target_logit),
        targets: e.addr(&t32),
        lse,
        row_loss: e.addr(&row_loss),
        loss,
        tokens: i32_of("tokens", tokens)?,
        splits: splits as i32,
        scale,
        _pad: 0,
    };
    let plan = LaunchPlan::linear("tl_xent_combine", 1, THREADS);
    // SAFETY: the buffers above, lse [T] and loss [1] f32 (caller).
    unsafe { e.launch(&plan, &combine) }
}

/// Default bytes of each per-block buffer of the fused cross-entropy (G, the
/// f32 `dh` accumulator, the engine's f32 logits): a block is produced and
/// consumed while it is (mostly) in L2 (50 MB on an H100 / H200).
pub const XENT_CHUNK_BYTES: usize = 32 << 20;

/// The f16 cross-entropy backward stores G' = (softmax − onehot)·slope·2¹⁵
/// (`kernels/xent_grad.cu`): |G'| ≤ 2¹⁵ < 65504, and probabilities down to
/// 2⁻²⁹ stay normal f16 numbers (G itself is subnormal or 0 in f16 at large V·T).
const XENT_F16_G_UNIT: f64 = 32768.0;

/// (token rows, vocabulary columns) of one block of the kernel backends'
/// `head_xent_backward` with the fused kernels (the GEMM engine has its own
/// blocks): the block's f32 `dh` accumulator (rows·d·4) and its G
/// (rows·C·elem) each within `chunk_bytes` (0 = [`XENT_CHUNK_BYTES`]), so
/// neither grows with T and the accumulator stays in L2 while the vocabulary
/// chunks stream past. Rows: all tokens when they fit, else the tokens split
/// evenly into multiples of 128 (at least 128); columns: a multiple of 128, at
/// least 128, at most V rounded up.
pub fn xent_backward_block(cfg: &LoraConfig, t: DType, tokens: usize, chunk_bytes: usize) -> (usize, usize) {
    let tile = GEMM_TILE as usize;
    let rows_max = (chunk_budget(chunk_bytes) / (cfg.hidden() * 4) / tile * tile).max(tile);
    let rows = if tokens <= rows_max {
        tokens.max(1)
    } else {
        tokens.div_ceil(tokens.div_ceil(rows_max)).div_ceil(tile) * tile
    };
    (rows, chunk_cols(cfg, rows * t.size(), chunk_bytes))
}

/// The chunk budget in bytes: `chunk_bytes`, or [`XENT_CHUNK_BYTES`] for 0.
fn chunk_budget(chunk_bytes: usize) -> usize {
    if chunk_bytes == 0 {
        XENT_CHUNK_BYTES
    } else {
        chunk_bytes
    }
}

/// Vocabulary columns of `col_bytes` each that fit the chunk budget: a
/// multiple of 128, at least 128, at most V rounded up.
fn chunk_cols(cfg: &LoraConfig, col_bytes: usize, chunk_bytes: usize) -> usize {
    let tile = GEMM_TILE as usize;
    (chunk_budget(chunk_bytes) / col_bytes / tile * tile).clamp(tile, cfg.vocab().div_ceil(tile) * tile)
}

/// (token rows, vocabulary columns) of one block of the GEMM-engine
/// cross-entropy backward: an f32 logits block and its G (storage dtype) in
/// at most the chunk bytes. Each block's GEMM re-reads W_c and adds into f32
/// `dh` rows: traffic ~ T·V·d·(10/C + 2/rows) bytes at C·rows = B elements,
/// least at C ≈ √(5B) (C = 5248, rows = 1024 at the Gemma-2-2B shape and 32
/// MiB); multiples of 128, and all tokens in one block when they fit.
fn engine_xent_block(cfg: &LoraConfig, t: DType, tokens: usize, chunk_bytes: usize) -> (usize, usize) {
    let tile = GEMM_TILE as usize;
    let elems = chunk_budget(chunk_bytes) / (4 + t.size());
    let v_max = cfg.vocab().div_ceil(tile) * tile;
    let t_max = tokens.max(1).div_ceil(tile) * tile;
    let cols = (((5 * elems) as f64).sqrt() as usize / tile * tile).clamp(tile, v_max);
    let rows = (elems / cols / tile * tile).clamp(tile, t_max);
    if rows == t_max {
        // Every token fits: give the block all the columns the budget allows.
        return (tokens, (elems / t_max / tile * tile).clamp(cols, v_max));
    }
    (rows, cols)
}

/// Tokens per split of the chunked dU GEMM (`grad_param` k_split): enough
/// (vocabulary tile, split) blocks for about two per multiprocessor; `tokens`
/// itself (no split) when one split suffices.
fn xent_du_split(tokens: usize, cols: usize, sms: u32) -> usize {
    let tile = GEMM_TILE as usize;
    let tiles_t = tokens.div_ceil(tile);
    let splits = (2 * sms as usize).div_ceil(cols.div_ceil(tile)).clamp(1, tiles_t);
    if splits == 1 {
        tokens
    } else {
        tiles_t.div_ceil(splits) * tile
    }
}

/// Bytes of the dU split partials: the largest over the token blocks of
/// `rows` (the full ones and the last) and the vocabulary chunks of `chunk`
/// columns (the full ones and the last).
fn xent_du_partial_bytes(cfg: &LoraConfig, tokens: usize, rows: usize, sms: u32, chunk: usize) -> usize {
    let v = cfg.vocab();
    let last_cols = v - (v.div_ceil(chunk) - 1) * chunk;
    let rows = rows.clamp(1, tokens.max(1));
    let last_rows = tokens.max(1) - (tokens.max(1).div_ceil(rows) - 1) * rows;
    [(rows, chunk.min(v)), (rows, last_cols), (last_rows, chunk.min(v)), (last_rows, last_cols)]
        .iter()
        .map(|&(tb, cols)| {
            let k = xent_du_split(tb, cols, sms);
            if k < tb {
                tb.div_ceil(k) * cols * cfg.rank() * 4
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0)
}

/// Peak extra device memory of `Backend::head_xent_backward` on the kernel
/// backends, in bytes, with the kernel variants `opts` (`Cuda::kernel_options`)
/// on a device with `sms` multiprocessors (`Cuda::multiprocessors`): the most
/// scratch live at once (each allocation counted as at least 16 bytes), which
/// `Cuda::scratch_peak_bytes` measures; when no target is valid the op
/// stays below it. Terms: O(T) for the validated targets, O(T·r) for p and
/// G·U, one token block of the f32 `dh` accumulator and of G (each at most
/// the chunk bytes, [`xent_backward_block`], or a 128-row / 128-column
/// minimum), the tile flags and dU partials of one block, the bounded dVh
/// partials; with `KernelOptions::wgmma` one chunk's U rows packed to the
/// storage dtype (C·RX·elem); with `KernelOptions::cublas` U in the storage
/// dtype (V·r·elem, f16 / bf16) and, without a gradient filter, an f32
/// logits block beside G. No term in T·V, V·d or T·d: the tests check this formula
/// against the op's measured peak for every path.
pub fn head_xent_backward_scratch_bytes(
    cfg: &LoraConfig,
    t: DType,
    tokens: usize,
    sms: u32,
    opts: &KernelOptions,
) -> usize {
    let m = |b: usize| b.max(16);
    let sms = sms.max(1);
    let (v, d, r, es) = (cfg.vocab(), cfg.hidden(), cfg.rank(), t.size());
    let half = t != DType::F32;
    let filtered = cfg.xent_grad_filter().is_some_and(|f| f > 0.0);
    let engine = opts.cublas && !filtered;
    let (rows_b, cols_b) = if engine {
        engine_xent_block(cfg, t, tokens, opts.xent_chunk_bytes)
    } else {
        xent_backward_block(cfg, t, tokens, opts.xent_chunk_bytes)
    };
    let first_cols = cols_b.min(v);
    // Held from start to end: targets, p, gu, U packed for the GEMM engine,
    // and one block's buffers.
    let held = m(tokens * 4)
        + m(tokens * r * es)
        + m(tokens * r * 4)
        + if opts.cublas && half { m(v * r * es) } else { 0 }
        + if engine {
            m(rows_b * cols_b * 4) + m(rows_b * cols_b * es)
        } else {
            m(rows_b * cols_b * es)
                + m(rows_b.div_ceil(GEMM_TILE as usize) * (cols_b / GEMM_TILE as usize) * 4)
                + m(xent_du_partial_bytes(cfg, tokens, rows_b, sms, cols_b))
        };
    // Per chunk, freed before the next: U rows packed for a wgmma grad_h.
    let per_chunk = if !half || opts.cublas {
        0
    } else if opts.wgmma && !filtered {
        let rx = if opts.wgmma_whole_atoms { MAX_HEAD_RANK } else { grad_h_rx(r).unwrap_or(MAX_HEAD_RANK) };
        m(first_cols * rx * es)
    } else {
        0
    };
    let up_chunk = UP_CHUNK.max(tokens.div_ceil(4 * sms as usize));
    let dvh_partials = m(tokens.div_ceil(up_chunk) * r * d * 4);
    held + (m(rows_b.min(tokens) * d * 4) + per_chunk).max(dvh_partials)
}

/// `base + index · bytes`: the address of element `index` of `bytes` each.
fn at(base: u64, index: usize, bytes: usize) -> u64 {
    base + (index * bytes) as u64
}

/// One token block of the fused cross-entropy backward: the block's rows of
/// every per-token operand (h, p in the storage dtype; the validated targets,
/// lse; gu f32) and its own f32 `dh` accumulator [tokens, d] (zeroed).
#[derive(Clone, Copy)]
struct XentRows {
    h: u64,
    p: u64,
    targets: u64,
    lse: u64,
    dh_acc: u64,
    gu: u64,
    tokens: usize,
}

/// How G is stored and scaled (`kernels/xent_grad.cu`): G' = G / factor ·
/// g_unit; the f32 sums over it get `g_scale` = factor / g_unit; `filter` > 0
/// zeroes the 128 × 128 tiles whose |G| entries are all below it.
#[derive(Clone, Copy)]
struct XentGradScale {
    g_unit: f32,
    g_scale: f32,
    filter: f32,
}

/// The fused kernels' part of one token block: per vocabulary chunk of
/// `chunk` columns, one kernel recomputes the logits and writes G [tb, C]
/// (and its tile flags with a filter); the head backward's GEMMs consume it
/// while it is in L2 (`dh_acc += G W`, `gu += G U`, `dU += Gᵀ p`, `dW += Gᵀ h`;
/// on the GEMM engine with `KernelOptions::cublas`, which a filter keeps on
/// this path; `u_eng` is then U in the storage dtype, [`engine_u`]).
/// `bufs`: G [rows, chunk], the flags, the dU split partials.
#[allow(clippy::too_many_arguments)]
fn fused_xent_block<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    b: XentRows,
    s: XentGradScale,
    grads: GradAddrs,
    u_eng: u64,
    chunk: usize,
    (g, live, du_part): (u64, u64, u64),
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let logits_wgmma = e.options().wgmma && t != DType::F32;
    let logits_mma = e.options().mma && t != DType::F32;
    let shared_bytes = if logits_wgmma {
        wg_shared_bytes(128, 3)
    } else {
        gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, if logits_mma { 3 } else { 1 })
    };
    let tokens = b.tokens;
    for col0 in (0..v).step_by(chunk) {
        let cols = chunk.min(v - col0);
        let params = XentGradLogitsParams {
            h: b.h,
            p: b.p,
            w: wt.w,
            u: wt.u,
            targets: b.targets,
            lse: b.lse,
            g,
            live,
            tokens: i32_of("tokens", tokens)?,
            vocab: i32_of("vocab", v)?,
            hidden: i32_of("hidden", d)?,
            rank: i32_of("rank", r)?,
            col0: col0 as i32,
            cols: cols as i32,
            softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
            g_unit: s.g_unit,
            filter: s.filter,
            _pad: 0,
        };
        let plan = LaunchPlan {
            kernel: if logits_wgmma {
                by_dtype!(t, "tl_xent_grad_logits_", "_wgmma")
            } else if logits_mma {
                by_dtype!(t, "tl_xent_grad_logits_", "_mma")
            } else {
                by_dtype!(t, "tl_xent_grad_logits_", "")
            },
            grid: (blocks(tokens, GEMM_TILE), blocks(cols, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes,
        };
        // SAFETY: the block's h [tb, d], p [tb, r], targets and lse [tb] rows;
        // W [V, d], U [V, r] (caller); g [rows, chunk] >= [tb, cols] and live
        // [row tiles, chunk / 128] >= the grid (the caller's allocations).
        unsafe { e.launch(&plan, &params)? };
        // The tile flags (row length = this chunk's column tiles) let the
        // consumers skip filtered tiles; without a filter every tile is live.
        let flags = (s.filter > 0.0).then(|| (live, cols.div_ceil(GEMM_TILE as usize)));
        let (w_rows, u_rows) = (wt.w + (col0 * d * t.size()) as u64, wt.u + (col0 * r * 4) as u64);
        let du = grads.u + (col0 * r * 4) as u64;
        if e.options().cublas {
            // Filtered tiles of G hold zeros, so the engine's sums equal the skipping kernels'.
            let op = EngineGrads {
                g,
                w: w_rows,
                u: at(u_eng, col0 * r, t.size()),
                h: b.h,
                p: b.p,
                dh_acc: b.dh_acc,
                gu: b.gu,
                du,
                dw: grads.w.map(|dw| dw + (col0 * d * 4) as u64),
                rows: cols,
                beta: 1.0,
                scale: s.g_scale,
            };
            engine_grads(e, cfg, t, op, tokens)?;
            continue;
        }
        let op = GradH {
            g,
            w: w_rows,
            u: u_rows,
            vh: wt.vh,
            dh: b.dh_acc,
            gu: b.gu,
            rows: cols,
            accumulate: true,
            live: flags,
        };
        grad_h(e, cfg, t, t, op, tokens)?;
        // dU += Gᵀ p: few vocabulary tiles per chunk, so split the token
        // range for parallelism; the partials are summed in order.
        let k_split = xent_du_split(tokens, cols, e.multiprocessors());
        let du_op =
            |grad, k_split| GradParam { g, b: b.p, grad, rows: cols, ncols: r, live: flags, k_split, scale: s.g_scale };
        if k_split < tokens {
            grad_param(e, t, t, du_op(du_part, k_split), tokens)?;
            let reduce = LoraUpReduceParams {
                partial: du_part,
                out: du,
                chunks: tokens.div_ceil(k_split) as i32,
                count: i32_of("vocabulary columns * rank", cols * r)?,
                scale: 1.0,
                _pad: 0,
            };
            let plan = LaunchPlan::linear("tl_lora_up_reduce", blocks(cols * r, THREADS), THREADS);
            // SAFETY: du_part holds the [splits, cols, r] partials written
            // above; du is the caller's dU rows [col0, col0 + cols).
            unsafe { e.launch(&plan, &reduce)? };
        } else {
            grad_param(e, t, t, du_op(du, 0), tokens)?;
        }
        if let Some(dw) = grads.w {
            let dw_op = GradParam {
                g,
                b: b.h,
                grad: dw + (col0 * d * 4) as u64,
                rows: cols,
                ncols: d,
                live: flags,
                k_split: 0,
                scale: s.g_scale,
            };
            grad_param(e, t, t, dw_op, tokens)?;
        }
    }
    Ok(())
}

/// The GEMM-engine part of one token block (`KernelOptions::cublas`, no
/// gradient filter): per vocabulary chunk of `cols_b` columns the f32 logits
/// on the engine, G' from them (`tl_xent_chunk_grad_*`, as the fused logit
/// kernels store it), then the engine's `dh_acc += G W`, `gu += G U`,
/// `dU += Gᵀ p`, `dW += Gᵀ h` on it. `bufs`: f32 logits and G, each
/// [rows, cols_b]; `u`: U in the storage dtype ([`engine_u`]).
#[allow(clippy::too_many_arguments)]
fn engine_xent_block_grads<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    u: u64,
    b: XentRows,
    s: XentGradScale,
    grads: GradAddrs,
    cols_b: usize,
    (z, g): (u64, u64),
) -> Result<()> {
    let (v, d, r, es) = (cfg.vocab(), cfg.hidden(), cfg.rank(), t.size());
    for col0 in (0..v).step_by(cols_b) {
        let cols = cols_b.min(v - col0);
        let (w_c, u_c) = (at(wt.w, col0 * d, es), at(u, col0 * r, es));
        engine_logits(e, cfg, t, (b.h, b.p), (w_c, u_c), z, b.tokens, cols)?;
        let grad = XentChunkGradParams {
            z,
            targets: b.targets,
            lse: b.lse,
            g,
            tokens: b.tokens as i32,
            cols: cols as i32,
            col0: col0 as i32,
            softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
            g_unit: s.g_unit,
            _pad: 0,
        };
        let plan = row_plan(by_dtype!(t, "tl_xent_chunk_grad_", ""), b.tokens, cols);
        // SAFETY: z [tb, cols] written above; the block's targets and lse
        // rows [tb]; g [rows, cols_b] >= [tb, cols] (the caller's allocation).
        unsafe { e.launch(&plan, &grad)? };
        let op = EngineGrads {
            g,
            w: w_c,
            u: u_c,
            h: b.h,
            p: b.p,
            dh_acc: b.dh_acc,
            gu: b.gu,
            du: at(grads.u, col0 * r, 4),
            dw: grads.w.map(|dw| at(dw, col0 * d, 4)),
            rows: cols,
            beta: 1.0,
            scale: s.g_scale,
        };
        engine_grads(e, cfg, t, op, b.tokens)?;
    }
    Ok(())
}

/// Fused head + cross-entropy backward, no [T, V] buffer, bitwise
/// deterministic. Per block of token rows ([`xent_backward_block`], or
/// the GEMM engine's block), a zeroed f32 `dh` accumulator of just those rows,
/// then per vocabulary chunk: the chunk's logits recomputed, G = ∂loss/∂z,
/// and the head backward's GEMMs on it while it is in L2 (`dh += G W`,
/// `gu += G U`, `dU += Gᵀ p`, `dW += Gᵀ h`); the block's `dh` rows get their
/// LoRA term `s·gu·Vh` before the next block. Finally `dVh += s·guᵀ h`. The
/// logits are computed once, as in the forward; no scratch grows with T·d.
#[allow(clippy::too_many_arguments)]
pub fn head_xent_backward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    h: u64,
    targets: u64,
    kind: IdKind,
    lse: u64,
    grad_loss: f32,
    dh: u64,
    grads: GradAddrs,
    tokens: usize,
) -> Result<()> {
    let (v, d, r, es) = (cfg.vocab(), cfg.hidden(), cfg.rank(), t.size());
    grad_h_rx(r)?;
    let (t32, valid) = prepare_ids(e, "targets", targets, kind, tokens, v, Some(cfg.ignore_index()))?;
    // G is stored without the loss factor and times g_unit (xent_grad.cu):
    // in f16, G itself (~1 / (V N)) would be subnormal or 0. The f32 sums
    // over it get factor / g_unit once, at the end.
    let g_unit = if t == DType::F16 { XENT_F16_G_UNIT } else { 1.0 };
    let g_scale_f64 = grad_loss as f64 * cfg.loss_scale(valid) / g_unit;
    let filter = cfg.xent_grad_filter().unwrap_or(0.0) as f32;
    let s = XentGradScale { g_unit: g_unit as f32, g_scale: g_scale_f64 as f32, filter };
    let p = e.scratch_uninit(tokens * r * es)?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let gu = e.scratch(tokens * r * 4)?;
    let engine = e.options().cublas && filter == 0.0;
    let chunk_bytes = e.options().xent_chunk_bytes;
    let (rows_b, cols_b) = if engine {
        engine_xent_block(cfg, t, tokens, chunk_bytes)
    } else {
        xent_backward_block(cfg, t, tokens, chunk_bytes)
    };
    // Scratch of one block, reused by every block: the engine's f32 logits,
    // G and U in the storage dtype; the fused kernels' G, tile flags and dU
    // split partials.
    // U as the GEMM engine's operand (storage dtype), packed once per call.
    let (_packed_u, u_eng) = if e.options().cublas { engine_u(e, t, wt.u, v, r)? } else { (None, wt.u) };
    let (buf_a, buf_b, buf_c) = if engine {
        let z = e.scratch_uninit(rows_b * cols_b * 4)?;
        let g = e.scratch_uninit(rows_b * cols_b * es)?;
        (z, g, None)
    } else {
        // Written before they are read: every G entry and tile flag by the
        // logits kernel (filtered tiles as 0), every partial by its split.
        let g = e.scratch_uninit(rows_b * cols_b * es)?;
        let live = e.scratch_uninit(rows_b.div_ceil(GEMM_TILE as usize) * (cols_b / GEMM_TILE as usize) * 4)?;
        let du_part = e.scratch_uninit(xent_du_partial_bytes(cfg, tokens, rows_b, e.multiprocessors(), cols_b))?;
        (g, live, Some(du_part))
    };
    // Token blocks outside: a block's h rows and f32 dh rows stay in L2
    // while the vocabulary chunks stream past.
    for t0 in (0..tokens).step_by(rows_b.max(1)) {
        let tb = rows_b.min(tokens - t0);
        let dh_acc = e.scratch(tb * d * 4)?;
        let b = XentRows {
            h: at(h, t0 * d, es),
            p: at(e.addr(&p), t0 * r, es),
            targets: at(e.addr(&t32), t0, 4),
            lse: at(lse, t0, 4),
            dh_acc: e.addr(&dh_acc),
            gu: at(e.addr(&gu), t0 * r, 4),
            tokens: tb,
        };
        if valid > 0 {
            if engine {
                let bufs = (e.addr(&buf_a), e.addr(&buf_b));
                engine_xent_block_grads(e, cfg, t, wt, u_eng, b, s, grads, cols_b, bufs)?;
            } else {
                let du_part = buf_c.as_ref().map_or(0, |x| e.addr(x));
                let bufs = (e.addr(&buf_a), e.addr(&buf_b), du_part);
                fused_xent_block(e, cfg, t, wt, b, s, grads, u_eng, cols_b, bufs)?;
            }
        }
        grad_finish(e, cfg, t, b.dh_acc, b.gu, wt.vh, at(dh, t0 * d, es), tb, s.g_scale)?;
    }
    if valid > 0 {
        lora_up(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale() * g_scale_f64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public memory formulas and block shapes answer (no panic, no
    /// division by zero) for any token count, multiprocessor count and
    /// option set, and the token blocks stay within the chunk bytes.
    #[test]
    fn memory_formulas_take_any_input() {
        let cfg = LoraConfig::builder(1000, 64, 8).xent_grad_filter(1e-3).build().unwrap();
        let exact = LoraConfig::builder(1000, 64, 8).build().unwrap();
        for tokens in [0, 1, 127, 129, 100_000] {
            for sms in [0, 1, 132] {
                for bits in 0..16u32 {
                    let opts = KernelOptions {
                        cublas: bits & 1 != 0,
                        wgmma: bits & 2 != 0,
                        wgmma_whole_atoms: bits & 4 != 0,
                        xent_chunk_bytes: if bits & 8 != 0 { 1 } else { 0 },
                        ..KernelOptions::default()
                    };
                    for c in [&cfg, &exact] {
                        for t in [DType::F32, DType::F16, DType::BF16] {
                            assert!(head_xent_forward_scratch_bytes(c, t, tokens, sms, &opts) >= 16);
                            assert!(head_xent_backward_scratch_bytes(c, t, tokens, sms, &opts) >= 16);
                            let (rows, cols) = xent_backward_block(c, t, tokens, opts.xent_chunk_bytes);
                            assert!(rows >= 1 && cols % 128 == 0 && cols >= 128, "{rows} x {cols}");
                            let budget = chunk_budget(opts.xent_chunk_bytes);
                            if tokens > rows {
                                assert!(rows % 128 == 0 && (rows == 128 || rows * 64 * 4 <= budget));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The GEMM-engine backward's blocks: multiples of 128 (or all tokens),
    /// within the byte budget whenever the 128 × 128 minimum allows, and the
    /// √(5B) split at the Gemma-2-2B shape.
    #[test]
    fn engine_xent_blocks_fit_the_budget() {
        let gemma = LoraConfig::builder(256_000, 2304, 16).build().unwrap();
        assert_eq!(engine_xent_block(&gemma, DType::BF16, 8192, 0), (1024, 5248));
        for (v, tokens, bytes) in [(256_000, 8192, 0), (300, 150, 1), (1000, 40, 0), (50_000, 3000, 8 << 20)] {
            let cfg = LoraConfig::builder(v, 64, 8).build().unwrap();
            for t in [DType::F32, DType::BF16] {
                let (rows, cols) = engine_xent_block(&cfg, t, tokens, bytes);
                assert!(rows == tokens || (rows % 128 == 0 && rows < tokens), "rows {rows} of {tokens}");
                assert!(cols % 128 == 0 && cols <= v.div_ceil(128) * 128, "cols {cols} of {v}");
                let budget = chunk_budget(bytes);
                let used = rows.min(tokens) * cols * (4 + t.size());
                assert!(used <= budget.max(128 * 128 * (4 + t.size())), "{rows} x {cols} over {budget} B");
            }
        }
        // Few tokens: one block of all of them, as many columns as fit.
        let cfg = LoraConfig::builder(1000, 64, 8).build().unwrap();
        assert_eq!(engine_xent_block(&cfg, DType::BF16, 40, 0), (40, 1024));
    }
}
