//! Typed errors. Every message names the argument and the expected vs actual value.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `tiedlora`. No op panics on bad input: it
/// returns one of these before touching any output buffer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer has the wrong number of elements for the shapes in the config.
    #[error("`{arg}` has {actual} elements, expected {expected} ({shape})")]
    BufferLength {
        /// The argument's name.
        arg: &'static str,
        /// Elements the shapes call for.
        expected: usize,
        /// Elements the buffer has.
        actual: usize,
        /// The shape that gives `expected`, e.g. `"[V=97, r=4]"`.
        shape: String,
    },
    /// Two arguments disagree on a shape (e.g. `ids` and `targets` lengths).
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A config field is out of its domain (rank 0, non-finite alpha, ...).
    #[error("invalid config `{field}`: {reason} (got {value})")]
    InvalidConfig {
        /// The config field.
        field: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A token id or target is outside `0..vocab` (and not `ignore_index`).
    #[error("`{arg}[{index}]` = {value} is out of range 0..{vocab}")]
    TokenOutOfRange {
        /// The argument's name.
        arg: &'static str,
        /// Position in the buffer.
        index: usize,
        /// The id found there.
        value: i64,
        /// V.
        vocab: usize,
    },
    /// A tensor in a file or buffer has a dtype this op does not accept.
    #[error("`{arg}`: unsupported dtype {actual}, expected one of {expected}")]
    UnsupportedDtype {
        /// The argument or tensor name.
        arg: String,
        /// The dtype found.
        actual: String,
        /// The dtypes accepted.
        expected: &'static str,
    },
    /// Operand dtypes that a backend has no kernel for.
    #[error("no kernel for dtype combination: {0}")]
    UnsupportedCombination(String),
    /// Reading or parsing a file (safetensors, adapter config, golden).
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The PEFT adapter's head factors differ from the transposed embedding factors.
    #[error("adapter is not tied: {0}")]
    NotTied(String),
    /// A device buffer belongs to another CUDA context (another GPU) than the
    /// backend's stream: its address means nothing to the backend's kernels.
    #[error("`{arg}` lives in {buffer}, the backend's stream in {backend}")]
    WrongDevice {
        /// The argument's name.
        arg: &'static str,
        /// Where the buffer was allocated, e.g. `"device 1"`.
        buffer: String,
        /// Where the backend runs, e.g. `"device 0"`.
        backend: String,
    },
    /// A backend could not be used (no driver, no kernels compiled in, ...).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A backend call failed at run time (driver error, launch failure, ...).
    #[error("backend error: {0}")]
    Backend(String),
}

impl Error {
    /// Shorthand used by the shape checks.
    pub(crate) fn len(arg: &'static str, expected: usize, actual: usize, shape: String) -> Self {
        Error::BufferLength { arg, expected, actual, shape }
    }
}
