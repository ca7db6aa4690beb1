//! Build script: compiles the hand-written kernels `kernels/*.cu`.
//!
//! Only the top-level `kernels/*.cu` files are compiled; everything else under
//! `kernels/` (`common.cuh`, `shim/`) is a header they include.
//!
//! - Feature `cuda`: nvcc compiles every kernel file to PTX for `compute_80`
//!   and to cubins for `sm_80` and `sm_90a` (`-O3 -lineinfo --std=c++17
//!   -Ikernels -Xptxas -v`). `sm_90a` is sm_90 plus Hopper's
//!   architecture-specific instructions (wgmma, used by the `_wgmma`
//!   kernels); its cubin loads on compute capability 9.0 only, the one
//!   sm_90 cubins run on anyway. The files are embedded in the crate through
//!   `$OUT_DIR/kernels_embedded.rs` (`src/kernels/mod.rs` includes it). Each
//!   kernel's registers and shared memory are printed as `cargo:warning`
//!   lines, and the build FAILS if any function reports spill stores/loads,
//!   a stack frame or local memory, or if ptxas reports a warpgroup-MMA
//!   advisory (`(C75xx)`: wgmma serialized, or `warpgroup.arrive` injected),
//!   which silently turns a Hopper kernel's asynchronous MMAs synchronous
//!   (`TIEDLORA_ALLOW_SPILLS=1` turns all of that into warnings, for
//!   experiments only).
//!   nvcc is found through `$NVCC`, then `$CUDA_HOME/bin/nvcc`,
//!   `$CUDA_PATH/bin/nvcc`, `PATH`, and last the repo-local install made by
//!   `bash scripts/install-nvcc.sh` (`.nvcc/site/nvidia/cu13/bin/nvcc`).
//!   `$NVCC_CCBIN` picks nvcc's host compiler (default: its own choice).
//! - Feature `cpu-kernels`: the host C++ compiler (the `cc` crate; `$CXX`
//!   overrides) compiles the same files as C++20 with
//!   `-include kernels/shim/cuda_shim.h -Ikernels/shim/include -pthread
//!   -fno-strict-aliasing`, at least `-O1`, always `-g`, into a static library
//!   linked into the crate.
//! - Neither: nothing is compiled (no nvcc, no C++ compiler needed).
//!
//! Feature `experimental-kernels` defines `TL_EXPERIMENTAL=1` for both
//! compilers, which adds the kernel variants no GPU run has measured yet (the
//! `#if TL_EXPERIMENTAL` blocks of `kernels/*.cu`); without it they are not
//! compiled at all. The kernel names come from the compiled code itself, never
//! from a hand-kept list: ptxas's report for the CUDA modules
//! (`kernels_embedded.rs`), and the archive's `extern "C"` symbols for the CPU
//! build (`shim_kernels.rs`, the table `src/kernels/host.rs` launches from).
//! Each build prints how many kernels it compiled.
//!
//! Sanitizers for the CPU-executed kernels: `TIEDLORA_SANITIZE=thread` or
//! `=address` adds `-fsanitize=... -fno-omit-frame-pointer` to the C++ build
//! and links gcc's static sanitizer runtime (whole archive, plus its preinit
//! object) into this package's tests, examples, benches and binaries through
//! `cargo:rustc-link-arg`. (`-C link-arg=-fsanitize=...` alone does not work:
//! rustc links with `-nodefaultlibs`, which makes gcc drop the runtime.) The
//! Rust code itself is not instrumented (that needs nightly `-Zsanitizer`);
//! the kernels, the shim and all their memory accesses are. Use a separate
//! target directory so switching does not rebuild everything each time:
//!
//! ```text
//! TIEDLORA_SANITIZE=thread CARGO_TARGET_DIR=target/tsan \
//!   TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/kernels/shim/tsan.supp" \
//!   cargo test --features cpu-kernels --test shim_selftest
//! TIEDLORA_SANITIZE=address CARGO_TARGET_DIR=target/asan \
//!   cargo test --features cpu-kernels --test shim_selftest
//! ```
//!
//! `kernels/shim/tsan.supp` silences reports inside libtest's own
//! (uninstrumented) bookkeeping; without `halt_on_error=1` TSan only exits
//! with status 66 at the end. ASan aborts on the first error. Run integration
//! tests (`--test NAME` / `--tests`): doctests are linked by rustdoc, which
//! does not get the link arguments.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let cpu = env::var_os("CARGO_FEATURE_CPU_KERNELS").is_some();
    if !cuda && !cpu {
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let sources = kernel_sources(&kernels);
    let experimental = env::var_os("CARGO_FEATURE_EXPERIMENTAL_KERNELS").is_some();
    // A directory makes cargo rerun when any file below it changes or appears.
    println!("cargo:rerun-if-changed={}", kernels.display());
    for f in sources.iter().chain(headers(&kernels).iter()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    if cuda {
        build_cuda(&root, &kernels, &sources, experimental);
    }
    if cpu {
        build_cpu(&kernels, &sources, experimental);
    }
}

/// The top-level `kernels/*.cu` files, sorted.
fn kernel_sources(kernels: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(kernels)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", kernels.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

/// Every other file under `kernels/` (headers, the shim).
fn headers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !(d == dir && p.extension().is_some_and(|x| x == "cu")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn jobs() -> usize {
    env::var("NUM_JOBS").ok().and_then(|s| s.parse().ok()).unwrap_or(1usize).max(1)
}

// ------------------------------------------------------------------ cuda ---

const INSTALL_HINT: &str = "run `bash scripts/install-nvcc.sh` (or set NVCC / CUDA_HOME) and rebuild";

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");
    let on_path = |name: &str| {
        env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
    };
    if let Some(nvcc) = env::var_os("NVCC").filter(|s| !s.is_empty()) {
        let p = PathBuf::from(&nvcc);
        if p.is_file() {
            return Some(p);
        }
        if let Some(p) = on_path(&p.to_string_lossy()) {
            return Some(p);
        }
        fail(&format!("NVCC={} is not an existing file nor a program on PATH; {INSTALL_HINT}", p.display()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|s| !s.is_empty()) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(p) = on_path("nvcc") {
        return Some(p);
    }
    let local = root.join(".nvcc/site/nvidia/cu13/bin/nvcc");
    if local.is_file() {
        return Some(local);
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Ptx,
    Cubin(&'static str),
}

/// What ptxas -v said about one function.
#[derive(Debug, Default, Clone)]
struct FnInfo {
    name: String,
    entry: bool,
    registers: u64,
    smem: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
    lmem: u64,
}

/// The number just before `unit` in `line` ("12 registers", "0 bytes smem").
fn num_before(line: &str, unit: &str) -> Option<u64> {
    let idx = line.find(unit)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(log: &str) -> Vec<FnInfo> {
    let mut fns: Vec<FnInfo> = Vec::new();
    let mut cur: Option<usize> = None;
    let get = |fns: &mut Vec<FnInfo>, name: &str| -> usize {
        if let Some(i) = fns.iter().position(|f| f.name == name) {
            i
        } else {
            fns.push(FnInfo { name: name.to_string(), ..FnInfo::default() });
            fns.len() - 1
        }
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            let i = get(&mut fns, name);
            fns[i].entry = true;
            cur = Some(i);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            cur = Some(get(&mut fns, rest.trim()));
        } else if line.contains("bytes stack frame") {
            if let Some(i) = cur {
                let f = &mut fns[i];
                f.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                f.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                f.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ") && line.contains("registers") {
            if let Some(i) = cur {
                let f = &mut fns[i];
                f.registers = num_before(line, "registers").unwrap_or(0);
                f.smem = num_before(line, "bytes smem").unwrap_or(0);
                f.lmem = num_before(line, "bytes lmem").unwrap_or(0);
            }
        }
    }
    fns
}

struct Compiled {
    stem: String,
    target: Target,
    out: PathBuf,
    fns: Vec<FnInfo>,
    /// ptxas's warpgroup-MMA advisories ("(C75xx)": wgmma serialized, or
    /// warpgroup.arrive injected around register use): a Hopper kernel that
    /// lost its asynchronous MMAs, which the build treats like a spill.
    gmma: Vec<String>,
}

/// ptxas's warpgroup-MMA performance advisories in a log, e.g.
/// "ptxas info : (C7515) Potential Performance Loss: wgmma.mma_async
/// instructions are serialized ..." or "(C7519) warpgroup.arrive is injected
/// ... to allow use of registers in GMMA in function 'k'".
fn gmma_advisories(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("(C75") || l.contains("Potential Performance Loss"))
        .map(|l| l.trim_start_matches("ptxas info").trim_start_matches([' ', ':']).to_string())
        .collect()
}

/// `-DTL_EXPERIMENTAL=0|1` for both compilers.
fn experimental_define(on: bool) -> &'static str {
    if on {
        "-DTL_EXPERIMENTAL=1"
    } else {
        "-DTL_EXPERIMENTAL=0"
    }
}

/// The kernel-set line each build prints.
fn report_kernel_count(what: &str, names: &[String], experimental: bool) {
    let set = if experimental { "default + experimental-kernels" } else { "default set" };
    println!("cargo:warning={what}: {} kernels compiled ({set})", names.len());
}

fn build_cuda(root: &Path, kernels: &Path, sources: &[PathBuf], experimental: bool) {
    println!("cargo:rerun-if-env-changed=TIEDLORA_ALLOW_SPILLS");
    let nvcc = find_nvcc(root).unwrap_or_else(|| {
        fail(&format!(
            "feature `cuda` needs nvcc and none was found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, \
             PATH, {}): {INSTALL_HINT}",
            root.join(".nvcc").display()
        ))
    });
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("kernels");
    fs::create_dir_all(&out_dir).unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", out_dir.display())));
    let ccbin = env::var_os("NVCC_CCBIN").filter(|s| !s.is_empty());

    let targets = [Target::Ptx, Target::Cubin("sm_80"), Target::Cubin("sm_90a")];
    let cache = NvccCache::new(&out_dir);
    // Every header a kernel file may include: part of each cache key.
    let headers_digest = digest_files(&headers(kernels));
    let work: Vec<(&PathBuf, Target)> = sources.iter().flat_map(|s| targets.iter().map(move |t| (s, *t))).collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<Compiled, String>>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs().min(work.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(src, target)) = work.get(i) else {
                    break;
                };
                let stem = src.file_stem().expect("kernel file stem").to_string_lossy().into_owned();
                let (flag, arch, file) = match target {
                    Target::Ptx => ("--ptx", "compute_80".to_string(), format!("{stem}.ptx")),
                    Target::Cubin(sm) => ("--cubin", sm.to_string(), format!("{stem}.{sm}.cubin")),
                };
                let out = out_dir.join(file);
                let mut cmd = Command::new(&nvcc);
                if let Some(cc) = &ccbin {
                    cmd.arg("-ccbin").arg(cc);
                }
                cmd.args(["-O3", "-lineinfo", "--std=c++17", "-Xptxas", "-v", experimental_define(experimental)])
                    .arg(format!("-I{}", kernels.display()))
                    .arg(flag)
                    .arg(format!("-arch={arch}"))
                    .arg("-o")
                    .arg(&out)
                    .arg(src);
                let cached = cache.as_ref().map(|c| c.entry(&cmd, &headers_digest, src, &out));
                if let Some(log) = cached.as_ref().and_then(|e| e.as_ref()).and_then(CacheEntry::load) {
                    let res = Ok(Compiled { stem, target, out, fns: parse_ptxas(&log), gmma: gmma_advisories(&log) });
                    results.lock().expect("results lock").push(res);
                    continue;
                }
                let res = match cmd.output() {
                    Err(e) => Err(format!("cannot run {}: {e}; {INSTALL_HINT}", nvcc.display())),
                    Ok(o) => {
                        let log =
                            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                        if o.status.success() {
                            if let Some(Some(e)) = &cached {
                                e.store(&log);
                            }
                            for line in log.lines() {
                                let l = line.to_ascii_lowercase();
                                if l.contains("warning") && !l.starts_with("ptxas info") {
                                    println!("cargo:warning=nvcc {stem}.cu [{arch}]: {line}");
                                }
                            }
                            Ok(Compiled { stem, target, out, fns: parse_ptxas(&log), gmma: gmma_advisories(&log) })
                        } else {
                            Err(format!("nvcc failed on {} for {arch} ({}):\n{log}", src.display(), o.status))
                        }
                    }
                };
                results.lock().expect("results lock").push(res);
            });
        }
    });
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for r in results.into_inner().expect("results") {
        match r {
            Ok(c) => done.push(c),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }

    // Resource report and the no-spill rule.
    done.sort_by(|a, b| a.stem.cmp(&b.stem));
    let allow_spills = env::var("TIEDLORA_ALLOW_SPILLS").is_ok_and(|v| v == "1");
    let mut violations = Vec::new();
    for c in &done {
        let Target::Cubin(sm) = c.target else {
            continue;
        };
        for a in &c.gmma {
            violations.push(format!("{}.cu [{sm}] {a}", c.stem));
        }
        for f in &c.fns {
            if f.entry {
                println!(
                    "cargo:warning=ptxas {sm} {}: {} registers, {} B smem, {} B stack, {} B spill stores, {} B spill loads",
                    f.name, f.registers, f.smem, f.stack, f.spill_stores, f.spill_loads
                );
            }
            if f.spill_stores > 0 || f.spill_loads > 0 || f.stack > 0 || f.lmem > 0 {
                violations.push(format!(
                    "{}.cu [{sm}] {}{}: {} B stack frame, {} B spill stores, {} B spill loads, {} B lmem",
                    c.stem,
                    if f.entry { "kernel " } else { "function " },
                    f.name,
                    f.stack,
                    f.spill_stores,
                    f.spill_loads,
                    f.lmem
                ));
            }
        }
    }
    if !violations.is_empty() {
        if allow_spills {
            for v in &violations {
                println!("cargo:warning=allowed by TIEDLORA_ALLOW_SPILLS=1: {v}");
            }
        } else {
            fail(&format!(
                "kernels use local memory (register spills or a stack frame) or lost their \
                 asynchronous warpgroup MMAs (ptxas C75xx); fix them, or set \
                 TIEDLORA_ALLOW_SPILLS=1 to build anyway:\n  {}",
                violations.join("\n  ")
            ));
        }
    }

    // kernels_embedded.rs
    let mut src = String::from("// @generated by build.rs from kernels/*.cu; do not edit.\n");
    let mut statics = String::new();
    src.push_str("/// Every `kernels/*.cu` file, compiled by nvcc.\npub static MODULES: &[EmbeddedModule] = &[\n");
    let stems: Vec<&String> = {
        let mut s: Vec<&String> = done.iter().map(|c| &c.stem).collect();
        s.dedup();
        s
    };
    for (i, stem) in stems.iter().enumerate() {
        let find = |t: Target| done.iter().find(|c| &c.stem == *stem && c.target == t).expect("every target compiled");
        let ptx = find(Target::Ptx);
        let sm80 = find(Target::Cubin("sm_80"));
        let sm90 = find(Target::Cubin("sm_90a"));
        for (tag, c) in [("SM80", sm80), ("SM90", sm90)] {
            let len = fs::metadata(&c.out).unwrap_or_else(|e| fail(&format!("{}: {e}", c.out.display()))).len();
            writeln!(
                statics,
                "static CUBIN_{i}_{tag}: Aligned<{len}> = Aligned(*include_bytes!({:?}));",
                c.out.display().to_string()
            )
            .expect("write to string");
        }
        let mut names: Vec<&str> = sm90.fns.iter().filter(|f| f.entry).map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let res = |c: &Compiled, name: &str| {
            let f = c.fns.iter().find(|f| f.name == name).cloned().unwrap_or_default();
            format!("KernelResources {{ registers: {}, shared_bytes: {} }}", f.registers, f.smem)
        };
        writeln!(
            src,
            "    EmbeddedModule {{\n        name: {stem:?},\n        ptx: include_str!({:?}),\n        cubin_sm80: &CUBIN_{i}_SM80.0,\n        cubin_sm90: &CUBIN_{i}_SM90.0,\n        kernels: &[",
            ptx.out.display().to_string()
        )
        .expect("write to string");
        for name in names {
            writeln!(
                src,
                "            EmbeddedKernel {{ name: {name:?}, sm80: {}, sm90: {} }},",
                res(sm80, name),
                res(sm90, name)
            )
            .expect("write to string");
        }
        src.push_str("        ],\n    },\n");
    }
    src.push_str("];\n");
    src.push_str(&statics);
    let all: Vec<String> = done
        .iter()
        .filter(|c| c.target == Target::Cubin("sm_90a") && c.stem != "shim_selftest")
        .flat_map(|c| c.fns.iter().filter(|f| f.entry).map(|f| f.name.clone()))
        .collect();
    report_kernel_count("CUDA modules", &all, experimental);
    let gen = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("kernels_embedded.rs");
    fs::write(&gen, src).unwrap_or_else(|e| fail(&format!("{}: {e}", gen.display())));
}

/// nvcc's outputs reused across cargo profiles and commands: `cargo clippy`,
/// `cargo build` and `cargo test` each run this build script with their own
/// `OUT_DIR`, and the nvcc work (minutes) is the same whenever the command
/// line, the kernel file and every header are. Kept under the target
/// directory (`target/nvcc-cache/`), keyed by a digest of all of them;
/// `TIEDLORA_NVCC_CACHE=0` turns it off.
struct NvccCache {
    dir: PathBuf,
}

struct CacheEntry {
    object: PathBuf,
    log: PathBuf,
    out: PathBuf,
}

impl NvccCache {
    fn new(out_dir: &Path) -> Option<Self> {
        println!("cargo:rerun-if-env-changed=TIEDLORA_NVCC_CACHE");
        if env::var("TIEDLORA_NVCC_CACHE").is_ok_and(|v| v == "0") {
            return None;
        }
        // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out/kernels.
        let target = out_dir.ancestors().nth(5)?;
        let dir = target.join("nvcc-cache");
        fs::create_dir_all(&dir).ok()?;
        Some(NvccCache { dir })
    }

    fn entry(&self, cmd: &Command, headers: &str, src: &Path, out: &Path) -> Option<CacheEntry> {
        let mut key = format!("{:?}|{headers}|{}", cmd.get_program(), digest_files(&[src.to_path_buf()]));
        for a in cmd.get_args() {
            // The output path differs per OUT_DIR; everything else is the key.
            if Path::new(a) != out {
                key.push('|');
                key.push_str(&a.to_string_lossy());
            }
        }
        let name = format!("{:016x}", fnv1a(key.as_bytes()));
        Some(CacheEntry {
            object: self.dir.join(&name),
            log: self.dir.join(format!("{name}.log")),
            out: out.to_path_buf(),
        })
    }
}

impl CacheEntry {
    /// Copies the cached output into place; `Some(ptxas log)` on a hit.
    fn load(&self) -> Option<String> {
        let log = fs::read_to_string(&self.log).ok()?;
        fs::copy(&self.object, &self.out).ok()?;
        Some(log)
    }

    fn store(&self, log: &str) {
        // Object first, log last: a log only exists beside a complete object.
        let tmp = self.object.with_extension(format!("tmp{}", std::process::id()));
        if fs::copy(&self.out, &tmp).is_ok() && fs::rename(&tmp, &self.object).is_ok() {
            let _ = fs::write(&self.log, log);
        }
    }
}

/// FNV-1a (64-bit): a stable digest for cache keys (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A digest of the files' names and contents.
fn digest_files(files: &[PathBuf]) -> String {
    let mut h = 0u64;
    for f in files {
        let bytes = fs::read(f).unwrap_or_default();
        h = fnv1a(&[h.to_le_bytes().as_slice(), f.to_string_lossy().as_bytes(), &bytes].concat());
    }
    format!("{h:016x}")
}

// ----------------------------------------------------------- cpu-kernels ---

fn build_cpu(kernels: &Path, sources: &[PathBuf], experimental: bool) {
    println!("cargo:rerun-if-env-changed=TIEDLORA_SANITIZE");
    let shim_header = kernels.join("shim").join("cuda_shim.h");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(shim_header.to_string_lossy().as_ref())
        .include(kernels)
        .include(kernels.join("shim").join("include"))
        .flag("-pthread")
        // CUDA code type-puns through reinterpret_cast (uint4/float4 vector
        // loads); without this, that is undefined behaviour for host C++.
        .flag("-fno-strict-aliasing")
        // A misaligned vector access faults on a GPU; in the shim it traps
        // too (SIGILL), so a kernel that skips an alignment check before a
        // 16-byte load fails the CPU tests instead of passing on x86.
        .flag("-fsanitize=alignment")
        .flag("-fsanitize-undefined-trap-on-error")
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-unused-parameter")
        .flag(experimental_define(experimental))
        .debug(true)
        .files(sources);
    // Tests run the kernels with up to 1024 threads per block: at least -O1.
    if env::var("OPT_LEVEL").is_ok_and(|o| o == "0") {
        b.opt_level(1);
    }
    match env::var("TIEDLORA_SANITIZE").as_deref() {
        Err(_) | Ok("") => {}
        Ok(s @ ("thread" | "address")) => {
            b.flag(format!("-fsanitize={s}")).flag("-fno-omit-frame-pointer");
            link_sanitizer_runtime(&b, s);
        }
        Ok(other) => fail(&format!("TIEDLORA_SANITIZE={other}: expected `thread` or `address`")),
    }
    b.compile("tiedlora_cpu_kernels");
    write_shim_table();
}

/// `$OUT_DIR/shim_kernels.rs`: every kernel entry point (`extern "C" tl_*`
/// symbol) the archive defines, declared and listed by name, so the table the
/// CPU backend launches from is exactly what was compiled. The shim's
/// self-test kernels (`tl_selftest_*`) are declared in `src/kernels/shim.rs`.
fn write_shim_table() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let lib = out.join("libtiedlora_cpu_kernels.a");
    println!("cargo:rerun-if-env-changed=NM");
    let nm = env::var("NM").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "nm".to_string());
    let listing = Command::new(&nm)
        .args(["--defined-only", "--extern-only", "--format=posix"])
        .arg(&lib)
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run `{nm}` on {} (binutils): {e}", lib.display())));
    if !listing.status.success() {
        fail(&format!("`{nm}` failed on {}: {}", lib.display(), String::from_utf8_lossy(&listing.stderr)));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, kind) = (f.next()?, f.next()?);
            (kind == "T" && name.starts_with("tl_") && !name.starts_with("tl_selftest_")).then(|| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        fail(&format!("no kernel entry points (`tl_*` symbols) found in {}", lib.display()));
    }
    let mut src = String::from("// @generated by build.rs from the symbols of the compiled kernels; do not edit.\n");
    src.push_str("crate::kernels::shim::shim_kernels!(\n");
    for n in &names {
        writeln!(src, "    {n},").expect("write to string");
    }
    src.push_str(");\n\n/// Every kernel entry point of this build, by symbol (sorted).\n");
    src.push_str("pub(crate) static SHIM_TABLE: &[(&str, crate::kernels::shim::ShimEntry)] = &[\n");
    for n in &names {
        writeln!(src, "    ({n:?}, {n} as crate::kernels::shim::ShimEntry),").expect("write to string");
    }
    src.push_str("];\n");
    let gen = out.join("shim_kernels.rs");
    fs::write(&gen, src).unwrap_or_else(|e| fail(&format!("{}: {e}", gen.display())));
    let experimental = env::var_os("CARGO_FEATURE_EXPERIMENTAL_KERNELS").is_some();
    report_kernel_count("CPU shim", &names, experimental);
}

