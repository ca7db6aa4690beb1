//! `head_forward` and `head_backward` rows.

use super::*;

pub(crate) fn bench_head_forward(gpu: &Gpu, m: &Model, st: &Settings, rep: &mut Report) -> Res<()> {
    let sh = &m.shape;
    let (t, v, d, r) = m.dims();
    let mut h = [gpu.alloc::<bf16>(t * d)?, gpu.alloc::<bf16>(t * d)?];
    gpu.fill_bf16(&mut h[0], 1.0, 10)?;
    gpu.fill_bf16(&mut h[1], 1.0, 11)?;
    let mut ours_out = gpu.alloc::<bf16>(t * v)?;
    let mut base_out = gpu.alloc::<bf16>(t * v)?;
    let flop = 2.0 * (t * v) as f64 * (d + r) as f64;
    let flop_base = 2.0 * (t * v) as f64 * d as f64;
    let tf = |f: f64, tm: &Timing| f / (tm.median_ms * 1e-3) / 1e12;

    // Correctness: one fused call against the unfused result.
    let has_ours = implemented(gpu.cuda.head_forward(&m.cfg, &m.weights(), h[0].as_view(), ours_out.as_view_mut()))?;
    if !has_ours {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "head_forward",
            path: "ours (fused)".into(),
            note: "not implemented".into(),
            ..Row::default()
        });
    }
    let unf_ok = unfused_head_forward(gpu, m, &h[0], &mut base_out);
    match (&unf_ok, has_ours) {
        (Ok(()), true) => {
            let rel = gpu.rel_norm(&ours_out, &base_out)?;
            rep.check(sh, "head_forward: fused vs unfused logits", rel);
        }
        (Err(e), _) => rep.error(sh, "head_forward", "unfused (a)", e.clone()),
        _ => {}
    }

    let mut ours_t = None;
    if has_ours {
        let mem = gpu.mem.measure(&gpu.stream, || {
            tl(gpu.cuda.head_forward(&m.cfg, &m.weights(), h[0].as_view(), ours_out.as_view_mut()))
        })?;
        let tm = gpu.time(st.warmup, st.iters, |i| {
            tl(gpu.cuda.head_forward(&m.cfg, &m.weights(), h[i % 2].as_view(), ours_out.as_view_mut()))
        })?;
        ours_t = Some((tm, mem));
    }
    // The baselines, before any optional backend (a crash there would poison
    // the process), then the unfused logits again for the variants' checks.
    let mut unf_t = None;
    let mut base_t = None;
    if unf_ok.is_ok() {
        let mem = gpu.mem.measure(&gpu.stream, || unfused_head_forward(gpu, m, &h[0], &mut base_out))?;
        let tm = gpu.time(st.warmup, st.iters, |i| unfused_head_forward(gpu, m, &h[i % 2], &mut base_out))?;
        unf_t = Some((tm, mem));
        let mem = gpu.mem.measure(&gpu.stream, || cublas_base_gemm(gpu, m, &h[0], &mut base_out))?;
        let tm = gpu.time(st.warmup, st.iters, |i| cublas_base_gemm(gpu, m, &h[i % 2], &mut base_out))?;
        base_t = Some((tm, mem));
        unfused_head_forward(gpu, m, &h[0], &mut base_out)?;
    }
    // The other main loops of the same op: checked against the unfused
    // logits, then timed like the default; an error is that row's alone.
    let variant = |rep: &mut Report, cuda: Option<&Cuda>, label: &str, out: &mut CudaSlice<bf16>| {
        let cuda = cuda.filter(|_| has_ours)?;
        let res = (|| -> Res<(Timing, Option<u64>)> {
            tl(cuda.head_forward(&m.cfg, &m.weights(), h[0].as_view(), out.as_view_mut()))?;
            if unf_ok.is_ok() {
                rep.check(
                    sh,
                    format!("head_forward: fused ({label}) vs unfused logits"),
                    gpu.rel_norm(out, &base_out)?,
                );
            }
            let mem = gpu.mem.measure(&gpu.stream, || {
                tl(cuda.head_forward(&m.cfg, &m.weights(), h[0].as_view(), out.as_view_mut()))
            })?;
            let tm = gpu.time(st.warmup, st.iters, |i| {
                tl(cuda.head_forward(&m.cfg, &m.weights(), h[i % 2].as_view(), out.as_view_mut()))
            })?;
            Ok((tm, mem))
        })();
        res.map_err(|e| rep.error(sh, "head_forward", &format!("ours ({label})"), e)).ok()
    };
    let wide_t = variant(rep, gpu.cuda_wide.as_ref(), "wide tiles", &mut ours_out);
    let mma_t = variant(rep, gpu.cuda_mma.as_ref(), "mma.sync", &mut ours_out);
    let wide_mma_t = variant(rep, gpu.cuda_wide_mma.as_ref(), "wide mma.sync", &mut ours_out);
    let wgmma_t = variant(rep, gpu.cuda_wgmma.as_ref(), "wgmma", &mut ours_out);
    let wide_wgmma_t = variant(rep, gpu.cuda_wide_wgmma.as_ref(), "wide wgmma", &mut ours_out);
    let cublas_t = variant(rep, gpu.cuda_cublas.as_ref(), "cuBLAS", &mut ours_out);
    let base_tf = base_t.map(|(tm, _)| tf(flop_base, &tm));
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused)",
        ours_t,
        flop,
        unf_t,
        base_tf,
        "K = d + r fused GEMM + lora_project; % of reference = TFLOP/s vs (b)",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused, wide 128x256 tiles)",
        wide_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_wide_tiles(true): _w256 kernels, 64x64 warp tiles, 3-stage cp.async",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused, mma.sync)",
        mma_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_mma(true): _mma kernel, ldmatrix + mma.sync, 3-stage cp.async, 64x32 warp tiles",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused, wide tiles, mma.sync)",
        wide_mma_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_mma(true).with_wide_tiles(true): _w256_mma, 64x64 warp tiles",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused, wgmma)",
        wgmma_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_wgmma(true): _wgmma, 128x128 blocks, 2 warpgroups x m64n128k16, 3-slot swizzled cp.async ring",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (fused, wide tiles, wgmma)",
        wide_wgmma_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_wgmma(true).with_wide_tiles(true): _w256_wgmma, 128x256 blocks, m64n256k16, 4 slots",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "ours (cuBLAS)",
        cublas_t,
        flop,
        unf_t,
        base_tf,
        "Cuda::with_cublas(true)?: [h | p] once, per chunk [W_c | U_c] (32 MiB) and one K = d + r cuBLAS GEMM into the logits",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "(a) unfused cuBLAS (PEFT)",
        unf_t,
        flop,
        unf_t,
        base_tf,
        "h·Wᵀ, h·Vhᵀ, (h·Vhᵀ)·Uᵀ into a [T,V] bf16 temp, scale-add kernel",
    );
    push_timed(
        rep,
        sh,
        "head_forward",
        "(b) cuBLAS h·Wᵀ only",
        base_t,
        flop_base,
        unf_t,
        base_tf,
        "no LoRA; FLOP 2·T·V·d",
    );
    Ok(())
}

