#!/usr/bin/env python3
"""The Python stack's head + cross-entropy paths on the GPU, for comparison
with tiedlora's fused kernels (examples/gpu_bench/bench_xent.rs, rows xent_*).

Runs on the device machine (torch, triton, transformers, peft; no network),
with the pure-Python wheels of Apple's Cut Cross-Entropy (`cut-cross-entropy`
25.1.1) and Liger (`liger-kernel` 0.8.5) unpacked on PYTHONPATH
(scripts/build-device-bundle.sh puts them in device-bundle/py):

    PYTHONPATH=device-bundle/py python3 scripts/bench_xent.py --out OUTDIR [--shapes gemma,llama] [--iters 20]

Per shape (bf16 W and h, LoRA r = 16, alpha = 32, mean over T valid targets;
Gemma-2's final-logit softcap 30; inputs drawn as gpu_bench draws them,
uniform in ±0.05 for W and U, ±0.1 for Vh, ±1 for h, uniform targets, so that
the softmax, and with it what a gradient filter skips, matches), each path is
timed with CUDA events
(median of --iters after --warmup calls) for
  * fwd: the loss only (under torch.no_grad), and
  * fwd+bwd: the loss and its backward (retain nothing between calls),
and its peak extra memory is torch.cuda.max_memory_allocated() during one
fwd+bwd call minus the memory allocated before it. That includes the
gradients the path returns (h.grad; W.grad when W is trainable).

Paths:
  peft        tied LoRA the PEFT way: a 1-layer tied LlamaForCausalLM, LoRA on
              embed_tokens + lm_head (ensure_weight_tying=True), then
              lm_head(h) -> float32 -> softcap -> F.cross_entropy (what HF's
              loss does); gradients for h and the LoRA factors.
  torch       the same head without LoRA (W frozen): logits = h Wᵀ (bf16),
              float32, softcap, F.cross_entropy.
  cce         cut_cross_entropy.linear_cross_entropy(h, W_merged, ...) with the
              LoRA delta merged into W and W frozen (its best case: it has no
              LoRA gradient), filter_eps="high" (its default: gradient entries
              below 2^-12 skipped; compare with gpu_bench's "grad filter 2^-12"
              rows);
  cce_exact   the same with filter_eps=None (exact; compare with our default);
  cce_train_w the same with W trainable (the memory a full tied fine-tune needs);
  liger       LigerFusedLinearCrossEntropyLoss(softcap)(W_merged, h, targets),
              W frozen; liger_train_w with W trainable.

Writes OUTDIR/results_py.md (a table and the JSON of every number). A path
that fails (import error, OOM) is recorded with its error; the others still
run. Exit status 0 if every path ran, 1 otherwise, 2 on bad usage or no GPU.
"""
import argparse
import json
import math
import sys
import time
import traceback

SHAPES = {
    "gemma": dict(model="Gemma-2-2B", tokens=8192, vocab=256000, hidden=2304, softcap=30.0),
    "llama": dict(model="Llama-3.2-1B", tokens=8192, vocab=128256, hidden=2048, softcap=None),
    "quick": dict(model="smoke", tokens=512, vocab=8192, hidden=512, softcap=30.0),
    "tiny": dict(model="dry run", tokens=64, vocab=1000, hidden=64, softcap=30.0),
}
RANK, ALPHA = 16, 32.0


def cpu_time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1], "iters": len(ms)}


def cuda_time(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    n = len(ms)
    med = ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])
    return {"median_ms": med, "min_ms": ms[0], "max_ms": ms[-1], "iters": n}


