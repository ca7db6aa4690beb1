//! The cuBLAS path of the head ops (`KernelOptions::cublas`, feature
//! `experimental-kernels`): plain GEMMs through [`Executor::gemm`] on
//! operands in the storage dtype, with small kernels for what cuBLAS lacks
//! (operand packing, the cross-entropy's chunk epilogues).

use super::xent_backward::{XentGradScale, XentRows};
use super::*;

/// `head_forward` on cuBLAS: one K = d + r GEMM per vocabulary chunk,
/// `[h | p] · [W_c | U_c]ᵀ`, rounded once straight into the logits; the
/// operands are concatenated in scratch (`[T, d + r]` once, `[C, d + r]` per
/// chunk).
///
/// # Safety
/// As [`super::head_forward`], with `p` = s·h·Vhᵀ [T, r] in `t`.
pub(super) unsafe fn head_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    (h, p): (u64, u64),
    logits: u64,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let (k, es) = (d + r, t.size());
    let hp = e.scratch_uninit(tokens * k * es)?;
    concat_rows(e, t, (h, p, false), e.addr(&hp), tokens, d, r)?;
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
    Ok(())
}

/// `head_backward` on cuBLAS (G in the storage dtype): `G·W` and `G·U` into
/// f32, then dh's LoRA term and one rounding, `dU += Gᵀ·p`, `dW += Gᵀ·h`,
/// and `dVh += s·guᵀ·h`.
///
/// # Safety
/// As [`super::head_backward`], with `p` [T, r] in `t` and `gu` [T, r] f32 scratch.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn head_backward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    (h, p, g): (u64, u64, u64),
    (dh, gu): (u64, u64),
    grads: GradAddrs,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let dh_acc = e.scratch_uninit(tokens * d * 4)?;
    let (_packed, u) = cublas_u(e, t, wt.u, v, r)?;
    let op = CublasGrads {
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
    cublas_grads(e, cfg, t, op, tokens)?;
    grad_finish(e, cfg, t, e.addr(&dh_acc), gu, wt.vh, dh, tokens, 1.0)?;
    lora_hidden_grad(e, cfg, t, gu, 0, h, grads.vh, tokens, cfg.scale())
}

/// U [rows, r] as a cuBLAS operand, in the storage dtype `t`, row
/// length r (the tensor cores round U to it in the fused kernels too): U
/// itself for f32, else a packed copy, kept alive by the returned scratch.
///
/// # Safety
/// `u` holds U's `rows` × `r` f32 values until the executor's launches finish.
pub(super) unsafe fn cublas_u<E: Executor>(
    e: &E,
    t: DType,
    u: u64,
    rows: usize,
    r: usize,
) -> Result<(Option<E::Scratch>, u64)> {
    if t == DType::F32 {
        return Ok((None, u));
    }
    let packed = pack_u(e, t, u, rows, r, r)?;
    let addr = e.addr(&packed);
    Ok((Some(packed), addr))
}

/// `z[rows, cols] = h · W_cᵀ + p · U_cᵀ` (f32, row length `cols`) on
/// cuBLAS: the logits of `rows` tokens (h, p from their first row) for the
/// vocabulary rows W_c, U_c (U in the storage dtype, [`cublas_u`]).
///
/// # Safety
/// h [rows, d], p [rows, r], W_c [cols, d], U_c [cols, r] in `t` and z
/// [rows, cols] f32 valid until the executor's launches finish.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn cublas_logits<E: Executor>(
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
/// (row length `rows`), run on the executor's cuBLAS
/// (`KernelOptions::cublas`), see [`cublas_grads`].
pub(super) struct CublasGrads {
    pub(super) g: u64,
    /// W rows and U rows ([`cublas_u`]: in the storage dtype, row length r)
    /// of the slice's vocabulary rows.
    pub(super) w: u64,
    pub(super) u: u64,
    pub(super) h: u64,
    /// p = s·h·Vhᵀ [T, r], storage dtype.
    pub(super) p: u64,
    /// f32 [T, d] and [T, r].
    pub(super) dh_acc: u64,
    pub(super) gu: u64,
    /// The slice's rows of dU [rows, r] and dW [rows, d] (f32, added into).
    pub(super) du: u64,
    pub(super) dw: Option<u64>,
    pub(super) rows: usize,
    /// 0: `dh_acc`, `gu` are written (not read); 1: added into.
    pub(super) beta: f32,
    /// Scale of the dU / dW products.
    pub(super) scale: f32,
}

