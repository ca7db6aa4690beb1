//! The head ops over stored logits: `head_forward` (one K = d + r
//! reduction) and `head_backward`.

use super::*;

/// `logits[T, V] = [h | s·h·Vhᵀ] · [W | U]ᵀ`, one K = d + r reduction.
pub fn head_forward<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    wt: WeightAddrs,
    h: u64,
    logits: u64,
    tokens: usize,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    if e.options().cublas {
        // One K = d + r GEMM per vocabulary chunk, [h | p] · [W_c | U_c]ᵀ,
        // rounded once straight into the logits: the operands are
        // concatenated in scratch ([T, d + r] once, [C, d + r] per chunk).
        let (k, es) = (d + r, t.size());
        let hp = e.scratch_uninit(tokens * k * es)?;
        concat_rows(e, t, (h, e.addr(&p), false), e.addr(&hp), tokens, d, r)?;
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
        return Ok(());
    }
    let params = HeadForwardParams {
        h,
        p: e.addr(&p),
        w: wt.w,
        u: wt.u,
        out: logits,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
    };
    let mma = if e.options().mma { "_mma" } else { "" };
    let plan = if e.options().wgmma && t != DType::F32 {
        let (wide, bn, stages) = if e.options().wide_tiles { ("_w256", 256, 4) } else { ("", 128, 3) };
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}{wide}_wgmma")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, bn), 1),
            block: (THREADS, 1, 1),
            shared_bytes: wg_shared_bytes(bn as usize, stages),
        }
    } else if e.options().wide_tiles && t != DType::F32 {
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}_w256{mma}")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, 2 * GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 256, 32, false, true, 0, 3),
        }
    } else if e.options().mma && t != DType::F32 {
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}_mma")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, 3),
        }
    } else {
        let sfx = stage_suffix(e, t, t);
        let stages = if sfx.is_empty() { 1 } else { 3 };
        LaunchPlan {
            kernel: intern(format!("tl_head_forward_{t}{sfx}")),
            grid: (blocks(tokens, GEMM_TILE), blocks(v, GEMM_TILE), 1),
            block: (THREADS, 1, 1),
            shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, true, 0, stages),
        }
    };
    // SAFETY: h [T, d], p [T, r], W [V, d], U [V, r], logits [T, V] (checked
    // by the caller or allocated above).
    unsafe { e.launch(&plan, &params) }
}

/// Head backward: `dh = G W + s (G U) Vh`, `dU += Gᵀ (s h Vhᵀ)`, `dVh += s (G U)ᵀ h`, `dW += Gᵀ h`.
#[allow(clippy::too_many_arguments)]
pub fn head_backward<E: Executor>(
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
    grad_h_rx(r)?;
    let p = e.scratch_uninit(tokens * r * t.size())?;
    lora_down(e, cfg, t, t, h, wt.vh, e.addr(&p), tokens, cfg.scale())?;
    let gu = e.scratch_uninit(tokens * r * 4)?;
    if e.options().cublas && gt == t {
        // G·W and G·U into f32 on the GEMM engine, then dh's LoRA term and one rounding.
        let dh_acc = e.scratch_uninit(tokens * d * 4)?;
        let (p, gu) = (e.addr(&p), e.addr(&gu));
        let (_packed, u) = engine_u(e, t, wt.u, v, r)?;
        let op = EngineGrads {
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
        engine_grads(e, cfg, t, op, tokens)?;
        grad_finish(e, cfg, t, e.addr(&dh_acc), gu, wt.vh, dh, tokens, 1.0)?;
        return lora_up(e, cfg, t, gu, 0, h, grads.vh, tokens, cfg.scale());
    }
    let op = GradH { g, w: wt.w, u: wt.u, vh: wt.vh, dh, gu: e.addr(&gu), rows: v, accumulate: false, live: None };
    grad_h(e, cfg, t, gt, op, tokens)?;
    // dU += Gᵀ p, p = s·h·Vhᵀ already carries the scale.
    let du = GradParam { g, b: e.addr(&p), grad: grads.u, rows: v, ncols: r, live: None, k_split: 0, scale: 1.0 };
    grad_param(e, t, gt, du, tokens)?;
    // dVh += s · guᵀ h.
    lora_up(e, cfg, t, e.addr(&gu), 0, h, grads.vh, tokens, cfg.scale())?;
    if let Some(dw) = grads.w {
        let dw = GradParam { g, b: h, grad: dw, rows: v, ncols: d, live: None, k_split: 0, scale: 1.0 };
        grad_param(e, t, gt, dw, tokens)?;
    }
    Ok(())
}
