//! Rows, checks, the targets verdicts, and their markdown / JSON forms.

use super::*;

#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub(crate) shape: String,
    pub(crate) op: &'static str,
    pub(crate) path: String,
    pub(crate) timing: Option<Timing>,
    pub(crate) tflops: Option<f64>,
    pub(crate) gbs: Option<f64>,
    pub(crate) speedup: Option<f64>,
    pub(crate) pct_ref: Option<f64>,
    pub(crate) peak_extra: Option<u64>,
    pub(crate) note: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub(crate) shape: String,
    pub(crate) what: String,
    pub(crate) rel: f64,
    pub(crate) tol: f64,
}

impl Check {
    pub(crate) fn pass(&self) -> bool {
        self.rel <= self.tol // false for NaN
    }
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) checks: Vec<Check>,
    pub(crate) errors: Vec<String>,
    pub(crate) copy: Option<(usize, Timing, f64)>,
}

impl Report {
    pub(crate) fn check(&mut self, shape: &Shape, what: impl Into<String>, rel: f64) {
        let c = Check { shape: shape.key.into(), what: what.into(), rel, tol: TOL_BF16 };
        println!(
            "  check {:<44} rel {:.3e} (tol {:.0e}) {}",
            c.what,
            c.rel,
            c.tol,
            if c.pass() { "PASS" } else { "FAIL" }
        );
        self.checks.push(c);
    }

    pub(crate) fn error(&mut self, shape: &Shape, op: &'static str, path: &str, e: String) {
        eprintln!("  ERROR {}/{op}/{path}: {e}", shape.key);
        self.errors.push(format!("{}/{op}/{path}: {e}", shape.key));
        self.rows.push(Row {
            shape: shape.key.into(),
            op,
            path: path.into(),
            note: format!("error: {e}"),
            ..Row::default()
        });
    }

    pub(crate) fn ok(&self) -> bool {
        self.errors.is_empty() && self.checks.iter().all(Check::pass)
    }
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.prec$}"))
}

