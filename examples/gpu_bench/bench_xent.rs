//! Fused cross-entropy rows (forward, forward + backward) and the
//! materialized internal baseline.

use super::*;

/// Buffers of one cross-entropy path (loss, per-token lse or losses, dh, dU, dVh).
struct XentBufs {
    pub(crate) loss: CudaSlice<f32>,
    pub(crate) rows: CudaSlice<f32>,
    pub(crate) dh: CudaSlice<bf16>,
    pub(crate) du: CudaSlice<f32>,
    pub(crate) dvh: CudaSlice<f32>,
}

impl XentBufs {
    pub(crate) fn new(gpu: &Gpu, t: usize, v: usize, d: usize, r: usize) -> Res<Self> {
        Ok(XentBufs {
            loss: gpu.zeros::<f32>(1)?,
            rows: gpu.zeros::<f32>(t)?,
            dh: gpu.alloc::<bf16>(t * d)?,
            du: gpu.zeros::<f32>(v * r)?,
            dvh: gpu.zeros::<f32>(r * d)?,
        })
    }
}

/// The head + cross-entropy: ours fused (no [T, V] buffer) against the
/// materialized paths (logits stored, then a cross-entropy over them), for
/// the loss alone and for loss + gradients (LoRA mode, mean over T targets).
pub(crate) fn bench_xent(gpu: &Gpu, m: &Model, st: &Settings, rep: &mut Report) -> Res<()> {
    let sh = &m.shape;
    let (t, v, d, r) = m.dims();
    let mut b = LoraConfig::builder(v, d, r).alpha(sh.alpha).embed_scale(sh.embed_scale);
    if let Some(k) = sh.softcap {
        b = b.logit_softcap(k);
    }
    let cfg = b.clone().build().ctx("LoraConfig")?;
    // The gradient filter at Cut Cross-Entropy's default threshold
    // (filter_eps = "high": bf16 eps / 32 = 2^-12), for the filtered rows.
    let cfg_filter = b.xent_grad_filter(FILTER_EPS).build().ctx("LoraConfig (filter)")?;
    let kappa = sh.softcap.unwrap_or(0.0) as f32;
    let mean = 1.0 / t as f32;
    let mut h = [gpu.alloc::<bf16>(t * d)?, gpu.alloc::<bf16>(t * d)?];
    gpu.fill_bf16(&mut h[0], 1.0, 10)?;
    gpu.fill_bf16(&mut h[1], 1.0, 11)?;
    let ids = [make_ids(gpu, t, v, 3)?.0, make_ids(gpu, t, v, 4)?.0];
    let mut ours = XentBufs::new(gpu, t, v, d, r)?;
    let mut mat = XentBufs::new(gpu, t, v, d, r)?;
    let flop_fwd = 2.0 * (t * v) as f64 * (d + r) as f64;
    let flop_base = 2.0 * (t * v) as f64 * d as f64;
    // Forward + backward: the logits GEMM, dh = G·[W | U], dU = Gᵀ·p (LoRA mode).
    let flop_all = 2.0 * (t * v) as f64 * (2 * (d + r) + r) as f64;
    let tf = |f: f64, tm: &Timing| f / (tm.median_ms * 1e-3) / 1e12;

    let fused_fwd = |cuda: &Cuda, i: usize, o: &mut XentBufs| {
        cuda.head_xent_forward::<bf16, u32>(
            &cfg,
            &m.weights(),
            h[i % 2].as_view(),
            ids[i % 2].buf.as_view(),
            o.loss.as_view_mut(),
            o.rows.as_view_mut(),
        )
    };
    // Forward + backward under `c` (the config or its filtered twin).
    let all_with = |cuda: &Cuda, c: &LoraConfig, i: usize, o: &mut XentBufs| -> tiedlora::Result<()> {
        fused_fwd(cuda, i, o)?;
        let mut grads = Grads { lora_vocab: o.du.as_view_mut(), lora_hidden: o.dvh.as_view_mut(), w: None };
        cuda.head_xent_backward::<bf16, u32>(
            c,
            &m.weights(),
            h[i % 2].as_view(),
            ids[i % 2].buf.as_view(),
            o.rows.as_view(),
            1.0,
            o.dh.as_view_mut(),
            &mut grads,
        )
    };
    let fused_all = |cuda: &Cuda, i: usize, o: &mut XentBufs| all_with(cuda, &cfg, i, o);
    // Materialized with our kernels: logits [T, V], the rows kernel, our head backward.
    let mat_fwd = |i: usize, o: &mut XentBufs, z: &mut CudaSlice<bf16>| -> Res<()> {
        tl(gpu.cuda.head_forward(&cfg, &m.weights(), h[i % 2].as_view(), z.as_view_mut()))?;
        gpu.xent_rows(z, &ids[i % 2], &mut o.rows, kappa, mean)
    };
    let mat_all = |i: usize, o: &mut XentBufs, z: &mut CudaSlice<bf16>| -> Res<()> {
        mat_fwd(i, o, z)?;
        let mut grads = Grads { lora_vocab: o.du.as_view_mut(), lora_hidden: o.dvh.as_view_mut(), w: None };
        tl(gpu.cuda.head_backward::<bf16, bf16>(
            &cfg,
            &m.weights(),
            h[i % 2].as_view(),
            z.as_view(),
            o.dh.as_view_mut(),
            &mut grads,
        ))
    };
    // The PEFT path: unfused cuBLAS forward, the rows kernel, PEFT's autograd backward.
    let peft_all = |i: usize, o: &mut XentBufs, z: &mut CudaSlice<bf16>| -> Res<()> {
        unfused_head_forward(gpu, m, &h[i % 2], z)?;
        gpu.xent_rows(z, &ids[i % 2], &mut o.rows, kappa, mean)?;
        unfused_head_backward(gpu, m, &h[i % 2], z, &mut o.dh, &mut o.du, &mut o.dvh)
    };

    let has_ours = implemented(fused_all(&gpu.cuda, 0, &mut ours))?;
    if !has_ours {
        rep.rows.push(Row {
            shape: sh.key.into(),
            op: "xent",
            path: "ours (fused)".into(),
            note: "not implemented".into(),
            ..Row::default()
        });
        return Ok(());
    }
    // Correctness: fused vs materialized (ours), one call each from zeroed gradients.
    {
        let mut z = gpu.alloc::<bf16>(t * v)?;
        mat_all(0, &mut mat, &mut z)?;
        let loss_fused = gpu.stream.clone_dtoh(&ours.loss).ctx("download loss")?[0] as f64;
        let rows = gpu.stream.clone_dtoh(&mat.rows).ctx("download row losses")?;
        gpu.sync()?;
        let loss_mat: f64 = rows.iter().map(|&x| x as f64).sum();
        rep.check(sh, "xent: loss fused vs materialized", rel_host(&[loss_fused], &[loss_mat]));
        rep.check(sh, "xent: dh fused vs materialized", gpu.rel_norm(&ours.dh, &mat.dh)?);
        rep.check(sh, "xent: dU fused vs materialized", gpu.rel_norm(&ours.du, &mat.du)?);
        rep.check(sh, "xent: dVh fused vs materialized", gpu.rel_norm(&ours.dvh, &mat.dvh)?);
    }
    // Buffers for the optional backends' forward checks and timings.
    let mut other = XentBufs::new(gpu, t, v, d, r)?;

    // Forward (loss only): ours, then the baselines before any optional
    // backend (a crash there would poison the process).
    gpu.cuda.reset_scratch_peak();
    let mem = gpu.mem.measure(&gpu.stream, || tl(fused_fwd(&gpu.cuda, 0, &mut ours)))?;
    let fwd_scratch = gpu.cuda.scratch_peak_bytes();
    let ours_fwd = Some((gpu.time(st.warmup, st.iters, |i| tl(fused_fwd(&gpu.cuda, i, &mut ours)))?, mem));
    let mut z = gpu.alloc::<bf16>(t * v)?;
    let mem = gpu.mem.measure(&gpu.stream, || {
        let mut z2 = gpu.alloc::<bf16>(t * v)?;
        mat_fwd(0, &mut mat, &mut z2)
    })?;
    let mat_fwd_t = Some((gpu.time(st.warmup, st.iters, |i| mat_fwd(i, &mut mat, &mut z))?, mem));
    let base_t = match gpu.blas() {
        Ok(_) => {
            let mem = gpu.mem.measure(&gpu.stream, || cublas_base_gemm(gpu, m, &h[0], &mut z))?;
            Some((gpu.time(st.warmup, st.iters, |i| cublas_base_gemm(gpu, m, &h[i % 2], &mut z))?, mem))
        }
        Err(_) => None,
    };
    // The other forward paths: loss checked against the default's, then
    // timed; an error is that row's alone.
    let mut checked_fwd = |rep: &mut Report, c: Option<&Cuda>, label: &str| {
        let c = c?;
        let res = (|| -> Res<(Timing, Option<u64>)> {
            tl(fused_fwd(c, 0, &mut other))?;
            tl(fused_fwd(&gpu.cuda, 0, &mut ours))?;
            let lv = gpu.stream.clone_dtoh(&other.loss).ctx("download loss")?[0] as f64;
            let ld = gpu.stream.clone_dtoh(&ours.loss).ctx("download loss")?[0] as f64;
            gpu.sync()?;
            rep.check(sh, format!("xent: loss ({label}) vs fused"), rel_host(&[lv], &[ld]));
            let mem = gpu.mem.measure(&gpu.stream, || tl(fused_fwd(c, 0, &mut other)))?;
            Ok((gpu.time(st.warmup, st.iters, |i| tl(fused_fwd(c, i, &mut other)))?, mem))
        })();
        res.map_err(|e| rep.error(sh, "xent_forward", &format!("ours ({label})"), e)).ok()
    };
    let mma_fwd = checked_fwd(rep, gpu.cuda_mma.as_ref(), "mma.sync");
    let wgmma_fwd = checked_fwd(rep, gpu.cuda_wgmma.as_ref(), "wgmma");
    let cublas_fwd = checked_fwd(rep, gpu.cuda_cublas.as_ref(), "cuBLAS");
    let base_tf = base_t.map(|(tm, _)| tf(flop_base, &tm));
    push_timed(
        rep,
        sh,
        "xent_forward",
        "ours (fused, no logits)",
        ours_fwd,
        flop_fwd,
        mat_fwd_t,
        base_tf,
        &format!(
            "loss + lse; scratch {:.1} MiB; speedup vs materialized; target: time <= 1.15x cuBLAS h·Wᵀ",
            mib(fwd_scratch as u64)
        ),
    );
    push_timed(
        rep,
        sh,
        "xent_forward",
        "ours (fused, no logits, mma.sync)",
        mma_fwd,
        flop_fwd,
        mat_fwd_t,
        base_tf,
        "Cuda::with_mma(true): _mma partials (ldmatrix + mma.sync, 3-stage cp.async)",
    );
    push_timed(
        rep,
        sh,
        "xent_forward",
        "ours (fused, no logits, wgmma)",
        wgmma_fwd,
        flop_fwd,
        mat_fwd_t,
        base_tf,
        "Cuda::with_wgmma(true): _wgmma partials (m64n128k16, logit tile in registers)",
    );
    push_timed(
        rep,
        sh,
        "xent_forward",
        "ours (cuBLAS, f32 chunks in L2)",
        cublas_fwd,
        flop_fwd,
        mat_fwd_t,
        base_tf,
        "Cuda::with_cublas(true)?: per 32 MiB f32 chunk [T, C]: cuBLAS p·U_cᵀ, += h·W_cᵀ, then its logsumexp partials",
    );
    push_timed(
        rep,
        sh,
        "xent_forward",
        "materialized (our head_forward + xent rows)",
        mat_fwd_t,
        flop_fwd,
        mat_fwd_t,
        base_tf,
        "logits [T,V] bf16 stored (counted in memory), 3-pass cross-entropy kernel (also writes G)",
    );
    push_timed(
        rep,
        sh,
        "xent_forward",
        "cuBLAS h·Wᵀ only (logits GEMM)",
        base_t,
        flop_base,
        mat_fwd_t,
        base_tf,
        "no LoRA, no loss; the 1.15x reference",
    );

    // Forward + backward (LoRA mode): ours, the baselines (on their own
    // buffers: `mat` keeps the one-call gradients the checks compare with),
    // then the optional backends.
    gpu.cuda.reset_scratch_peak();
    let mem = gpu.mem.measure(&gpu.stream, || tl(fused_all(&gpu.cuda, 0, &mut ours)))?;
    let all_scratch = gpu.cuda.scratch_peak_bytes();
    let ours_all = Some((gpu.time(st.warmup, st.iters, |i| tl(fused_all(&gpu.cuda, i, &mut ours)))?, mem));
    let mut mat_timed = XentBufs::new(gpu, t, v, d, r)?;
    let mem = gpu.mem.measure(&gpu.stream, || {
        let mut z2 = gpu.alloc::<bf16>(t * v)?;
        mat_all(0, &mut mat_timed, &mut z2)
    })?;
    let mat_all_t = Some((gpu.time(st.warmup, st.iters, |i| mat_all(i, &mut mat_timed, &mut z))?, mem));
    drop(mat_timed);
    let peft_t = match gpu.blas() {
        Ok(_) => {
            let mut p = XentBufs::new(gpu, t, v, d, r)?;
            let mem = gpu.mem.measure(&gpu.stream, || {
                let mut z2 = gpu.alloc::<bf16>(t * v)?;
                peft_all(0, &mut p, &mut z2)
            })?;
            Some((gpu.time(st.warmup, st.iters, |i| peft_all(i, &mut p, &mut z))?, mem))
        }
        Err(_) => None,
    };
    // Each optional backend (or the filtered config): one call from zeroed
    // gradients compared with the materialized path, then timed; an error is
    // that row's alone. Exact paths are checked; the gradient filter is
    // approximate by design (error bounds on
    // `LoraConfigBuilder::xent_grad_filter`), so its distance from the exact
    // gradients goes into the row's note instead of a check.
    let timed_all = |rep: &mut Report, c: Option<&Cuda>, xc: &LoraConfig, label: &str| {
        let c = c?;
        let res = (|| -> Res<(Timing, Option<u64>, String)> {
            let mut o = XentBufs::new(gpu, t, v, d, r)?;
            tl(all_with(c, xc, 0, &mut o))?;
            let (rdh, rdu) = (gpu.rel_norm(&o.dh, &mat.dh)?, gpu.rel_norm(&o.du, &mat.du)?);
            if xc.xent_grad_filter().is_none() {
                rep.check(sh, format!("xent: dh fused ({label}) vs materialized"), rdh);
                rep.check(sh, format!("xent: dU fused ({label}) vs materialized"), rdu);
            }
            let mem = gpu.mem.measure(&gpu.stream, || tl(all_with(c, xc, 0, &mut o)))?;
            let tm = gpu.time(st.warmup, st.iters, |i| tl(all_with(c, xc, i, &mut o)))?;
            Ok((tm, mem, format!("vs exact: dh {rdh:.1e}, dU {rdu:.1e}")))
        })();
        res.map_err(|e| rep.error(sh, "xent_fwd_bwd", &format!("ours ({label})"), e)).ok()
    };
    let mut checked_all = |c: Option<&Cuda>, label: &str| timed_all(rep, c, &cfg, label).map(|(tm, mem, _)| (tm, mem));
    let mma_all = checked_all(gpu.cuda_mma.as_ref(), "mma.sync");
    let wgmma_all = checked_all(gpu.cuda_wgmma_mma.as_ref(), "wgmma");
    let cublas_all = checked_all(gpu.cuda_cublas.as_ref(), "cuBLAS");
    let cublas_big_all = checked_all(gpu.cuda_cublas_big.as_ref(), "cuBLAS, 128 MiB blocks");
    let big_all = checked_all(gpu.cuda_big.as_ref(), "fused, 128 MiB blocks");
    let filter_all = timed_all(rep, Some(&gpu.cuda), &cfg_filter, "fused, grad filter");
    let filter_cublas_all = timed_all(rep, gpu.cuda_cublas.as_ref(), &cfg_filter, "cuBLAS, grad filter");
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (fused, no logits)",
        ours_all,
        flop_all,
        peft_t,
        None,
        &format!("loss + dh, dU, dVh; scratch {:.1} MiB; speedup vs the PEFT path", mib(all_scratch as u64)),
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (fused, no logits, mma.sync)",
        mma_all,
        flop_all,
        peft_t,
        None,
        "Cuda::with_mma(true): every GEMM of both passes on its _mma kernel",
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (fused, no logits, wgmma)",
        wgmma_all,
        flop_all,
        peft_t,
        None,
        "Cuda::with_wgmma(true)?: every GEMM of both passes on its _wgmma kernel",
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (cuBLAS, f32 chunks in L2)",
        cublas_all,
        flop_all,
        peft_t,
        None,
        "Cuda::with_cublas(true)?: both passes per f32 logits chunk on cuBLAS; backward per token x vocabulary block (cublas_xent_block)",
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (cuBLAS, 128 MiB blocks)",
        cublas_big_all,
        flop_all,
        peft_t,
        None,
        "with_cublas(true)?.with_xent_chunk_bytes(128 MiB): the engine with 4x larger logit chunks / backward blocks",
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "ours (fused, no logits, 128 MiB blocks)",
        big_all,
        flop_all,
        peft_t,
        None,
        "with_xent_chunk_bytes(128 MiB): the backward in one token block of all T rows (f32 dh [T, d]) vs the default 32 MiB blocks",
    );
    for (label, row) in [
        ("ours (fused, no logits, grad filter 2^-12)", filter_all),
        ("ours (cuBLAS, grad filter 2^-12)", filter_cublas_all),
    ] {
        let Some((tm, mem, err)) = row else { continue };
        let note = format!(
            "xent_grad_filter(2^-12), CCE's filter_eps=\"high\": approximate ({err}); compare with CCE (filtered) in results_py.md"
        );
        push_timed(rep, sh, "xent_fwd_bwd", label, Some((tm, mem)), flop_all, peft_t, None, &note);
    }
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "materialized (ours: head_forward + xent rows + head_backward)",
        mat_all_t,
        flop_all,
        peft_t,
        None,
        "logits/G [T,V] bf16 stored",
    );
    push_timed(
        rep,
        sh,
        "xent_fwd_bwd",
        "PEFT path (unfused cuBLAS fwd + xent rows + autograd bwd)",
        peft_t,
        flop_all,
        peft_t,
        None,
        "logits/G [T,V] bf16 + LoRA temporaries; the cheapest cross-entropy over stored logits",
    );
    Ok(())
}
