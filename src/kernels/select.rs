//! The one place that decides which implementation runs each head GEMM, and
//! the kernel it launches.
//!
//! The ops ask [`gemm`] (and [`cublas`]) with the op, the dtypes and the
//! executor's [`KernelOptions`]; the answer names the kernel through the
//! `*_kernel` functions here, which look it up among the kernels this build
//! compiled ([`compiled`]): a name the ops build and the build lacks is an
//! `Err`, never a launch of a missing symbol. The default build has one
//! implementation per op, [`Gemm::Tile`] (the WMMA tile GEMM, register-staged:
//! the path measured on an H200, BENCHMARKS.md 2026-11-28); the others exist
//! with the feature `experimental-kernels` until a GPU run measures them.
//! The fused cross-entropy has no measured path yet: its default is the
//! same tile GEMM with the logit tile kept in shared memory, because that
//! GEMM is the one that has passed the GPU parity tests. The performance
//! model (DESIGN.md §7) expects the cuBLAS path to be faster, but its cuBLAS
//! calls have never run, so it stays experimental until a GPU run checks and
//! times it.

use super::exec::KernelOptions;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The implementation of one head GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gemm {
    /// WMMA tiles of 128 × 128, register-staged main loop (the default).
    Tile,
    /// [`Gemm::Tile`]'s rank <= 16 half-precision `grad_h` with two resident
    /// blocks per SM on sm_90+ (`_2blocks`).
    #[cfg(feature = "experimental-kernels")]
    TileTwoBlocks,
    /// 128 × 256 WMMA tiles on a 3-stage cp.async ring (`_w256`, forward only).
    #[cfg(feature = "experimental-kernels")]
    WideTile,
    /// ldmatrix + mma.sync on a 3-stage cp.async ring (`_mma`); `wide`:
    /// 128 × 256 tiles (`_w256_mma`, forward only).
    #[cfg(feature = "experimental-kernels")]
    Mma { wide: bool },
    /// Hopper warpgroup MMAs (`_wgmma`, sm_90a only); `wide`: 128 × 256
    /// tiles (`_w256_wgmma`, forward only).
    #[cfg(feature = "experimental-kernels")]
    Wgmma { wide: bool },
}

/// Which GEMM of the head ops asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// `head_forward`'s logits.
    HeadForward,
    /// The fused cross-entropy's logit kernels (forward partials, backward G).
    XentLogits,
    /// The head backward's `dh` and `G·U`; `filtered`: G has tile flags.
    GradH { u_cols: usize, filtered: bool },
    /// The head backward's `dU` / `dW`; `filtered` as for `GradH`.
    GradParam { filtered: bool },
    /// The head backward's second G·U product, with U's low parts as the B
    /// matrix of a plain grad_h launch (f16 / bf16): the tile kernels, or
    /// their mma.sync variant (the wgmma kernels stage U differently).
    GuLowPart,
}

/// The implementation of the GEMM at `site`, for storage dtype `t` and
/// upstream-gradient dtype `g`.
pub(crate) fn gemm(site: Site, t: DType, g: DType, opts: &KernelOptions) -> Gemm {
    #[cfg(feature = "experimental-kernels")]
    {
        let half = t != DType::F32;
        let same = t == g;
        match site {
            Site::HeadForward if half => {
                if opts.wgmma {
                    return Gemm::Wgmma { wide: opts.wide_tiles };
                }
                if opts.mma {
                    return Gemm::Mma { wide: opts.wide_tiles };
                }
                if opts.wide_tiles {
                    return Gemm::WideTile;
                }
            }
            Site::XentLogits if half => {
                if opts.wgmma {
                    return Gemm::Wgmma { wide: false };
                }
                if opts.mma {
                    return Gemm::Mma { wide: false };
                }
            }
            Site::GradH { u_cols, filtered } if half => {
                if opts.wgmma && same && !filtered {
                    return Gemm::Wgmma { wide: false };
                }
                if opts.mma && same {
                    return Gemm::Mma { wide: false };
                }
                if opts.grad_h_two_blocks && u_cols == 16 && !filtered {
                    return Gemm::TileTwoBlocks;
                }
            }
            Site::GuLowPart if half && same && opts.mma => return Gemm::Mma { wide: false },
            Site::GradParam { filtered } if half && same => {
                if opts.wgmma && !filtered {
                    return Gemm::Wgmma { wide: false };
                }
                if opts.mma {
                    return Gemm::Mma { wide: false };
                }
            }
            _ => {}
        }
    }
    let _ = (site, t, g, opts);
    Gemm::Tile
}

