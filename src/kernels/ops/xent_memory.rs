//! Blocking and peak memory of the fused cross-entropy: the chunk budget,
//! the token x vocabulary blocks of the backward, and the public formulas
//! for the extra device memory of both directions.

use super::*;

/// Default bytes of each per-block buffer of the fused cross-entropy (G, the
/// f32 `dh` accumulator, cuBLAS's f32 logits): a block is produced and
/// consumed while it is (mostly) in L2 (50 MB on an H100 / H200).
pub const XENT_CHUNK_BYTES: usize = 32 << 20;

/// (token rows, vocabulary columns) of one block of the kernel backends'
/// `head_xent_backward` with the fused kernels (the cuBLAS path has its own
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
pub(super) fn chunk_cols(cfg: &LoraConfig, col_bytes: usize, chunk_bytes: usize) -> usize {
    let tile = GEMM_TILE as usize;
    (chunk_budget(chunk_bytes) / col_bytes / tile * tile).clamp(tile, cfg.vocab().div_ceil(tile) * tile)
}

/// (token rows, vocabulary columns) of one block of the cuBLAS-path
/// cross-entropy backward: an f32 logits block and its G (storage dtype) in
/// at most the chunk bytes. Each block's GEMM re-reads W_c and adds into f32
/// `dh` rows: traffic ~ T·V·d·(10/C + 2/rows) bytes at C·rows = B elements,
/// least at C ≈ √(5B) (C = 5248, rows = 1024 at the Gemma-2-2B shape and 32
/// MiB); multiples of 128, and all tokens in one block when they fit.
#[cfg(feature = "experimental-kernels")]
pub(super) fn cublas_xent_block(cfg: &LoraConfig, t: DType, tokens: usize, chunk_bytes: usize) -> (usize, usize) {
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
pub(super) fn xent_du_split(tokens: usize, cols: usize, sms: u32) -> usize {
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
pub(super) fn xent_du_partial_bytes(cfg: &LoraConfig, tokens: usize, rows: usize, sms: u32, chunk: usize) -> usize {
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

/// Vocabulary splits of the cross-entropy forward: `(columns per split,
/// splits)`, enough (token tile, split) blocks for two per multiprocessor.
pub(super) fn xent_splits(cfg: &LoraConfig, tokens: usize, sms: u32) -> (usize, usize) {
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
    #[cfg(feature = "experimental-kernels")]
    {
        if select::cublas(select::HeadOp::XentForward, t, t, opts) {
            let cols = chunk_cols(cfg, tokens.max(1) * 4, opts.xent_chunk_bytes);
            let packed_u = if t == DType::F32 { 0 } else { m(v * r * es) };
            return base + 2 * m(tokens * 4) + m(tokens * cols * 4) + packed_u;
        }
    }
    let _ = (v, opts);
    let (_, splits) = xent_splits(cfg, tokens, sms);
    base + 2 * m(splits * tokens * 4)
}

/// (token rows, vocabulary columns) of one block of the cross-entropy
/// backward: [`xent_backward_block`], or on the cuBLAS path without a
/// gradient filter (`cublas_blocks`) its own blocks of f32 logits and G.
pub(super) fn backward_block_shape(
    cfg: &LoraConfig,
    t: DType,
    tokens: usize,
    chunk_bytes: usize,
    cublas_blocks: bool,
) -> (usize, usize) {
    #[cfg(feature = "experimental-kernels")]
    {
        if cublas_blocks {
            return cublas_xent_block(cfg, t, tokens, chunk_bytes);
        }
    }
    let _ = cublas_blocks;
    xent_backward_block(cfg, t, tokens, chunk_bytes)
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
/// storage dtype (C·RX·elem); above rank 64 in f16 / bf16, U in the storage
/// dtype (V·r·elem); with `KernelOptions::cublas` U in the storage
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
    let on_cublas = select::cublas(select::HeadOp::XentBackward, t, t, opts);
    let cublas_blocks = on_cublas && !filtered;
    let (rows_b, cols_b) = backward_block_shape(cfg, t, tokens, opts.xent_chunk_bytes, cublas_blocks);
    // Held from start to end: targets, p, gu, U packed for cuBLAS, and one
    // block's buffers.
    let held = m(tokens * 4)
        + m(tokens * r * es)
        + m(tokens * r * 4)
        + if on_cublas && half { m(v * r * es) } else { 0 }
        + if r > select::MAX_HEAD_RANK && half { m(v * r * es) } else { 0 }
        + if cublas_blocks {
            m(rows_b * cols_b * 4) + m(rows_b * cols_b * es)
        } else {
            m(rows_b * cols_b * es)
                + m(rows_b.div_ceil(GEMM_TILE as usize) * (cols_b / GEMM_TILE as usize) * 4)
                + m(xent_du_partial_bytes(cfg, tokens, rows_b, sms, cols_b))
        };
    // Per chunk, freed before the next: U rows packed for a wgmma grad_h.
    let u_cols = select::grad_h_u_cols(r, Gemm::Tile, opts).unwrap_or(select::MAX_HEAD_RANK);
    let per_chunk = match select::gemm(Site::GradH { u_cols, filtered }, t, t, opts) {
        #[cfg(feature = "experimental-kernels")]
        gemm @ Gemm::Wgmma { .. } if !on_cublas && r <= select::MAX_HEAD_RANK => {
            m(cols_b.min(v) * select::grad_h_u_cols(r, gemm, opts).unwrap_or(select::MAX_HEAD_RANK) * es)
        }
        _ => 0,
    };
    let up_chunk = UP_CHUNK.max(tokens.div_ceil(4 * sms as usize));
    let dvh_partials = m(tokens.div_ceil(up_chunk) * r * d * 4);
    held + (m(rows_b.min(tokens) * d * 4) + per_chunk).max(dvh_partials)
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
                    #[allow(unused_mut, clippy::needless_update)]
                    let mut opts = KernelOptions {
                        xent_chunk_bytes: if bits & 8 != 0 { 1 } else { 0 },
                        ..KernelOptions::default()
                    };
                    #[cfg(feature = "experimental-kernels")]
                    {
                        opts.cublas = bits & 1 != 0;
                        opts.wgmma = bits & 2 != 0;
                        opts.wgmma_whole_atoms = bits & 4 != 0;
                    }
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

    /// The cuBLAS backward's blocks: multiples of 128 (or all tokens),
    /// within the byte budget whenever the 128 × 128 minimum allows, and the
    /// √(5B) split at the Gemma-2-2B shape.
    #[test]
    #[cfg(feature = "experimental-kernels")]
    fn cublas_xent_blocks_fit_the_budget() {
        let gemma = LoraConfig::builder(256_000, 2304, 16).build().unwrap();
        assert_eq!(cublas_xent_block(&gemma, DType::BF16, 8192, 0), (1024, 5248));
        for (v, tokens, bytes) in [(256_000, 8192, 0), (300, 150, 1), (1000, 40, 0), (50_000, 3000, 8 << 20)] {
            let cfg = LoraConfig::builder(v, 64, 8).build().unwrap();
            for t in [DType::F32, DType::BF16] {
                let (rows, cols) = cublas_xent_block(&cfg, t, tokens, bytes);
                assert!(rows == tokens || (rows % 128 == 0 && rows < tokens), "rows {rows} of {tokens}");
                assert!(cols % 128 == 0 && cols <= v.div_ceil(128) * 128, "cols {cols} of {v}");
                let budget = chunk_budget(bytes);
                let used = rows.min(tokens) * cols * (4 + t.size());
                assert!(used <= budget.max(128 * 128 * (4 + t.size())), "{rows} x {cols} over {budget} B");
            }
        }
        // Few tokens: one block of all of them, as many columns as fit.
        let cfg = LoraConfig::builder(1000, 64, 8).build().unwrap();
        assert_eq!(cublas_xent_block(&cfg, DType::BF16, 40, 0), (40, 1024));
    }
}
