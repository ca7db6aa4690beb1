#![cfg(feature = "cpu-kernels")]
//! Runs `kernels/shim_selftest.cu` on the CPU through the shim and checks every
//! result against values computed here.
//!
//! `cargo test --features cpu-kernels --test shim_selftest`

use std::ffi::c_void;

use half::{bf16, f16};
use tiedlora::kernels::shim::{launch, selftest::*, ShimEntry};
use tiedlora::kernels::LaunchPlan;

fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

fn plan(kernel: &'static str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchPlan {
    LaunchPlan { kernel, grid, block, shared_bytes: smem }
}

// ---------------------------------------------------------------- reduce ---

#[repr(C)]
#[derive(Clone, Copy)]
struct ReduceParams {
    x: u64,
    out: u64,
    n: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<ReduceParams>() == 24);

/// Runs the reduction and checks each block's sum (integer-valued inputs, so
/// the f32 sums are exact whatever the order).
fn check_reduce(grid: (u32, u32, u32), block: (u32, u32, u32), n: usize) {
    let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
    let nblocks = (grid.0 * grid.1 * grid.2) as usize;
    let nthreads = (block.0 * block.1 * block.2) as usize;
    let mut out = vec![f32::NAN; nblocks];
    let params = ReduceParams { x: addr(&x), out: addr_mut(&mut out), n: n as u32, _pad: 0 };
    let p = plan("tl_selftest_reduce", grid, block, (nthreads * 4) as u32);
    // SAFETY: the params mirror ReduceParams in shim_selftest.cu; `x` holds n
    // floats and `out` one float per block, both alive for the call.
    unsafe { launch(tl_selftest_reduce as ShimEntry, &p, &params) }.unwrap();
    let mut expected = vec![0.0f32; nblocks];
    for (i, v) in x.iter().enumerate() {
        let b = (i / nthreads) % nblocks;
        expected[b] += v;
    }
    assert_eq!(out, expected, "{p}");
}

#[test]
fn reduce_1d_2d_3d() {
    check_reduce((4, 1, 1), (256, 1, 1), 10_000);
    check_reduce((3, 2, 1), (32, 8, 1), 3000);
    check_reduce((2, 1, 2), (8, 8, 16), 5000);
    check_reduce((1, 1, 1), (32, 32, 1), 1500);
    check_reduce((5, 1, 1), (32, 1, 1), 77);
}

#[test]
fn parallel_launches_are_serialized() {
    std::thread::scope(|s| {
        for k in 0..4u32 {
            s.spawn(move || check_reduce((2 + k, 1, 1), (64, 1, 1), 1000 + 100 * k as usize));
        }
    });
}

// ------------------------------------------------------------ early exit ---

#[repr(C)]
#[derive(Clone, Copy)]
struct EarlyExitParams {
    out: u64,
    n_active: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<EarlyExitParams>() == 16);

fn check_early_exit(n: u32, n_active: u32) {
    const SENTINEL: u32 = 0xDEAD_BEEF;
    let nu = n as usize;
    let mut out = vec![SENTINEL; 5 * nu];
    let params = EarlyExitParams { out: addr_mut(&mut out), n_active, _pad: 0 };
    let p = plan("tl_selftest_early_exit", (1, 1, 1), (n, 1, 1), 0);
    // SAFETY: params mirror EarlyExitParams; `out` holds 5 * blockDim.x u32.
    unsafe { launch(tl_selftest_early_exit as ShimEntry, &p, &params) }.unwrap();

    let na = n_active;
    let count3 = (0..na).filter(|t| t % 3 == 0).count() as u32;
    let survivors = (0..na).filter(|t| t % 5 != 4).count() as u32;
    for t in 0..n {
        let tu = t as usize;
        let row: Vec<u32> = (0..5).map(|k| out[k * nu + tu]).collect();
        let expected = if t >= na {
            vec![SENTINEL; 5]
        } else {
            let mut s = (t + 1) % na;
            if s % 5 == 4 {
                s = (s + 1) % na;
            }
            let (r3, r4) = if t % 5 == 4 { (SENTINEL, SENTINEL) } else { (2 * s, survivors) };
            vec![(t + 1) % na + 1, count3, 3, r3, r4]
        };
        assert_eq!(row, expected, "thread {t} (n={n}, n_active={na})");
    }
}

