//! Reading and writing safetensors files (golden cases, PEFT adapters).
//!
//! [`TensorFile`] owns a file's bytes and hands out tensors converted to the
//! type the caller needs; every failure (unreadable file, bad header, missing
//! tensor, unsupported dtype, wrong shape) is an [`Error::File`] or
//! [`Error::UnsupportedDtype`] naming the file and the tensor.

use crate::dtype::Element;
use crate::error::{Error, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A safetensors file held in memory.
#[derive(Debug, Clone)]
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

/// Float tensors are accepted in any of these stored dtypes.
const FLOAT_DTYPES: &str = "F64, F32, F16, BF16";

impl TensorFile {
    /// Reads and parses the header of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Parses bytes already in memory; `path` is only used in messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| file_err(&path, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        // Parse once fully so that offsets are validated up front.
        SafeTensors::deserialize(&bytes).map_err(|e| file_err(&path, e))?;
        Ok(TensorFile { path, bytes, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty if the file has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata value, or an error naming the missing key.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| self.err(format!("metadata key `{key}` is missing")))
    }

    fn tensors(&self) -> SafeTensors<'_> {
        // Cannot fail: `from_bytes` already deserialized these bytes.
        SafeTensors::deserialize(&self.bytes).expect("validated in TensorFile::from_bytes")
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors().names().into_iter().map(String::from).collect();
        names.sort();
        names
    }

    /// Whether the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(t.shape().to_vec())
    }

    /// The stored dtype of tensor `name` as safetensors spells it (`F32`, `BF16`, ...).
    pub fn dtype_name(&self, name: &str) -> Result<String> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(format!("{:?}", t.dtype()))
    }

    /// Tensor `name` widened to f64 from F64, F32, F16 or BF16, with its shape.
    pub fn f64(&self, name: &str) -> Result<(Vec<f64>, Vec<usize>)> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let data = t.data();
        let values = match t.dtype() {
            Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f64()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f64()).collect(),
            other => return Err(self.bad_dtype(name, other, FLOAT_DTYPES)),
        };
        Ok((values, t.shape().to_vec()))
    }

    /// Tensor `name` as f32 (F64 values are rounded once to nearest).
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (v, shape) = self.f64(name)?;
        Ok((v.into_iter().map(|x| x as f32).collect(), shape))
    }

    /// Tensor `name` in storage dtype `T`; it must be stored exactly as `T`
    /// (a golden's `w` and `h` are the exact inputs, so no conversion is allowed).
    pub fn exact<T: Element>(&self, name: &str) -> Result<(Vec<T>, Vec<usize>)> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let want = match T::DTYPE {
            crate::DType::F32 => Dtype::F32,
            crate::DType::F16 => Dtype::F16,
            crate::DType::BF16 => Dtype::BF16,
        };
        if t.dtype() != want {
            return Err(self.bad_dtype(name, t.dtype(), T::DTYPE.name()));
        }
        let values = bytemuck::pod_collect_to_vec::<u8, T>(t.data());
        Ok((values, t.shape().to_vec()))
    }

    /// Integer tensor `name` (I64, I32 or U32) as i64.
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let st = self.tensors();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let data = t.data();
        let values = match t.dtype() {
            Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect(),
            Dtype::U32 => data.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as i64).collect(),
            other => return Err(self.bad_dtype(name, other, "I64, I32, U32")),
        };
        Ok((values, t.shape().to_vec()))
    }

    /// An [`Error::File`] about this file.
    pub fn err(&self, reason: impl Into<String>) -> Error {
        Error::File { path: self.path.display().to_string(), reason: reason.into() }
    }

    fn missing(&self, name: &str) -> Error {
        self.err(format!("tensor `{name}` is missing"))
    }

    fn bad_dtype(&self, name: &str, actual: Dtype, expected: &'static str) -> Error {
        Error::UnsupportedDtype {
            arg: format!("{}: `{name}`", self.path.display()),
            actual: format!("{actual:?}"),
            expected,
        }
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File { path: path.display().to_string(), reason: e.to_string() }
}

/// Writes f32 tensors (name, shape, values) and string metadata as a safetensors file.
pub fn write_f32(
    path: impl AsRef<Path>,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, values) in tensors {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::ShapeMismatch(format!(
                "tensor `{name}` has {} values for shape {shape:?}",
                values.len()
            )));
        }
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))
            .map_err(|e| file_err(path, e))?;
        views.push((name.to_string(), view));
    }
    let bytes = safetensors::serialize(views, metadata).map_err(|e| file_err(path, e))?;
    std::fs::write(path, bytes).map_err(|e| file_err(path, e))
}
