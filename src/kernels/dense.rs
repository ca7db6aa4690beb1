//! [`DenseGemm`]: one plain GEMM handed to an executor's cuBLAS (the cuBLAS path)
//! (`KernelOptions::cublas`: cuBLAS on a GPU, [`host_gemm`] on the CPU shim).
//!
//! The head backward's `dh = G·W` is a textbook GEMM with nothing to fuse in
//! its main loop (the LoRA term `s·(G·U)·Vh` is added afterwards from a
//! [T, r] product), so a vendor GEMM may run it; the op sequences in
//! `ops/` stay the same on both executors, and the CPU tests check them
//! with [`host_gemm`] standing in for cuBLAS.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// One row-major operand of a [`DenseGemm`].
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    /// Address of element (0, 0) of the stored matrix.
    pub addr: u64,
    /// Elements between consecutive stored rows.
    pub ld: usize,
    /// The product uses the stored matrix transposed.
    pub trans: bool,
}

/// Row-major `C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C` with A
/// and B in `ab` (f32, f16 or bf16), C in `c_type` (f32, or `ab`: rounded
/// once from the f32 result), f32 accumulation. `op(A)` is A stored [m, k]
/// (or [k, m] when `a.trans`), `op(B)` is B stored [k, n] (or [n, k]). With
/// `beta == 0`, C is only written (it may hold NaN before).
#[derive(Debug, Clone, Copy)]
pub struct DenseGemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// A.
    pub a: Operand,
    /// B.
    pub b: Operand,
    /// Element type of A and B.
    pub ab: DType,
    /// Address of C.
    pub c: u64,
    /// Element type of C: f32 or `ab`.
    pub c_type: DType,
    /// Elements between consecutive rows of C.
    pub ldc: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's old value (0: C is not read).
    pub beta: f32,
}

