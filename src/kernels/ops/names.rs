//! Kernel names of the op variants: the dtype infixes and the suffixes that
//! select a pipeline (`_s3`, `_mma`, `_wgmma`) from the executor's options.

use super::*;

/// A kernel name built at run time, as the `&'static str` a [`LaunchPlan`]
/// holds (each distinct name is allocated once and kept).
pub(super) fn intern(name: String) -> &'static str {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut set = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&known) = set.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    set.insert(leaked);
    leaked
}

/// `_s3` when the executor runs the cp.async pipeline, the weights are f16 or
/// bf16 and the gradient is in the same dtype (the combinations with an `_s3` kernel).
pub(super) fn stage_suffix<E: Executor>(e: &E, t: DType, g: DType) -> &'static str {
    if e.options().gemm_stages == 3 && t == g && t != DType::F32 {
        "_s3"
    } else {
        ""
    }
}

/// Kernel-name suffix and ring depth of the head backward GEMMs (grad_h,
/// grad_param): `_mma` (ldmatrix + mma.sync, 3-stage ring) when the executor
/// asks for it and G is in the storage dtype (f16 / bf16), else as
/// [`stage_suffix`].
pub(super) fn backward_gemm_variant<E: Executor>(e: &E, t: DType, g: DType) -> (&'static str, usize) {
    if e.options().mma && t == g && t != DType::F32 {
        return ("_mma", 3);
    }
    let sfx = stage_suffix(e, t, g);
    (sfx, if sfx.is_empty() { 1 } else { 3 })
}

/// `<storage>_<grad>` kernel-name infix; the gradient is the storage dtype or f32.
pub(super) fn tg_name(t: DType, g: DType, names: [&'static str; 5]) -> Result<&'static str> {
    // names: f32_f32, f16_f16, f16_f32, bf16_bf16, bf16_f32
    Ok(match (t, g) {
        (DType::F32, DType::F32) => names[0],
        (DType::F16, DType::F16) => names[1],
        (DType::F16, DType::F32) => names[2],
        (DType::BF16, DType::BF16) => names[3],
        (DType::BF16, DType::F32) => names[4],
        _ => {
            return Err(Error::UnsupportedCombination(format!(
                "upstream gradient in {g} for {t} weights: the kernels take the storage dtype or f32"
            )))
        }
    })
}
