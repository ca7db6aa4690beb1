//! The fused head + cross-entropy forward (`kernels/xent.cu`): loss and
//! per-token logsumexp with no [T, V] buffer.

use super::*;

/// Fused head + cross-entropy forward, no [T, V] buffer: `loss` \[1\] and `lse`
/// \[T\] of the softcapped logits, from per-(token tile, vocabulary split)
/// online logsumexp partials merged in a fixed order.
///
/// # Safety
/// `wt` holds W [V, d] (storage dtype `t`), U [V, r] and Vh [r, d] (f32),
/// `h` is [T, d] in `t`, `targets` [T] ids of `kind`, `loss` [1] and `lse`
/// [T] f32, all valid on the executor's device until its launches finish,
/// the outputs overlapping none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn head_xent_forward<E: Executor>(
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
    lora_project(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let on_cublas = select::cublas(HeadOp::XentForward, t, t, &e.options());
    let (split_cols, splits) = if on_cublas {
        // One running (max, sum) pair per row across cuBLAS's chunks.
        (chunk_cols(cfg, tokens.max(1) * 4, e.options().xent_chunk_bytes), 1)
    } else {
        xent_splits(cfg, tokens, e.multiprocessors())
    };
    let part_max = e.scratch(splits * tokens * 4)?;
    let part_sum = e.scratch(splits * tokens * 4)?;
    let target_logit = e.scratch(tokens * 4)?;
    let row_loss = e.scratch(tokens * 4)?;
    let partials = (e.addr(&part_max), e.addr(&part_sum), e.addr(&target_logit));
    if on_cublas {
        #[cfg(feature = "experimental-kernels")]
        cublas::xent_forward_chunks(e, cfg, t, wt, (h, e.addr(&p)), e.addr(&t32), partials, tokens, split_cols)?;
    } else {
        let tiles_m = tokens.div_ceil(GEMM_TILE as usize);
        let params = XentPartialParams {
            h,
            p: e.addr(&p),
            w: wt.w,
            u: wt.u,
            targets: e.addr(&t32),
            part_max: partials.0,
            part_sum: partials.1,
            target_logit: partials.2,
            tokens: i32_of("tokens", tokens)?,
            vocab: i32_of("vocab", v)?,
            hidden: i32_of("hidden", d)?,
            rank: i32_of("rank", r)?,
            split_cols: i32_of("vocabulary split", split_cols)?,
            softcap: cfg.logit_softcap().unwrap_or(0.0) as f32,
        };
        let gemm = select::gemm(Site::XentLogits, t, t, &e.options());
        let plan = LaunchPlan {
            kernel: select::xent_partial_kernel(t, gemm)?,
            grid: (tiles_m as u32, splits as u32, 1),
            block: (THREADS, 1, 1),
            shared_bytes: xent_logits_shared_bytes(t, gemm, true),
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
    let plan = LaunchPlan::linear(select::kernel("tl_xent_combine")?, 1, THREADS);
    // SAFETY: the buffers above, lse [T] and loss [1] f32 (caller).
    unsafe { e.launch(&plan, &combine) }
}

/// Dynamic shared memory of a fused cross-entropy logit kernel
/// (`kernels/xent.cu`, `kernels/xent_grad.cu`): the GEMM tile, and in the
/// forward (`partials`) the 128 × 129 f32 logit tile beside it (the `_mma`
/// kernels park it over the drained ring, the `_wgmma` ones keep it in
/// registers).
pub(super) fn xent_logits_shared_bytes(t: DType, gemm: Gemm, partials: bool) -> u32 {
    let z_tile = if partials { (128 * 129 * 4) as u32 } else { 0 };
    match gemm {
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { .. } => wg_shared_bytes(128, 3),
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { .. } => gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 3).max(z_tile),
        _ => gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 1) + z_tile,
    }
}
