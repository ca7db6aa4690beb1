#!/usr/bin/env bash
# All GPU checks in one bounded run, ON the device machine (CUDA 13 driver,
# compute-sanitizer, python3 with torch/peft; no Rust, no network), from the
# repository root, with the binaries built here by scripts/build-device-bundle.sh
# in device-bundle/ (git-ignored: the device machine must carry it).
#
#   bash scripts/gpu-check.sh OUTDIR
#   # device machine: run(command='bash scripts/gpu-check.sh "$OUT"', carry=["device-bundle"], timeout_s=600)
#
# Steps (each with its own timeout; one failing never stops the others):
#   env         nvidia-smi, tool versions, libcublas location
#   kernels_gpu device-bundle/bin/kernels_gpu --ignored --nocapture --test-threads=1, the
#               default kernels (every test but the optional families below)
#   kg_tiles, kg_defer, kg_engine, kg_mma, kg_wgmma   one process per optional family
#               (wide tiles, deferred id errors, cuBLAS engine, mma.sync, wgmma; its small
#               tests and its gpu_larger_shapes_* test): a family
#               that fails is left out of verify / bench / ncu (gpu_bench --variants) and
#               of the sanitizer runs, so a crash cannot poison the other paths' rows
#   goldens     device-bundle/bin/goldens --include-ignored ... (CPU golden harness;
#               it has no ignored tests, so plain --ignored would run nothing)
#   cuda_step   examples/cuda_step: one fused tied-LoRA step on the GPU vs the CPU reference
#   cuda_step_cublas  the same with --cublas (Cuda::with_cublas)
#   candle_gpu  tests/candle_gpu.rs: tiedlora::candle on candle's CUDA tensors vs
#               candle's unfused f64 autograd on the CPU (limit 90)
#   finetune_cuda, peft_finetune   examples/finetune --device cuda (limit 120), and
#               scripts/peft_check.py --finetune on what it wrote (limit 120)
#   verify      gpu_bench --verify: every GPU path (ours and the cuBLAS baselines)
#               once at T=512 V=8192 d=512, vs tiedlora::CpuReference  -> OUTDIR/verify.{json,md}
#   bench       gpu_bench: Gemma-2-2B and Llama-3.2-1B shapes  -> OUTDIR/results.{json,md}
#   memcheck    compute-sanitizer --tool memcheck  on kernels_gpu's gpu_small_* tests
#   racecheck   compute-sanitizer --tool racecheck on kernels_gpu's gpu_small_* tests
#   bench_py    scripts/bench_xent.py: PEFT / torch / CCE / Liger head + cross-entropy
#               at the same shapes                              -> OUTDIR/results_py.md
#   ncu         Nsight Compute on the first launch of each _mma / _wgmma GEMM kernel
#               at the Llama shape -> OUTDIR/ncu.txt
#   ncu_small   durations of every launch of the small kernels (embedding ops, lora_project /
#               lora_hidden_grad, sort, grouped sums) at the Llama shape, as CSV -> end of OUTDIR/ncu.txt
#   peft_golden, peft_export   scripts/peft_check.py on tests/data/goldens/peft_llama_tied and
#               device-bundle/peft-export (CPU only; run in the background from the start)
#
# Wall-time budget (H100/H200), total capped at GPU_CHECK_BUDGET_S (default 540 s;
# a step that would start past it is recorded as SKIP, and every step's timeout
# is cut to the time left):
#   env ~3 s | kernels_gpu + kg_* ~50-120 s (limits 150 + 5 x 90; each family's
#     64-bit indexing test moves a 4.3 GB [T, V] to the host: ~5-8 s, estimated) | goldens ~5 s (limit 45) | cuda_step ~5-15 s (limit 60)
#   verify ~10-20 s (limit 60; mostly the CPU reference, ~6 s on a 2-core box)
#   bench ~60-150 s (limit 200; results written after each shape, so a cut
#     run keeps the shapes it finished): context + module load + cuBLAS init ~2 s;
#     copy test 2x4 GiB x 26 copies ~0.1 s; per shape ~27 calls of each path
#     (probe, memory, 5 warm-up, 20 timed). Estimate from the second run's
#     times (seventh session, every family on): Gemma head_forward 10 rows
#     ~8 s, head_backward 9 rows ~17 s (the fused ones at ~116 ms a call),
#     xent_forward 6 rows ~6 s, xent_fwd_bwd 9 rows ~30 s (fused ~225 ms a call),
#     embedding rows < 1 s: ~60 s; Llama about half: ~95 s in all.
#   bench_py ~40-120 s (limit 180; first calls include Triton autotuning)
#   memcheck ~20-60 s (limit 90) | racecheck ~30-90 s (limit 90)
#   ncu ~40-100 s (limit 100; ~12 kernels x 4 sections) | ncu_small ~15-40 s (limit 60: one Llama bench pass,
#     durations of the small kernels only)
#   peft (background, overlapping the GPU steps) ~15-30 s each, limit 120 each
#   expected total ~6-8 min; hard cap 9 min + packing (steps past the budget are
#   SKIPped in this order of importance: ... sanitizers, then ncu last).
#
# OUTDIR receives at most 8 files (the device machine returns at most 8):
#   summary.txt (PASS/FAIL/SKIP per step), gpu-check.log (every step's output,
#   each capped at 2 MB), results.json, results.md, verify.json, verify.md,
#   results_py.md, ncu.txt.
set -u -o pipefail

