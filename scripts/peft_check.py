#!/usr/bin/env python3
"""Check tiedlora's PEFT adapters with HF PEFT itself (a manual check, not run in CI).

Needs torch, transformers (5.x) and peft (0.21 or later) and safetensors; no
network, no GPU (everything runs on CPU, in float64). Install them in a venv
outside the repository, e.g.

    python3 -m venv ~/pyenv-peft && ~/pyenv-peft/bin/pip install torch transformers peft safetensors

Every mode prints one line per check (`ok` or `FAIL`), then `PASS` or
`FAILED: [...]`, and exits 0 if all checks passed, 1 if any failed, 2 on bad
usage.

Mode 1: an adapter directory written by `PeftAdapter::write`

    # write adapters with the crate: the golden adapter re-written in the Llama
    # layout (`model.embed_tokens`), and its factors in the GPT-2 layout (`transformer.wte`)
    TIEDLORA_PEFT_EXPORT=/tmp/llama TIEDLORA_PEFT_EXPORT_GPT2=/tmp/gpt2 \\
        cargo test --test peft_adapter round_trip
    python3 scripts/peft_check.py /tmp/llama
    python3 scripts/peft_check.py /tmp/gpt2

  The architecture comes from the embedding module of the adapter's
  `lora_embedding_A` key (cross-checked with `target_modules`):
  `model.embed_tokens` -> a tied LlamaForCausalLM, `transformer.wte` -> a tied
  GPT2LMHeadModel, one layer, seed 0, float64, vocab and hidden size taken from
  the adapter. The script loads the adapter with `PeftModel.from_pretrained` and checks:
    1. PEFT reported no missing and no unexpected adapter keys;
    2. the embedding and lm_head are both LoRA layers, holding exactly the
       file's `lora_embedding_A/B` and `lm_head.lora_A/B`, with scaling
       s = lora_alpha / r (or / sqrt(r) with use_rslora);
    3. `get_input_embeddings()(ids)`  == W[ids] + s * A.T[ids] @ B.T       (by hand);
    4. `get_output_embeddings()(h)`   == h W.T + s * (h A_h.T) @ B_h.T     (by hand),
  where A, B, A_h, B_h are the file's tensors (rel. tolerance 1e-12, float64).
  An adapter whose config PEFT does not tie onto the head fails 1, 2 and 4.

Mode 2: the fine-tune example's output directory

    cargo run --release --features candle --example finetune -- <out>
    python3 scripts/peft_check.py --finetune <out>

  `<out>` holds (the contract with examples/finetune.rs):
    base/config.json, base/model.safetensors  a Hugging Face GPT2LMHeadModel
        checkpoint (tie_word_embeddings true, HF tensor names
        `transformer.wte.weight`, `transformer.wpe.weight`,
        `transformer.h.{i}.ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/mlp.c_proj.{weight,bias}`
        with Conv1D weights [in, out], `transformer.ln_f.{weight,bias}`; no
        `lm_head.weight`), F32: the model before the LoRA phase (frozen W);
    adapter/  the tied LoRA adapter written by `PeftAdapter::write` for `transformer.wte`;
    check.safetensors  `input_ids` (I64 [1, T]) and `logits` (F32 [1, T, V]):
        the candle model's logits with the LoRA applied.
  The script loads `GPT2LMHeadModel.from_pretrained(<out>/base)` in float64
  (eager attention) and checks that no base tensor was missing, unexpected or
  mis-shaped and that W is tied; applies `PeftModel.from_pretrained(model,
  <out>/adapter)` with the checks of mode 1 (keys, LoRA on both paths, exact
  factors, embedding and head outputs by hand); runs `input_ids` and checks
    5. max |logits - check logits| / max |check logits| <= 1e-4 (f32 on the candle side);
    6. the LoRA is really there on both paths: the check logits differ from the
       base model's, from PEFT's with the embedding delta switched off, and from
       PEFT's with the head delta switched off, each by more than 10 x the
       error of 5, clamped to [1e-4, 1e-3], relative to max |check logits|
       (a fine-tune that moves the logits less than that is not checked).

Mode 3: self-test of mode 2

    python3 scripts/peft_check.py --selftest-finetune [ADAPTER_DIR]

  Builds an `<out>` directory as described above in a temp dir: a random
  2-layer GPT-2 checkpoint written tensor by tensor under the HF names with a
  hand-written config.json, a random tied adapter written in the crate's layout
  (or, given ADAPTER_DIR, a GPT-2 layout adapter written by the crate, e.g.
  /tmp/gpt2 above, whose V, d, r set the model's), and logits computed by a
  GPT-2 forward written out here in plain torch (float64, independent of
  transformers) with the LoRA delta on the embedding and the head. Then runs
  mode 2 on it (must pass), and on three broken variants that mode 2 must
  reject: logits without the head delta, logits of the base model, and the
  adapter config without `lm_head` in `target_modules`.
"""
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

