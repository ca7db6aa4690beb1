//! The embedding ops (`kernels/embed.cu`, `kernels/sort_ids.cu`): the fused
//! lookup and the deterministic backward over stably sorted ids.

use super::*;

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

/// `e[t] = c·(W[ids[t]] + s·U[ids[t]]·Vh)`. The kernel reads the caller's
/// ids and range-checks each before it indexes anything; by default a
/// validation launch first makes a bad id an `Err` before `out` is touched.
/// When the executor defers id errors the op is this one launch: bad rows
/// come out NaN and the kernel records the first bad id itself.
///
/// # Safety
/// `wt` holds W [V, d] (storage dtype `t`), U [V, r] and Vh [r, d] (f32), `ids`
/// [T] ids of `kind` and `out` [T, d] in `t`, all valid on the executor's
/// device until its launches finish, `out` overlapping none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn embed_forward<E: Executor>(
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
    let record = match e.deferred_id_record() {
        Some(record) => record,
        None => {
            check_ids(e, "ids", ids, kind, tokens, v)?;
            0
        }
    };
    let (kernel, nc, minb, waves) = embed_forward_kernel(t, r);
    let (bx, by) = EMBED_BLOCK;
    let gx = blocks(d.div_ceil(nc), bx);
    let want = (waves * e.multiprocessors() * minb).div_ceil(gx).max(1);
    let gy = blocks(tokens, by).min(65535).min(want).max(1);
    let params = EmbedForwardParams {
        ids,
        w: wt.w,
        u: wt.u,
        vh: wt.vh,
        out,
        record,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        embed_scale: cfg.embed_scale() as f32,
        id_bytes: kind.size() as i32,
        arg: DEFERRED_ARG_IDS,
    };
    let plan = LaunchPlan { kernel: select::kernel(kernel)?, grid: (gx, gy, 1), block: (bx, by, 1), shared_bytes: 0 };
    // SAFETY: ids [T] of `kind` (the kernel range-checks each before use), W
    // [V, d], U [V, r], Vh [r, d] and out [T, d] checked by the caller; the
    // record is 0 or the executor's ID_RECORD_LEN × i64.
    unsafe { e.launch(&plan, &params) }
}

/// Stable sort of token positions by id: returns (keys, perm), skipped ids last.
///
/// # Safety
/// `ids32` holds `tokens` validated i32 ids (< `vocab`, or negative to skip)
/// until the executor's launches finish.
pub unsafe fn sort_ids<E: Executor>(
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
            let plan = LaunchPlan::linear(select::kernel(kernel)?, grid as u32, SORT_THREADS);
            // SAFETY: keys/vals buffers of T ints, hist of nblocks * 2^RADIX_BITS ints, all
            // allocated here; ids32 is the validated [T] buffer.
            unsafe { e.launch(&plan, &params)? };
        }
        (k_in, v_in) = (k_out, v_out);
    }
    Ok((keys, perm))
}

/// `out[id] += scale · Σ_{t: ids[t] = id} x[t]` in a fixed order, `x` [T, ncols] of `xt`.
///
/// # Safety
/// `keys` / `perm` come from [`sort_ids`] over `tokens` ids, `x` is [T, ncols]
/// in `xt` and `out` [vocab, ncols] f32, valid until the launches finish.
#[allow(clippy::too_many_arguments)]
unsafe fn group_rows<E: Executor>(
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
    for kernel in [select::by_dtype("tl_group_rows_partial_", xt, "")?, select::kernel("tl_group_rows_combine")?] {
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
///
/// # Safety
/// As [`embed_forward`], with `d_embed` [T, d] in `gt` instead of `out`, and
/// the f32 gradients of `grads` (added into) valid and overlapping none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn embed_backward<E: Executor>(
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
    lora_project(e, cfg, gt, DType::F32, d_embed, wt.vh, e.addr(&gu), tokens, cs)?;
    let (keys, perm) = sort_ids(e, e.addr(&ids32), tokens, v)?;
    group_rows(e, &keys, &perm, DType::F32, e.addr(&gu), grads.u, tokens, v, r, 1.0)?;
    lora_hidden_grad(e, cfg, gt, wt.u, e.addr(&ids32), d_embed, grads.vh, tokens, cs)?;
    if let Some(dw) = grads.w {
        group_rows(e, &keys, &perm, gt, d_embed, dw, tokens, v, d, cfg.embed_scale())?;
    }
    Ok(())
}
