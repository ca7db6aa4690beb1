#!/usr/bin/env bash
# Build the embedding kernels (embed.cu, sort_ids.cu, merge.cu) for the CPU
# shim and run kernels/test/embed_cpu_test.cpp against double-precision loops.
#   bash kernels/test/run.sh            (CXX, CXXFLAGS and OUT_DIR override)
#   SANITIZE=address|thread bash kernels/test/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-g++}
OUT_DIR=${OUT_DIR:-/tmp/tiedlora-embed-test}
CXXFLAGS=${CXXFLAGS:--O1 -g}
mkdir -p "$OUT_DIR"
flags=(-std=c++20 $CXXFLAGS -pthread -Ikernels -Ikernels/shim/include)
if [[ -n "${SANITIZE:-}" ]]; then flags+=(-fsanitize="$SANITIZE"); fi
objs=() pids=()
for k in embed sort_ids merge; do
  "$CXX" "${flags[@]}" -include kernels/shim/cuda_shim.h -x c++ -c "kernels/$k.cu" -o "$OUT_DIR/$k.o" &
  pids+=($!) objs+=("$OUT_DIR/$k.o")
done
"$CXX" "${flags[@]}" -c kernels/test/embed_cpu_test.cpp -o "$OUT_DIR/embed_cpu_test.o" &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
"$CXX" "${flags[@]}" "$OUT_DIR/embed_cpu_test.o" "${objs[@]}" -o "$OUT_DIR/embed_cpu_test"
"$OUT_DIR/embed_cpu_test"