OUTDIR="${1:?usage: bash scripts/gpu-check.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
BUNDLE="${TIEDLORA_BUNDLE:-$ROOT/device-bundle}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
LOG="$OUTDIR/gpu-check.log"
SUMMARY="$OUTDIR/summary.txt"
WORK="$(mktemp -d)"
START=$(date +%s)
: >"$LOG"
: >"$SUMMARY"

RESULTS=()
record() { # NAME STATUS DETAIL
  local line
  line="$(printf '%-12s %-4s %s' "$1" "$2" "$3")"
  RESULTS+=("$line")
  echo "$line" >>"$SUMMARY"
  echo ">>> $line"
}

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT_S CMD... : runs CMD with a timeout, logs it, records PASS/FAIL/SKIP;
# STEP_RC is its exit status afterwards (99 when skipped).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - $(elapsed)))
  STEP_RC=99
  if ((left < 15)); then
    record "$name" SKIP "time budget (${BUDGET}s) spent"
    return
  fi
  ((limit > left)) && limit=$left
  local slog="$WORK/$name.log"
  echo "=== [$name] $(date -u '+%H:%M:%S') timeout ${limit}s: $*" >"$slog"
  echo "=== [$name] timeout ${limit}s"
  local t0 rc dt
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$slog" 2>&1
  rc=$?
  STEP_RC=$rc
  dt=$(($(date +%s) - t0))
  head -c 2000000 "$slog" >>"$LOG"
  echo >>"$LOG"
  tail -n 8 "$slog"
  if ((rc == 0)); then
    record "$name" PASS "${dt}s"
  elif ((rc == 124 || rc == 137)); then
    record "$name" FAIL "timeout after ${dt}s (limit ${limit}s)"
  else
    record "$name" FAIL "exit ${rc} after ${dt}s"
  fi
}

# ---------------------------------------------------------------- setup ---
BIN="$BUNDLE/bin"
# bin.tar.xz: one xz stream with a 256 MiB dictionary (scripts/build-device-bundle.sh);
# unpacked by xz when the machine has it, else by Python's lzma (any dictionary size).
if [ -f "$BUNDLE/bin.tar.xz" ]; then
  if command -v xz >/dev/null; then
    xz -dc "$BUNDLE/bin.tar.xz" | tar -xf - -C "$BUNDLE"
  else
    python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
      "$BUNDLE/bin.tar.xz" "$BUNDLE"
  fi || echo "gpu-check: cannot unpack $BUNDLE/bin.tar.xz" | tee -a "$LOG"
elif [ -f "$BUNDLE/bin.tar.gz" ]; then
  tar -xzf "$BUNDLE/bin.tar.gz" -C "$BUNDLE" || echo "gpu-check: cannot unpack $BUNDLE/bin.tar.gz" | tee -a "$LOG"