#[test]
fn early_exit_and_barriers() {
    check_early_exit(256, 203);
    check_early_exit(256, 256);
    check_early_exit(1024, 999);
    check_early_exit(40, 12);
}

// ------------------------------------------------------------------ warp ---

#[repr(C)]
#[derive(Clone, Copy)]
struct WarpParams {
    input: u64,
    out: u64,
}
const _: () = assert!(size_of::<WarpParams>() == 16);

#[test]
fn warp_shuffles_and_votes() {
    let n = 96usize;
    let input: Vec<i32> = (0..n as i32).map(|t| (t * 37 + 11) % 23).collect();
    let mut out = vec![i32::MIN; 12 * n];
    let params = WarpParams { input: addr(&input), out: addr_mut(&mut out) };
    let p = plan("tl_selftest_warp", (1, 1, 1), (n as u32, 1, 1), 0);
    // SAFETY: params mirror WarpParams; `input` holds blockDim.x i32, `out` 12x that.
    unsafe { launch(tl_selftest_warp as ShimEntry, &p, &params) }.unwrap();

    for t in 0..n {
        let (base, l) = (t / 32 * 32, t % 32);
        let warp = &input[base..base + 32];
        let v = input[t];
        let ballot = |f: &dyn Fn(i32) -> bool, lanes: std::ops::Range<usize>| {
            lanes.filter(|&j| f(warp[j])).fold(0u32, |acc, j| acc | (1 << j)) as i32
        };
        let expected = [
            warp[3],
            warp[l ^ 1],
            if l + 1 < 32 { warp[l + 1] } else { v },
            if l >= 2 { warp[l - 2] } else { v },
            ballot(&|x| x & 1 == 1, 0..32),
            warp.contains(&7) as i32,
            1,
            warp[(l & !7) + 1],
            if l < 16 { warp[l ^ 2] } else { ballot(&|x| x % 3 == 0, 16..32) },
            warp.iter().sum::<i32>(),
            -1,
            l as i32,
        ];
        assert_eq!(&out[12 * t..12 * t + 12], &expected, "thread {t}");
    }
}

// --------------------------------------------------------------- atomics ---

#[repr(C)]
#[derive(Clone, Copy)]
struct AtomicParams {
    f32_sum: u64,
    f64_sum: u64,
    i32_sum: u64,
    u32_count: u64,
    u64_sum: u64,
    i32_max: u64,
    i32_min: u64,
    u32_or: u64,
    cas_counter: u64,
    exch: u64,
}
const _: () = assert!(size_of::<AtomicParams>() == 80);

#[test]
fn atomics_from_every_thread() {
    let (blocks, threads) = (8u32, 256u32);
    let total = blocks * threads;
    let mut f32_sum = [0.0f32];
    let mut f64_sum = [0.0f64];
    let mut i32_sum = [0i32];
    let mut u32_count = [0u32];
    let mut u64_sum = [0u64];
    let mut i32_max = [i32::MIN];
    let mut i32_min = [i32::MAX];
    let mut u32_or = [0u32];
    let mut cas_counter = [0i32];
    let mut exch = [-1i32];
    let params = AtomicParams {
        f32_sum: addr_mut(&mut f32_sum),
        f64_sum: addr_mut(&mut f64_sum),
        i32_sum: addr_mut(&mut i32_sum),
        u32_count: addr_mut(&mut u32_count),
        u64_sum: addr_mut(&mut u64_sum),
        i32_max: addr_mut(&mut i32_max),
        i32_min: addr_mut(&mut i32_min),
        u32_or: addr_mut(&mut u32_or),
        cas_counter: addr_mut(&mut cas_counter),
        exch: addr_mut(&mut exch),
    };
    let p = plan("tl_selftest_atomics", (blocks, 1, 1), (threads, 1, 1), 0);
    // SAFETY: params mirror AtomicParams; every pointer is a live one-element array.
    unsafe { launch(tl_selftest_atomics as ShimEntry, &p, &params) }.unwrap();

    let keys: Vec<i32> = (0..total).map(|g| ((g * 7919) % 1001) as i32 - 500).collect();
    assert_eq!(f32_sum[0], total as f32);
    assert_eq!(f64_sum[0], total as f64 * 0.5);
    assert_eq!(i32_sum[0], (0..total).map(|g| (g % 7) as i32 - 3).sum::<i32>());
    assert_eq!(u32_count[0], total);
    assert_eq!(u64_sum[0], (0..total as u64).map(|g| g << 20).sum::<u64>());
    assert_eq!(i32_max[0], *keys.iter().max().unwrap());
    assert_eq!(i32_min[0], *keys.iter().min().unwrap());
    assert_eq!(u32_or[0], (1u32 << 29) - 1);
    assert_eq!(cas_counter[0], 2 * total as i32);
    assert!((0..total as i32).contains(&exch[0]), "exch = {}", exch[0]);

    // __launch_bounds__(256): a bigger block is refused, like on the GPU.
    let big = plan("tl_selftest_atomics", (1, 1, 1), (512, 1, 1), 0);
    // SAFETY: as above; the launch is refused before any thread runs.
    let err = unsafe { launch(tl_selftest_atomics as ShimEntry, &big, &params) }.unwrap_err();
    assert!(err.to_string().contains("invalid block"), "{err}");
}

