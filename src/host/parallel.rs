//! Minimal row parallelism for the reference: contiguous row ranges on scoped
//! threads, partial results combined in a fixed order (deterministic for a
//! given thread count).

use std::ops::Range;

/// Splits `0..rows` into at most `threads` contiguous, non-empty ranges.
pub fn ranges(rows: usize, threads: usize) -> Vec<Range<usize>> {
    let n = threads.clamp(1, rows.max(1));
    let base = rows / n;
    let extra = rows % n;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Runs `f(rows, out_rows)` on each range of rows, where `out_rows` is the
/// matching slice of `out` (`row_len` elements per row), and returns the
/// per-range results in row order.
pub fn for_row_chunks<T, R, F>(out: &mut [T], row_len: usize, threads: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(Range<usize>, &mut [T]) -> R + Sync,
{
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let ranges = ranges(rows, threads);
    if ranges.len() <= 1 {
        return vec![f(0..rows, out)];
    }
    std::thread::scope(|scope| {
        let mut rest = out;
        let mut handles = Vec::with_capacity(ranges.len());
        for range in ranges {
            let (chunk, tail) = rest.split_at_mut(range.len() * row_len);
            rest = tail;
            let f = &f;
            handles.push(scope.spawn(move || f(range, chunk)));
        }
        handles.into_iter().map(|h| h.join().expect("reference worker thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_rows_once() {
        for rows in 0..20 {
            for threads in 1..6 {
                let r = ranges(rows, threads);
                let total: usize = r.iter().map(|r| r.len()).sum();
                assert_eq!(total, rows);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