pub(crate) fn bench_head_backward(gpu: &Gpu, m: &Model, st: &Settings, rep: &mut Report) -> Res<()> {
    let sh = &m.shape;
    let (t, v, d, r) = m.dims();
    let mut h = [gpu.alloc::<bf16>(t * d)?, gpu.alloc::<bf16>(t * d)?];
    gpu.fill_bf16(&mut h[0], 1.0, 10)?;
    gpu.fill_bf16(&mut h[1], 1.0, 11)?;
    let mut g = [gpu.alloc::<bf16>(t * v)?, gpu.alloc::<bf16>(t * v)?];
    gpu.fill_bf16(&mut g[0], 0.01, 20)?;
    gpu.fill_bf16(&mut g[1], 0.01, 21)?;
    let mut dh_o = gpu.alloc::<bf16>(t * d)?;
    let mut dh_b = gpu.alloc::<bf16>(t * d)?;
    let mut du_o = gpu.zeros::<f32>(v * r)?;
    let mut dvh_o = gpu.zeros::<f32>(r * d)?;
    let mut du_b = gpu.zeros::<f32>(v * r)?;
    let mut dvh_b = gpu.zeros::<f32>(r * d)?;
    let flop = 2.0 * (t * v) as f64 * (d + 2 * r) as f64 + 6.0 * (t * d * r) as f64;
    let flop_gw = 2.0 * (t * v) as f64 * d as f64;
    let tf = |f: f64, tm: &Timing| f / (tm.median_ms * 1e-3) / 1e12;

    // One call of the head backward on `cuda` (a main-loop variant of the backend).
    let run = |cuda: &Cuda, i: usize, dh: &mut CudaSlice<bf16>, du: &mut CudaSlice<f32>, dvh: &mut CudaSlice<f32>| {
        let mut grads = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
        cuda.head_backward::<bf16, bf16>(
            &m.cfg,
            &m.weights(),
            h[i % 2].as_view(),
            g[i % 2].as_view(),
            dh.as_view_mut(),
            &mut grads,
        )
    };
    let ours = |i: usize, dh: &mut CudaSlice<bf16>, du: &mut CudaSlice<f32>, dvh: &mut CudaSlice<f32>| {
        run(&gpu.cuda, i, dh, du, dvh)
    };
    let has_ours = implemented(ours(0, &mut dh_o, &mut du_o, &mut dvh_o))?;
    if !has_ours {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "head_backward",
            path: "ours (fused)".into(),
            note: "not implemented".into(),
            ..Row::default()
        });
    }
    let unf_ok = unfused_head_backward(gpu, m, &h[0], &g[0], &mut dh_b, &mut du_b, &mut dvh_b);
    match (&unf_ok, has_ours) {
        (Ok(()), true) => {
            rep.check(sh, "head_backward: dh fused vs unfused", gpu.rel_norm(&dh_o, &dh_b)?);
            rep.check(sh, "head_backward: dU fused vs unfused", gpu.rel_norm(&du_o, &du_b)?);
            rep.check(sh, "head_backward: dVh fused vs unfused", gpu.rel_norm(&dvh_o, &dvh_b)?);
        }
        (Err(e), _) => rep.error(sh, "head_backward", "unfused (PEFT autograd)", e.clone()),
        _ => {}
    }

    let mut ours_t = None;
    if has_ours {
        let mem = gpu.mem.measure(&gpu.stream, || tl(ours(0, &mut dh_o, &mut du_o, &mut dvh_o)))?;
        let tm = gpu.time(st.warmup, st.iters, |i| tl(ours(i, &mut dh_o, &mut du_o, &mut dvh_o)))?;
        ours_t = Some((tm, mem));
    }
    // The baselines, before any optional backend (a crash there would poison
    // the process), then the unfused gradients of one call again (from zero)
    // for the variants' checks.
    let (mut unf_t, mut gw_t) = (None, None);
    if unf_ok.is_ok() {
        let mem = gpu
            .mem
            .measure(&gpu.stream, || unfused_head_backward(gpu, m, &h[0], &g[0], &mut dh_b, &mut du_b, &mut dvh_b))?;
        let tm = gpu.time(st.warmup, st.iters, |i| {
            unfused_head_backward(gpu, m, &h[i % 2], &g[i % 2], &mut dh_b, &mut du_b, &mut dvh_b)
        })?;
        unf_t = Some((tm, mem));
        let mem = gpu.mem.measure(&gpu.stream, || cublas_grad_h_gemm(gpu, m, &g[0], &mut dh_b))?;
        let tm = gpu.time(st.warmup, st.iters, |i| cublas_grad_h_gemm(gpu, m, &g[i % 2], &mut dh_b))?;
        gw_t = Some((tm, mem));
        (du_b, dvh_b) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
        unfused_head_backward(gpu, m, &h[0], &g[0], &mut dh_b, &mut du_b, &mut dvh_b)?;
    }
    // The other variants, each on its own buffers: checked against the
    // unfused result, then timed like the default; an error is that row's alone.
    let variant = |rep: &mut Report, cuda: Option<&Cuda>, label: &str| {
        let cuda = cuda.filter(|_| has_ours)?;
        let res = (|| -> Res<(Timing, Option<u64>)> {
            let mut dh_s = gpu.alloc::<bf16>(t * d)?;
            let mut du_s = gpu.zeros::<f32>(v * r)?;
            let mut dvh_s = gpu.zeros::<f32>(r * d)?;
            tl(run(cuda, 0, &mut dh_s, &mut du_s, &mut dvh_s))?;
            if unf_ok.is_ok() {
                rep.check(sh, format!("head_backward: dh fused ({label}) vs unfused"), gpu.rel_norm(&dh_s, &dh_b)?);
                rep.check(sh, format!("head_backward: dU fused ({label}) vs unfused"), gpu.rel_norm(&du_s, &du_b)?);
            }
            let mem = gpu.mem.measure(&gpu.stream, || tl(run(cuda, 0, &mut dh_s, &mut du_s, &mut dvh_s)))?;
            let tm = gpu.time(st.warmup, st.iters, |i| tl(run(cuda, i, &mut dh_s, &mut du_s, &mut dvh_s)))?;
            Ok((tm, mem))
        })();
        res.map_err(|e| rep.error(sh, "head_backward", &format!("ours ({label})"), e)).ok()
    };
    let gh2_t = variant(rep, gpu.cuda_gh2.as_ref(), "grad_h 2 blocks/SM");
    let mma_t = variant(rep, gpu.cuda_mma.as_ref(), "mma.sync");
    let wgmma_t = variant(rep, gpu.cuda_wgmma_mma.as_ref(), "wgmma");
    let whole_t = variant(rep, gpu.cuda_wgmma_whole.as_ref(), "wgmma, whole atoms");
    let cublas_t = variant(rep, gpu.cuda_cublas.as_ref(), "cuBLAS");
    let gw_tf = gw_t.map(|(tm, _)| tf(flop_gw, &tm));
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (fused)",
        ours_t,
        flop,
        unf_t,
        gw_tf,
        "LoRA mode (Grads.w = None), G bf16; % of reference = TFLOP/s vs cuBLAS G·W",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (fused, grad_h 2 blocks/SM)",
        gh2_t,
        flop,
        unf_t,
        gw_tf,
        "Cuda::with_grad_h_two_blocks(true): _2blocks grad_h (2 blocks/SM on sm_90)",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (fused, mma.sync)",
        mma_t,
        flop,
        unf_t,
        gw_tf,
        "Cuda::with_mma(true): grad_h / grad_param _mma kernels (ldmatrix + mma.sync, 3-stage cp.async)",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (fused, wgmma)",
        wgmma_t,
        flop,
        unf_t,
        gw_tf,
        "Cuda::with_wgmma(true)?: grad_h _wgmma (m64n(128+RX)k16, W N-major), dU _wgmma (Gᵀ M-major)",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (fused, wgmma, whole atoms)",
        whole_t,
        flop,
        unf_t,
        gw_tf,
        "with_wgmma_whole_atoms(true): grad_h _rx64_wgmma (m64n192k16) at r = 16",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "ours (cuBLAS)",
        cublas_t,
        flop,
        unf_t,
        gw_tf,
        "Cuda::with_cublas(true)?: cuBLAS G·W, G·U (f32 out), Gᵀ·p; our lora_project, finish (dh = acc + s·gu·Vh), lora_hidden_grad",
    );
    push_timed(
        rep,
        sh,
        "head_backward",
        "unfused cuBLAS (PEFT autograd)",
        unf_t,
        flop,
        unf_t,
        gw_tf,
        "G·W, Gs = s·G ([T,V] temp), Gsᵀ(hVhᵀ), Gs·U, (Gs·U)ᵀh, dh += (Gs·U)·Vh",
    );
    push_timed(rep, sh, "head_backward", "cuBLAS dh = G·W only", gw_t, flop_gw, unf_t, gw_tf, "no LoRA; FLOP 2·T·V·d");
    Ok(())
}