// ------------------------------------------------------------- convert -----

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvertParams {
    src: u64,
    f16_bits: u64,
    bf16_bits: u64,
    f16_back: u64,
    bf16_back: u64,
    pair_bits: u64,
    n: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<ConvertParams>() == 56);

struct Converted {
    f16_bits: Vec<u16>,
    bf16_bits: Vec<u16>,
    f16_back: Vec<f32>,
    bf16_back: Vec<f32>,
    pair_bits: Vec<u32>,
}

fn convert(src: &[f32]) -> Converted {
    let n = src.len();
    let mut c = Converted {
        f16_bits: vec![0; n],
        bf16_bits: vec![0; n],
        f16_back: vec![0.0; n],
        bf16_back: vec![0.0; n],
        pair_bits: vec![0; 2 * n],
    };
    let params = ConvertParams {
        src: addr(src),
        f16_bits: addr_mut(&mut c.f16_bits),
        bf16_bits: addr_mut(&mut c.bf16_bits),
        f16_back: addr_mut(&mut c.f16_back),
        bf16_back: addr_mut(&mut c.bf16_back),
        pair_bits: addr_mut(&mut c.pair_bits),
        n: n as u32,
        _pad: 0,
    };
    let p = plan("tl_selftest_convert", (LaunchPlan::blocks_for(n, 128), 1, 1), (128, 1, 1), 0);
    // SAFETY: params mirror ConvertParams; every buffer holds n (pair_bits 2n) elements.
    unsafe { launch(tl_selftest_convert as ShimEntry, &p, &params) }.unwrap();
    c
}

#[test]
fn half_and_bf16_known_bit_patterns() {
    let two = |e: i32| 2f32.powi(e);
    // (input, f16 bits, bf16 bits)
    let cases: &[(f32, u16, u16)] = &[
        (1.0, 0x3C00, 0x3F80),
        (-2.0, 0xC000, 0xC000),
        (0.0, 0x0000, 0x0000),
        (-0.0, 0x8000, 0x8000),
        (65504.0, 0x7BFF, 0x4780),
        (65519.99, 0x7BFF, 0x4780),
        (65520.0, 0x7C00, 0x4780),              // f16: tie rounds up to even = inf
        (1.0 + two(-11), 0x3C00, 0x3F80),       // f16 tie -> even (down)
        (1.0 + 3.0 * two(-11), 0x3C02, 0x3F80), // f16 tie -> even (up)
        (1.0 + two(-8), 0x3C04, 0x3F80),        // bf16 tie -> even (down)
        (1.0 + 3.0 * two(-8), 0x3C0C, 0x3F82),  // bf16 tie -> even (up)
        (two(-14), 0x0400, 0x3880),             // smallest normal f16
        (two(-24), 0x0001, 0x3380),             // smallest subnormal f16
        (two(-25), 0x0000, 0x3300),             // f16 tie -> even zero
        (1.5 * two(-25), 0x0001, 0x3340),
        (3.0 * two(-25), 0x0002, 0x33C0), // 1.5 ulp: tie -> even (2)
        (f32::INFINITY, 0x7C00, 0x7F80),
        (f32::NEG_INFINITY, 0xFC00, 0xFF80),
        (f32::MAX, 0x7C00, 0x7F80), // bf16 rounds up to inf
        (f32::from_bits(0x7F7F_7FFF), 0x7C00, 0x7F7F),
        (f32::NAN, 0x7FFF, 0x7FFF), // canonical NaN, as CUDA
        (-f32::NAN, 0x7FFF, 0x7FFF),
    ];
    let src: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let c = convert(&src);
    for (i, &(x, h, b)) in cases.iter().enumerate() {
        assert_eq!(c.f16_bits[i], h, "f16({x:e}) = {:#06x}, want {h:#06x}", c.f16_bits[i]);
        assert_eq!(c.bf16_bits[i], b, "bf16({x:e}) = {:#06x}, want {b:#06x}", c.bf16_bits[i]);
    }
}

