//! The head backward's GEMM launches (`kernels/head.cu`), shared by
//! `head_backward` and the fused cross-entropy backward: dh and G·U
//! (`grad_h`), dU / dW (`grad_param`), and dh's LoRA term (`grad_finish`).

use super::*;

/// The rank's extra-column count of the grad_h kernels (16, 32 or 64).
pub(super) fn grad_h_rx(r: usize) -> Result<usize> {
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
pub(super) struct GradH {
    pub(super) g: u64,
    pub(super) w: u64,
    pub(super) u: u64,
    pub(super) vh: u64,
    /// `dh` [T, d]: storage dtype, or the f32 accumulator with `accumulate`.
    pub(super) dh: u64,
    pub(super) gu: u64,
    pub(super) rows: usize,
    pub(super) accumulate: bool,
    /// Tile flags of G (`kernels/params.h`) and their row length, if filtered.
    pub(super) live: Option<(u64, usize)>,
}

/// `dh = G W + s (G U) Vh` and `gu = G U` (or, accumulating, f32 `dh += G W`, `gu += G U`).
pub(super) fn grad_h<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    gt: DType,
    op: GradH,
    tokens: usize,
) -> Result<()> {
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
pub(super) struct GradParam {
    pub(super) g: u64,
    pub(super) b: u64,
    pub(super) grad: u64,
    pub(super) rows: usize,
    pub(super) ncols: usize,
    /// Tile flags of G as in [`GradH`], if filtered.
    pub(super) live: Option<(u64, usize)>,
    /// 0, or tokens per split (a multiple of 128): the token range is split
    /// over grid.z and each split WRITES its partial sums to
    /// `grad + z·rows·ncols` (the caller sums them in order).
    pub(super) k_split: usize,
    pub(super) scale: f32,
}

/// One grad_param launch (`dU += Gᵀ p`, `dW += Gᵀ h`), see [`GradParam`].
pub(super) fn grad_param<E: Executor>(e: &E, t: DType, gt: DType, op: GradParam, tokens: usize) -> Result<()> {
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

/// `dh = g_scale · (dh_acc + s · gu · Vh)` in the storage dtype.
#[allow(clippy::too_many_arguments)]
pub(super) fn grad_finish<E: Executor>(
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
