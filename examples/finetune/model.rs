//! A small GPT-2 decoder in candle, minus its tied embedding / head (which
//! `tiedlora::candle::TiedLora` owns): learned positions, pre-LayerNorm
//! blocks, causal self-attention, a gelu_new MLP and the final LayerNorm.
//! The math and the parameter layout are Hugging Face's `GPT2LMHeadModel`'s,
//! so the trained model exports as one (`export_hf`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// The shape of the model (GPT-2's config names).
#[derive(Debug, Clone, Copy)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub layer_norm_epsilon: f64,
}

/// HF's `Conv1D`: weight [in, out], y = x·W + b.
struct Conv1D {
    w: Tensor,
    b: Tensor,
}

impl Conv1D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D GEMM over all B·T rows rather than a batched matmul.
        let (lead, n_in) = x.dims().split_at(x.rank() - 1);
        let y = x.reshape(((), n_in[0]))?.matmul(&self.w)?.broadcast_add(&self.b)?;
        let mut shape = lead.to_vec();
        shape.push(self.w.dim(1)?);
        y.reshape(shape)
    }
}

/// LayerNorm over the last dim, from autograd-tracked primitives (candle-nn's
/// fused `layer_norm` has no backward).
struct LayerNorm {
    g: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.g)?.broadcast_add(&self.b)
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

/// The decoder between the tied embedding and the tied head.
pub struct Gpt {
    pub cfg: GptConfig,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Every parameter by its HF name (less `transformer.wte.weight`), in a
    /// fixed order: the same tensors the blocks use.
    params: Vec<(String, Tensor)>,
}

