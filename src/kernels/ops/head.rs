//! The head ops over stored logits: `head_forward` (one K = d + r
//! reduction) and `head_backward`.

use super::*;

/// `logits[T, V] = [h | s·h·Vhᵀ] · [W | U]ᵀ`, one K = d + r reduction.
///
/// # Safety
/// `wt` holds W [V, d] (storage dtype `t`), U [V, r] and Vh [r, d] (f32),
/// `h` is [T, d] and `logits` [T, V] in `t`, all valid on the executor's
/// device until its launches finish, `logits` overlapping none of the others.
pub unsafe fn head_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    h: u64,
    logits: u64,
    tokens: usize,
) -> Result<()> {
    let (v, r) = (cfg.vocab(), cfg.rank());
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_project(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    #[cfg(feature = "experimental-kernels")]
    {
        if select::cublas(HeadOp::Forward, t, t, &e.options()) {
            return cublas::head_forward(e, cfg, t, wt, (h, e.addr(&p)), logits, tokens);
        }
    }
    let params = HeadForwardParams {
        h,
        p: e.addr(&p),
        w: wt.w,
        u: wt.u,
        out: logits,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", v)?,
        hidden: i32_of("hidden", cfg.hidden())?,
        rank: i32_of("rank", r)?,
    };
    let gemm = select::gemm(Site::HeadForward, t, t, &e.options());
    let es = t.size();
    // (block columns, shared memory) of each implementation (kernels/head.cu).
    let (bn, shared_bytes) = match gemm {
        Gemm::Tile => (128, gemm_shared_bytes(es, 128, 128, 32, false, true, 0, 1)),
        #[cfg(feature = "experimental-kernels")]
        Gemm::WideTile | Gemm::Mma { wide: true } => (256, gemm_shared_bytes(es, 128, 256, 32, false, true, 0, 3)),
        #[cfg(feature = "experimental-kernels")]
        Gemm::TileTwoBlocks => (128, gemm_shared_bytes(es, 128, 128, 32, false, true, 0, 1)),
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { wide: false } => (128, gemm_shared_bytes(es, 128, 128, 32, false, true, 0, 3)),
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { wide } => {
            if wide {
                (256, wg_shared_bytes(256, 4))
            } else {
                (128, wg_shared_bytes(128, 3))
            }
        }
    };
    let plan = LaunchPlan {
        kernel: select::head_forward_kernel(t, gemm)?,
        grid: (blocks(tokens, GEMM_TILE), blocks(v, bn), 1),
        block: (THREADS, 1, 1),
        shared_bytes,
    };
    // SAFETY: h [T, d], p [T, r], W [V, d], U [V, r], logits [T, V] (the
    // caller's contract, or allocated above).
    unsafe { e.launch(&plan, &params) }
}

/// Head backward: `dh = G W + s (G U) Vh`, `dU += Gᵀ (s h Vhᵀ)`, `dVh += s (G U)ᵀ h`, `dW += Gᵀ h`.
///
/// f16 / bf16 (not on the cuBLAS path): the tensor-core operands U and
/// p = s·h·Vhᵀ are f32 values, and a sum that cancels (G·U over V, Gᵀ·p over
/// T) would amplify their rounding to the storage dtype by its condition
/// number. So G·U and Gᵀ·p get a second product with their low parts
/// ([`head_backward_split`]), and dh's LoRA term is formed from that gu: G·W
/// into a zeroed f32 accumulator [T, d], then `dh = acc + s·gu·Vh` with one
/// rounding, as in the fused cross-entropy backward.
///
/// # Safety
/// As [`head_forward`], with G [T, V] in `gt` at `g` instead of the logits,
/// `dh` [T, d] in `t` (written) and the f32 gradients of `grads` (dU [V, r],
/// dVh [r, d], dW [V, d], added into) valid and overlapping none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn head_backward<E: Executor>(
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
    let wide = r > select::MAX_HEAD_RANK;
    if wide || (t != DType::F32 && !select::cublas(HeadOp::Backward, t, gt, &e.options())) {
        return head_backward_split(e, cfg, (t, gt), wt, (h, g, dh), grads, tokens);
    }
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_project(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let gu = e.scratch_uninit(tokens * r * 4)?;
    #[cfg(feature = "experimental-kernels")]
    {
        if select::cublas(HeadOp::Backward, t, gt, &e.options()) {
            return cublas::head_backward(e, cfg, t, wt, (h, e.addr(&p), g), (dh, e.addr(&gu)), grads, tokens);
        }
    }
    let op = GradH { g, w: wt.w, u: wt.u, vh: wt.vh, dh, gu: e.addr(&gu), rows: v, accumulate: false, live: None };
    grad_h(e, cfg, t, gt, op, tokens)?;
    // dU += Gᵀ p, p = s·h·Vhᵀ already carries the scale.
    let du = GradParam { g, b: e.addr(&p), grad: grads.u, rows: v, ncols: r, live: None, k_split: 0, scale: 1.0 };
    grad_param(e, t, gt, du, tokens)?;
    // dVh += s · guᵀ h.
    lora_hidden_grad(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale())?;
    head_grad_w(e, t, gt, g, h, grads.w, (v, d), tokens)
}

/// [`head_backward`] in f16 / bf16 on the kernels, with U and p split in
/// two; and, in every dtype, at ranks above [`select::MAX_HEAD_RANK`].
///
/// The low parts go through second launches of the unchanged GEMM kernels:
/// one column of grad_h blocks (1/⌈d/128⌉ of grad_h) and a second dU pass
/// (one more read of G), plus O(V·r + T·d) of packing and f32 accumulator
/// traffic. The alternatives cost more: U_lo as more extra columns of every
/// grad_h block is that many more MMA columns in all of them; a gu-only
/// column of blocks inside the same kernel, whose operands then differ per
/// block, took ptxas from 128 to 157 registers at 16 U columns, likewise
/// parking [p_hi | p_lo] for dU in one grad_param pass (80 -> 94 registers:
/// 3 -> 2 blocks per SM); an f32 FMA G·U beside the MMAs would take ~r/14 of
/// the tile's time by estimate (128 FMA against ~1200 tensor-core MAC per
/// clock and SM), more than the tile at r = 16.
///
/// Above rank 64, U's columns no longer fit beside W's in a grad_h tile
/// (their f32 tile would outgrow shared memory and the registers): G·W and
/// G·U are then two GEMMs of the same kernels ([`grad_h_wide_rank`]), G read
/// twice.
///
/// # Safety
/// As [`head_backward`].
unsafe fn head_backward_split<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    (t, gt): (DType, DType),
    wt: WeightAddrs,
    (h, g, dh): (u64, u64, u64),
    grads: GradAddrs,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let half = t != DType::F32;
    let (dh_acc, gu) = (e.scratch(tokens * d * 4)?, e.scratch(tokens * r * 4)?);
    // U = hi + 2⁻ˢʰⁱᶠᵗ·lo in the storage dtype (f16 / bf16).
    let u_parts = if half { Some(pack_parts(e, t, wt.u, v, r)?) } else { None };
    let op = GradH {
        g,
        w: wt.w,
        u: wt.u,
        vh: wt.vh,
        dh: e.addr(&dh_acc),
        gu: e.addr(&gu),
        rows: v,
        accumulate: true,
        live: None,
    };
    if r > select::MAX_HEAD_RANK {
        let u = u_parts.as_ref().map_or(wt.u, |(hi, _)| e.addr(hi));
        grad_h_wide_rank(e, cfg, (t, gt), GradH { u, ..op }, tokens)?;
    } else {
        grad_h(e, cfg, t, gt, op, tokens)?;
    }
    if let Some((_, u_lo)) = &u_parts {
        // gu += 2⁻ˢʰⁱᶠᵗ·G·U_lo: gu now holds G·U with U to ~2⁻²² (f16) /
        // 2⁻¹⁶ (bf16), so a G·U sum that cancels keeps its precision.
        grad_plain(e, (t, gt), (g, e.addr(u_lo), e.addr(&gu)), (v, r), tokens, None, lo_unit(t) as f32)?;
    }
    grad_finish(e, cfg, t, e.addr(&dh_acc), e.addr(&gu), wt.vh, dh, tokens, 1.0)?;
    // dU += Gᵀ p (f32), in f16 / bf16 as Gᵀ p_hi + 2⁻ˢʰⁱᶠᵗ·Gᵀ p_lo; p = s·h·Vhᵀ.
    let p = e.scratch_uninit(tokens * r * 4)?;
    lora_project(e, cfg, t, DType::F32, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let p_parts = if half { Some(pack_parts(e, t, e.addr(&p), tokens, r)?) } else { None };
    let operands = match &p_parts {
        Some((p_hi, p_lo)) => vec![(e.addr(p_hi), 1.0), (e.addr(p_lo), lo_unit(t) as f32)],
        None => vec![(e.addr(&p), 1.0)],
    };
    for (b, scale) in operands {
        let du = GradParam { g, b, grad: grads.u, rows: v, ncols: r, live: None, k_split: 0, scale };
        grad_param(e, t, gt, du, tokens)?;
    }
    // dVh += s · guᵀ h.
    lora_hidden_grad(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale())?;
    head_grad_w(e, t, gt, g, h, grads.w, (v, d), tokens)
}

/// `dW += Gᵀ h` when `dw` is given (full tied fine-tune).
///
/// # Safety
/// As [`head_backward`].
#[allow(clippy::too_many_arguments)]
unsafe fn head_grad_w<E: Executor>(
    e: &E,
    t: DType,
    gt: DType,
    g: u64,
    h: u64,
    dw: Option<u64>,
    (v, d): (usize, usize),
    tokens: usize,
) -> Result<()> {
    match dw {
        Some(grad) => {
            let op = GradParam { g, b: h, grad, rows: v, ncols: d, live: None, k_split: 0, scale: 1.0 };
            grad_param(e, t, gt, op, tokens)
        }
        None => Ok(()),
    }
}
