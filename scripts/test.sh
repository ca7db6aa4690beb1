#!/usr/bin/env bash
# The whole test suite on a machine with no GPU (what CI runs):
#   1. installs the pinned nvcc into .nvcc/ (repo-local, idempotent), so the
#      CUDA kernels are compiled for real (the build fails on register spills);
#   2. runs every test with the CUDA backend and the CPU-executed kernels built
#      in, the experimental kernel variants included: the CPU backends, the
#      goldens, the PEFT files, and the same kernels/*.cu run on CPU threads
#      through the shim. Tests that need a GPU are listed as ignored (run them
#      with scripts/gpu-check.sh on a GPU machine);
#   3. runs the candle integration's tests and doc tests on candle's CPU
#      device (feature `candle`; with `cuda` too, candle's own CUDA kernels
#      would be compiled, which the device bundle does instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-nvcc.sh
cargo test --features cuda,cpu-kernels,experimental-kernels "$@"
cargo test --features candle --test candle_parity "$@"
cargo test --features candle --doc "$@"