P = "base_model.model."
HA, HB = P + "lm_head.lora_A.weight", P + "lm_head.lora_B.weight"
TOL_F64 = 1e-12  # float64 on both sides, same operations: only summation-order rounding
TOL_F32 = 1e-4  # candle's f32 forward against transformers' float64 forward
FAMILIES = {"model.embed_tokens": "llama", "transformer.wte": "gpt2"}


class Checks:
    def __init__(self, quiet=False):
        self.failures = []
        self.quiet = quiet

    def __call__(self, name, ok, detail=""):
        if not self.quiet:
            print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            self.failures.append(name)
        return ok

    def finish(self):
        if not self.quiet:
            print("PASS" if not self.failures else f"FAILED: {self.failures}")
        return 1 if self.failures else 0


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def print_versions():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


def read_adapter(adapter_dir):
    """The adapter's tensors (float64), config, embedding module, family, V, d, r and scale s."""
    t = {k: v.to(torch.float64) for k, v in load_file(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    modules = sorted({k[len(P):-len(".lora_embedding_A")] for k in t
                      if k.startswith(P) and k.endswith(".lora_embedding_A")})
    if len(modules) != 1:
        raise ValueError(f"expected the lora_embedding_A of one module, found {modules}")
    module = modules[0]
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    family = FAMILIES.get(module)
    if family is None:
        raise ValueError(f"embedding module {module!r}: this script knows {sorted(FAMILIES)}")
    if module not in targets:
        raise ValueError(f"target_modules {targets} does not list the embedding module {module!r}")
    ea, eb = P + module + ".lora_embedding_A", P + module + ".lora_embedding_B"
    lacking = [k for k in (ea, eb, HA, HB) if k not in t]
    if lacking:
        raise ValueError(f"adapter file lacks {lacking}")
    r, V = t[ea].shape
    d = t[eb].shape[0]
    s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return dict(t=t, cfg=cfg, module=module, family=family, targets=targets, ea=ea, eb=eb, r=r, V=V, d=d, s=s)


def tiny_model(family, V, d):
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=V, n_embd=d, n_layer=1, n_head=1, n_positions=32, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    return model.to(torch.float64).eval()


def load_peft(base, adapter_dir, check):
    """PeftModel.from_pretrained, recording PEFT's load result (missing and unexpected keys) and warnings."""
    results = []
    original = PeftModel.load_adapter

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        results.append(result)
        return result

    PeftModel.load_adapter = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, adapter_dir).eval()
    finally:
        PeftModel.load_adapter = original
    for w in caught:
        print(f"     warning: {w.message}")
    missing = list(results[0].missing_keys) if results else ["<no load result>"]
    unexpected = list(results[0].unexpected_keys) if results else ["<no load result>"]
    check("no missing adapter keys", not missing, f"{missing}" if missing else "")
    check("no unexpected adapter keys", not unexpected, f"{unexpected}" if unexpected else "")
    return model


def check_lora_paths(model, a, W, check, seed=1):
    """The LoRA layers PEFT built on the embedding and the head, against the file and the formulas."""
    t, s, V, d = a["t"], a["s"], a["V"], a["d"]
    A, B, hA, hB = t[a["ea"]], t[a["eb"]], t[HA], t[HB]
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_lora = hasattr(emb, "lora_embedding_A") and "default" in emb.lora_embedding_A
    head_lora = hasattr(head, "lora_A") and "default" in head.lora_A
    check("embedding is a LoRA layer", emb_lora, type(emb).__name__)
    check("lm_head is a LoRA layer", head_lora, type(head).__name__)
    loaded = []
    if emb_lora:
        loaded += [("lora_embedding_A", emb.lora_embedding_A["default"], A),
                   ("lora_embedding_B", emb.lora_embedding_B["default"], B)]
        check("embedding scaling", math.isclose(emb.scaling["default"], s, rel_tol=1e-15),
              f"{emb.scaling['default']} vs {s}")
    if head_lora:
        loaded += [("lm_head.lora_A", head.lora_A["default"].weight, hA),
                   ("lm_head.lora_B", head.lora_B["default"].weight, hB)]
        check("head scaling", math.isclose(head.scaling["default"], s, rel_tol=1e-15),
              f"{head.scaling['default']} vs {s}")
    for name, got, want in loaded:
        got = got.detach()
        same = got.shape == want.shape and torch.equal(got.to(torch.float64), want)
        check(f"{name} loaded exactly", same, f"{tuple(got.shape)} {got.dtype}")
    if emb_lora and head_lora:
        shared = head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
        print(f"     head lora_A shares storage with lora_embedding_B: {shared}")

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (23,), generator=g)
    h = torch.randn(5, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = W[ids] + s * (A.T[ids] @ B.T)
        e = rel_err(emb(ids).to(torch.float64), ref)
        check("embedding output == W[ids] + s A.T[ids] B.T", e <= TOL_F64, f"rel err {e:.2e}")
        delta = (ref - W[ids]).abs().max().item()
        check("embedding LoRA delta is nonzero (the check means something)", delta > 0, f"max |delta| {delta:.2e}")
        ref = h @ W.T + s * (h @ hA.T) @ hB.T
        e = rel_err(head(h).to(torch.float64), ref)
        check("head output == h W.T + s (h A_h.T) B_h.T", e <= TOL_F64, f"rel err {e:.2e}")
        delta = (ref - h @ W.T).abs().max().item()
        check("head LoRA delta is nonzero (the check means something)", delta > 0, f"max |delta| {delta:.2e}")


def tied_weight(model, check):
    W = model.get_input_embeddings().weight
    tied = W.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    check("base model is tied (one tensor for embedding and head)", tied)
    return W.detach().clone().to(torch.float64), tied


def mode_adapter(adapter_dir):
    print_versions()
    check = Checks()
    try:
        a = read_adapter(adapter_dir)
    except (OSError, ValueError, KeyError) as e:
        check("adapter directory readable", False, str(e))
        return check.finish()
    print(f"     {adapter_dir}: module {a['module']} -> {a['family']}, target_modules {a['targets']}, "
          f"V={a['V']} d={a['d']} r={a['r']} s={a['s']}")
    base = tiny_model(a["family"], a["V"], a["d"])
    W, tied = tied_weight(base, check)
    if not tied:
        return check.finish()
    model = load_peft(base, adapter_dir, check)
    check_lora_paths(model, a, W, check)
    return check.finish()


# ---------------------------------------------------------------------------------------------
# Mode 2: the fine-tune example's output


def mode_finetune(out, check=None):
    if check is None:
        print_versions()
        check = Checks()
    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    check_path = os.path.join(out, "check.safetensors")
    lacking = [p for p in (os.path.join(base_dir, "config.json"), os.path.join(base_dir, "model.safetensors"),
                           os.path.join(adapter_dir, "adapter_config.json"),
                           os.path.join(adapter_dir, "adapter_model.safetensors"), check_path)
               if not os.path.isfile(p)]
    if not check(f"{out} holds the expected files", not lacking, f"missing {lacking}" if lacking else ""):
        return check.finish()

    chk = load_file(check_path)
    ids, want = chk.get("input_ids"), chk.get("logits")
    ok = (ids is not None and want is not None and ids.dtype == torch.int64 and want.dtype == torch.float32
          and ids.dim() == 2 and ids.shape[0] == 1 and want.dim() == 3 and want.shape[:2] == ids.shape)
    desc = {k: (str(v.dtype), tuple(v.shape)) for k, v in chk.items()}
    if not check("check.safetensors: input_ids I64 [1, T], logits F32 [1, T, V]", ok, f"{desc}"):
        return check.finish()
    want = want.to(torch.float64)

    # transformers prints a load report to stdout in some versions; keep it but also collect the info.
    model, info = GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.float64, attn_implementation="eager",
                                                  output_loading_info=True)
    model.eval()
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    bad = {k: list(info.get(k, [])) for k in ("unexpected_keys", "mismatched_keys", "error_msgs")}
    check("base checkpoint: no missing tensors (besides the tied lm_head.weight)", not missing, f"{missing}")
    check("base checkpoint: no unexpected or mis-shaped tensors", not any(bad.values()), f"{bad}")
    check("base config has tie_word_embeddings", bool(model.config.tie_word_embeddings))
    W, tied = tied_weight(model, check)
    V, d = W.shape
    in_range = bool(((ids >= 0) & (ids < V)).all())
    check("input_ids within the vocab", in_range, f"V={V}")
    check("logits width is the vocab", want.shape[2] == V, f"{want.shape[2]} vs V={V}")
    if not (tied and in_range and want.shape[2] == V):
        return check.finish()
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.to(torch.float64)

    try:
        a = read_adapter(adapter_dir)
    except (OSError, ValueError, KeyError) as e:
        check("adapter directory readable", False, str(e))
        return check.finish()
    print(f"     adapter: module {a['module']}, target_modules {a['targets']}, V={a['V']} d={a['d']} "
          f"r={a['r']} s={a['s']}")
    check("adapter is on transformer.wte", a["module"] == "transformer.wte", a["module"])
    if not check("adapter shapes match the base model", (a["V"], a["d"]) == (V, d),
                 f"adapter V={a['V']} d={a['d']}, model V={V} d={d}"):
        return check.finish()

    model = load_peft(model, adapter_dir, check)
    check_lora_paths(model, a, W, check)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        got = model(input_ids=ids).logits.to(torch.float64)
        scale = want.abs().max().item()
        err = (got - want).abs().max().item() / scale
        check(f"logits match check.safetensors (max |diff| / max |logits| <= {TOL_F32:g})", err <= TOL_F32,
              f"{err:.2e} (max |logits| {scale:.3g}, T={ids.shape[1]}, V={V})")

        # Each path on its own: the check logits must not be explainable without it.
        variants = {"the base model (no adapter)": base_logits}
        for name, layer in (("embedding", emb), ("head", head)):
            if hasattr(layer, "scaling") and "default" in layer.scaling:
                keep = layer.scaling["default"]
                layer.scaling["default"] = 0.0
                try:
                    variants[f"PEFT with the {name} delta switched off"] = model(input_ids=ids).logits.to(torch.float64)
                finally:
                    layer.scaling["default"] = keep
            else:
                check(f"{name} LoRA can be switched off", False, "not a LoRA layer")
        # Ten times the match error, within [TOL_F32, 10 TOL_F32]: when the match fails, these say which
        # variant the check logits are (or are not) instead of failing wholesale.
        need = max(TOL_F32, 10 * min(err, TOL_F32))
        for name, logits in variants.items():
            diff = (logits - want).abs().max().item() / scale
            check(f"check logits differ from {name}", diff > need, f"{diff:.2e} (need > {need:.2e})")
            if diff <= TOL_F32 < err:  # the match failed, but this variant matches
                print(f"     hint: the check logits are those of {name}")
    return check.finish()


