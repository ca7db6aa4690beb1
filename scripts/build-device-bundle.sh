#!/usr/bin/env bash
# Build everything the GPU machine needs into the git-ignored folder
# device-bundle/. Run it HERE (the machine with Rust and nvcc); the device
# machine has a CUDA 13 driver, nvcc, compute-sanitizer, python3 with
# torch/peft, but NO Rust and NO network.
#
#   bash scripts/build-device-bundle.sh
#
# then, on the device, from the repository root (the device tool copies this
# working tree there; device-bundle/ is git-ignored, so name it in `carry`):
#
#   bash scripts/gpu-check.sh OUTDIR          # e.g. "$OUT"
#
# What it builds (release, --features cuda,experimental-kernels: the default
# kernels and the variants a GPU run measures for promotion; x86-64, glibc of this machine):
#   - the integration-test executables `kernels_gpu` (GPU parity tests, ignored
#     without a device) and `goldens` (golden harness), picked from
#     `cargo test --release --features cuda,experimental-kernels --no-run --message-format=json`;
#   - `examples/gpu_bench` (the benchmark; see examples/gpu_bench/main.rs) and
#     `examples/cuda_step` (one fused training step on the GPU vs the CPU reference);
#   - device-bundle/peft-export/: the golden PEFT adapter re-written by
#     tiedlora's `PeftAdapter::write` (tests/peft_adapter.rs round_trip_golden_bitwise
#     with TIEDLORA_PEFT_EXPORT), for scripts/peft_check.py to load with PEFT.
#
# Layout of device-bundle/:
#   bin.tar.xz            kernels_gpu, goldens, gpu_bench, cuda_step. Three of them
#                         embed every kernel's PTX + sm_80/sm_90 cubins (~75 MB
#                         each raw, ~13 MB each gzipped: 41 MB, near the device
#                         tool's 64 MiB carry limit). One xz stream with a
#                         256 MiB dictionary sees the shared kernel blob once:
#                         5.3 MB for all four (2026-11-28), ~1.5 min to pack.
#   manifest.env          MANIFEST_DIR (the CARGO_MANIFEST_DIR baked into the
#                         test binaries: tests/common/golden.rs finds the
#                         built-in goldens under it), git revision, build date,
#                         toolchain, sha256 of each binary
#   goldens/              copy of tests/data/goldens
#   peft-export/          see above
#   py/                   cut-cross-entropy and liger-kernel, unpacked from their
#                         PyPI wheels, for scripts/bench_xent.py (PYTHONPATH)
#   gpu-check.sh, peft_check.py, bench_xent.py   copies of the scripts (the device
#                         runs the ones in scripts/, which travel with the working tree)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="$ROOT/device-bundle"
LIMIT_MIB=60 # the device tool carries at most 64 MiB (working tree included)
CCE_VERSION=25.1.1   # Apple's Cut Cross-Entropy, PyPI cut-cross-entropy
LIGER_VERSION=0.8.5  # LinkedIn's Liger kernels, PyPI liger-kernel

die() {
  echo "build-device-bundle: error: $*" >&2
  exit 1
}

