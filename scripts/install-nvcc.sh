#!/usr/bin/env bash
# Install the pinned CUDA 13.0 nvcc from PyPI into the repo-local, git-ignored
# folder .nvcc/ (never system-wide). Idempotent: re-running is a no-op once the
# pinned set is installed and works.
#
#   bash scripts/install-nvcc.sh          # install (or verify) and print nvcc's path
#   NVCC_INSTALL_FORCE=1 bash scripts/...  # wipe .nvcc/ and reinstall
#
# The versions are pinned as ONE set on purpose: unpinned, pip mixes 13.5
# parts with 13.0 ones and ptxas then rejects the PTX.
#
# Afterwards `cargo build --features cuda` finds nvcc here by itself (build.rs
# looks at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then .nvcc/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.nvcc"
SITE="$DEST/site"
CU="$SITE/nvidia/cu13"
NVCC="$CU/bin/nvcc"
STAMP="$DEST/installed.txt"
PYTHON="${PYTHON:-python3}"

PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.88
  nvidia-cuda-cccl==13.0.85
)
WANT="${PKGS[*]}"

# A host compiler nvcc accepts (CUDA 13.0 supports gcc up to 14).
HOSTCXX="${NVCC_CCBIN:-$(command -v g++ || true)}"

# A real compile of a .cu to PTX (compute_80) and to an sm_90 cubin. Runs in a
# subshell so its temporary folder goes away whatever happens.
verify() (
  set -euo pipefail
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  cat > "$tmp/t.cu" <<'CU'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
extern "C" __global__ void axpy(float a, const float* __restrict__ x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  __shared__ float s[32];
  if (i < n) { s[threadIdx.x % 32] = __half2float(__float2half(x[i])); y[i] += a * s[threadIdx.x % 32]; }
}
CU
  local ccbin=()
  [ -n "$HOSTCXX" ] && ccbin=(-ccbin "$HOSTCXX")
  "$NVCC" --version >/dev/null
  "$NVCC" "${ccbin[@]}" --std=c++17 -arch=compute_80 --ptx -o "$tmp/t.ptx" "$tmp/t.cu"
  "$NVCC" "${ccbin[@]}" --std=c++17 -arch=sm_90 --cubin -Xptxas -v -o "$tmp/t.cubin" "$tmp/t.cu" 2> "$tmp/ptxas.log"
  grep -q '\.target sm_80' "$tmp/t.ptx"
  [ -s "$tmp/t.cubin" ]
)

if [ -z "${NVCC_INSTALL_FORCE:-}" ] && [ -x "$NVCC" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  if verify; then
    echo "nvcc already installed: $NVCC"
    "$NVCC" --version | tail -n 2
    exit 0
  fi
  echo "existing .nvcc/ install does not work; reinstalling" >&2
fi

rm -rf "$DEST"
mkdir -p "$SITE"
start=$(date +%s)
echo "installing ${WANT} into $SITE ..."
"$PYTHON" -m pip install --quiet --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore \
  --target "$SITE" "${PKGS[@]}"

[ -x "$NVCC" ] || { echo "error: nvcc not found at $NVCC after install" >&2; exit 1; }

# The wheels lay nvcc, ptxas, cicc (nvvm/bin), libdevice, the crt headers and
# cccl all under nvidia/cu13, and nvcc.profile there resolves everything
# relative to its own bin/ ($(_HERE_)/..), so no symlinks, -I or
# NVVMIR_LIBRARY_DIR are needed. Check that with a real compile.
if ! verify; then
  echo "error: nvcc installed at $NVCC but a test compile failed (host compiler: ${HOSTCXX:-none})" >&2
  exit 1
fi
echo "$WANT" > "$STAMP"
end=$(date +%s)
echo "installed in $((end - start)) s"
echo "nvcc: $NVCC"
"$NVCC" --version | tail -n 2