#[test]
fn half_and_bf16_match_the_half_crate() {
    // Every f16 value, halfway points, and a pseudo-random sweep of f32 bits.
    let mut src: Vec<f32> = Vec::new();
    for h in 0..=u16::MAX {
        let v = f16::from_bits(h).to_f32();
        src.push(v);
        src.push(f32::from_bits(v.to_bits().wrapping_add(1 << 12)));
        src.push(bf16::from_bits(h).to_f32());
    }
    let mut s = 0x9E37_79B9u32;
    for _ in 0..50_000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        src.push(f32::from_bits(s));
    }
    let c = convert(&src);
    for (i, &x) in src.iter().enumerate() {
        if x.is_nan() {
            assert_eq!(c.f16_bits[i], 0x7FFF);
            assert_eq!(c.bf16_bits[i], 0x7FFF);
            assert!(c.f16_back[i].is_nan() && c.bf16_back[i].is_nan());
            continue;
        }
        let h = f16::from_f32(x);
        let b = bf16::from_f32(x);
        assert_eq!(c.f16_bits[i], h.to_bits(), "f16({x:e})");
        assert_eq!(c.bf16_bits[i], b.to_bits(), "bf16({x:e})");
        assert_eq!(c.f16_back[i].to_bits(), h.to_f32().to_bits(), "f16 back ({x:e})");
        assert_eq!(c.bf16_back[i].to_bits(), b.to_f32().to_bits(), "bf16 back ({x:e})");
        let neg_h = f16::from_f32(-x).to_bits() as u32;
        let neg_b = bf16::from_f32(-x).to_bits() as u32;
        assert_eq!(c.pair_bits[2 * i], h.to_bits() as u32 | (neg_h << 16), "half2({x:e})");
        assert_eq!(c.pair_bits[2 * i + 1], b.to_bits() as u32 | (neg_b << 16), "bfloat162({x:e})");
    }
}

// ------------------------------------------------------------------ wmma ---

#[repr(C)]
#[derive(Clone, Copy)]
struct WmmaParams {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
}
const _: () = assert!(size_of::<WmmaParams>() == 32);

/// A[m][k], B[k][n] and C are small multiples of 1/8, exact in f16 and bf16,
/// and every partial sum is exact in f32: the result must match exactly.
fn check_wmma(entry: ShimEntry, kernel: &'static str, to_bits: fn(f32) -> u16) {
    let a_val = |m: usize, k: usize| ((m * 16 + k) * 7 % 11) as f32 / 4.0 - 1.25;
    let b_val = |k: usize, n: usize| ((k * 16 + n) * 5 % 13) as f32 / 8.0 - 0.75;
    let c_val = |m: usize, n: usize| (m as f32) - (n as f32) / 2.0;
    let mut a = vec![0u16; 256];
    let mut b = vec![0u16; 256];
    let mut c = vec![0f32; 256];
    for i in 0..16 {
        for j in 0..16 {
            a[i * 16 + j] = to_bits(a_val(i, j));
            b[j * 16 + i] = to_bits(b_val(i, j)); // col-major: B[k=i][n=j] at b[n * 16 + k]
            c[i * 16 + j] = c_val(i, j);
        }
    }
    let mut d = vec![f32::NAN; 512];
    let params = WmmaParams { a: addr(&a), b: addr(&b), c: addr(&c), d: addr_mut(&mut d) };
    let p = plan(kernel, (1, 1, 1), (64, 1, 1), 0);
    // SAFETY: params mirror WmmaParams; a, b: 256 16-bit values, c: 256 f32, d: 512 f32.
    unsafe { launch(entry, &p, &params) }.unwrap();
    for m in 0..16 {
        for n in 0..16 {
            let want = 2.0 * ((0..16).map(|k| a_val(m, k) * b_val(k, n)).sum::<f32>() + c_val(m, n));
            assert_eq!(d[m * 16 + n], want, "{kernel} row-major D[{m}][{n}]");
            assert_eq!(d[256 + n * 16 + m], want, "{kernel} col-major D[{m}][{n}]");
        }
    }
}

