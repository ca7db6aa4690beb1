//! The fused head + cross-entropy forward (`kernels/xent.cu`): loss and
//! per-token logsumexp with no [T, V] buffer.

use super::*;

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
