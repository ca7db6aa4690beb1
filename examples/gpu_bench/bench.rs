//! The benchmark run: settings, row helpers, copy bandwidth and the loop
//! over shapes and ops.

use super::*;

/// Runs `probe` once: `Ok(true)` if ours exists, `Ok(false)` for
/// `BackendUnavailable` (recorded as a "not implemented" row).
pub(crate) fn implemented(res: tiedlora::Result<()>) -> Res<bool> {
    match res {
        Ok(()) => Ok(true),
        Err(tiedlora::Error::BackendUnavailable(_)) => Ok(false),
        Err(e) => Err(format!("{e}")),
    }
}

pub(crate) fn tl<T>(r: tiedlora::Result<T>) -> Res<T> {
    r.map_err(|e| e.to_string())
}

pub(crate) struct Settings {
    pub(crate) warmup: usize,
    pub(crate) iters: usize,
}

/// One timed row of a compute-bound op: TFLOP/s from `flop`, speedup over the
/// unfused path's median, and the share of the cuBLAS reference's TFLOP/s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_timed(
    rep: &mut Report,
    sh: &Shape,
    op: &'static str,
    path: &str,
    t: Option<(Timing, Option<u64>)>,
    flop: f64,
    unfused: Option<(Timing, Option<u64>)>,
    ref_tflops: Option<f64>,
    note: &str,
) {
    let Some((tm, mem)) = t else { return };
    let tflops = flop / (tm.median_ms * 1e-3) / 1e12;
    rep.rows.push(Row {
        shape: sh.key.into(),
        op,
        path: path.into(),
        timing: Some(tm),
        tflops: Some(tflops),
        speedup: unfused.map(|(u, _)| u.median_ms / tm.median_ms),
        pct_ref: ref_tflops.map(|b| tflops / b),
        peak_extra: mem,
        note: note.into(),
        ..Row::default()
    });
}

/// Device-to-device copy bandwidth (bytes read + written per second).
fn bench_copy(gpu: &Gpu, bytes: usize, st: &Settings) -> Res<(Timing, f64)> {
    let src = gpu.zeros::<u8>(bytes)?;
    let mut dst = gpu.alloc::<u8>(bytes)?;
    let tm = gpu.time(st.warmup, st.iters, |_| gpu.stream.memcpy_dtod(&src, &mut dst).ctx("memcpy_dtod"))?;
    Ok((tm, 2.0 * bytes as f64 / (tm.median_ms * 1e-3) / 1e9))
}

pub(crate) fn run_bench(gpu: &Gpu, args: &Args, rep: &mut Report, t0: Instant) {
    let st = Settings { warmup: args.warmup, iters: args.iters };
    println!("copy bandwidth: {} MiB device-to-device", args.copy_bytes >> 20);
    match bench_copy(gpu, args.copy_bytes, &st) {
        Ok((tm, gbs)) => {
            println!("  {:.3} ms median, {gbs:.0} GB/s (read + write)", tm.median_ms);
            rep.copy = Some((args.copy_bytes, tm, gbs));
            rep.rows.push(Row {
                shape: "-".into(),
                op: "copy",
                path: "(c) device-to-device memcpy".into(),
                timing: Some(tm),
                gbs: Some(gbs),
                pct_ref: Some(1.0),
                note: format!("{} MiB; GB/s counts bytes read + written", args.copy_bytes >> 20),
                ..Row::default()
            });
        }
        Err(e) => {
            eprintln!("  ERROR copy: {e}");
            rep.errors.push(format!("copy: {e}"));
        }
    }
    let copy_gbs = rep.copy.map(|(_, _, g)| g);
    for sh in &args.shapes {
        println!(
            "shape {} ({}): T={} V={} d={} r={} s={} c={}",
            sh.key,
            sh.model,
            sh.tokens,
            sh.vocab,
            sh.hidden,
            sh.rank,
            sh.alpha / sh.rank as f64,
            sh.embed_scale
        );
        let start = Instant::now();
        let m = match Model::new(gpu, *sh) {
            Ok(m) => m,
            Err(e) => {
                rep.error(sh, "setup", "-", e);
                continue;
            }
        };
        if let Err(e) = bench_head_forward(gpu, &m, &st, rep) {
            rep.error(sh, "head_forward", "-", e);
        }
        if let Err(e) = bench_head_backward(gpu, &m, &st, rep) {
            rep.error(sh, "head_backward", "-", e);
        }
        if let Err(e) = bench_embed(gpu, &m, &st, copy_gbs, rep) {
            rep.error(sh, "embed", "-", e);
        }
        if let Err(e) = bench_xent(gpu, &m, &st, rep) {
            rep.error(sh, "xent", "-", e);
        }
        drop(m);
        let _ = gpu.sync();
        gpu.mem.trim();
        println!("  shape {} took {:.1} s", sh.key, start.elapsed().as_secs_f64());
        if let Err(e) = write_outputs(args, gpu, rep, t0.elapsed().as_secs_f64(), true) {
            eprintln!("gpu_bench: partial results: {e}");
        }
    }
}