/// Links the sanitizer runtime into this package's tests, examples, benches
/// and binaries. rustc links with `-nodefaultlibs`, which makes gcc drop the
/// runtime that `-fsanitize=...` would add, so add it by hand the way gcc's
/// `-static-libtsan` / `-static-libasan` do: the preinit object and the whole
/// static runtime, inside the executable so its interceptors (malloc, pthread)
/// take precedence over libc's. Other compilers fall back to `-fsanitize=...`.
fn link_sanitizer_runtime(b: &cc::Build, which: &str) {
    let lib = if which == "thread" { "tsan" } else { "asan" };
    let compiler = b.get_compiler();
    let locate = |name: &str| -> Option<PathBuf> {
        let out = Command::new(compiler.path()).arg(format!("-print-file-name={name}")).output().ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        p.is_absolute().then_some(p).filter(|p| p.is_file())
    };
    match (locate(&format!("lib{lib}_preinit.o")), locate(&format!("lib{lib}.a"))) {
        (Some(preinit), Some(runtime)) => {
            println!("cargo:rustc-link-arg={}", preinit.display());
            println!("cargo:rustc-link-arg=-Wl,--whole-archive");
            println!("cargo:rustc-link-arg={}", runtime.display());
            println!("cargo:rustc-link-arg=-Wl,--no-whole-archive");
            for l in ["-lstdc++", "-lpthread", "-ldl", "-lrt", "-lm"] {
                println!("cargo:rustc-link-arg={l}");
            }
        }
        _ => println!("cargo:rustc-link-arg=-fsanitize={which}"),
    }
}
