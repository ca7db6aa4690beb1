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
    select::grad_h_u_cols(r, Gemm::Tile, &e.options())?;
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
    if let Some(dw) = grads.w {
        let dw = GradParam { g, b: h, grad: dw, rows: v, ncols: d, live: None, k_split: 0, scale: 1.0 };
        grad_param(e, t, gt, dw, tokens)?;
    }
    Ok(())
}
