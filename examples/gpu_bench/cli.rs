//! Command line: the benchmark shapes, the optional backend families
//! (`--variants`) and the run settings.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) key: &'static str,
    pub(crate) model: &'static str,
    pub(crate) tokens: usize,
    pub(crate) vocab: usize,
    pub(crate) hidden: usize,
    pub(crate) rank: usize,
    pub(crate) alpha: f64,
    pub(crate) embed_scale: f64,
    /// Final-logit softcap of the model (Gemma 2: 30), for the cross-entropy rows.
    pub(crate) softcap: Option<f64>,
}

pub(crate) const GEMMA: Shape = Shape {
    key: "gemma",
    model: "Gemma-2-2B",
    tokens: 8192,
    vocab: 256_000,
    hidden: 2304,
    rank: 16,
    alpha: 32.0,
    embed_scale: 48.0, // sqrt(2304)
    softcap: Some(30.0),
};
pub(crate) const LLAMA: Shape = Shape {
    key: "llama",
    model: "Llama-3.2-1B",
    tokens: 8192,
    vocab: 128_256,
    hidden: 2048,
    rank: 16,
    alpha: 32.0,
    embed_scale: 1.0,
    softcap: None,
};
pub(crate) const QUICK: Shape = Shape {
    key: "quick",
    model: "smoke",
    tokens: 512,
    vocab: 8192,
    hidden: 512,
    rank: 16,
    alpha: 32.0,
    embed_scale: 1.0,
    softcap: Some(30.0),
};

/// The gradient filter's ε in the filtered cross-entropy rows: Cut
/// Cross-Entropy's default (`filter_eps = "high"`, bf16 eps / 32).
pub(crate) const FILTER_EPS: f64 = 1.0 / 4096.0;
/// Relative-norm tolerance for bf16 outputs (DESIGN.md §3).
pub(crate) const TOL_BF16: f64 = 8e-3;
/// cuBLAS workspace handed to the handle (allocated before any measurement).
pub(crate) const CUBLAS_WORKSPACE: usize = 32 << 20;

pub(crate) const USAGE: &str = "usage: gpu_bench [--quick | --shapes gemma,llama,quick] [--verify] [--out DIR]
                 [--warmup N] [--iters N] [--copy-mib N] [--variants LIST]
  --quick        the small smoke shape only (T=512, V=8192, d=512, r=16)
  --shapes LIST  comma-separated: gemma (T=8192 V=256000 d=2304), llama (T=8192 V=128256 d=2048), quick
  --verify       quick shape: every GPU path once, downloaded and compared with tiedlora::CpuReference (no timing)
  --out DIR      where results.json/results.md (verify.json/verify.md with --verify) go (default .)
  --warmup N     untimed calls per path (default 5)
  --iters N      timed calls per path, median reported (default 20; fewer is allowed but flagged)
  --copy-mib N   size of the device-to-device copy that gives the bandwidth reference (default 4096)
  --variants LIST  the optional backends to run beside the default kernels and the baselines, comma-separated
                 from tiles (wide tiles, grad_h 2 blocks/SM, 128 MiB blocks), mma, wgmma, cublas, defer; or all
                 (default), none. gpu-check.sh leaves out a family whose GPU tests failed: a crash (a sticky
                 CUDA error) would poison every later row of the process";

/// The optional backends `gpu_bench` runs beside the default kernels and the
/// baselines (`--variants`), by family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Variants {
    /// wide tiles, grad_h at 2 blocks/SM, 128 MiB
    /// cross-entropy blocks (the WMMA kernels).
    pub(crate) tiles: bool,
    /// `Cuda::with_mma` (and with wide tiles).
    pub(crate) mma: bool,
    /// `Cuda::with_wgmma` and its combinations.
    pub(crate) wgmma: bool,
    /// `Cuda::with_cublas` (32 MiB and 128 MiB chunks).
    pub(crate) cublas: bool,
    /// `Cuda::with_deferred_id_errors`.
    pub(crate) defer: bool,
}

impl Variants {
    const ALL: Variants = Variants { tiles: true, mma: true, wgmma: true, cublas: true, defer: true };
    const NONE: Variants = Variants { tiles: false, mma: false, wgmma: false, cublas: false, defer: false };

    pub(crate) fn parse(list: &str) -> Res<Variants> {
        let mut v = Variants::NONE;
        for name in list.split(',').filter(|s| !s.is_empty()) {
            match name {
                "all" => v = Variants::ALL,
                "none" => {}
                "tiles" => v.tiles = true,
                "mma" => v.mma = true,
                "wgmma" => v.wgmma = true,
                "cublas" => v.cublas = true,
                "defer" => v.defer = true,
                other => {
                    return Err(format!(
                        "unknown variant family {other:?} (tiles, mma, wgmma, cublas, defer, all, none)"
                    ))
                }
            }
        }
        Ok(v)
    }
}

#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) shapes: Vec<Shape>,
    pub(crate) verify: bool,
    pub(crate) out: PathBuf,
    pub(crate) warmup: usize,
    pub(crate) iters: usize,
    pub(crate) copy_bytes: usize,
    pub(crate) variants: Variants,
}

pub(crate) fn parse_args() -> Res<Args> {
    let mut a = Args {
        shapes: vec![GEMMA, LLAMA],
        verify: false,
        out: PathBuf::from("."),
        warmup: 5,
        iters: 20,
        copy_bytes: 4096 << 20,
        variants: Variants::ALL,
    };
    let mut quick = false;
    let mut copy_set = false;
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> Res<usize> {
        v.ok_or(format!("{flag} needs a value"))?.parse().map_err(|_| format!("{flag}: not a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--verify" => a.verify = true,
            "--out" => a.out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--warmup" => a.warmup = num(it.next(), "--warmup")?,
            "--iters" => a.iters = num(it.next(), "--iters")?.max(1),
            "--copy-mib" => {
                a.copy_bytes = num(it.next(), "--copy-mib")?.max(1) << 20;
                copy_set = true;
            }
            "--shapes" => {
                let list = it.next().ok_or("--shapes needs a list")?;
                a.shapes = list
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| match s {
                        "gemma" => Ok(GEMMA),
                        "llama" => Ok(LLAMA),
                        "quick" => Ok(QUICK),
                        other => Err(format!("unknown shape {other:?} (gemma, llama, quick)")),
                    })
                    .collect::<Res<_>>()?;
                if a.shapes.is_empty() {
                    return Err("--shapes: empty list".into());
                }
            }
            "--variants" => a.variants = Variants::parse(&it.next().ok_or("--variants needs a list")?)?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if quick || a.verify {
        a.shapes = vec![QUICK];
        if !copy_set {
            a.copy_bytes = 256 << 20;
        }
    }
    Ok(a)
}
