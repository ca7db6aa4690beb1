//! The tied embedding / LM head as ops on candle's autograd graph (feature
//! `candle`).
//!
//! [`TiedLora`] owns the tied parameters as candle tensors: W [V, d] (frozen
//! in LoRA mode, a [`Var`] in full tied fine-tune mode), U [V, r] and Vh
//! [r, d] (f32 [`Var`]s in LoRA mode). Its ops are candle custom ops, so they
//! sit in the caller's graph like any other op:
//!
//! * [`TiedLora::embed`]: ids [..] (u32 or i64) → `c·(W[ids] + s·U[ids]·Vh)` [.., d];
//! * [`TiedLora::logits`]: h [.., d] → `h Wᵀ + s·(h Vhᵀ) Uᵀ` [.., V];
//! * [`TiedLora::loss`]: h [.., d], targets [..] → the cross-entropy of the
//!   (softcapped) head logits, reduced per the config, fused: no [tokens, V]
//!   tensor in the forward or the backward.
//!
//! After `loss.backward()`, candle's `GradStore` holds ONE gradient for U and
//! ONE for Vh (or for W in full mode): candle sums the gradients each op
//! returns for a `Var`, and the embedding and head ops return theirs for the
//! same `Var`s. The gradient of `h` flows on into the rest of the model.
//!
//! On candle's CPU device the ops run on [`crate::Cpu`]; on its CUDA device
//! (features `candle` + `cuda`) on the crate's kernels, on candle's own
//! stream, reading candle's cudarc buffers in place (no copy of W).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use tiedlora::candle::TiedLora;
//! use tiedlora::LoraConfig;
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let (v, d, r) = (50, 8, 4);
//! let cfg = LoraConfig::builder(v, d, r).alpha(8.0).build().map_err(candle_core::Error::wrap)?;
//! let w = Tensor::randn(0f32, 0.1, (v, d), &dev)?;
//! let tied = TiedLora::lora(w, cfg, 0)?;
//!
//! let ids = Tensor::new(&[[1u32, 7, 7], [3, 49, 0]], &dev)?; // [B, T]
//! let e = tied.embed(&ids)?; // [B, T, d]
//! let h = e.tanh()?; // stand-in for the transformer
//! let targets = Tensor::new(&[[7i64, 7, 3], [49, 0, -100]], &dev)?;
//! let loss = tied.loss(&h, &targets)?;
//! let grads = loss.backward()?;
//! let (u, vh) = tied.lora_vars().unwrap();
//! // One gradient per factor, summing the embedding and head paths.
//! assert_eq!(grads.get(u.as_tensor()).unwrap().dims(), &[v, r]);
//! assert_eq!(grads.get(vh.as_tensor()).unwrap().dims(), &[r, d]);
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "cuda")]
mod cuda;
mod host;
mod ops;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::LoraConfig;
use crate::peft::PeftAdapter;
use ops::{Engine, FullOp, Kind, LoraOp};

/// A crate error as a candle error (the message is the crate's).
pub(crate) fn err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A candle error with this message.
pub(crate) fn msg(s: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("tiedlora: {s}"))
}

/// What the optimizer trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// W frozen; U and Vh are the trainable `Var`s.
    Lora,
    /// Full tied fine-tune: W is the trainable `Var`; the LoRA factors are frozen.
    Full,
}

/// The tied embedding / LM head of a candle model; see the module docs.
pub struct TiedLora {
    cfg: LoraConfig,
    mode: Mode,
    w: Tensor,
    w_var: Option<Var>,
    u: Tensor,
    vh: Tensor,
    lora: Option<(Var, Var)>,
    engine: Arc<Engine>,
}

impl std::fmt::Debug for TiedLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TiedLora")
            .field("mode", &self.mode)
            .field("vocab", &self.cfg.vocab())
            .field("hidden", &self.cfg.hidden())
            .field("rank", &self.cfg.rank())
            .field("dtype", &self.w.dtype())
            .field("device", &self.w.device().location())
            .finish()
    }
}

impl TiedLora {
    /// LoRA mode: W [V, d] (f32, f16 or bf16, on a CPU or CUDA device) is
    /// frozen; U [V, r] and Vh [r, d] are f32 `Var`s on W's device,
    /// initialised as PEFT does (U = 0, Vh ~ N(0, 1), [`crate::init::init_lora`])
    /// from `seed`.
    pub fn lora(w: Tensor, cfg: LoraConfig, seed: u64) -> Result<Self> {
        let f = crate::init::init_lora(&cfg, &mut StdRng::seed_from_u64(seed));
        Self::with_factors(w, cfg, f.lora_vocab, f.lora_hidden)
    }