impl Gpt {
    /// A fresh model, initialised as HF GPT-2 does (N(0, 0.02), the residual
    /// projections N(0, 0.02/√(2·n_layer)), LayerNorm 1 / 0, biases 0), from
    /// `seed`. Returns the model and its trainable `Var`s by name.
    pub fn new(cfg: GptConfig, dev: &Device, seed: u64) -> Result<(Gpt, Vec<(String, Var)>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = cfg.n_embd;
        let proj_std = 0.02 / ((2 * cfg.n_layer) as f64).sqrt();
        let mut vars = Vec::new();
        let mut add = |name: String, t: Tensor| -> Result<Tensor> {
            let v = Var::from_tensor(&t)?;
            let t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(t)
        };
        let mut params = HashMap::new();
        let mut put = |name: String, t: Tensor| -> Result<()> {
            params.insert(name.clone(), add(name, t)?);
            Ok(())
        };
        put("transformer.wpe.weight".into(), normal(&mut rng, (cfg.n_positions, d), 0.02, dev)?)?;
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}.");
            for ln in ["ln_1", "ln_2"] {
                put(format!("{p}{ln}.weight"), Tensor::ones(d, DType::F32, dev)?)?;
                put(format!("{p}{ln}.bias"), Tensor::zeros(d, DType::F32, dev)?)?;
            }
            for (name, n_in, n_out, std) in [
                ("attn.c_attn", d, 3 * d, 0.02),
                ("attn.c_proj", d, d, proj_std),
                ("mlp.c_fc", d, 4 * d, 0.02),
                ("mlp.c_proj", 4 * d, d, proj_std),
            ] {
                put(format!("{p}{name}.weight"), normal(&mut rng, (n_in, n_out), std, dev)?)?;
                put(format!("{p}{name}.bias"), Tensor::zeros(n_out, DType::F32, dev)?)?;
            }
        }
        put("transformer.ln_f.weight".into(), Tensor::ones(d, DType::F32, dev)?)?;
        put("transformer.ln_f.bias".into(), Tensor::zeros(d, DType::F32, dev)?)?;
        let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
        let params = names.into_iter().map(|n| (n.clone(), params[&n].clone())).collect();
        Ok((Gpt::from_params(cfg, params)?, vars))
    }

    /// The model over the given named tensors (Vars' tensors to train them,
    /// detached copies to freeze them).
    fn from_params(cfg: GptConfig, params: Vec<(String, Tensor)>) -> Result<Gpt> {
        let map: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |n: &str| -> Result<Tensor> {
            map.get(n).map(|t| (*t).clone()).ok_or_else(|| candle_core::Error::Msg(format!("missing parameter {n}")))
        };
        let eps = cfg.layer_norm_epsilon;
        let ln = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm { g: get(&format!("{p}.weight"))?, b: get(&format!("{p}.bias"))?, eps })
        };
        let conv = |p: &str| -> Result<Conv1D> {
            Ok(Conv1D { w: get(&format!("{p}.weight"))?, b: get(&format!("{p}.bias"))? })
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}.");
                Ok(Block {
                    ln_1: ln(&format!("{p}ln_1"))?,
                    c_attn: conv(&format!("{p}attn.c_attn"))?,
                    attn_proj: conv(&format!("{p}attn.c_proj"))?,
                    ln_2: ln(&format!("{p}ln_2"))?,
                    c_fc: conv(&format!("{p}mlp.c_fc"))?,
                    mlp_proj: conv(&format!("{p}mlp.c_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gpt { cfg, wpe: get("transformer.wpe.weight")?, blocks, ln_f: ln("transformer.ln_f")?, params })
    }

    /// The same weights, detached from autograd: phase 2's frozen base (no
    /// gradient is computed for them, which also saves the work).
    pub fn frozen(&self) -> Result<Gpt> {
        let params = self.params.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        Gpt::from_params(self.cfg, params)
    }

    /// Token embeddings [B, T, d] (from the tied embedding) → the hidden
    /// states [B, T, d] after `ln_f`, ready for the tied head.
    pub fn forward(&self, tok_emb: &Tensor) -> Result<Tensor> {
        let (_, t, _) = tok_emb.dims3()?;
        if t > self.cfg.n_positions {
            candle_core::bail!("{t} tokens exceed n_positions = {}", self.cfg.n_positions);
        }
        let mut x = tok_emb.broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, x.device())?;
        for b in &self.blocks {
            x = (&x + self.attention(b, &b.ln_1.forward(&x)?, &mask)?)?;
            let m = b.mlp_proj.forward(&gelu_new(&b.c_fc.forward(&b.ln_2.forward(&x)?)?)?)?;
            x = (x + m)?;
        }
        self.ln_f.forward(&x)
    }

    /// Causal multi-head self-attention, scaled by 1/√head_dim (HF GPT-2's
    /// `scale_attn_weights`); q, k, v are c_attn's output thirds, each split
    /// into heads of consecutive columns, as in HF.
    fn attention(&self, b: &Block, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (bsz, t, d) = x.dims3()?;
        let nh = self.cfg.n_head;
        let hd = d / nh;
        let qkv = b.c_attn.forward(x)?.reshape((bsz, t, 3, nh, hd))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous(); // [B, H, T, hd]
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        // The generic softmax: candle-nn's fused softmax_last_dim has no backward.
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((bsz, t, d))?;
        b.attn_proj.forward(&y)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors`: an HF
    /// `GPT2LMHeadModel` checkpoint (f32, tied: the head is `wte`).
    pub fn export_hf(&self, wte: &Tensor, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        tensors.insert("transformer.wte.weight".into(), wte.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        for (n, t) in &self.params {
            tensors.insert(n.clone(), t.to_device(&Device::Cpu)?);
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let c = &self.cfg;
        let config = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_positions": c.n_positions,
            "n_ctx": c.n_positions,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "initializer_range": 0.02,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            // Byte-level vocabulary: NUL (never in the text) stands in for
            // GPT-2's <|endoftext|>, which is outside V = 256.
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": true,
            "torch_dtype": "float32"
        });
        let text = serde_json::to_string_pretty(&config).map_err(candle_core::Error::wrap)?;
        std::fs::write(dir.join("config.json"), text + "\n")?;
        Ok(())
    }
}

/// HF's `gelu_new`, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written as
/// the identical x·σ(2·√(2/π)·(x + 0.044715·x³)): candle's tanh-based `gelu`
/// and its backward spend most of their time in libm's tanhf / powf, a
/// quarter of a training step on the CPU; `exp` is far cheaper.
fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x.sqr()? * 0.044715)? + 1.0)?.mul(x)?;
    x.mul(&candle_nn::ops::sigmoid(&(inner * c)?)?)
}

/// [T, T]: 0 on and below the diagonal, -inf above (a token sees only the past).
fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// N(0, std²) f32 values, from the model's seeded RNG (the same weights on
/// any device).
pub fn normal(rng: &mut StdRng, shape: (usize, usize), std: f64, dev: &Device) -> Result<Tensor> {
    let dist = Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| dist.sample(rng)).collect();
    Tensor::from_vec(v, shape, dev)
}