/// The issues' targets per shape, read off the rows: the fastest of our
/// paths for each op against that op's reference in the same run. A path
/// whose checks failed is still listed (the checks table says which); the
/// cross-entropy's fwd + bwd target is against CCE, in `results_py.md`.
pub(crate) fn targets_markdown(rows: &[Row], shapes: &[Shape]) -> String {
    let ms = |r: &Row| r.timing.as_ref().map_or(f64::INFINITY, |t| t.median_ms);
    let mut md = String::from(
        "Targets (fastest of our paths per op; `met` needs that path's checks to pass too):\n\n\
         | shape | op | fastest of ours | median ms | measured | target | met |\n\
         |---|---|---|---:|---|---|---|\n",
    );
    for sh in shapes {
        let timed =
            |op: &'static str| rows.iter().filter(move |r| r.shape == sh.key && r.op == op && r.timing.is_some());
        let best = |op| timed(op).filter(|r| r.path.starts_with("ours")).min_by(|a, b| ms(a).total_cmp(&ms(b)));
        let find = |op, prefix: &str| timed(op).find(|r| r.path.starts_with(prefix));
        // `met`: Some(verdict), or None where this binary cannot tell.
        let mut line = |op: &str, best: Option<&Row>, measured: Option<(String, Option<bool>)>, target: &str| {
            let (path, t) =
                best.map_or(("–".to_string(), "–".to_string()), |b| (b.path.clone(), format!("{:.3}", ms(b))));
            let (m, ok) = measured.map_or(("– (a row is missing)".to_string(), "–"), |(m, ok)| {
                (m, ok.map_or("see results_py.md", |ok| if ok { "yes" } else { "no" }))
            });
            let _ = writeln!(md, "| {} | {op} | {path} | {t} | {m} | {target} | {ok} |", sh.key);
        };
        let mem_le = |a: &Row, b: &Row| match (a.peak_extra, b.peak_extra) {
            (Some(x), Some(y)) => (x <= y, format!("; peak {:.0} vs {:.0} MiB", mib(x), mib(y))),
            _ => (true, "; peak memory not measured".to_string()),
        };
        let b = best("head_forward");
        let m = b.zip(find("head_forward", "(a)")).zip(find("head_forward", "(b)")).map(|((b, a), base)| {
            let (x, pct) = (ms(a) / ms(b), b.tflops.unwrap_or(0.0) / base.tflops.unwrap_or(f64::INFINITY));
            (format!("{x:.2}x (a); {:.0} % of (b) TFLOP/s", 100.0 * pct), Some(x >= 1.3 && pct >= 0.70))
        });
        line("head_forward", b, m, ">= 1.3x (a), >= 70 % of (b)");
        for (op, unf) in [("head_backward", "unfused"), ("embed_backward", "unfused")] {
            let b = best(op);
            let m = b.zip(find(op, unf)).map(|(b, u)| {
                let (mem_ok, mem) = mem_le(b, u);
                (format!("{:.2}x unfused{mem}", ms(u) / ms(b)), Some(ms(b) < ms(u) && mem_ok))
            });
            line(op, b, m, "faster than unfused, peak memory no higher");
        }
        let b = best("embed_forward");
        let m = b.and_then(|b| b.pct_ref.map(|p| (format!("{:.0} % of copy bandwidth", 100.0 * p), Some(p >= 0.80))));
        line("embed_forward", b, m, ">= 80 % of (c)");
        let b = best("xent_forward");
        let m = b.zip(find("xent_forward", "cuBLAS")).map(|(b, c)| {
            let x = ms(b) / ms(c);
            (format!("{x:.2}x the cuBLAS h·Wᵀ time"), Some(x <= 1.15))
        });
        line("xent_forward", b, m, "<= 1.15x cuBLAS h·Wᵀ");
        let b = best("xent_fwd_bwd");
        let m =
            b.zip(find("xent_fwd_bwd", "PEFT")).map(|(b, p)| (format!("{:.2}x the PEFT path", ms(p) / ms(b)), None));
        line("xent_fwd_bwd", b, m, "faster than CCE (results_py.md)");
    }
    md
}

pub(crate) fn rows_markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| shape | op | path | median ms | min ms | TFLOP/s | GB/s | speedup vs unfused | % of reference | peak extra MiB | notes |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.shape,
            r.op,
            r.path,
            opt(r.timing.map(|t| t.median_ms), 3),
            opt(r.timing.map(|t| t.min_ms), 3),
            opt(r.tflops, 1),
            opt(r.gbs, 0),
            r.speedup.map_or("–".into(), |x| format!("{x:.2}×")),
            r.pct_ref.map_or("–".into(), |p| format!("{:.1} %", 100.0 * p)),
            opt(r.peak_extra.map(mib), 1),
            r.note
        );
    }
    s
}

pub(crate) fn checks_markdown(checks: &[Check]) -> String {
    let mut s = String::from(
        "| shape | check (relative norm ‖a − b‖/‖b‖) | value | tolerance | result |\n|---|---|---:|---:|---|\n",
    );
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3e} | {:.0e} | {} |",
            c.shape,
            c.what,
            c.rel,
            c.tol,
            if c.pass() { "PASS" } else { "FAIL" }
        );
    }
    s
}

pub(crate) fn row_json(r: &Row) -> Value {
    json!({
        "shape": r.shape, "op": r.op, "path": r.path,
        "median_ms": r.timing.map(|t| t.median_ms), "min_ms": r.timing.map(|t| t.min_ms),
        "max_ms": r.timing.map(|t| t.max_ms), "iters": r.timing.map(|t| t.iters),
        "tflops": r.tflops, "gb_per_s": r.gbs, "speedup_vs_unfused": r.speedup,
        "fraction_of_reference": r.pct_ref, "peak_extra_bytes": r.peak_extra, "note": r.note,
    })
}

/// Today's UTC date and time from the system clock (no calendar crate).
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}