    /// LoRA mode with given factors: U [V, r] and Vh [r, d] row-major f32
    /// (e.g. [`PeftAdapter::lora_vocab`] / `lora_hidden`).
    pub fn with_factors(w: Tensor, cfg: LoraConfig, lora_vocab: Vec<f32>, lora_hidden: Vec<f32>) -> Result<Self> {
        let w = check_weight(w, &cfg)?;
        let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
        let u = factor(lora_vocab, (v, r), "lora_vocab", w.device())?;
        let vh = factor(lora_hidden, (r, d), "lora_hidden", w.device())?;
        let (u, vh) = (Var::from_tensor(&u)?, Var::from_tensor(&vh)?);
        Ok(TiedLora {
            engine: Arc::new(Engine::new(w.device())?),
            cfg,
            mode: Mode::Lora,
            w,
            w_var: None,
            u: u.as_tensor().clone(),
            vh: vh.as_tensor().clone(),
            lora: Some((u, vh)),
        })
    }

    /// LoRA mode with the factors of a PEFT adapter directory (read by
    /// [`PeftAdapter::read`]); `cfg` gives the rest (embedding multiplier,
    /// softcap, loss reduction) and must match the adapter's shapes, alpha
    /// and rsLoRA.
    pub fn from_peft(w: Tensor, cfg: LoraConfig, dir: impl AsRef<Path>) -> Result<Self> {
        let a = PeftAdapter::read(dir).map_err(err)?;
        if (a.vocab(), a.hidden(), a.rank()) != (cfg.vocab(), cfg.hidden(), cfg.rank()) || a.scale() != cfg.scale() {
            return Err(msg(format!(
                "the adapter is V={} d={} r={} scale {}; the config is V={} d={} r={} scale {}",
                a.vocab(),
                a.hidden(),
                a.rank(),
                a.scale(),
                cfg.vocab(),
                cfg.hidden(),
                cfg.rank(),
                cfg.scale()
            )));
        }
        Self::with_factors(w, cfg, a.lora_vocab, a.lora_hidden)
    }

    /// Full tied fine-tune: W is the trainable `Var` (f32, f16 or bf16), its
    /// one gradient summing the embedding and head paths. The LoRA factors
    /// are zero and frozen (the delta is 0); `cfg` supplies the shapes, the
    /// embedding multiplier, the softcap and the loss reduction.
    pub fn full(w: Var, cfg: LoraConfig) -> Result<Self> {
        let wt = check_weight(w.as_tensor().clone(), &cfg)?;
        if !wt.is_contiguous() {
            return Err(msg("the W `Var` must be contiguous"));
        }
        let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
        let dev = wt.device().clone();
        Ok(TiedLora {
            engine: Arc::new(Engine::new(&dev)?),
            u: Tensor::zeros((v, r), DType::F32, &dev)?,
            vh: Tensor::zeros((r, d), DType::F32, &dev)?,
            cfg,
            mode: Mode::Full,
            w: wt,
            w_var: Some(w),
            lora: None,
        })
    }

    /// Reads W from a Hugging Face model's safetensors file (`model.safetensors`,
    /// or one shard of it): the tensor `model.embed_tokens.weight` (Llama,
    /// Qwen2, Gemma) or `transformer.wte.weight` (GPT-2), onto `device`.
    /// Returns the tensor and the name it was found under.
    pub fn load_tied_weight(path: impl AsRef<Path>, device: &Device) -> Result<(Tensor, &'static str)> {
        let path = path.as_ref();
        let mut tensors = candle_core::safetensors::load(path, device)?;
        for name in ["model.embed_tokens.weight", "transformer.wte.weight"] {
            if let Some(t) = tensors.remove(name) {
                return Ok((t, name));
            }
        }
        Err(msg(format!("{}: no `model.embed_tokens.weight` or `transformer.wte.weight` tensor", path.display())))
    }

