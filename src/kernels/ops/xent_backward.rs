//! The fused head + cross-entropy backward (`kernels/xent_grad.cu`): the
//! tied-LoRA gradients per token block, no [T, V] buffer.

use super::*;

/// The f16 cross-entropy backward stores G' = (softmax − onehot)·slope·2¹⁵
/// (`kernels/xent_grad.cu`): |G'| ≤ 2¹⁵ < 65504, and probabilities down to
/// 2⁻²⁹ stay normal f16 numbers (G itself is subnormal or 0 in f16 at large V·T).
const XENT_F16_G_UNIT: f64 = 32768.0;

/// One token block of the fused cross-entropy backward: the block's rows of
/// every per-token operand (h, p in the storage dtype; the validated targets,
/// lse; gu f32) and its own f32 `dh` accumulator [tokens, d] (zeroed).
#[derive(Clone, Copy)]
pub(super) struct XentRows {
    pub(super) h: u64,
    pub(super) p: u64,
    pub(super) targets: u64,
    pub(super) lse: u64,
    pub(super) dh_acc: u64,
    pub(super) gu: u64,
    pub(super) tokens: usize,
}

/// How G is stored and scaled (`kernels/xent_grad.cu`): G' = G / factor ·
/// g_unit; the f32 sums over it get `g_scale` = factor / g_unit; `filter` > 0
/// zeroes the 128 × 128 tiles whose |G| entries are all below it.
#[derive(Clone, Copy)]
pub(super) struct XentGradScale {
    pub(super) g_unit: f32,
    pub(super) g_scale: f32,
    pub(super) filter: f32,
}