/// The head op asking [`cublas`].
#[cfg_attr(not(feature = "experimental-kernels"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadOp {
    Forward,
    /// `head_backward` with G in dtype `g`.
    Backward,
    XentForward,
    XentBackward,
}

/// Whether `op` runs its GEMMs on cuBLAS ([`KernelOptions::cublas`]):
/// `head_backward` only with G in the storage dtype.
pub(crate) fn cublas(op: HeadOp, t: DType, g: DType, opts: &KernelOptions) -> bool {
    #[cfg(feature = "experimental-kernels")]
    {
        opts.cublas && (op != HeadOp::Backward || t == g)
    }
    #[cfg(not(feature = "experimental-kernels"))]
    {
        let _ = (op, t, g, opts);
        false
    }
}

/// Columns of U staged beside W's in a `grad_h` tile for rank `r`: the
/// smallest of 16, 32, 64 that holds r (64 for every rank with
/// `wgmma_whole_atoms` on the wgmma kernels).
pub(crate) fn grad_h_u_cols(r: usize, gemm: Gemm, opts: &KernelOptions) -> Result<usize> {
    let cols = match r {
        0..=16 => 16,
        17..=32 => 32,
        33..=MAX_HEAD_RANK => 64,
        _ => {
            return Err(Error::UnsupportedCombination(format!(
                "rank {r}: the fused head backward kernels support rank <= {MAX_HEAD_RANK}"
            )))
        }
    };
    #[cfg(feature = "experimental-kernels")]
    if matches!(gemm, Gemm::Wgmma { .. }) && opts.wgmma_whole_atoms {
        return Ok(MAX_HEAD_RANK);
    }
    let _ = (gemm, opts);
    Ok(cols)
}

/// Largest rank the head backward keeps in its grad_h tiles' extra columns;
/// above it, G·W and G·U are two GEMMs (`ops::head_grads::grad_h_wide_rank`).
pub const MAX_HEAD_RANK: usize = 64;

/// The kernel-name suffix of an implementation (the `.cu` instantiations'
/// naming: `kernels/head.cu`, `xent.cu`, `xent_grad.cu`).
fn suffix(gemm: Gemm) -> &'static str {
    match gemm {
        Gemm::Tile => "",
        #[cfg(feature = "experimental-kernels")]
        Gemm::TileTwoBlocks => "_2blocks",
        #[cfg(feature = "experimental-kernels")]
        Gemm::WideTile => "_w256",
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { wide: false } => "_mma",
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { wide: true } => "_w256_mma",
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { wide: false } => "_wgmma",
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { wide: true } => "_w256_wgmma",
    }
}

/// `<storage>_<gradient>` in kernel names; the gradient is the storage dtype or f32.
fn dtype_pair(t: DType, g: DType) -> Result<String> {
    if g != t && g != DType::F32 {
        return Err(Error::UnsupportedCombination(format!(
            "upstream gradient in {g} for {t} weights: the kernels take the storage dtype or f32"
        )));
    }
    Ok(format!("{t}_{g}"))
}

/// `head_forward`'s kernel.
pub(crate) fn head_forward_kernel(t: DType, gemm: Gemm) -> Result<&'static str> {
    compiled_named(format!("tl_head_forward_{t}{}", suffix(gemm)))
}