    /// `c·(W[ids] + s·U[ids]·Vh)`: ids of any shape (u32 or i64) → that shape + [d],
    /// in W's dtype. An id outside `0..V` is an `Err`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_device(ids, "ids")?;
        let ids = ids.contiguous()?;
        self.apply(&ids, Kind::Embed)
    }

    /// `h Wᵀ + s·(h Vhᵀ) Uᵀ`: h [.., d] in W's dtype → [.., V].
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.check_device(h, "h")?;
        let h = h.contiguous()?;
        self.apply(&h, Kind::Logits)
    }

    /// The cross-entropy of the (softcapped) head logits of `h` [.., d]
    /// against `targets` (h's leading shape, u32 or i64; `ignore_index`
    /// skipped), reduced per the config: a scalar f32 tensor. Fused: no
    /// [tokens, V] tensor in the forward or the backward.
    pub fn loss(&self, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.check_device(h, "h")?;
        self.check_device(targets, "targets")?;
        let h = h.contiguous()?;
        let lead = h.dims().split_last().map(|(_, l)| l.iter().product::<usize>()).unwrap_or(0);
        if targets.elem_count() != lead {
            return Err(msg(format!(
                "targets {:?} do not match h {:?} (one target per row of h)",
                targets.dims(),
                h.dims()
            )));
        }
        let targets = targets.contiguous()?;
        // Element 0 is the loss; 1.. the per-token log-sum-exp the backward
        // takes back (as the op's result, so no state lives in the op).
        let out = self.apply(&h, Kind::Loss { targets })?;
        out.get(0)
    }

    /// The trainable `Var`s: `[W]` in full mode, `[U, Vh]` in LoRA mode.
    pub fn vars(&self) -> Vec<Var> {
        match (&self.w_var, &self.lora) {
            (Some(w), _) => vec![w.clone()],
            (None, Some((u, vh))) => vec![u.clone(), vh.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// (U, Vh) in LoRA mode (e.g. for LoRA+'s separate learning rates).
    pub fn lora_vars(&self) -> Option<(&Var, &Var)> {
        self.lora.as_ref().map(|(u, vh)| (u, vh))
    }

    /// W [V, d].
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// The config: shapes, scale, embedding multiplier, softcap, reduction.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// LoRA or full.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The factors as host vectors (U [V, r], Vh [r, d], f32).
    pub fn factors(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.u.flatten_all()?.to_vec1::<f32>()?, self.vh.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Writes the factors as a PEFT adapter directory for the embedding
    /// module `embedding_module` (`"transformer.wte"`, `"model.embed_tokens"`),
    /// with the head view under `lm_head` ([`PeftAdapter::write`]).
    pub fn save_peft(&self, dir: impl AsRef<Path>, embedding_module: &str) -> Result<()> {
        let (u, vh) = self.factors()?;
        PeftAdapter::new(&self.cfg, u, vh, embedding_module).and_then(|a| a.write(dir)).map_err(err)
    }

    /// `W + s·U·Vh`, computed in f32 and rounded once to W's dtype: the
    /// delta merged exactly once, for export.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let delta = (self.u.matmul(&self.vh)? * self.cfg.scale())?;
        (self.w.to_dtype(DType::F32)? + delta)?.to_dtype(self.w.dtype())
    }

    fn check_device(&self, x: &Tensor, what: &str) -> Result<()> {
        if x.device().same_device(self.w.device()) {
            Ok(())
        } else {
            Err(msg(format!(
                "`{what}` is on {:?}, the tied weight on {:?}",
                x.device().location(),
                self.w.device().location()
            )))
        }
    }

    /// Puts the op in the graph: LoRA mode as `op3(x, U, Vh)` (W captured),
    /// full mode as `op2(x, W)` (U, Vh captured), so each op's backward
    /// returns gradients for exactly the trainable tensors.
    fn apply(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        let params = ops::Params {
            cfg: self.cfg.clone(),
            w: self.w.clone(),
            u: self.u.clone(),
            vh: self.vh.clone(),
            engine: self.engine.clone(),
        };
        match self.mode {
            Mode::Lora => x.apply_op3(&self.u, &self.vh, LoraOp { kind, params }),
            Mode::Full => x.apply_op2(&self.w, FullOp { kind, params }),
        }
    }
}

fn check_weight(w: Tensor, cfg: &LoraConfig) -> Result<Tensor> {
    if w.dims() != [cfg.vocab(), cfg.hidden()] {
        return Err(msg(format!("W is {:?}, the config says [V={}, d={}]", w.dims(), cfg.vocab(), cfg.hidden())));
    }
    if !matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(msg(format!("W is {:?}; f32, f16 or bf16 expected", w.dtype())));
    }
    w.contiguous()
}

fn factor(v: Vec<f32>, shape: (usize, usize), what: &str, dev: &Device) -> Result<Tensor> {
    if v.len() != shape.0 * shape.1 {
        return Err(msg(format!("`{what}` has {} elements, expected {}×{}", v.len(), shape.0, shape.1)));
    }
    Tensor::from_vec(v, shape, dev)
}
