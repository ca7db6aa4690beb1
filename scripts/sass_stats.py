#!/usr/bin/env python3
"""Instruction mix of each kernel's hot GEMM loop, from its sm_90 SASS.

Static analysis only (no GPU): it compiles kernels/*.cu with the repo-local
nvcc (scripts/install-nvcc.sh) to sm_90 cubins, disassembles them with
cuobjdump + nvdisasm (installed from PyPI into the git-ignored
.nvcc/tools/, never system-wide), finds the innermost backward branch whose
body holds tensor-core MMAs (HMMA) or, for the FMA kernels, FFMAs, and prints
its instruction count per opcode (the natural loop: out-of-line blocks the
loop branches to and back from are counted too). It answers "how many instructions does one
K step issue per MMA" before a GPU is available; it says nothing about time.

    python3 scripts/sass_stats.py                       # head + xent kernels, bf16
    python3 scripts/sass_stats.py kernels/head.cu 'tl_head_forward_bf16.*'

Caveat: the loop is chosen statically (the smallest natural loop holding
MMAs and global loads). ptxas may emit specialized copies of a loop (e.g.
for a case it can prove), and the smallest copy need not be the one that
runs most; read the SASS (`cuobjdump -sass -fun NAME`) before trusting a
number. That is also why this is an analysis tool and not a CI check: with
the steady-state staging disabled on purpose, a specialized copy still
looked lean.
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
    subprocess.run([NVCC, "-O3", "--std=c++17", "-I" + os.path.join(ROOT, "kernels"), "-cubin", "-arch=sm_90a",
                    src, "-o", out], check=True)


def functions(cuobjdump, env, cubin):
    out = subprocess.run([cuobjdump, "-elf", cubin], capture_output=True, text=True, env=env, check=True).stdout
    return sorted(set(re.findall(r"\.text\.(tl_\w+)", out)))


def hot_loop(cuobjdump, env, cubin, fn):
    """The natural loop (every instruction on a path from the header back to
    the back edge, out-of-line blocks included) holding MMAs and global loads
    with the fewest instructions: the K-step loop's steady state. Returns (instructions in the function,
    (MMA count, "HGMMA", "HMMA" or "FFMA", loop instruction texts) or None)."""
    sass = subprocess.run([cuobjdump, "-sass", "-fun", fn, cubin], capture_output=True, text=True, env=env,
                          check=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    index = {a: i for i, (a, _) in enumerate(ins)}
    # Control flow per instruction: a predicated branch or exit may fall through.
    succ = []
    for i, (_, text) in enumerate(ins):
        words = text.split()
        predicated = words[0].startswith("@") and not words[0].startswith("@PT")
        op = opcode(text)
        nxt = [i + 1] if i + 1 < len(ins) else []
        m = re.search(r"0x([0-9a-f]+)", text) if op == "BRA" else None
        if m and int(m.group(1), 16) in index:
            tgt = [index[int(m.group(1), 16)]]
            succ.append(tgt + nxt if predicated else tgt)
        elif op in ("EXIT", "RET", "BRA"):
            succ.append(nxt if predicated else [])
        else:
            succ.append(nxt)
    pred = [[] for _ in ins]
    for i, ss in enumerate(succ):
        for j in ss:
            pred[j].append(i)
    best = None
    for key in ("HGMMA", "HMMA", "FFMA"):
        for i, ss in enumerate(succ):
            for h in ss:
                if h > i:
                    continue  # not a back edge
                # Natural loop of the back edge i -> h.
                body, stack = {h, i}, [i]
                while stack:
                    for q in pred[stack.pop()]:
                        if q not in body:
                            body.add(q)
                            stack.append(q)
                texts = [ins[k][1] for k in sorted(body)]
                n = sum(key in t for t in texts)
                # The steady state loads the next K step (LDG or LDGSTS); the
                # drain iterations at the end of a ring, which only multiply,
                # may form a smaller loop of their own.
                loads = any(opcode(t) in ("LDG", "LDGSTS") for t in texts)
                if n and loads and (best is None or len(texts) < len(best[2])):
                    best = (n, key, texts)
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