/// `grad_h`'s kernel for `u_cols` U columns ([`grad_h_u_cols`]).
pub(crate) fn grad_h_kernel(t: DType, g: DType, u_cols: usize, gemm: Gemm) -> Result<&'static str> {
    compiled_named(format!("tl_head_grad_h_{}_u{u_cols}{}", dtype_pair(t, g)?, suffix(gemm)))
}

/// `grad_param`'s kernel for `bn` = 64 (dU) or 128 (dW) output columns per block.
pub(crate) fn grad_param_kernel(t: DType, g: DType, bn: usize, gemm: Gemm) -> Result<&'static str> {
    compiled_named(format!("tl_head_grad_param_{}_n{bn}{}", dtype_pair(t, g)?, suffix(gemm)))
}

/// The fused cross-entropy forward's partials kernel.
pub(crate) fn xent_partial_kernel(t: DType, gemm: Gemm) -> Result<&'static str> {
    compiled_named(format!("tl_xent_partial_{t}{}", suffix(gemm)))
}

/// The fused cross-entropy backward's G kernel.
pub(crate) fn xent_grad_logits_kernel(t: DType, gemm: Gemm) -> Result<&'static str> {
    compiled_named(format!("tl_xent_grad_logits_{t}{}", suffix(gemm)))
}

/// `prefix` + the dtype's name + `suffix`: the per-dtype kernels with one variant.
pub(crate) fn by_dtype(prefix: &str, t: DType, suffix: &str) -> Result<&'static str> {
    compiled_named(format!("{prefix}{t}{suffix}"))
}

/// The compiled kernel `name` (a kernel with one variant), or an `Err` that
/// names it.
pub(crate) fn kernel(name: &str) -> Result<&'static str> {
    compiled_named(name.to_string())
}

fn compiled_named(name: String) -> Result<&'static str> {
    compiled(&name).ok_or_else(|| {
        Error::UnsupportedCombination(format!(
            "kernel {name} is not compiled into this build{}",
            if cfg!(feature = "experimental-kernels") {
                ""
            } else {
                " (experimental kernels need the feature `experimental-kernels`)"
            }
        ))
    })
}

/// The kernel named `name` among those this build compiled: the CUDA
/// modules' (from ptxas's report) or the CPU shim's (from the archive's
/// symbols), both generated by build.rs from `kernels/*.cu`.
pub(crate) fn compiled(name: &str) -> Option<&'static str> {
    #[cfg(feature = "cuda")]
    if let Some(k) = super::MODULES.iter().flat_map(|m| m.kernels.iter()).find(|k| k.name == name) {
        return Some(k.name);
    }
    #[cfg(feature = "cpu-kernels")]
    if let Ok(i) = super::host::SHIM_TABLE.binary_search_by(|(n, _)| (*n).cmp(name)) {
        return Some(super::host::SHIM_TABLE[i].0);
    }
    let _ = name;
    None
}

