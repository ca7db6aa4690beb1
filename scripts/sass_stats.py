#!/usr/bin/env python3
"""Instruction mix of each kernel's hot GEMM loop, from its sm_90 SASS.

Static analysis only (no GPU): it compiles kernels/*.cu with the repo-local
nvcc (scripts/install-nvcc.sh) to sm_90 cubins, disassembles them with
cuobjdump + nvdisasm (installed from PyPI into the git-ignored
.nvcc/tools/, never system-wide), finds the innermost backward branch whose
body holds tensor-core MMAs (HMMA) or, for the FMA kernels, FFMAs, and prints
its instruction count per opcode. It answers "how many instructions does one
K step issue per MMA" before a GPU is available; it says nothing about time.

    python3 scripts/sass_stats.py                       # head + xent kernels, bf16
    python3 scripts/sass_stats.py kernels/head.cu 'tl_head_forward_bf16.*'
"""
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.environ.get("NVCC", os.path.join(ROOT, ".nvcc/site/nvidia/cu13/bin/nvcc"))
TOOLS = os.path.join(ROOT, ".nvcc/tools")
# The newest disassemblers on PyPI for CUDA 13 that read sm_90 cubins
# (the pinned 13.0 set has no cuobjdump / nvdisasm wheels).
TOOL_PKGS = ["nvidia-cuda-cuobjdump==13.2.51", "nvidia-cuda-nvdisasm==13.2.51"]


def tools():
    bindir = os.path.join(TOOLS, "nvidia/cu13/bin")
    cuobjdump = os.path.join(bindir, "cuobjdump")
    if not os.path.exists(cuobjdump) or not os.path.exists(os.path.join(bindir, "nvdisasm")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", TOOLS,
                        *TOOL_PKGS], check=True)
        for f in os.listdir(bindir):
            os.chmod(os.path.join(bindir, f), 0o755)
    return cuobjdump, bindir


def compile_cubin(src, out):
    subprocess.run([NVCC, "-O3", "--std=c++17", "-I" + os.path.join(ROOT, "kernels"), "-cubin", "-arch=sm_90",
                    src, "-o", out], check=True)


def functions(cuobjdump, env, cubin):
    out = subprocess.run([cuobjdump, "-elf", cubin], capture_output=True, text=True, env=env, check=True).stdout
    return sorted(set(re.findall(r"\.text\.(tl_\w+)", out)))


def hot_loop(cuobjdump, env, cubin, fn):
    sass = subprocess.run([cuobjdump, "-sass", "-fun", fn, cubin], capture_output=True, text=True, env=env,
                          check=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA[^;]*0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    best = None
    for key in ("HMMA", "FFMA"):
        for start, end in loops:
            body = [t for a, t in ins if start <= a <= end]
            n = sum(key in t for t in body)
            # The smallest loop that holds MMAs: the K-step loop (an outer
            # loop over tiles, or the tail steps' loop, is larger).
            if n and (best is None or len(body) < len(best[2])):
                best = (n, key, body)
        if best:
            break
    return len(ins), best


def opcode(text):
    words = text.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


def main():
    args = sys.argv[1:]
    srcs = [os.path.join(ROOT, "kernels/head.cu"), os.path.join(ROOT, "kernels/xent.cu"),
            os.path.join(ROOT, "kernels/xent_grad.cu")]
    pattern = re.compile(r"tl_(head|xent)_\w*bf16\w*")
    if args:
        srcs = [args[0]]
        if len(args) > 1:
            pattern = re.compile(args[1])
    cuobjdump, bindir = tools()
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    print(f"{'kernel':44s} {'instr':>6s} {'loop':>5s} {'mma':>4s} {'loop/mma':>8s}  top opcodes in the loop")
    with tempfile.TemporaryDirectory() as tmp:
        for src in srcs:
            cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
            compile_cubin(src, cubin)
            for fn in functions(cuobjdump, env, cubin):
                if not pattern.fullmatch(fn):
                    continue
                total, best = hot_loop(cuobjdump, env, cubin, fn)
                if not best:
                    print(f"{fn:44s} {total:6d}  (no MMA loop)")
                    continue
                n, key, body = best
                top = Counter(opcode(t) for t in body).most_common(8)
                mix = " ".join(f"{k}:{v}" for k, v in top)
                print(f"{fn:44s} {total:6d} {len(body):5d} {n:4d} {len(body) / n:8.1f}  {mix}")


if __name__ == "__main__":
    main()