fi
have_bin() { [ -x "$BIN/$1" ]; }
if ! have_bin kernels_gpu || ! have_bin gpu_bench; then
  echo "gpu-check: no binaries in $BIN: run scripts/build-device-bundle.sh on the build machine and carry device-bundle/" | tee -a "$LOG"
fi

MANIFEST_DIR=""
if [ -f "$BUNDLE/manifest.env" ]; then
  # shellcheck disable=SC1091
  . "$BUNDLE/manifest.env"
  cat "$BUNDLE/manifest.env" >>"$LOG"
fi
# The test binaries find the built-in goldens (tests/common/golden.rs builtin_dir)
# under $CARGO_MANIFEST_DIR read at run time, then the build machine's path baked
# in at compile time, then tests/data/goldens relative to the working directory.
# Set the first to this tree. Binaries built before that lookup existed only know
# the baked-in path: if it is missing here, link it to this working tree (we run
# as root on the device machine, which starts bare each time).
export CARGO_MANIFEST_DIR="$ROOT"
if [ -n "$MANIFEST_DIR" ] && [ "$MANIFEST_DIR" != "$ROOT" ] && [ ! -e "$MANIFEST_DIR/tests/data/goldens" ]; then
  if [ ! -e "$MANIFEST_DIR" ] && mkdir -p "$(dirname "$MANIFEST_DIR")" 2>/dev/null && ln -s "$ROOT" "$MANIFEST_DIR" 2>/dev/null; then
    echo "gpu-check: linked $MANIFEST_DIR -> $ROOT (built-in goldens path of the test binaries)" | tee -a "$LOG"
  else
    echo "gpu-check: WARNING: $MANIFEST_DIR/tests/data/goldens is missing and cannot be linked; golden tests will fail" | tee -a "$LOG"
  fi
fi

# cudarc loads libcublas.so.13 at run time (the bench's baselines): find it.
find_cublas_dir() {
  local p d
  p="$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.13 /{print $NF; exit}')"
  [ -n "$p" ] && { dirname "$p"; return; }
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    /usr/local/cuda-13*/targets/x86_64-linux/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
    /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/libcublas.so.13" ] && { echo "$d"; return; }
  done
  p="$(python3 -c 'import glob, site, sys
for s in site.getsitepackages():
    for f in glob.glob(s + "/nvidia/**/libcublas.so.13", recursive=True):
        print(f); sys.exit()' 2>/dev/null)"
  [ -n "$p" ] && { dirname "$p"; return; }
  p="$(timeout 20 find /usr /opt -name 'libcublas.so.13' 2>/dev/null | head -n1)"
  [ -n "$p" ] && dirname "$p"
}
CUBLAS_DIR="$(find_cublas_dir)"
if [ -n "$CUBLAS_DIR" ]; then
  export LD_LIBRARY_PATH="$CUBLAS_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n1)"

# --------------------------------------------------- PEFT (background) ---
# CPU only (float64); started first so it overlaps the GPU steps.
peft_job() { # NAME ADAPTER_DIR
  local name=$1 dir=$2 t0 rc
  t0=$(date +%s)
  {
    echo "=== [$name] python3 scripts/peft_check.py $dir"
    CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 timeout --kill-after=10 120 python3 scripts/peft_check.py "$dir"
    rc=$?
    echo "exit $rc after $(($(date +%s) - t0))s"
    echo "$rc $(($(date +%s) - t0))" >"$WORK/$name.rc"
  } >"$WORK/$name.log" 2>&1
}
PEFT_GOLDEN="tests/data/goldens/peft_llama_tied"
[ -d "$PEFT_GOLDEN" ] || PEFT_GOLDEN="$BUNDLE/goldens/peft_llama_tied"
(
  peft_job peft_golden "$PEFT_GOLDEN"
  if [ -d "$BUNDLE/peft-export" ]; then peft_job peft_export "$BUNDLE/peft-export"; fi
) &
PEFT_PID=$!

