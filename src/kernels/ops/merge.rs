//! `merge` / `unmerge` of the LoRA delta into W (`kernels/merge.cu`).

use super::*;

/// `W ± s·U·Vh` in place, rounded once to W's dtype.
///
/// # Safety
/// `w` holds W [V, d] in `t` (updated in place), `u` U [V, r] and `vh` Vh
/// [r, d] f32, valid until the executor's launches finish.
pub unsafe fn merge<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    w: u64,
    u: u64,
    vh: u64,
    subtract: bool,
) -> Result<()> {
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let params = MergeParams {
        w,
        u,
        vh,
        rows: i32_of("vocab", v)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        subtract: i32::from(subtract),
        _pad: 0,
    };
    let plan = LaunchPlan {
        kernel: select::by_dtype("tl_merge_", t, "")?,
        grid: (blocks(d, THREADS), blocks(v, 8).min(65535), 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: W [V, d], U [V, r], Vh [r, d] checked by the caller.
    unsafe { e.launch(&plan, &params) }
}