/// The fused kernels' part of one token block: per vocabulary chunk of
/// `chunk` columns, one kernel recomputes the logits and writes G [tb, C]
/// (and its tile flags with a filter); the head backward's GEMMs consume it
/// while it is in L2 (`dh_acc += G W`, `gu += G U`, `dU += Gᵀ p`, `dW += Gᵀ h`;
/// on cuBLAS with `KernelOptions::cublas`, which a filter keeps on this
/// path; `u_cublas` is then U in the storage dtype). Above rank 64, `u_wide`
/// is U in the storage dtype for [`grad_h_wide_rank`].
/// `bufs`: G [rows, chunk], the flags, the dU split partials.
///
/// # Safety
/// As [`head_xent_backward`] for the block's rows `b`, with the buffers
/// `(g, live, du_part)` sized by the caller for [rows, chunk].
#[allow(clippy::too_many_arguments)]
unsafe fn fused_xent_block<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    b: XentRows,
    s: XentGradScale,
    grads: GradAddrs,
    (u_cublas, u_wide): (u64, u64),
    chunk: usize,
    (g, live, du_part): (u64, u64, u64),
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    #[cfg(not(feature = "experimental-kernels"))]
    let _ = u_cublas;
    let gemm = select::gemm(Site::XentLogits, t, t, &e.options());
    let (kernel, shared_bytes) = (select::xent_grad_logits_kernel(t, gemm)?, xent_logits_shared_bytes(t, gemm, false));
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
            kernel,
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
        #[cfg(feature = "experimental-kernels")]
        {
            if select::cublas(HeadOp::XentBackward, t, t, &e.options()) {
                // Filtered tiles of G hold zeros, so cuBLAS's sums equal the skipping kernels'.
                let op = cublas::CublasGrads {
                    g,
                    w: w_rows,
                    u: at(u_cublas, col0 * r, t.size()),
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
                cublas::cublas_grads(e, cfg, t, op, tokens)?;
                continue;
            }
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
        if r > select::MAX_HEAD_RANK {
            grad_h_wide_rank(e, cfg, (t, t), GradH { u: at(u_wide, col0 * r, t.size()), ..op }, tokens)?;
        } else {
            grad_h(e, cfg, t, t, op, tokens)?;
        }
        // dU += Gᵀ p: few vocabulary tiles per chunk, so split the token
        // range for parallelism; the partials are summed in order.
        let k_split = xent_du_split(tokens, cols, e.multiprocessors());
        let du_op =
            |grad, k_split| GradParam { g, b: b.p, grad, rows: cols, ncols: r, live: flags, k_split, scale: s.g_scale };
        if k_split < tokens {
            grad_param(e, t, t, du_op(du_part, k_split), tokens)?;
            let reduce = SumPartialsParams {
                partial: du_part,
                out: du,
                chunks: tokens.div_ceil(k_split) as i32,
                count: i32_of("vocabulary columns * rank", cols * r)?,
                scale: 1.0,
                _pad: 0,
            };
            let plan = LaunchPlan::linear(select::kernel("tl_sum_partials")?, blocks(cols * r, THREADS), THREADS);
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

/// Fused head + cross-entropy backward, no [T, V] buffer, bitwise
/// deterministic. Per block of token rows ([`xent_backward_block`], or
/// cuBLAS's block), a zeroed f32 `dh` accumulator of just those rows,
/// then per vocabulary chunk: the chunk's logits recomputed, G = ∂loss/∂z,
/// and the head backward's GEMMs on it while it is in L2 (`dh += G W`,
/// `gu += G U`, `dU += Gᵀ p`, `dW += Gᵀ h`); the block's `dh` rows get their
/// LoRA term `s·gu·Vh` before the next block. Finally `dVh += s·guᵀ h`. The
/// logits are computed once, as in the forward; no scratch grows with T·d.
///
/// # Safety
/// As [`super::head_xent_forward`], with `lse` [T] f32 (the forward's), `dh`
/// [T, d] in `t` (written) and the f32 gradients of `grads` (added into)
/// valid and overlapping none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn head_xent_backward<E: Executor>(
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
    let on_cublas = select::cublas(HeadOp::XentBackward, t, t, &e.options());
    let wide = r > select::MAX_HEAD_RANK;
    if wide && on_cublas {
        return Err(Error::UnsupportedCombination(format!(
            "rank {r}: the cuBLAS path's cross-entropy backward supports rank <= {}",
            select::MAX_HEAD_RANK
        )));
    }
    let (t32, valid) = prepare_ids(e, "targets", targets, kind, tokens, v, Some(cfg.ignore_index()))?;
    // G is stored without the loss factor and times g_unit (xent_grad.cu):
    // in f16, G itself (~1 / (V N)) would be subnormal or 0. The f32 sums
    // over it get factor / g_unit once, at the end.
    let g_unit = if t == DType::F16 { XENT_F16_G_UNIT } else { 1.0 };
    let g_scale_f64 = grad_loss as f64 * cfg.loss_scale(valid) / g_unit;
    let filter = cfg.xent_grad_filter().unwrap_or(0.0) as f32;
    let s = XentGradScale { g_unit: g_unit as f32, g_scale: g_scale_f64 as f32, filter };
    let p = e.scratch_uninit(tokens * r * es)?;
    lora_project(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let gu = e.scratch(tokens * r * 4)?;
    // Above rank 64, U in the storage dtype as a GEMM operand, packed once.
    let packed_u = if wide && t != DType::F32 { Some(pack_u(e, t, wt.u, v, r, r)?) } else { None };
    let u_wide = packed_u.as_ref().map_or(wt.u, |x| e.addr(x));
    // With a gradient filter the fused logit kernels write G (and its tile
    // flags) and cuBLAS consumes it; without, cuBLAS computes the logits too.
    let cublas_blocks = on_cublas && filter == 0.0;
    let chunk_bytes = e.options().xent_chunk_bytes;
    let (rows_b, cols_b) = backward_block_shape(cfg, t, tokens, chunk_bytes, cublas_blocks);
    // U as a cuBLAS operand (storage dtype), packed once per call.
    #[cfg(feature = "experimental-kernels")]
    let (_packed_u, u_cublas) = if on_cublas { cublas::cublas_u(e, t, wt.u, v, r)? } else { (None, wt.u) };
    #[cfg(not(feature = "experimental-kernels"))]
    let u_cublas = wt.u;
    // Scratch of one block, reused by every block: cuBLAS's f32 logits and
    // G; the fused kernels' G, tile flags and dU split partials.
    let (buf_a, buf_b, buf_c) = if cublas_blocks {
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
            if cublas_blocks {
                #[cfg(feature = "experimental-kernels")]
                cublas::xent_block_grads(
                    e,
                    cfg,
                    t,
                    wt,
                    u_cublas,
                    b,
                    s,
                    grads,
                    cols_b,
                    (e.addr(&buf_a), e.addr(&buf_b)),
                )?;
            } else {
                let du_part = buf_c.as_ref().map_or(0, |x| e.addr(x));
                let bufs = (e.addr(&buf_a), e.addr(&buf_b), du_part);
                fused_xent_block(e, cfg, t, wt, b, s, grads, (u_cublas, u_wide), cols_b, bufs)?;
            }
        }
        grad_finish(e, cfg, t, b.dh_acc, b.gu, wt.vh, at(dh, t0 * d, es), tb, s.g_scale)?;
    }
    if valid > 0 {
        lora_hidden_grad(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale() * g_scale_f64)?;
    }
    Ok(())
}