/// The column-major call that runs a [`DenseGemm`], argument for argument as
/// `cublasGemmEx` takes it. cuBLAS is column-major: a row-major [r, c]
/// matrix with leading dimension ld is the column-major [c, r] transpose with
/// the same ld, so the row-major `C = op(A)·op(B)` is the column-major
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ`: m' = n, n' = m, B first. Both engines (cuBLAS in
/// `src/cuda/blas.rs`, [`host_gemm`] on the CPU shim) execute this one value,
/// so the CPU tests check the translation cuBLAS receives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColMajorGemm {
    /// `transa`: the first operand is used transposed.
    pub trans_a: bool,
    /// `transb`.
    pub trans_b: bool,
    /// Rows of the column-major C.
    pub m: usize,
    /// Columns of the column-major C.
    pub n: usize,
    /// The reduction length.
    pub k: usize,
    /// `A`, `lda`.
    pub a: (u64, usize),
    /// `B`, `ldb`.
    pub b: (u64, usize),
    /// `C`, `ldc`.
    pub c: (u64, usize),
    /// Element type of A and B.
    pub ab: DType,
    /// Element type of C.
    pub c_type: DType,
    /// `alpha` (host f32: f32 compute).
    pub alpha: f32,
    /// `beta`.
    pub beta: f32,
}

impl DenseGemm {
    /// The column-major call of this row-major GEMM (see [`ColMajorGemm`]).
    pub fn col_major(&self) -> ColMajorGemm {
        ColMajorGemm {
            trans_a: self.b.trans,
            trans_b: self.a.trans,
            m: self.n,
            n: self.m,
            k: self.k,
            a: (self.b.addr, self.b.ld),
            b: (self.a.addr, self.a.ld),
            c: (self.c, self.ldc),
            ab: self.ab,
            c_type: self.c_type,
            alpha: self.alpha,
            beta: self.beta,
        }
    }
}

impl ColMajorGemm {
    /// cuBLAS's documented argument rules for `cublasGemmEx`, checked before
    /// the call so a bad one is a named `Err` on every engine (cuBLAS itself
    /// answers `CUBLAS_STATUS_INVALID_VALUE`): sizes that fit its 32-bit
    /// `int`s, `lda >= max(1, transa ? k : m)`, `ldb >= max(1, transb ? n : k)`,
    /// `ldc >= max(1, m)`, and C in f32 or the operands' type.
    pub fn check(&self) -> Result<()> {
        let fits = |what: &str, v: usize| {
            if i32::try_from(v).is_ok() {
                Ok(())
            } else {
                Err(Error::ShapeMismatch(format!("GEMM {what} = {v} does not fit cuBLAS's 32-bit sizes")))
            }
        };
        for (what, v) in
            [("m", self.m), ("n", self.n), ("k", self.k), ("lda", self.a.1), ("ldb", self.b.1), ("ldc", self.c.1)]
        {
            fits(what, v)?;
        }
        let rows_a = if self.trans_a { self.k } else { self.m };
        let rows_b = if self.trans_b { self.n } else { self.k };
        for (what, ld, rows) in [("lda", self.a.1, rows_a), ("ldb", self.b.1, rows_b), ("ldc", self.c.1, self.m)] {
            if ld < rows.max(1) {
                return Err(Error::ShapeMismatch(format!(
                    "GEMM {}x{}x{}: {what} = {ld} is below the {} rows of its column-major operand",
                    self.m,
                    self.n,
                    self.k,
                    rows.max(1)
                )));
            }
        }
        if self.c_type != DType::F32 && self.c_type != self.ab {
            return Err(Error::UnsupportedCombination(format!(
                "GEMM with {:?} operands into {:?}: C must be f32 or the operands' type",
                self.ab, self.c_type
            )));
        }
        Ok(())
    }
}

/// Reads element `i` of a buffer of `t` values at `addr` as f32.
///
/// # Safety
/// `addr` must point at more than `i` live, aligned values of `t`.
#[cfg(feature = "cpu-kernels")]
unsafe fn load(t: DType, addr: u64, i: usize) -> f32 {
    // SAFETY: the caller guarantees element i exists and is aligned.
    unsafe {
        match t {
            DType::F32 => *(addr as *const f32).add(i),
            DType::F16 => (*(addr as *const half::f16).add(i)).to_f32(),
            DType::BF16 => (*(addr as *const half::bf16).add(i)).to_f32(),
        }
    }
}

/// `op(X)` as a dense f32 matrix [rows, cols], row-major.
///
/// # Safety
/// `x` must address a live matrix of `t` holding `op(X)` as [`Operand`] says.
#[cfg(feature = "cpu-kernels")]
unsafe fn widen(t: DType, x: &Operand, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            let at = if x.trans { j * x.ld + i } else { i * x.ld + j };
            // SAFETY: (i, j) lies inside op(X) (caller).
            out.push(unsafe { load(t, x.addr, at) });
        }
    }
    out
}

/// The CPU shim's stand-in for cuBLAS: what cuBLAS computes for a
/// [`DenseGemm`] (f32 products summed in f32, in order of k), on host memory.
/// It executes the [`ColMajorGemm`] cuBLAS would receive, with cuBLAS's
/// column-major meaning of every argument, after the same argument checks.
///
/// # Safety
/// Every address must point at host memory holding the matrices `g`
/// describes (A, B readable; C writable, and readable unless `beta == 0`),
/// and C must not overlap A or B.
#[cfg(feature = "cpu-kernels")]
pub unsafe fn host_gemm(g: &DenseGemm) -> Result<()> {
    let cm = g.col_major();
    cm.check()?;
    // Column-major op(X) [rows, cols] as a dense row-major f32 copy: element
    // (i, j) of a column-major matrix lies at i + j·ld.
    let op = |(addr, ld): (u64, usize), trans: bool, rows: usize, cols: usize| {
        let stored = Operand { addr, ld, trans: !trans };
        // SAFETY: the caller guarantees the operand holds op(X); `widen` reads
        // row-major (i, j) at i·ld + j, which is column-major (j, i).
        unsafe { widen(cm.ab, &stored, rows, cols) }
    };
    let a = op(cm.a, cm.trans_a, cm.m, cm.k);
    let b = op(cm.b, cm.trans_b, cm.k, cm.n);
    for j in 0..cm.n {
        for i in 0..cm.m {
            let mut acc = 0.0f32;
            for p in 0..cm.k {
                acc = a[i * cm.k + p].mul_add(b[p * cm.n + j], acc);
            }
            let at = i + j * cm.c.1;
            // SAFETY: (i, j) lies inside C (caller); C is not read when beta == 0.
            unsafe {
                let v = if cm.beta == 0.0 {
                    cm.alpha * acc
                } else {
                    cm.alpha * acc + cm.beta * load(cm.c_type, cm.c.0, at)
                };
                match cm.c_type {
                    DType::F32 => *(cm.c.0 as *mut f32).add(at) = v,
                    DType::F16 => *(cm.c.0 as *mut half::f16).add(at) = half::f16::from_f32(v),
                    DType::BF16 => *(cm.c.0 as *mut half::bf16).add(at) = half::bf16::from_f32(v),
                }
            }
        }
    }
    Ok(())
}

#[cfg(all(test, feature = "cpu-kernels"))]
mod tests {
    use super::*;
    use half::bf16;

    /// Every transpose combination against an f64 sum, with leading dimensions
    /// wider than the matrices, beta = 0 over a NaN-filled C (not read) and
    /// beta = 1 (accumulates).
    #[test]
    fn host_gemm_matches_f64_for_every_layout() {
        use rand::Rng;
        let (m, n, k) = (5, 7, 9);
        let pad = 3;
        let mut rng = rand::rng();
        let mut val = |_: usize| rng.random_range(-0.75f32..0.75);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Stored shapes (rows, cols) and their leading dimensions.
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let a: Vec<bf16> = (0..ar * (ac + pad)).map(|s| bf16::from_f32(val(s))).collect();
            let b: Vec<bf16> = (0..br * (bc + pad)).map(|s| bf16::from_f32(val(s))).collect();
            let opa = |i: usize, p: usize| if ta { a[p * (ac + pad) + i] } else { a[i * (ac + pad) + p] }.to_f64();
            let opb = |p: usize, j: usize| if tb { b[j * (bc + pad) + p] } else { b[p * (bc + pad) + j] }.to_f64();
            let ldc = n + 1;
            for beta in [0.0f32, 1.0] {
                let old: Vec<f32> = (0..m * ldc).map(&mut val).collect();
                let mut c: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * ldc] } else { old.clone() };
                let g = DenseGemm {
                    m,
                    n,
                    k,
                    a: Operand { addr: a.as_ptr() as u64, ld: ac + pad, trans: ta },
                    b: Operand { addr: b.as_ptr() as u64, ld: bc + pad, trans: tb },
                    ab: DType::BF16,
                    c: c.as_mut_ptr() as u64,
                    c_type: DType::F32,
                    ldc,
                    alpha: 0.5,
                    beta,
                };
                // SAFETY: a, b, c are live host buffers of the sizes g describes.
                unsafe { host_gemm(&g) }.unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want = 0.5 * (0..k).map(|p| opa(i, p) * opb(p, j)).sum::<f64>()
                            + beta as f64 * old[i * ldc + j] as f64;
                        let got = c[i * ldc + j] as f64;
                        assert!((got - want).abs() < 1e-5, "({ta}, {tb}, beta {beta}) C[{i},{j}] = {got}, want {want}");
                    }
                    // The padding column of C is never written.
                    let pad_at = i * ldc + n;
                    assert!(c[pad_at].is_nan() == (beta == 0.0) && (beta == 0.0 || c[pad_at] == old[pad_at]));
                }
                // C in the operands' dtype: the same result rounded once.
                let mut c16 = vec![bf16::NAN; m * ldc];
                if beta != 0.0 {
                    c16.iter_mut().zip(&old).for_each(|(x, &o)| *x = bf16::from_f32(o));
                }
                let g16 = DenseGemm { c: c16.as_mut_ptr() as u64, c_type: DType::BF16, ..g };
                // SAFETY: as above, C [m, ldc] bf16.
                unsafe { host_gemm(&g16) }.unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want = if beta == 0.0 {
                            c[i * ldc + j]
                        } else {
                            c[i * ldc + j] - old[i * ldc + j] + bf16::from_f32(old[i * ldc + j]).to_f32()
                        };
                        let got = c16[i * ldc + j].to_f32();
                        assert!(
                            (got - want).abs() <= 2f32.powi(-8) * want.abs() + 1e-6,
                            "bf16 C[{i},{j}] = {got}, want {want}"
                        );
                    }
                    assert!(c16[i * ldc + n].is_nan() == (beta == 0.0));
                }
            }
        }
    }

    /// The translation cuBLAS receives: row-major [m, n] is column-major
    /// [n, m] with B first, and cuBLAS's leading-dimension rules reject
    /// an operand whose ld is below its column-major rows, naming it.
    #[test]
    fn col_major_call_swaps_operands_and_checks_leading_dimensions() {
        let g = DenseGemm {
            m: 4,
            n: 6,
            k: 8,
            a: Operand { addr: 0x100, ld: 8, trans: false },
            b: Operand { addr: 0x200, ld: 8, trans: true },
            ab: DType::BF16,
            c: 0x300,
            c_type: DType::F32,
            ldc: 6,
            alpha: 1.0,
            beta: 0.0,
        };
        let cm = g.col_major();
        assert_eq!((cm.m, cm.n, cm.k, cm.trans_a, cm.trans_b), (6, 4, 8, true, false));
        assert_eq!((cm.a, cm.b, cm.c), ((0x200, 8), (0x100, 8), (0x300, 6)));
        cm.check().unwrap();
        // Row-major A [4, 8] with ld 7 overlaps its rows: column-major B, ldb 7 < k.
        let bad_a = DenseGemm { a: Operand { ld: 7, ..g.a }, ..g };
        let err = bad_a.col_major().check().unwrap_err().to_string();
        assert!(err.contains("ldb = 7") && err.contains("8 rows"), "{err}");
        let bad_c = DenseGemm { ldc: 5, ..g };
        assert!(bad_c.col_major().check().unwrap_err().to_string().contains("ldc = 5"));
        let f16_into_bf16 = DenseGemm { c_type: DType::F16, ..g };
        assert!(f16_into_bf16.col_major().check().is_err());
        let huge = DenseGemm { k: 1 << 31, ..g };
        assert!(huge.col_major().check().unwrap_err().to_string().contains("32-bit"));
    }
}
