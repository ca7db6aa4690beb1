//! `embed_forward` and `embed_backward` rows.

use super::*;

pub(crate) fn bench_embed(gpu: &Gpu, m: &Model, st: &Settings, copy_gbs: Option<f64>, rep: &mut Report) -> Res<()> {
    let sh = &m.shape;
    let (t, v, d, r) = m.dims();
    let ids = [make_ids(gpu, t, v, 1)?.0, make_ids(gpu, t, v, 2)?.0];
    let mut out_o = gpu.alloc::<bf16>(t * d)?;
    let mut out_b = gpu.alloc::<bf16>(t * d)?;
    let bytes = (t * d * 2 + t * d * 2 + t * r * 4 + r * d * 4) as f64;
    let gbs = |tm: &Timing| bytes / (tm.median_ms * 1e-3) / 1e9;

    // ---- forward
    let fwd = |i: usize, out: &mut CudaSlice<bf16>| {
        gpu.cuda.embed_forward::<bf16, u32>(&m.cfg, &m.weights(), ids[i % 2].buf.as_view(), out.as_view_mut())
    };
    let has_ours = implemented(fwd(0, &mut out_o))?;
    let unf_ok = unfused_embed_forward(gpu, m, &ids[0], &mut out_b);
    match (&unf_ok, has_ours) {
        (Ok(()), true) => rep.check(sh, "embed_forward: fused vs unfused", gpu.rel_norm(&out_o, &out_b)?),
        (Err(e), _) => rep.error(sh, "embed_forward", "unfused", e.clone()),
        _ => {}
    }
    let unf_t = if unf_ok.is_ok() {
        let mem = gpu.mem.measure(&gpu.stream, || unfused_embed_forward(gpu, m, &ids[0], &mut out_b))?;
        Some((gpu.time(st.warmup, st.iters, |i| unfused_embed_forward(gpu, m, &ids[i % 2], &mut out_b))?, mem))
    } else {
        None
    };
    if has_ours {
        let mem = gpu.mem.measure(&gpu.stream, || tl(fwd(0, &mut out_o)))?;
        let tm = gpu.time(st.warmup, st.iters, |i| tl(fwd(i, &mut out_o)))?;
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_forward",
            path: "ours (fused)".into(),
            timing: Some(tm),
            gbs: Some(gbs(&tm)),
            speedup: unf_t.map(|(u, _)| u.median_ms / tm.median_ms),
            pct_ref: copy_gbs.map(|c| gbs(&tm) / c),
            peak_extra: mem,
            note: "GB/s over T·d·2 + T·d·2 + T·r·4 + r·d·4 bytes; % of reference = vs (c) copy bandwidth".into(),
            ..Row::default()
        });
    } else {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_forward",
            path: "ours (fused)".into(),
            note: "not implemented".into(),
            ..Row::default()
        });
    }
    if let (true, Some(cd)) = (has_ours, gpu.cuda_defer.as_ref()) {
        // Deferred id errors: the same kernels with no host round trip.
        let fwd_d = |i: usize, out: &mut CudaSlice<bf16>| {
            cd.embed_forward::<bf16, u32>(&m.cfg, &m.weights(), ids[i % 2].buf.as_view(), out.as_view_mut())
        };
        let mut out_d = gpu.alloc::<bf16>(t * d)?;
        tl(fwd_d(0, &mut out_d))?;
        rep.check(sh, "embed_forward: fused (deferred ids) vs fused", gpu.rel_norm(&out_d, &out_o)?);
        let mem = gpu.mem.measure(&gpu.stream, || tl(fwd_d(0, &mut out_d)))?;
        let tm = gpu.time(st.warmup, st.iters, |i| tl(fwd_d(i, &mut out_d)))?;
        tl(cd.take_id_error())?;
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_forward",
            path: "ours (fused, deferred id errors)".into(),
            timing: Some(tm),
            gbs: Some(gbs(&tm)),
            speedup: unf_t.map(|(u, _)| u.median_ms / tm.median_ms),
            pct_ref: copy_gbs.map(|c| gbs(&tm) / c),
            peak_extra: mem,
            note: "Cuda::with_deferred_id_errors(true): one launch (the gather checks each id), no host round trip; errors via take_id_error".into(),
            ..Row::default()
        });
    }
    if let Some((tm, mem)) = unf_t {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_forward",
            path: "unfused (gather + cuBLAS + scale-add)".into(),
            timing: Some(tm),
            gbs: Some(gbs(&tm)),
            speedup: Some(1.0),
            pct_ref: copy_gbs.map(|c| gbs(&tm) / c),
            peak_extra: mem,
            note: "W[ids], U[ids], U[ids]·Vh into a [T,d] temp, c·(e + s·δ)".into(),
            ..Row::default()
        });
    }

    // ---- backward
    let mut de = [gpu.alloc::<bf16>(t * d)?, gpu.alloc::<bf16>(t * d)?];
    gpu.fill_bf16(&mut de[0], 0.01, 30)?;
    gpu.fill_bf16(&mut de[1], 0.01, 31)?;
    let mut du_o = gpu.zeros::<f32>(v * r)?;
    let mut dvh_o = gpu.zeros::<f32>(r * d)?;
    let mut du_b = gpu.zeros::<f32>(v * r)?;
    let mut dvh_b = gpu.zeros::<f32>(r * d)?;
    let bwd = |i: usize, du: &mut CudaSlice<f32>, dvh: &mut CudaSlice<f32>| {
        let mut grads = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
        gpu.cuda.embed_backward::<bf16, bf16, u32>(
            &m.cfg,
            &m.weights(),
            ids[i % 2].buf.as_view(),
            de[i % 2].as_view(),
            &mut grads,
        )
    };
    let has_ours = implemented(bwd(0, &mut du_o, &mut dvh_o))?;
    let unf_ok = unfused_embed_backward(gpu, m, &ids[0], &de[0], &mut du_b, &mut dvh_b);
    match (&unf_ok, has_ours) {
        (Ok(()), true) => {
            rep.check(sh, "embed_backward: dU fused vs unfused", gpu.rel_norm(&du_o, &du_b)?);
            rep.check(sh, "embed_backward: dVh fused vs unfused", gpu.rel_norm(&dvh_o, &dvh_b)?);
        }
        (Err(e), _) => rep.error(sh, "embed_backward", "unfused", e.clone()),
        _ => {}
    }
    let unf_t = if unf_ok.is_ok() {
        let mem =
            gpu.mem.measure(&gpu.stream, || unfused_embed_backward(gpu, m, &ids[0], &de[0], &mut du_b, &mut dvh_b))?;
        Some((
            gpu.time(st.warmup, st.iters, |i| {
                unfused_embed_backward(gpu, m, &ids[i % 2], &de[i % 2], &mut du_b, &mut dvh_b)
            })?,
            mem,
        ))
    } else {
        None
    };
    if has_ours {
        let mem = gpu.mem.measure(&gpu.stream, || tl(bwd(0, &mut du_o, &mut dvh_o)))?;
        let tm = gpu.time(st.warmup, st.iters, |i| tl(bwd(i, &mut du_o, &mut dvh_o)))?;
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_backward",
            path: "ours (fused)".into(),
            timing: Some(tm),
            speedup: unf_t.map(|(u, _)| u.median_ms / tm.median_ms),
            peak_extra: mem,
            note: "LoRA mode, dE bf16".into(),
            ..Row::default()
        });
    } else {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_backward",
            path: "ours (fused)".into(),
            note: "not implemented".into(),
            ..Row::default()
        });
    }
    if let (true, Some(cd)) = (has_ours, gpu.cuda_defer.as_ref()) {
        let bwd_d = |i: usize, du: &mut CudaSlice<f32>, dvh: &mut CudaSlice<f32>| {
            let mut grads = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
            let (iv, dv) = (ids[i % 2].buf.as_view(), de[i % 2].as_view());
            cd.embed_backward::<bf16, bf16, u32>(&m.cfg, &m.weights(), iv, dv, &mut grads)
        };
        let (mut du_d, mut dvh_d) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
        tl(bwd_d(0, &mut du_d, &mut dvh_d))?;
        if unf_ok.is_ok() {
            rep.check(sh, "embed_backward: dU fused (deferred ids) vs unfused", gpu.rel_norm(&du_d, &du_b)?);
        }
        let mem = gpu.mem.measure(&gpu.stream, || tl(bwd_d(0, &mut du_d, &mut dvh_d)))?;
        let tm = gpu.time(st.warmup, st.iters, |i| tl(bwd_d(i, &mut du_d, &mut dvh_d)))?;
        tl(cd.take_id_error())?;
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_backward",
            path: "ours (fused, deferred id errors)".into(),
            timing: Some(tm),
            speedup: unf_t.map(|(u, _)| u.median_ms / tm.median_ms),
            peak_extra: mem,
            note: "Cuda::with_deferred_id_errors(true): no host round trip".into(),
            ..Row::default()
        });
    }
    if let Some((tm, mem)) = unf_t {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "embed_backward",
            path: "unfused (gather + cuBLAS + atomic scatter-add)".into(),
            timing: Some(tm),
            speedup: Some(1.0),
            peak_extra: mem,
            note: "c·s·dE, U[ids], U[ids]ᵀ·dEs, dEs·Vhᵀ (f32), atomicAdd into dU".into(),
            ..Row::default()
        });
    }
    Ok(())
}
