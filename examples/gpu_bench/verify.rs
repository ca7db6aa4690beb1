//! `--verify`: every GPU path at the quick shape against `tiedlora::CpuReference`.

use super::*;

fn down<T: DeviceRepr + Element>(gpu: &Gpu, s: &CudaSlice<T>) -> Res<Vec<f64>> {
    let v = gpu.stream.clone_dtoh(s).ctx("download")?;
    gpu.sync()?;
    Ok(v.iter().map(|x| x.to_f64()).collect())
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Every GPU path once at the quick shape, downloaded and compared with the
/// CPU reference run on the same (downloaded) inputs widened to f32.
pub(crate) fn run_verify(gpu: &Gpu, rep: &mut Report) -> Res<()> {
    let sh = QUICK;
    let m = Model::new(gpu, sh)?;
    let (t, v, d, r) = m.dims();
    let cpu = CpuReference::new();
    let mut h = gpu.alloc::<bf16>(t * d)?;
    gpu.fill_bf16(&mut h, 1.0, 10)?;
    let mut g = gpu.alloc::<bf16>(t * v)?;
    gpu.fill_bf16(&mut g, 0.01, 20)?;
    let mut de = gpu.alloc::<bf16>(t * d)?;
    gpu.fill_bf16(&mut de, 0.01, 30)?;
    let (ids, ids_host) = make_ids(gpu, t, v, 1)?;
    let (w, u, vh) = (to_f32(&down(gpu, &m.w)?), to_f32(&down(gpu, &m.u)?), to_f32(&down(gpu, &m.vh)?));
    let (hh, gh, deh) = (to_f32(&down(gpu, &h)?), to_f32(&down(gpu, &g)?), to_f32(&down(gpu, &de)?));
    let cw = Weights::<CpuReference, f32> { w: &w, lora_vocab: &u, lora_hidden: &vh };
    let zero_u = vec![0f32; v * r];
    let cw0 = Weights::<CpuReference, f32> { w: &w, lora_vocab: &zero_u, lora_hidden: &vh };
    let wide = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<f64>>();
    let cpu_t0 = Instant::now();

    // head forward
    let mut logits = vec![0f32; t * v];
    tl(cpu.head_forward(&m.cfg, &cw, &hh, &mut logits))?;
    let logits = wide(&logits);
    let mut base = vec![0f32; t * v];
    tl(cpu.head_forward(&m.cfg, &cw0, &hh, &mut base))?;
    let base = wide(&base);
    let mut out = gpu.alloc::<bf16>(t * v)?;
    if implemented(gpu.cuda.head_forward(&m.cfg, &m.weights(), h.as_view(), out.as_view_mut()))? {
        rep.check(&sh, "head_forward ours vs CPU", rel_host(&down(gpu, &out)?, &logits));
        // Every variant writes into NaN-poisoned logits (a variant that
        // skipped a tile cannot pass on the previous variant's output).
        let nan = vec![bf16::NAN; t * v];
        let variants = [
            (gpu.cuda_wide.as_ref(), "wide tiles"),
            (gpu.cuda_mma.as_ref(), "mma.sync"),
            (gpu.cuda_wide_mma.as_ref(), "wide, mma.sync"),
            (gpu.cuda_wgmma.as_ref(), "wgmma"),
            (gpu.cuda_wide_wgmma.as_ref(), "wide, wgmma"),
            (gpu.cuda_cublas.as_ref(), "cuBLAS"),
        ];
        for (cuda, label) in variants {
            let Some(cuda) = cuda else {
                println!(
                    "  head_forward ours ({label}): not run (--variants; wgmma needs compute capability 9.0; \
                     cuBLAS must load)"
                );
                continue;
            };
            let res = (|| -> Res<()> {
                gpu.stream.memcpy_htod(&nan, &mut out).ctx("poison logits")?;
                tl(cuda.head_forward(&m.cfg, &m.weights(), h.as_view(), out.as_view_mut()))?;
                rep.check(&sh, format!("head_forward ours ({label}) vs CPU"), rel_host(&down(gpu, &out)?, &logits));
                Ok(())
            })();
            if let Err(e) = res {
                rep.error(&sh, "head_forward", &format!("ours ({label})"), e);
            }
        }
    } else {
        println!("  head_forward ours: not implemented");
    }
    unfused_head_forward(gpu, &m, &h, &mut out)?;
    rep.check(&sh, "head_forward (a) unfused vs CPU", rel_host(&down(gpu, &out)?, &logits));
    cublas_base_gemm(gpu, &m, &h, &mut out)?;
    rep.check(&sh, "head_forward (b) cuBLAS h·Wᵀ vs CPU (U = 0)", rel_host(&down(gpu, &out)?, &base));

    // head backward
    let (mut dh_c, mut du_c, mut dvh_c) = (vec![0f32; t * d], vec![0f32; v * r], vec![0f32; r * d]);
    {
        let mut gr = Grads::<CpuReference> { lora_vocab: &mut du_c, lora_hidden: &mut dvh_c, w: None };
        tl(cpu.head_backward::<f32, f32>(&m.cfg, &cw, &hh, &gh, &mut dh_c, &mut gr))?;
    }
    let (dh_c, du_c, dvh_c) = (wide(&dh_c), wide(&du_c), wide(&dvh_c));
    let mut dh = gpu.alloc::<bf16>(t * d)?;
    let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
    let res = {
        let mut gr = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
        gpu.cuda.head_backward::<bf16, bf16>(&m.cfg, &m.weights(), h.as_view(), g.as_view(), dh.as_view_mut(), &mut gr)
    };
    if implemented(res)? {
        rep.check(&sh, "head_backward ours dh vs CPU", rel_host(&down(gpu, &dh)?, &dh_c));
        rep.check(&sh, "head_backward ours dU vs CPU", rel_host(&down(gpu, &du)?, &du_c));
        rep.check(&sh, "head_backward ours dVh vs CPU", rel_host(&down(gpu, &dvh)?, &dvh_c));
        for (cuda, label) in [(gpu.cuda_mma.as_ref(), "mma.sync"), (gpu.cuda_cublas.as_ref(), "cuBLAS")] {
            let Some(cuda) = cuda else {
                println!("  head_backward ours ({label}): not run (--variants, or libcublas did not load)");
                continue;
            };
            let res = (|| -> Res<()> {
                let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
                gpu.stream.memcpy_htod(&vec![bf16::NAN; t * d], &mut dh).ctx("poison dh")?;
                {
                    let mut gr = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
                    let (hv, gv) = (h.as_view(), g.as_view());
                    tl(cuda.head_backward::<bf16, bf16>(&m.cfg, &m.weights(), hv, gv, dh.as_view_mut(), &mut gr))?;
                }
                rep.check(&sh, format!("head_backward ours ({label}) dh vs CPU"), rel_host(&down(gpu, &dh)?, &dh_c));
                rep.check(&sh, format!("head_backward ours ({label}) dU vs CPU"), rel_host(&down(gpu, &du)?, &du_c));
                rep.check(&sh, format!("head_backward ours ({label}) dVh vs CPU"), rel_host(&down(gpu, &dvh)?, &dvh_c));
                Ok(())
            })();
            if let Err(e) = res {
                rep.error(&sh, "head_backward", &format!("ours ({label})"), e);
            }
        }
    } else {
        println!("  head_backward ours: not implemented");
    }
    let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
    unfused_head_backward(gpu, &m, &h, &g, &mut dh, &mut du, &mut dvh)?;
    rep.check(&sh, "head_backward unfused dh vs CPU", rel_host(&down(gpu, &dh)?, &dh_c));
    rep.check(&sh, "head_backward unfused dU vs CPU", rel_host(&down(gpu, &du)?, &du_c));
    rep.check(&sh, "head_backward unfused dVh vs CPU", rel_host(&down(gpu, &dvh)?, &dvh_c));

    // embedding forward
    let mut e_c = vec![0f32; t * d];
    tl(cpu.embed_forward::<f32, u32>(&m.cfg, &cw, &ids_host, &mut e_c))?;
    let e_c = wide(&e_c);
    let mut e = gpu.alloc::<bf16>(t * d)?;
    if implemented(gpu.cuda.embed_forward::<bf16, u32>(&m.cfg, &m.weights(), ids.buf.as_view(), e.as_view_mut()))? {
        rep.check(&sh, "embed_forward ours vs CPU", rel_host(&down(gpu, &e)?, &e_c));
    } else {
        println!("  embed_forward ours: not implemented");
    }
    unfused_embed_forward(gpu, &m, &ids, &mut e)?;
    rep.check(&sh, "embed_forward unfused vs CPU", rel_host(&down(gpu, &e)?, &e_c));

    // embedding backward
    let (mut du_c, mut dvh_c) = (vec![0f32; v * r], vec![0f32; r * d]);
    {
        let mut gr = Grads::<CpuReference> { lora_vocab: &mut du_c, lora_hidden: &mut dvh_c, w: None };
        tl(cpu.embed_backward::<f32, f32, u32>(&m.cfg, &cw, &ids_host, &deh, &mut gr))?;
    }
    let (du_c, dvh_c) = (wide(&du_c), wide(&dvh_c));
    let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
    let res = {
        let mut gr = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
        gpu.cuda.embed_backward::<bf16, bf16, u32>(&m.cfg, &m.weights(), ids.buf.as_view(), de.as_view(), &mut gr)
    };
    if implemented(res)? {
        rep.check(&sh, "embed_backward ours dU vs CPU", rel_host(&down(gpu, &du)?, &du_c));
        rep.check(&sh, "embed_backward ours dVh vs CPU", rel_host(&down(gpu, &dvh)?, &dvh_c));
    } else {
        println!("  embed_backward ours: not implemented");
    }
    let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
    unfused_embed_backward(gpu, &m, &ids, &de, &mut du, &mut dvh)?;
    rep.check(&sh, "embed_backward unfused dU vs CPU", rel_host(&down(gpu, &du)?, &du_c));
    rep.check(&sh, "embed_backward unfused dVh vs CPU", rel_host(&down(gpu, &dvh)?, &dvh_c));

    // fused head + cross-entropy (softcap 30, mean), forward and backward
    let xcfg = LoraConfig::builder(v, d, r).alpha(sh.alpha).logit_softcap_opt(sh.softcap).build().ctx("LoraConfig")?;
    let (mut lse_c, mut dh_c, mut du_c, mut dvh_c) =
        (vec![0f32; t], vec![0f32; t * d], vec![0f32; v * r], vec![0f32; r * d]);
    let mut loss_c = [0f32];
    tl(cpu.head_xent_forward::<f32, u32>(&xcfg, &cw, &hh, &ids_host, &mut loss_c, &mut lse_c))?;
    {
        let mut gr = Grads::<CpuReference> { lora_vocab: &mut du_c, lora_hidden: &mut dvh_c, w: None };
        tl(cpu.head_xent_backward::<f32, u32>(&xcfg, &cw, &hh, &ids_host, &lse_c, 1.0, &mut dh_c, &mut gr))?;
    }
    let (mut loss, mut lse) = (gpu.zeros::<f32>(1)?, gpu.zeros::<f32>(t)?);
    let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
    let fwd = gpu.cuda.head_xent_forward::<bf16, u32>(
        &xcfg,
        &m.weights(),
        h.as_view(),
        ids.buf.as_view(),
        loss.as_view_mut(),
        lse.as_view_mut(),
    );
    if implemented(fwd)? {
        rep.check(&sh, "xent_forward ours loss vs CPU", rel_host(&down(gpu, &loss)?, &[f64::from(loss_c[0])]));
        rep.check(&sh, "xent_forward ours lse vs CPU", rel_host(&down(gpu, &lse)?, &wide(&lse_c)));
        let res = {
            let mut gr = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
            gpu.cuda.head_xent_backward::<bf16, u32>(
                &xcfg,
                &m.weights(),
                h.as_view(),
                ids.buf.as_view(),
                lse.as_view(),
                1.0,
                dh.as_view_mut(),
                &mut gr,
            )
        };
        if implemented(res)? {
            rep.check(&sh, "xent_backward ours dh vs CPU", rel_host(&down(gpu, &dh)?, &wide(&dh_c)));
            rep.check(&sh, "xent_backward ours dU vs CPU", rel_host(&down(gpu, &du)?, &wide(&du_c)));
            rep.check(&sh, "xent_backward ours dVh vs CPU", rel_host(&down(gpu, &dvh)?, &wide(&dvh_c)));
        } else {
            println!("  head_xent_backward ours: not implemented");
        }
        // The optional backends: forward and backward into NaN-poisoned
        // outputs (the backward from its own forward's lse); an error is
        // recorded and the others still run.
        let variants = [
            (gpu.cuda_mma.as_ref(), "mma.sync"),
            (gpu.cuda_wgmma_mma.as_ref(), "wgmma"),
            (gpu.cuda_cublas.as_ref(), "cuBLAS"),
        ];
        for (c, label) in variants {
            let Some(c) = c else {
                println!("  head_xent ours ({label}): not run (--variants, compute capability or libcublas)");
                continue;
            };
            let res = (|| -> Res<()> {
                let (mut loss, mut lse) = (gpu.alloc::<f32>(1)?, gpu.alloc::<f32>(t)?);
                gpu.stream.memcpy_htod(&[f32::NAN], &mut loss).ctx("poison loss")?;
                gpu.stream.memcpy_htod(&vec![f32::NAN; t], &mut lse).ctx("poison lse")?;
                gpu.stream.memcpy_htod(&vec![bf16::NAN; t * d], &mut dh).ctx("poison dh")?;
                let (mut du, mut dvh) = (gpu.zeros::<f32>(v * r)?, gpu.zeros::<f32>(r * d)?);
                let (hv, iv) = (h.as_view(), ids.buf.as_view());
                tl(c.head_xent_forward::<bf16, u32>(
                    &xcfg,
                    &m.weights(),
                    hv,
                    iv,
                    loss.as_view_mut(),
                    lse.as_view_mut(),
                ))?;
                let want = [f64::from(loss_c[0])];
                rep.check(&sh, format!("xent_forward ours ({label}) loss vs CPU"), rel_host(&down(gpu, &loss)?, &want));
                rep.check(
                    &sh,
                    format!("xent_forward ours ({label}) lse vs CPU"),
                    rel_host(&down(gpu, &lse)?, &wide(&lse_c)),
                );
                {
                    let mut gr = Grads { lora_vocab: du.as_view_mut(), lora_hidden: dvh.as_view_mut(), w: None };
                    let (hv, iv, lv) = (h.as_view(), ids.buf.as_view(), lse.as_view());
                    tl(c.head_xent_backward::<bf16, u32>(
                        &xcfg,
                        &m.weights(),
                        hv,
                        iv,
                        lv,
                        1.0,
                        dh.as_view_mut(),
                        &mut gr,
                    ))?;
                }
                rep.check(
                    &sh,
                    format!("xent_backward ours ({label}) dh vs CPU"),
                    rel_host(&down(gpu, &dh)?, &wide(&dh_c)),
                );
                rep.check(
                    &sh,
                    format!("xent_backward ours ({label}) dU vs CPU"),
                    rel_host(&down(gpu, &du)?, &wide(&du_c)),
                );
                rep.check(
                    &sh,
                    format!("xent_backward ours ({label}) dVh vs CPU"),
                    rel_host(&down(gpu, &dvh)?, &wide(&dvh_c)),
                );
                Ok(())
            })();
            if let Err(e) = res {
                rep.error(&sh, "xent", &format!("ours ({label})"), e);
            }
        }
    } else {
        println!("  head_xent_forward ours: not implemented");
    }
    println!("  (CPU reference and comparisons took {:.1} s)", cpu_t0.elapsed().as_secs_f64());
    Ok(())
}
