//! Golden cases (`tiedlora-golden-1`, DESIGN.md §3): discovery, loading, comparison.

use std::path::{Path, PathBuf};
use tiedlora::io::TensorFile;
use tiedlora::{DType, Error, LoraConfig, Reduction, Result};

/// Where a golden case lives.
#[derive(Debug, Clone)]
pub enum CasePath {
    /// One `*.safetensors` file with inputs and expected outputs of every op.
    Standard(PathBuf),
    /// A folder written by PEFT: adapter files plus `e2e.safetensors`.
    PeftE2e(PathBuf),
}

impl CasePath {
    pub fn name(&self) -> String {
        match self {
            CasePath::Standard(p) => p.file_stem().unwrap_or_default().to_string_lossy().into_owned(),
            CasePath::PeftE2e(p) => p.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        }
    }
}

/// The project's own goldens (copied from shared/goldens). A test binary run
/// outside cargo (the GPU machine runs prebuilt binaries from another checkout
/// path) finds them relative to the working directory, the repository root.
pub fn builtin_dir() -> PathBuf {
    let rel = Path::new("tests/data/goldens");
    let candidates = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(|d| PathBuf::from(d).join(rel)),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)),
        Some(rel.to_path_buf()),
    ];
    candidates.into_iter().flatten().find(|p| p.is_dir()).unwrap_or_else(|| rel.to_path_buf())
}

/// Every case in `dir`: each `*.safetensors` file, and each sub-folder holding `e2e.safetensors`.
/// An unreadable directory is an error, not an empty list.
pub fn discover(dir: &Path) -> Result<Vec<CasePath>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::File {
        path: dir.display().to_string(),
        reason: format!("cannot list golden directory: {e}"),
    })?;
    let mut cases = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::File { path: dir.display().to_string(), reason: e.to_string() })?.path();
        if path.is_dir() && path.join("e2e.safetensors").is_file() {
            cases.push(CasePath::PeftE2e(path));
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            cases.push(CasePath::Standard(path));
        }
    }
    cases.sort_by_key(|c| c.name());
    Ok(cases)
}

/// Built-in cases plus those in `$TIEDLORA_GOLDENS` if it is set.
pub fn all_cases() -> Result<Vec<(String, CasePath)>> {
    let mut out: Vec<(String, CasePath)> =
        discover(&builtin_dir())?.into_iter().map(|c| ("builtin".to_string(), c)).collect();
    if let Some(extra) = std::env::var_os("TIEDLORA_GOLDENS") {
        let dir = PathBuf::from(extra);
        let found = discover(&dir)?;
        if found.is_empty() {
            return Err(Error::File {
                path: dir.display().to_string(),
                reason: "TIEDLORA_GOLDENS names a directory with no golden cases".into(),
            });
        }
        out.extend(found.into_iter().map(|c| ("TIEDLORA_GOLDENS".to_string(), c)));
    }
    Ok(out)
}

/// A golden file with its config and storage dtype parsed from the metadata.
pub struct Golden {
    pub file: TensorFile,
    pub cfg: LoraConfig,
    pub dtype: DType,
}

fn parse<T: std::str::FromStr>(file: &TensorFile, key: &str) -> Result<T> {
    let raw = file.meta(key)?;
    raw.parse().map_err(|_| file.err(format!("metadata `{key}` = {raw:?} does not parse")))
}

impl Golden {
    pub fn open(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let format = file.meta("format")?;
        if format != "tiedlora-golden-1" {
            return Err(file.err(format!("format {format:?}, expected \"tiedlora-golden-1\"")));
        }
        let dtype_s = file.meta("dtype")?;
        let dtype = DType::parse(dtype_s).ok_or_else(|| Error::UnsupportedDtype {
            arg: format!("{}: metadata `dtype`", path.display()),
            actual: dtype_s.to_string(),
            expected: "f32, f16, bf16",
        })?;
        let reduction_s = file.meta("reduction")?;
        let reduction = Reduction::parse(reduction_s)
            .ok_or_else(|| file.err(format!("metadata `reduction` = {reduction_s:?}, expected mean or sum")))?;
        let softcap: f64 = parse(&file, "logit_softcap")?;
        let cfg = LoraConfig::builder(parse(&file, "vocab")?, parse(&file, "hidden")?, parse(&file, "rank")?)
            .alpha(parse(&file, "alpha")?)
            .use_rslora(parse(&file, "use_rslora")?)
            .embed_scale(parse(&file, "embed_scale")?)
            .logit_softcap_opt(Some(softcap))
            .ignore_index(parse(&file, "ignore_index")?)
            .reduction(reduction)
            .build()?;
        let scale: f64 = parse(&file, "scale")?;
        if (cfg.scale() - scale).abs() > 1e-9 * scale.abs().max(1.0) {
            return Err(
                file.err(format!("metadata scale {scale} disagrees with alpha/rank/use_rslora ({})", cfg.scale()))
            );
        }
        Ok(Golden { file, cfg, dtype })
    }

    /// An expected tensor widened to f64, checked against the expected element count.
    pub fn expected(&self, name: &str, len: usize) -> Result<Vec<f64>> {
        let (v, shape) = self.file.f64(name)?;
        if v.len() != len {
            return Err(self
                .file
                .err(format!("tensor `{name}` has shape {shape:?} ({} values), expected {len}", v.len())));
        }
        Ok(v)
    }

    /// Ids/targets as i64, checked against the `tokens` metadata.
    pub fn tokens(&self, name: &str) -> Result<Vec<i64>> {
        let (v, _) = self.file.i64(name)?;
        let t: usize = parse(&self.file, "tokens")?;
        if v.len() != t {
            return Err(self.file.err(format!("`{name}` has {} values, metadata tokens = {t}", v.len())));
        }
        Ok(v)
    }
}

/// ‖out − ref‖ / ‖ref‖ (‖out‖ when ref is all zeros). NaN or ∞ anywhere gives NaN, which never passes.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_err: length mismatch");
    if out.iter().chain(reference).any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let diff: f64 = out.iter().zip(reference).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// One comparison line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub case: String,
    pub op: &'static str,
    pub backend: String,
    pub tensor: String,
    pub err: f64,
    pub tol: f64,
    /// The backend does not implement this op (shown as SKIP, never as ok).
    pub skipped: bool,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.skipped || self.err <= self.tol // NaN compares false
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.skipped {
            return write!(
                f,
                "{:<28} {:<20} {:<15} SKIP: not implemented on this backend",
                self.case, self.op, self.backend
            );
        }
        write!(
            f,
            "{:<28} {:<20} {:<15} {:<24} rel_err {:>10.3e}  tol {:>7.1e}  {}",
            self.case,
            self.op,
            self.backend,
            self.tensor,
            self.err,
            self.tol,
            if self.passed() { "ok" } else { "FAIL" }
        )
    }
}
