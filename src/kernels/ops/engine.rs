//! The GEMM engine's shares of the head ops (`KernelOptions::cublas`): plain
//! GEMMs through [`Executor::gemm`] on operands in the storage dtype.

use super::*;

/// U [rows, r] as the GEMM engine's operand, in the storage dtype `t`, row
/// length r (the tensor cores round U to it in the fused kernels too): U
/// itself for f32, else a packed copy, kept alive by the returned scratch.
pub(super) fn engine_u<E: Executor>(
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

/// `z[rows, cols] = h · W_cᵀ + p · U_cᵀ` (f32, row length `cols`) on the GEMM
/// engine: the logits of `rows` tokens (h, p from their first row) for the
/// vocabulary rows W_c, U_c (U in the storage dtype, [`engine_u`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn engine_logits<E: Executor>(
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
pub(super) struct EngineGrads {
    pub(super) g: u64,
    /// W rows and U rows ([`engine_u`]: in the storage dtype, row length r)
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
/// the GEMM engine.
pub(super) fn engine_grads<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    op: EngineGrads,
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