def peak_extra(torch, fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def softcap_logits(torch, z, kappa):
    return z if kappa is None else kappa * torch.tanh(z / kappa)


def make_paths(torch, F, sh, dev, log):
    """Returns {name: (fwd_fn, fwd_bwd_fn)} for the shape; builds each path's state."""
    T, V, d, kappa = sh["tokens"], sh["vocab"], sh["hidden"], sh["softcap"]
    s = ALPHA / RANK
    g = torch.Generator(device=dev).manual_seed(0)

    def uniform(shape, scale):  # gpu_bench's fills: uniform in [-scale, scale)
        return (torch.rand(shape, device=dev, generator=g) * 2 - 1) * scale

    w = uniform((V, d), 0.05).to(torch.bfloat16)
    u = uniform((V, RANK), 0.05)
    vh = uniform((RANK, d), 0.1)
    h0 = uniform((T, d), 1.0).to(torch.bfloat16)
    y = torch.randint(0, V, (T,), device=dev, generator=g)
    w_merged = (w.float() + s * (u @ vh)).to(torch.bfloat16)
    paths = {}

    def with_h(step):
        # A fresh leaf h each call, so .grad never accumulates across calls.
        def run():
            h = h0.detach().requires_grad_(True)
            step(h)
        return run

    # ---- torch: materialized logits, frozen W, no LoRA
    def torch_loss(h):
        z = softcap_logits(torch, (h @ w.t()).float(), kappa)
        return F.cross_entropy(z, y)

    paths["torch"] = (lambda: torch_loss(h0), with_h(lambda h: torch_loss(h).backward()))

    # ---- peft: tied LoRA on embed_tokens + lm_head
    def build_peft():
        import peft
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=256, num_hidden_layers=1,
                          num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
        with torch.device(dev):  # initialise on the device: V·d random values
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(w)
        kw = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["embed_tokens", "lm_head"])
        try:
            lcfg = LoraConfig(ensure_weight_tying=True, **kw)
            note = f"peft {peft.__version__}, ensure_weight_tying=True"
        except TypeError:
            lcfg = LoraConfig(**kw)
            note = f"peft {peft.__version__} has no ensure_weight_tying"
        pm = get_peft_model(model, lcfg)
        head = pm.base_model.model.lm_head
        with torch.no_grad():  # a non-zero delta, in the adapter's own dtype
            head.lora_A["default"].weight.copy_(vh.to(head.lora_A["default"].weight.dtype))
            head.lora_B["default"].weight.copy_(u.to(head.lora_B["default"].weight.dtype))
        log(f"  peft: {note}; lm_head adapter dtype {head.lora_A['default'].weight.dtype}")
        return head

    try:
        head = build_peft()

        def peft_loss(h):
            z = softcap_logits(torch, head(h).float(), kappa)
            return F.cross_entropy(z, y)

        paths["peft"] = (lambda: peft_loss(h0), with_h(lambda h: peft_loss(h).backward()))
    except Exception as e:  # recorded, the other paths still run
        paths["peft"] = e

    # ---- cce
    try:
        from cut_cross_entropy import linear_cross_entropy

        w_cce = w_merged.clone().requires_grad_(True)

        def cce(h, c, eps="high"):
            return linear_cross_entropy(h, c, y, softcap=kappa, reduction="mean", filter_eps=eps)

        def cce_train(h):
            w_cce.grad = None
            cce(h, w_cce).backward()

        paths["cce"] = (lambda: cce(h0, w_merged), with_h(lambda h: cce(h, w_merged).backward()))
        paths["cce_train_w"] = (lambda: cce(h0, w_cce), with_h(cce_train))
        paths["cce_exact"] = (lambda: cce(h0, w_merged, None), with_h(lambda h: cce(h, w_merged, None).backward()))
    except Exception as e:
        paths["cce"] = paths["cce_train_w"] = paths["cce_exact"] = e

    # ---- liger
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lf = LigerFusedLinearCrossEntropyLoss(softcap=kappa, reduction="mean")
        w_lg = w_merged.clone().requires_grad_(True)

        def liger_train(h):
            w_lg.grad = None
            lf(w_lg, h, y).backward()

        paths["liger"] = (lambda: lf(w_merged, h0, y), with_h(lambda h: lf(w_merged, h, y).backward()))
        paths["liger_train_w"] = (lambda: lf(w_lg, h0, y), with_h(liger_train))
    except Exception as e:
        paths["liger"] = paths["liger_train_w"] = e
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="gemma,llama")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="check the script itself on a CPU: tiny shape, wall-clock timing, no memory numbers")
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:
        print(f"bench_xent: no torch: {e}", file=sys.stderr)
        return 2
    if a.cpu_dry_run:
        dev, a.shapes = torch.device("cpu"), "tiny"
    elif not torch.cuda.is_available():
        print("bench_xent: no CUDA device", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
    gpu = dev.type == "cuda"
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)"}
    for mod in ("triton", "transformers", "peft", "cut_cross_entropy", "liger_kernel"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "installed")
        except Exception as e:
            versions[mod] = f"unavailable: {type(e).__name__}: {e}"
    log(f"versions: {json.dumps(versions)}")
    results, failed = [], 0
    for key in a.shapes.split(","):
        sh = SHAPES[key]
        log(f"shape {key}: {sh}")
        t0 = time.time()
        try:
            paths = make_paths(torch, F, sh, dev, log)
        except Exception as e:
            log(f"  setup failed: {e}")
            results.append({"shape": key, "path": "setup", "error": repr(e)})
            failed += 1
            continue
        for name, p in paths.items():
            row = {"shape": key, "path": name}
            try:
                if isinstance(p, Exception):
                    raise p
                fwd, fwd_bwd = p
                timer = (lambda f: cuda_time(torch, f, a.warmup, a.iters)) if gpu else (
                    lambda f: cpu_time(f, a.warmup, a.iters))
                with torch.no_grad():
                    row["fwd"] = timer(fwd)
                row["fwd_bwd"] = timer(fwd_bwd)
                if gpu:
                    row["peak_extra_mib"] = peak_extra(torch, fwd_bwd) / 2**20
                log(f"  {name:<14} fwd {row['fwd']['median_ms']:9.2f} ms   fwd+bwd {row['fwd_bwd']['median_ms']:9.2f} ms"
                    f"   peak extra {row.get('peak_extra_mib', float('nan')):9.1f} MiB")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  {name:<14} ERROR {row['error']}")
                traceback.print_exc()
                failed += 1
            results.append(row)
            if gpu:
                torch.cuda.empty_cache()
        del paths
        if gpu:
            torch.cuda.empty_cache()
        log(f"  shape {key} took {time.time() - t0:.1f} s")

    md = ["# Python-stack head + cross-entropy (scripts/bench_xent.py)", "",
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {json.dumps(versions)}", "",
          "| shape | path | fwd ms | fwd+bwd ms | peak extra MiB (incl. returned grads) | note |",
          "|---|---|---:|---:|---:|---|"]
    for r in results:
        f = lambda k: f"{r[k]['median_ms']:.2f}" if k in r else "-"
        pe = f"{r['peak_extra_mib']:.1f}" if "peak_extra_mib" in r else "-"
        md.append(f"| {r['shape']} | {r['path']} | {f('fwd')} | {f('fwd_bwd')} | {pe} | {r.get('error', '')} |")
    md += ["", "```json", json.dumps({"versions": versions, "results": results}, indent=1), "```", "", "Log:", "```"]
    md += lines + ["```"]
    with open(f"{a.out}/results_py.md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