/// `dh_acc (+)= G W`, `gu (+)= G U`, `dU += scale·Gᵀ p`, `dW += scale·Gᵀ h` on
/// cuBLAS.
///
/// # Safety
/// Every address of `op` holds the matrix its field documents, valid until
/// the executor's launches finish; the outputs overlap none of the inputs.
pub(super) unsafe fn cublas_grads<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    op: CublasGrads,
    tokens: usize,
) -> Result<()> {
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

/// The fused cross-entropy forward's partials on cuBLAS: per vocabulary
/// chunk of `split_cols` columns, f32 logits (in L2), then their logsumexp
/// folded into the rows' running (max, sum) pairs in order
/// (`tl_xent_chunk_partial`).
///
/// # Safety
/// As [`super::head_xent_forward`], with `p` [T, r] in `t`, validated
/// `targets` [T] i32 and the partials (max, sum, target logit) [T] f32 each.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn xent_forward_chunks<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    (h, p): (u64, u64),
    targets: u64,
    (part_max, part_sum, target_logit): (u64, u64, u64),
    tokens: usize,
    split_cols: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let z = e.scratch_uninit(tokens * split_cols * 4)?;
    let (_packed, u) = cublas_u(e, t, wt.u, v, r)?;
    let kernel = select::kernel("tl_xent_chunk_partial")?;
    for (chunk, col0) in (0..v).step_by(split_cols).enumerate() {
        let cols = split_cols.min(v - col0);
        let rows = (wt.w + (col0 * d * t.size()) as u64, u + (col0 * r * t.size()) as u64);
        cublas_logits(e, cfg, t, (h, p), rows, e.addr(&z), tokens, cols)?;
        let partial = XentChunkPartialParams {
            z: e.addr(&z),
            targets,
            part_max,
            part_sum,
            target_logit,
            tokens: i32_of("tokens", tokens)?,
            cols: cols as i32,
            col0: col0 as i32,
            chunk: chunk as i32,
            softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
            _pad: 0,
        };
        // One warp per token row.
        let plan = LaunchPlan::linear(kernel, blocks(tokens, THREADS / 32), THREADS);
        // SAFETY: z [T, cols] written above; targets [T], the running pairs
        // [T] and target_logit [T] (the caller's contract).
        unsafe { e.launch(&plan, &partial)? };
    }
    Ok(())
}

/// The cuBLAS part of one token block of the fused cross-entropy backward
/// (`KernelOptions::cublas`, no
/// gradient filter): per vocabulary chunk of `cols_b` columns the f32 logits
/// on cuBLAS, G' from them (`tl_xent_chunk_grad_*`, as the fused logit
/// kernels store it), then cuBLAS's `dh_acc += G W`, `gu += G U`,
/// `dU += Gᵀ p`, `dW += Gᵀ h` on it. `bufs`: f32 logits and G, each
/// [rows, cols_b]; `u`: U in the storage dtype ([`cublas_u`]).
///
/// # Safety
/// As [`super::head_xent_backward`] for the block's rows `b`, with the
/// buffers `(z, g)` of at least [rows, cols_b] each.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn xent_block_grads<E: Executor>(
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
        cublas_logits(e, cfg, t, (b.h, b.p), (w_c, u_c), z, b.tokens, cols)?;
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
        let plan = row_plan(select::by_dtype("tl_xent_chunk_grad_", t, "")?, b.tokens, cols);
        // SAFETY: z [tb, cols] written above; the block's targets and lse
        // rows [tb]; g [rows, cols_b] >= [tb, cols] (the caller's allocation).
        unsafe { e.launch(&plan, &grad)? };
        let op = CublasGrads {
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
        cublas_grads(e, cfg, t, op, b.tokens)?;
    }
    Ok(())
}