# ---------------------------------------------------------------------------------------------
# Mode 3: self-test of mode 2


def gelu(x, kind):
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if kind == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    raise ValueError(f"activation_function {kind!r} not written out here")


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gpt2_logits_by_hand(w, cfg, ids, lora=None, embedding_delta=True, head_delta=True):
    """GPT-2 forward in plain torch, float64 ([1, T] ids -> [1, T, V] logits).

    `lora` = (A [r, V], B [d, r], s) in PEFT's embedding layout: the tied weight
    is W + s (B A).T, i.e. delta W = s A.T B.T [V, d]."""
    w = {k: v.to(torch.float64) for k, v in w.items()}
    d, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    hd = d // nh
    W = w["transformer.wte.weight"]
    x = W[ids]
    if lora is not None and embedding_delta:
        A, B, s = lora
        x = x + s * (A.T[ids] @ B.T)
    T = ids.shape[1]
    x = x + w["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        q, k, v = (h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(d, dim=-1)
        q, k, v = (z.view(1, T, nh, hd).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        m = gelu(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], cfg["activation_function"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    logits = x @ W.T
    if lora is not None and head_delta:
        A, B, s = lora
        logits = logits + s * (x @ B) @ A  # head lora_A = B.T [r, d], lora_B = A.T [V, r]
    return logits


def write_adapter_like_the_crate(path, A, B, alpha, target_modules):
    """The four tensors and the config `PeftAdapter::write` writes for `transformer.wte`."""
    os.makedirs(path, exist_ok=True)
    r = A.shape[0]
    m = P + "transformer.wte."
    save_file({m + "lora_embedding_A": A.contiguous(), m + "lora_embedding_B": B.contiguous(),
               HA: B.T.contiguous(), HB: A.T.contiguous()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "", "r": r,
           "lora_alpha": alpha, "use_rslora": False, "target_modules": target_modules,
           "ensure_weight_tying": True, "lora_dropout": 0.0, "bias": "none", "lora_bias": False,
           "init_lora_weights": True, "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
           "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
           "layers_pattern": None, "exclude_modules": None, "revision": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def build_finetune_dir(out, adapter_src=None, n_layer=2, n_head=2, T=12):
    """A random `<out>` directory per the contract; returns (weights, config, lora, ids)."""
    g = torch.Generator().manual_seed(0)
    if adapter_src is not None:
        a = read_adapter(adapter_src)
        if a["module"] != "transformer.wte":
            raise ValueError(f"{adapter_src}: need a GPT-2 layout adapter (transformer.wte), got {a['module']}")
        V, d = a["V"], a["d"]
        A, B, s = a["t"][a["ea"]].float(), a["t"][a["eb"]].float(), a["s"]
        shutil.copytree(adapter_src, os.path.join(out, "adapter"))
    else:
        V, d, r, alpha = 50, 16, 4, 8
        A = torch.randn(r, V, generator=g) * 0.3
        B = torch.randn(d, r, generator=g) * 0.3
        s = alpha / r
        write_adapter_like_the_crate(os.path.join(out, "adapter"), A, B, alpha,
                                     ["transformer.wte", "wte", "lm_head"])
    if d % n_head:
        n_head = 1
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": 32,
           "n_embd": d, "n_layer": n_layer, "n_head": n_head, "n_inner": None, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "dtype": "float32"}

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).float()

    w = {"transformer.wte.weight": rnd(V, d, std=0.5), "transformer.wpe.weight": rnd(32, d, std=0.1),
         "transformer.ln_f.weight": rnd(d, std=0.1, mean=1.0), "transformer.ln_f.bias": rnd(d, std=0.1)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = rnd(d, std=0.1, mean=1.0), rnd(d, std=0.1)
        for name, (n_in, n_out) in (("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)),
                                    ("mlp.c_fc", (d, 4 * d)), ("mlp.c_proj", (4 * d, d))):
            w[p + name + ".weight"] = rnd(n_in, n_out, std=1.0 / math.sqrt(n_in))  # Conv1D: [in, out]
            w[p + name + ".bias"] = rnd(n_out, std=0.1)
    os.makedirs(os.path.join(out, "base"))
    save_file(w, os.path.join(out, "base", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "base", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    ids = torch.randint(0, V, (1, T), generator=g, dtype=torch.int64)
    return w, cfg, (A.to(torch.float64), B.to(torch.float64), s), ids


def write_check(out, ids, logits):
    save_file({"input_ids": ids.contiguous(), "logits": logits.float().contiguous()},
              os.path.join(out, "check.safetensors"))


def run_quiet(out):
    """Mode 2 on `out` with its output captured; returns (exit code, failed check names)."""
    check = Checks()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = mode_finetune(out, check)
    return rc, check.failures


def selftest_finetune(adapter_src=None):
    print_versions()
    outer = Checks()
    root = tempfile.mkdtemp(prefix="peft-check-selftest-")
    try:
        out = os.path.join(root, "good")
        os.makedirs(out)
        w, cfg, lora, ids = build_finetune_dir(out, adapter_src)
        write_check(out, ids, gpt2_logits_by_hand(w, cfg, ids, lora))
        print(f"--- mode 2 on a generated directory ({'adapter ' + adapter_src if adapter_src else 'random adapter'})")
        rc = mode_finetune(out, Checks())
        print("---")
        outer("mode 2 passes on the generated directory", rc == 0)

        # The by-hand forward without LoRA is transformers' GPT-2 (independent check of the forward itself).
        base = GPT2LMHeadModel.from_pretrained(os.path.join(out, "base"), dtype=torch.float64,
                                               attn_implementation="eager").eval()
        with torch.no_grad():
            e = rel_err(base(input_ids=ids).logits.to(torch.float64), gpt2_logits_by_hand(w, cfg, ids))
        outer("by-hand GPT-2 forward == transformers' (no adapter, float64)", e <= 1e-10, f"rel err {e:.2e}")

        # Each broken variant must fail the match and be recognised as what it is.
        broken = {
            "logits without the head delta": (dict(head_delta=False), "head delta switched off"),
            "logits without the embedding delta": (dict(embedding_delta=False), "embedding delta switched off"),
            "logits of the base model": (dict(lora=None), "the base model"),
        }
        for name, (kwargs, culprit) in broken.items():
            kwargs = {"lora": lora, **kwargs}
            write_check(out, ids, gpt2_logits_by_hand(w, cfg, ids, **kwargs))
            rc, failed = run_quiet(out)
            differ = [f for f in failed if f.startswith("check logits differ")]
            ok = rc == 1 and any(f.startswith("logits match") for f in failed) and len(differ) == 1 \
                and culprit in differ[0]
            outer(f"mode 2 rejects {name}", ok, f"failed checks: {failed}")
        write_check(out, ids, gpt2_logits_by_hand(w, cfg, ids, lora))

        # An adapter config PEFT does not tie onto the head (the form without lm_head).
        cfg_path = os.path.join(out, "adapter", "adapter_config.json")
        os.chmod(cfg_path, 0o644)
        with open(cfg_path) as f:
            acfg = json.load(f)
        acfg["target_modules"] = [m for m in acfg["target_modules"] if m != "lm_head"]
        with open(cfg_path, "w") as f:
            json.dump(acfg, f, indent=2)
        rc, failed = run_quiet(out)
        outer(f"mode 2 rejects target_modules {acfg['target_modules']}", rc == 1, f"failed checks: {failed}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return outer.finish()


USAGE = "usage: peft_check.py ADAPTER_DIR | --finetune OUT_DIR | --selftest-finetune [ADAPTER_DIR]"

if __name__ == "__main__":
    args = sys.argv[1:]
    if args in ([], ["-h"], ["--help"]):
        print(__doc__)
        print(USAGE)
        sys.exit(0 if args else 2)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args[0] == "--finetune" and len(args) == 2:
        sys.exit(mode_finetune(args[1]))
    if args[0] == "--selftest-finetune" and len(args) <= 2:
        sys.exit(selftest_finetune(args[1] if len(args) == 2 else None))
    if len(args) == 1 and not args[0].startswith("-"):
        sys.exit(mode_adapter(args[0]))
    print(USAGE)
    sys.exit(2)
