//! A bounds-checked f32 GEMM over strided views of host slices, on
//! `matrixmultiply::sgemm` (single-threaded, deterministic for a given input).

/// A read-only strided matrix view: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A writable strided matrix view.
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols` view of `data` starting at element 0 with row stride `ld`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Mat { data, rows, cols, rs: ld, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

impl<'a> MatMut<'a> {
    /// Row-major `rows × cols` view of `data` with row stride `ld`.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Self {
        MatMut { data, rows, cols, rs: ld, cs: 1 }
    }
}

/// Largest element index a view touches plus one (0 for an empty view).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C = alpha·A·B + beta·C`. With `beta == 0`, C is written without being
/// read (NaN in C does not propagate). Panics on mismatched shapes or views
/// that reach past their slices (internal invariants, never user input).
pub fn gemm(alpha: f32, a: Mat<'_>, b: Mat<'_>, beta: f32, c: MatMut<'_>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && c.rows == m && c.cols == n, "gemm shape mismatch");
    assert!(extent(a.rows, a.cols, a.rs, a.cs) <= a.data.len(), "gemm: A out of bounds");
    assert!(extent(b.rows, b.cols, b.rs, b.cs) <= b.data.len(), "gemm: B out of bounds");
    assert!(extent(c.rows, c.cols, c.rs, c.cs) <= c.data.len(), "gemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = &mut c.data[i * c.rs + j * c.cs];
                *x = if beta == 0.0 { 0.0 } else { beta * *x };
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every index (i*rs + j*cs for i < rows,
    // j < cols) of A, B and C inside their slices; C is a unique borrow, so it
    // aliases neither A nor B; strides fit in isize because they index slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.data.as_mut_ptr(),
            c.rs as isize,
            c.cs as isize,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_with_transposes_and_strides() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // B stored as [n, k]
        let mut c = vec![f32::NAN; m * (n + 2)];
        gemm(2.0, Mat::rows(&a, m, k, k), Mat::rows(&bt, n, k, k).t(), 0.0, MatMut::rows(&mut c, m, n, n + 2));
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 2.0 * (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f32>();
                assert!((c[i * (n + 2) + j] - want).abs() < 1e-5, "{i} {j}");
            }
            assert!(c[i * (n + 2) + n].is_nan(), "padding untouched");
        }
    }
}