#[test]
fn wmma_f16_tile() {
    check_wmma(tl_selftest_wmma_f16, "tl_selftest_wmma_f16", |x| f16::from_f32(x).to_bits());
}

#[test]
fn wmma_bf16_tile() {
    check_wmma(tl_selftest_wmma_bf16, "tl_selftest_wmma_bf16", |x| bf16::from_f32(x).to_bits());
}

// ---------------------------------------------------------------- errors ---

#[test]
fn bad_launches_are_errors() {
    let x = [0.0f32; 4];
    let mut out = [0.0f32; 4];
    let params = ReduceParams { x: addr(&x), out: addr_mut(&mut out), n: 4, _pad: 0 };
    let cases: &[(LaunchPlan, &str)] = &[
        (plan("tl_selftest_reduce", (0, 1, 1), (32, 1, 1), 128), "invalid grid"),
        (plan("tl_selftest_reduce", (1, 0, 1), (32, 1, 1), 128), "invalid grid"),
        (plan("tl_selftest_reduce", (1, 1, 70_000), (32, 1, 1), 128), "invalid grid"),
        (plan("tl_selftest_reduce", (1, 1, 1), (2048, 1, 1), 8192), "invalid block"),
        (plan("tl_selftest_reduce", (1, 1, 1), (64, 32, 1), 8192), "invalid block"),
        (plan("tl_selftest_reduce", (1, 1, 1), (1, 1, 65), 260), "invalid block"),
        (plan("tl_selftest_reduce", (1, 1, 1), (0, 1, 1), 0), "invalid block"),
        (plan("tl_selftest_reduce", (1, 1, 1), (32, 1, 1), 300_000), "shared memory"),
    ];
    for (p, msg) in cases {
        // SAFETY: params mirror ReduceParams; the launch is refused before any thread runs.
        let err = unsafe { launch(tl_selftest_reduce as ShimEntry, p, &params) }.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(msg) && text.contains("tl_selftest_reduce"), "{p}: {text}");
    }
    // SAFETY: a null params pointer is refused before any thread runs.
    let rc = unsafe { tl_selftest_reduce(1, 1, 1, 32, 1, 1, 128, std::ptr::null::<c_void>()) };
    assert_eq!(rc, 5);
}

// ---------------------------------------------------------------- misuse ---

#[repr(C)]
#[derive(Clone, Copy)]
struct MisuseParams {
    out: u64,
    mode: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<MisuseParams>() == 16);

const MISUSE_ENV: &str = "TL_SELFTEST_MISUSE_MODE";

/// Child half of `misuse_is_diagnosed`: runs a misbehaving kernel, which
/// aborts the process. Does nothing in a normal test run.
#[test]
fn misuse_child() {
    let Some(mode) = std::env::var(MISUSE_ENV).ok().and_then(|m| m.parse().ok()) else {
        return;
    };
    let mut out = vec![0i32; 64];
    let params = MisuseParams { out: addr_mut(&mut out), mode, _pad: 0 };
    let p = plan("tl_selftest_misuse", (1, 1, 1), (64, 1, 1), 0);
    // SAFETY: params mirror MisuseParams; `out` holds blockDim.x i32.
    let _ = unsafe { launch(tl_selftest_misuse as ShimEntry, &p, &params) };
    unreachable!("the shim should have aborted (mode {mode})");
}

#[test]
fn misuse_is_diagnosed() {
    let exe = std::env::current_exe().unwrap();
    // Which lane notices first depends on scheduling, hence several messages.
    let cases: [(u32, &[&str]); 3] = [
        (1, &["returned from the kernel"]),
        (2, &["mismatched warp-synchronous operations", "returned from the kernel"]),
        (3, &["deadlock: __syncthreads", "deadlock: lane"]),
    ];
    for (mode, expected) in cases {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "misuse_child", "--nocapture", "--test-threads=1"])
            .env(MISUSE_ENV, mode.to_string())
            .env("TL_SHIM_TIMEOUT_S", "2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mode {mode}: child succeeded");
        assert!(
            stderr.contains("tl_shim: kernel tl_selftest_misuse") && expected.iter().any(|e| stderr.contains(e)),
            "mode {mode}: {stderr}"
        );
    }
}
