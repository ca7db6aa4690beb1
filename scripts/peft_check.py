#!/usr/bin/env python3
"""Check that HF PEFT loads an adapter written by tiedlora into a tied model.

Needs torch, transformers, peft and safetensors; no network, no GPU required
(it runs on CPU in float64). How to run:

    # here (Rust): write an adapter directory (the golden adapter, re-written by
    # `PeftAdapter::write`, Llama layout `model.embed_tokens`)
    TIEDLORA_PEFT_EXPORT=/path/to/adapter cargo test --test peft_adapter round_trip
    # on a machine with the Python stack (e.g. the device machine, carrying the dir)
    python3 scripts/peft_check.py /path/to/adapter

It builds a tiny tied LlamaForCausalLM (seed 0, float64, vocab and hidden size
taken from the adapter: 64 and 16 for the golden), loads the adapter with
`PeftModel.from_pretrained`, and checks:
  1. embed_tokens `lora_embedding_A/B` and lm_head `lora_A/B` equal the file's tensors;
  2. the LoRA scaling equals lora_alpha / r (or / sqrt(r) with use_rslora);
  3. `get_input_embeddings()(ids)` == W[ids] + s * A.T[ids] @ B.T   (float64, by hand);
  4. `get_output_embeddings()(h)` == h W.T + s * (h A_h.T) B_h.T    (float64, by hand);
  5. PEFT reported no missing or unexpected adapter keys.
Prints each check and exits 1 on any mismatch (2 on bad usage).
"""
import json
import math
import os
import sys
import warnings

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

P = "base_model.model."
EA, EB = P + "model.embed_tokens.lora_embedding_A", P + "model.embed_tokens.lora_embedding_B"
HA, HB = P + "lm_head.lora_A.weight", P + "lm_head.lora_B.weight"
TOL = 1e-12  # float64 on both sides, same operations: only summation-order rounding
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        failures.append(name)


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def main(adapter_dir):
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    t = {k: v.to(torch.float64) for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    missing = [k for k in (EA, EB, HA, HB) if k not in t]
    if missing:
        print(f"FAIL adapter file lacks {missing} (this script checks the Llama layout)")
        return 1
    r, V = t[EA].shape
    d = t[EB].shape[0]
    s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True)).to(torch.float64).eval()
    W = base.get_input_embeddings().weight
    if W.data_ptr() != base.get_output_embeddings().weight.data_ptr():
        print("FAIL the base model is not tied")
        return 1
    W = W.detach().clone()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    key_warnings = [str(w.message) for w in caught
                    if "key" in str(w.message).lower()
                    and ("missing" in str(w.message).lower() or "unexpected" in str(w.message).lower())]
    for w in caught:
        print(f"     warning: {w.message}")
    check("no missing/unexpected adapter keys", not key_warnings, "; ".join(key_warnings))

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not hasattr(emb, "lora_embedding_A") or not hasattr(head, "lora_A"):
        print(f"FAIL LoRA not applied: embedding {type(emb).__name__}, head {type(head).__name__} "
              f"(does this PEFT version honour ensure_weight_tying?)")
        return 1
    A, B = emb.lora_embedding_A["default"].detach(), emb.lora_embedding_B["default"].detach()
    hA, hB = head.lora_A["default"].weight.detach(), head.lora_B["default"].weight.detach()
    for name, got, want in (("lora_embedding_A", A, t[EA]), ("lora_embedding_B", B, t[EB]),
                            ("lm_head.lora_A", hA, t[HA]), ("lm_head.lora_B", hB, t[HB])):
        same = got.shape == want.shape and torch.equal(got.to(torch.float64), want)
        check(f"{name} loaded exactly", same, f"{tuple(got.shape)} {got.dtype}")
    check("embedding scaling", math.isclose(emb.scaling["default"], s, rel_tol=1e-15), f"{emb.scaling['default']} vs {s}")
    check("head scaling", math.isclose(head.scaling["default"], s, rel_tol=1e-15), f"{head.scaling['default']} vs {s}")
    print(f"     head lora_A shares storage with lora_embedding_B: {hA.data_ptr() == B.data_ptr()}")

    A, B, hA, hB = (x.to(torch.float64) for x in (A, B, hA, hB))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (23,), generator=g)
    with torch.no_grad():
        out = emb(ids).to(torch.float64)
        ref = W[ids] + s * (A.T[ids] @ B.T)
        e = rel_err(out, ref)
        check("embedding output == W[ids] + s A.T[ids] B.T", e <= TOL, f"rel err {e:.2e}")
        delta = (ref - W[ids]).abs().max().item()
        check("embedding LoRA delta is nonzero (the check means something)", delta > 0, f"max |delta| {delta:.2e}")

        h = torch.randn(5, d, generator=g, dtype=torch.float64)
        out = head(h).to(torch.float64)
        ref = h @ W.T + s * (h @ hA.T) @ hB.T
        e = rel_err(out, ref)
        check("head output == h W.T + s (h A_h.T) B_h.T", e <= TOL, f"rel err {e:.2e}")

    print("PASS" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