# ---------------------------------------------------------------- steps ---
env_info() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -srm)  cwd: $ROOT"
  nvidia-smi || return 1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  echo "libcublas dir: ${CUBLAS_DIR:-NOT FOUND: the bench will have no cuBLAS baselines}"
  echo "compute-sanitizer: ${SANITIZER:-NOT FOUND}"
  [ -n "$SANITIZER" ] && "$SANITIZER" --version | tail -n 2
  python3 -c 'import torch, peft, transformers; print("torch", torch.__version__, "peft", peft.__version__, "transformers", transformers.__version__)'
  ls -la "$BIN"
  return 0
}
export ROOT BIN CUBLAS_DIR SANITIZER
export -f env_info
step env 30 bash -c env_info

SMALL_FILTER="gpu_small_"
# The GPU tests by family, each family in its own process: a crash (a sticky
# CUDA error) poisons only its own process. A family whose tests fail is left
# out of verify / bench / ncu (gpu_bench --variants) and of the sanitizer
# runs, so it cannot take the other paths' rows and checks with it.
KG=("$BIN/kernels_gpu" --ignored --nocapture --test-threads=1)
step kernels_gpu 150 "${KG[@]}" --skip _mma --skip wgmma --skip gemm_engine --skip wide_tiles --skip two_blocks --skip deferred_id
VARIANTS="none"
FAILED_SKIPS=()
family() { # NAME VARIANT TEST_FILTER...: one family's tests; on PASS its variant joins VARIANTS
  local name=$1 variant=$2
  shift 2
  step "$name" 90 "${KG[@]}" "$@"
  if ((STEP_RC == 0)); then
    VARIANTS+=",$variant"
  else
    for f in "$@"; do FAILED_SKIPS+=(--skip "$f"); done
  fi
}
family kg_tiles tiles wide_tiles two_blocks
family kg_defer defer deferred_id
family kg_engine cublas gemm_engine
family kg_mma mma _mma
family kg_wgmma wgmma wgmma
echo "gpu_bench --variants $VARIANTS" | tee -a "$LOG"
step goldens 45 "$BIN/goldens" --include-ignored --nocapture --test-threads=1
step cuda_step 60 "$BIN/cuda_step"
step cuda_step_cublas 60 "$BIN/cuda_step" --cublas
# The candle integration on candle's CUDA tensors, then the fine-tune on the
# GPU (short) and its adapter checked by PEFT against the run's own logits.
if have_bin candle_gpu && have_bin finetune; then
  step candle_gpu 90 "$BIN/candle_gpu" --ignored --nocapture --test-threads=1
  step finetune_cuda 120 "$BIN/finetune" --device cuda --out "$WORK/finetune"
else
  record candle_gpu SKIP "no candle CUDA binaries in the bundle"
  record finetune_cuda SKIP "no candle CUDA binaries in the bundle"
fi
if [ -f "$WORK/finetune/check.safetensors" ]; then
  step peft_finetune 120 python3 scripts/peft_check.py --finetune "$WORK/finetune"
else
  record peft_finetune SKIP "finetune wrote no check.safetensors"
fi
step verify 60 "$BIN/gpu_bench" --verify --variants "$VARIANTS" --out "$OUTDIR"
step bench 200 "$BIN/gpu_bench" --variants "$VARIANTS" --out "$OUTDIR"
if [ -n "$SANITIZER" ]; then
  step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 \
    "${KG[@]}" "$SMALL_FILTER" ${FAILED_SKIPS[@]+"${FAILED_SKIPS[@]}"}
  # Not the cuBLAS engine test under racecheck: its own kernels use no shared
  # memory (nothing to race on), and racecheck-instrumented cuBLAS GEMMs
  # could eat the step's time limit (memcheck above does check it).
  step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
    "${KG[@]}" "$SMALL_FILTER" --skip gpu_small_gemm_engine_paths ${FAILED_SKIPS[@]+"${FAILED_SKIPS[@]}"}
else
  record memcheck FAIL "compute-sanitizer not found"
  record racecheck FAIL "compute-sanitizer not found"
fi
# The Python stack's head + cross-entropy paths (PEFT, torch, Cut Cross-Entropy,
# Liger) at the same shapes, for the fused cross-entropy comparison. After the
# sanitizers: its time (Triton autotuning) is the least predictable.
step bench_py 180 env PYTHONPATH="$BUNDLE/py${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  python3 scripts/bench_xent.py --out "$OUTDIR"