command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found (used to read cargo's JSON messages)"

# nvcc (repo-local, pinned; idempotent and quick when already installed).
if [ -z "${NVCC:-}" ] && [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
  bash scripts/install-nvcc.sh >/dev/null || die "scripts/install-nvcc.sh failed"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Prints the executable of the target named $2 of kind $3 from cargo JSON file $1.
pick() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
path, name, kind = sys.argv[1:]
found = []
with open(path) as f:
    for line in f:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if (m.get("reason") == "compiler-artifact" and m.get("executable")
                and m["target"]["name"] == name and kind in m["target"]["kind"]):
            found.append(m["executable"])
if not found:
    sys.exit(f"no {kind} executable named {name} in cargo's output")
print(found[-1])
PY
}

echo "== building test executables (cargo test --release --features cuda,experimental-kernels --no-run)"
if ! cargo test --release --features cuda,experimental-kernels --no-run --message-format=json >"$TMP/tests.json" 2>"$TMP/tests.err"; then
  cat "$TMP/tests.err" >&2
  die "cargo test --no-run failed"
fi
KERNELS_GPU="$(pick "$TMP/tests.json" kernels_gpu test)" || die "kernels_gpu test target not found (tests/kernels_gpu.rs)"
GOLDENS="$(pick "$TMP/tests.json" goldens test)" || die "goldens test target not found (tests/goldens.rs)"

echo "== building examples/gpu_bench and examples/cuda_step (cargo build --release --features cuda,experimental-kernels)"
if ! cargo build --release --features cuda,experimental-kernels --example gpu_bench --example cuda_step --message-format=json \
  >"$TMP/bench.json" 2>"$TMP/bench.err"; then
  cat "$TMP/bench.err" >&2
  die "building the examples failed"
fi
GPU_BENCH="$(pick "$TMP/bench.json" gpu_bench example)" || die "gpu_bench executable not found"
CUDA_STEP="$(pick "$TMP/bench.json" cuda_step example)" || die "cuda_step executable not found"

# The candle integration on candle's CUDA device: candle's own kernels are
# compiled for CUDA_COMPUTE_CAP (default 90: the H100 / H200 the device
# machines have) with the nvcc on PATH (the repo-local one if none); about
# 30 min on 2 cores the first time (candle-kernels), cached afterwards.
# candle's cudarc links libcuda, libcublas(Lt), libcurand and libnvrtc at
# build time, so the link needs them (a CUDA toolkit's lib64 and lib64/stubs
# on LIBRARY_PATH); without them this part is skipped with a warning and
# gpu-check records its steps as SKIP.
CANDLE_GPU="" FINETUNE=""
echo "== building tests/candle_gpu.rs and examples/finetune (--features cuda,candle)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
command -v nvcc >/dev/null || export PATH="$ROOT/.nvcc/site/nvidia/cu13/bin:$PATH"
if cargo test --release --features cuda,candle --test candle_gpu --no-run --message-format=json \
  >"$TMP/candle.json" 2>"$TMP/candle.err" &&
  cargo build --release --features cuda,candle --example finetune --message-format=json \
    >"$TMP/finetune.json" 2>"$TMP/finetune.err"; then
  CANDLE_GPU="$(pick "$TMP/candle.json" candle_gpu test)" || die "candle_gpu test target not found (tests/candle_gpu.rs)"
  FINETUNE="$(pick "$TMP/finetune.json" finetune example)" || die "finetune executable not found"
else
  tail -n 20 "$TMP/candle.err" "$TMP/finetune.err" 2>/dev/null >&2
  echo "build-device-bundle: warning: no candle CUDA binaries (see above; the link needs the CUDA libraries)" >&2
fi

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE" "$TMP/bin"
if [ -n "$CANDLE_GPU" ]; then
  cp "$CANDLE_GPU" "$TMP/bin/candle_gpu"
  cp "$FINETUNE" "$TMP/bin/finetune"
fi
cp "$KERNELS_GPU" "$TMP/bin/kernels_gpu"
cp "$GOLDENS" "$TMP/bin/goldens"
cp "$GPU_BENCH" "$TMP/bin/gpu_bench"
cp "$CUDA_STEP" "$TMP/bin/cuda_step"

# Smoke checks that need no GPU: the binaries start, list their tests, and the
# bench reports a missing GPU with exit status 2 (not a panic).
"$TMP/bin/kernels_gpu" --list >"$TMP/kernels_gpu.list" || die "kernels_gpu --list failed"
"$TMP/bin/goldens" --list >/dev/null || die "goldens --list failed"
if [ -n "$CANDLE_GPU" ]; then
  "$TMP/bin/candle_gpu" --list >/dev/null 2>&1 || echo "build-device-bundle: note: candle_gpu does not start here (it links libcuda)" >&2
fi
if ! grep -q 'gpu_small_' "$TMP/kernels_gpu.list"; then
  echo "build-device-bundle: warning: kernels_gpu has no gpu_small_* tests; gpu-check.sh's sanitizer steps will run none" >&2
fi
set +e
"$TMP/bin/gpu_bench" --quick >/dev/null 2>"$TMP/bench.smoke"
rc=$?
set -e
if [ "$rc" != 2 ] && [ "$rc" != 0 ] && [ "$rc" != 1 ]; then
  cat "$TMP/bench.smoke" >&2
  die "gpu_bench exited with status $rc (expected 2 without a GPU)"
fi

command -v xz >/dev/null || die "xz not found (packs the binaries into one stream)"
echo "== packing the binaries (xz, 256 MiB dictionary: ~1.5 min)"
(cd "$TMP" && tar -cf - bin | xz -6 --lzma2=dict=256MiB >"$BUNDLE/bin.tar.xz")

echo "== exporting the golden adapter through PeftAdapter::write (device-bundle/peft-export)"
TIEDLORA_PEFT_EXPORT="$BUNDLE/peft-export" \
  cargo test --release --features cuda,experimental-kernels --test peft_adapter -q -- round_trip_golden_bitwise --exact >"$TMP/peft.log" 2>&1 ||
  { cat "$TMP/peft.log" >&2; die "peft_adapter round_trip_golden_bitwise failed"; }
[ -f "$BUNDLE/peft-export/adapter_config.json" ] || die "no adapter was exported to $BUNDLE/peft-export"

cp -r tests/data/goldens "$BUNDLE/goldens"
cp scripts/gpu-check.sh scripts/peft_check.py scripts/bench_xent.py "$BUNDLE/"

# The comparison libraries of scripts/bench_xent.py (pure-Python wheels; the
# device has torch and triton but no network): unpacked into device-bundle/py.
echo "== fetching cut-cross-entropy $CCE_VERSION and liger-kernel $LIGER_VERSION wheels (device-bundle/py)"
if python3 -m pip download --quiet --no-deps --dest "$TMP/wheels" \
  "cut-cross-entropy==$CCE_VERSION" "liger-kernel==$LIGER_VERSION" >"$TMP/wheels.log" 2>&1; then
  mkdir -p "$BUNDLE/py"
  for whl in "$TMP"/wheels/*.whl; do
    python3 -m zipfile -e "$whl" "$BUNDLE/py" || die "cannot unpack $whl"
  done
else
  cat "$TMP/wheels.log" >&2
  echo "build-device-bundle: warning: no CCE / Liger wheels (offline?); bench_xent.py will record them as unavailable" >&2
fi

{
  echo "# written by scripts/build-device-bundle.sh"
  echo "MANIFEST_DIR='$ROOT'"
  echo "GIT_REV='$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')'"
  echo "BUILD_DATE='$(date -u '+%Y-%m-%d %H:%M:%S UTC')'"
  echo "RUSTC='$(rustc --version 2>/dev/null || echo unknown)'"
  echo "BUILD_HOST_GLIBC='$(ldd --version 2>/dev/null | head -n1 | awk '{print $NF}')'"
  for b in kernels_gpu goldens gpu_bench cuda_step candle_gpu finetune; do
    [ -f "$TMP/bin/$b" ] || continue
    echo "SHA256_${b}='$(sha256sum "$TMP/bin/$b" | cut -d' ' -f1)'"
  done
} >"$BUNDLE/manifest.env"

size_kib=$(du -sk "$BUNDLE" | cut -f1)
echo "== device-bundle/ ready: $((size_kib / 1024)) MiB"
ls -la "$BUNDLE"
if [ $((size_kib / 1024)) -gt "$LIMIT_MIB" ]; then
  die "device-bundle/ is over ${LIMIT_MIB} MiB: the device tool cannot carry it"
fi
echo "next (device): run 'bash scripts/gpu-check.sh \"\$OUT\"' with carry = [\"device-bundle\"]"