/// Every kernel this build compiled (sorted, the shim's self-test kernels
/// excepted).
pub fn compiled_kernels() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut names: Vec<&'static str> = Vec::new();
    #[cfg(feature = "cuda")]
    names.extend(
        super::MODULES.iter().filter(|m| m.name != "shim_selftest").flat_map(|m| m.kernels.iter().map(|k| k.name)),
    );
    #[cfg(feature = "cpu-kernels")]
    names.extend(super::host::SHIM_TABLE.iter().map(|(n, _)| *n));
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Every option set the selection can see (the default build has one).
    fn option_sets() -> Vec<KernelOptions> {
        #[allow(unused_mut)]
        let mut sets = vec![KernelOptions::default()];
        #[cfg(feature = "experimental-kernels")]
        for bits in 0..64u32 {
            sets.push(KernelOptions {
                grad_h_two_blocks: bits & 1 != 0,
                wide_tiles: bits & 2 != 0,
                mma: bits & 4 != 0,
                wgmma: bits & 8 != 0,
                wgmma_whole_atoms: bits & 16 != 0,
                cublas: bits & 32 != 0,
                ..KernelOptions::default()
            });
        }
        sets
    }

    /// Every kernel any selection can name is compiled into this build: the
    /// ops never ask for a symbol the build lacks (in the default build, no
    /// experimental one), for every op, dtype pair, rank and option set.
    #[test]
    fn every_selected_kernel_is_compiled() {
        let mut checked = 0;
        for opts in option_sets() {
            for t in DTYPES {
                for g in [t, DType::F32] {
                    for filtered in [false, true] {
                        for r in [1, 16, 17, 33, 64] {
                            let probe = gemm(Site::GradH { u_cols: 16, filtered }, t, g, &opts);
                            let cols = grad_h_u_cols(r, probe, &opts).unwrap();
                            let k = gemm(Site::GradH { u_cols: cols, filtered }, t, g, &opts);
                            let cols = grad_h_u_cols(r, k, &opts).unwrap();
                            grad_h_kernel(t, g, cols, k).unwrap();
                        }
                        grad_h_kernel(t, g, 16, gemm(Site::GuLowPart, t, g, &opts)).unwrap();
                        for bn in [64, 128] {
                            grad_param_kernel(t, g, bn, gemm(Site::GradParam { filtered }, t, g, &opts)).unwrap();
                        }
                    }
                }
                head_forward_kernel(t, gemm(Site::HeadForward, t, t, &opts)).unwrap();
                let logits = gemm(Site::XentLogits, t, t, &opts);
                xent_partial_kernel(t, logits).unwrap();
                xent_grad_logits_kernel(t, logits).unwrap();
                checked += 1;
            }
        }
        assert!(checked >= 3);
    }

    /// The default build selects the measured path everywhere and compiles
    /// no experimental kernel; with the feature, the variants are there.
    #[test]
    fn default_build_has_one_path_per_op() {
        let names = compiled_kernels();
        let experimental = ["_mma", "_wgmma", "_w256", "_2blocks", "tl_concat_rows_", "_chunk_"];
        let found: Vec<&str> = names.iter().copied().filter(|n| experimental.iter().any(|x| n.contains(x))).collect();
        println!(
            "{} kernels compiled, {} of them experimental (feature experimental-kernels: {})",
            names.len(),
            found.len(),
            cfg!(feature = "experimental-kernels")
        );
        assert!(!names.is_empty());
        if cfg!(feature = "experimental-kernels") {
            assert!(found.len() > 40, "experimental kernels missing: {found:?}");
        } else {
            assert!(found.is_empty(), "experimental kernels in the default build: {found:?}");
            for t in DTYPES {
                for site in [Site::HeadForward, Site::XentLogits, Site::GradParam { filtered: false }] {
                    assert_eq!(gemm(site, t, t, &KernelOptions::default()), Gemm::Tile);
                }
            }
        }
    }

    /// With both kernel features the CUDA modules and the CPU shim define the
    /// same kernels (both lists are generated from the compiled code).
    #[test]
    #[cfg(all(feature = "cuda", feature = "cpu-kernels"))]
    fn cuda_and_shim_builds_define_the_same_kernels() {
        let mut cuda: Vec<&str> = super::super::MODULES
            .iter()
            .filter(|m| m.name != "shim_selftest")
            .flat_map(|m| m.kernels.iter().map(|k| k.name))
            .collect();
        cuda.sort_unstable();
        let shim: Vec<&str> = super::super::host::SHIM_TABLE.iter().map(|(n, _)| *n).collect();
        assert_eq!(cuda, shim);
    }

    #[test]
    fn unknown_kernels_are_errors() {
        let err = compiled_named("tl_no_such_kernel".into()).unwrap_err();
        assert!(err.to_string().contains("tl_no_such_kernel"), "{err}");
        assert!(matches!(
            grad_h_u_cols(65, Gemm::Tile, &KernelOptions::default()),
            Err(Error::UnsupportedCombination(_))
        ));
    }
}