# Nsight Compute profile of the tensor-core GEMM kernels at the Llama shape,
# to steer the kernel work: OUTDIR/ncu.txt. The first launch of EACH kernel
# whose name ends in _mma or _wgmma (`--kernel-id ::regex:NAME:1`; the
# default kernels' profile is in BENCHMARKS.md, second run), so mma.sync and
# wgmma variants of every op sit side by side; and of the cuBLAS engine's
# chunk kernels (their DRAM vs L2 throughput says whether the f32 logits
# chunk stayed in L2). Skipped when ncu is absent or
# GPU_CHECK_NCU=0.
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
if [ -n "$NCU" ] && [ "${GPU_CHECK_NCU:-1}" != 0 ]; then
  step ncu 100 bash -c "\"$NCU\" --kernel-id '::regex:^(tl_(head_forward|head_grad_h|head_grad_param|xent_partial|xent_grad_logits)_.*(_mma|_wgmma)|tl_(concat_rows|xent_chunk_partial|xent_chunk_grad).*)\$:1' \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      \"$BIN/gpu_bench\" --shapes llama --warmup 0 --iters 1 --copy-mib 64 --variants \"$VARIANTS\" \
      --out \"$WORK/ncu-bench\" >\"$OUTDIR/ncu.txt\" 2>&1"
  # Durations only, of the small kernels around the GEMMs (the embedding
  # ops are launch- and latency-bound; their per-kernel split says where the
  # time goes): one CSV row per launch, appended to OUTDIR/ncu.txt (the
  # device machine returns at most 8 files).
  step ncu_small 60 bash -c "\"$NCU\" --kernel-name regex:'tl_(prepare_ids|lora_project|lora_hidden_grad|lora_pack|sort_ids|group_rows|embed_forward|xent_combine|xent_grad_finish)' \
      --launch-count 120 --metrics gpu__time_duration.sum --csv \"$BIN/gpu_bench\" --shapes llama --warmup 0 --iters 1 \
      --copy-mib 64 --variants \"$VARIANTS\" --out \"$WORK/ncu-small\" >>\"$OUTDIR/ncu.txt\" 2>&1"
else
  record ncu SKIP "ncu not found or GPU_CHECK_NCU=0"
  record ncu_small SKIP "ncu not found or GPU_CHECK_NCU=0"
fi

# ------------------------------------------------------ collect PEFT ---
# Each check has its own 120 s timeout, so this wait is bounded (<= ~260 s
# after the start, which the GPU steps normally outlast anyway).
wait "$PEFT_PID" 2>/dev/null
for name in peft_golden peft_export; do
  if [ "$name" = peft_export ] && [ ! -d "$BUNDLE/peft-export" ]; then
    record "$name" SKIP "no device-bundle/peft-export"
    continue
  fi
  if [ -f "$WORK/$name.log" ]; then
    head -c 2000000 "$WORK/$name.log" >>"$LOG"
    tail -n 8 "$WORK/$name.log"
  fi
  if [ -f "$WORK/$name.rc" ]; then
    read -r rc dt <"$WORK/$name.rc"
    if [ "$rc" = 0 ]; then record "$name" PASS "${dt}s"; else record "$name" FAIL "exit ${rc} after ${dt}s"; fi
  else
    record "$name" FAIL "did not finish within the time budget"
  fi
done

# ------------------------------------------------------------ summary ---
rm -rf "$WORK"
total=$(elapsed)
fails=0
for r in "${RESULTS[@]}"; do
  case "$r" in *" FAIL "*) fails=$((fails + 1)) ;; esac
done
{
  echo "total ${total}s, ${fails} step(s) failed"
} >>"$SUMMARY"
echo
echo "================ gpu-check summary (${OUTDIR}/summary.txt)"
cat "$SUMMARY"
[ -f "$OUTDIR/results.md" ] && echo && sed -n '1,60p' "$OUTDIR/results.md"
exit $((fails > 0 ? 1 : 0))
