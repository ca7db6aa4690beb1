//! The candle custom ops: one struct per training mode, one `Kind` per op.
//!
//! LoRA mode is `op3(x, U, Vh)` with W captured, full mode `op2(x, W)` with
//! U and Vh captured: candle asks each op's backward for the gradients of its
//! arguments only, so the trainable tensors are exactly the arguments. The
//! device work is in `host.rs` (candle's CPU device, on [`crate::Cpu`]) and
//! `cuda.rs` (candle's CUDA device, on the kernels).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, StorageRef, Tensor};

use super::{host, msg};
use crate::config::LoraConfig;
use crate::cpu::Cpu;

/// Token ids as u32 or i64: binds `$ids` to `$get::<u32 | i64>($x, $what)?`
/// (a host slice or a device view) and evaluates `$body`; other dtypes are an
/// `Err`. Needs `BackendStorage` in scope for the storage's dtype.
macro_rules! with_ids {
    ($get:ident, $x:expr, $what:expr, |$ids:ident| $body:expr) => {
        match $x.0.dtype() {
            candle_core::DType::U32 => {
                let $ids = $get::<u32>($x, $what)?;
                $body
            }
            candle_core::DType::I64 => {
                let $ids = $get::<i64>($x, $what)?;
                $body
            }
            other => return Err(super::msg(format!("`{}` is {other:?}; token ids must be u32 or i64", $what))),
        }
    };
}

/// W's dtype picks the storage dtype `T` of W, h, embeddings and logits:
/// calls `$f::<f32 | f16 | bf16>(args)`.
macro_rules! with_float {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<crate::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<crate::bf16>($($arg),*),
            other => Err(super::msg(format!("W is {other:?}; f32, f16 or bf16 expected"))),
        }
    };
}

pub(crate) use {with_float, with_ids};

/// The backends of one device, made once per [`super::TiedLora`].
pub(crate) struct Engine {
    pub(crate) cpu: Cpu,
    #[cfg(feature = "cuda")]
    pub(crate) cuda: Option<crate::cuda::Cuda>,
}

impl Engine {
    pub(crate) fn new(dev: &Device) -> Result<Self> {
        match dev {
            Device::Cpu => Ok(Engine {
                cpu: Cpu::new(),
                #[cfg(feature = "cuda")]
                cuda: None,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Engine {
                cpu: Cpu::new(),
                cuda: Some(crate::cuda::Cuda::with_stream(d.cuda_stream()).map_err(super::err)?),
            }),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                Err(msg("this build of tiedlora has no CUDA kernels: build it with `--features cuda,candle`"))
            }
            Device::Metal(_) => Err(msg("candle's Metal device is not supported (CPU and CUDA are)")),
        }
    }
}

/// The tied parameters and config an op reads.
#[derive(Clone)]
pub(crate) struct Params {
    pub(crate) cfg: LoraConfig,
    pub(crate) w: Tensor,
    pub(crate) u: Tensor,
    pub(crate) vh: Tensor,
    pub(crate) engine: std::sync::Arc<Engine>,
}

/// Which op; `x` is the ids (embed) or h (logits, loss).
#[derive(Clone)]
pub(crate) enum Kind {
    Embed,
    Logits,
    /// Output: [1 + N] f32, the loss then the N log-sum-exps.
    Loss {
        targets: Tensor,
    },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Embed => "tiedlora-embed",
            Kind::Logits => "tiedlora-logits",
            Kind::Loss { .. } => "tiedlora-loss",
        }
    }

    /// The output shape for input dims `x`.
    pub(crate) fn out_shape(&self, cfg: &LoraConfig, x: &[usize]) -> Result<Shape> {
        match self {
            Kind::Embed => Ok([x, &[cfg.hidden()]].concat().into()),
            Kind::Logits | Kind::Loss { .. } => {
                let (&last, lead) = x.split_last().ok_or_else(|| msg("h must have at least one dimension"))?;
                if last != cfg.hidden() {
                    return Err(msg(format!("h is {x:?}: its last dimension must be d = {}", cfg.hidden())));
                }
                Ok(match self {
                    Kind::Logits => [lead, &[cfg.vocab()]].concat().into(),
                    _ => (1 + lead.iter().product::<usize>()).into(),
                })
            }
        }
    }
}

/// Gradients of one backward call, as tensors on the op's device.
pub(crate) struct OpGrads {
    /// dh (logits, loss); `None` for the ids.
    pub(crate) dx: Option<Tensor>,
    pub(crate) du: Tensor,
    pub(crate) dvh: Tensor,
    /// dW in W's dtype, when asked.
    pub(crate) dw: Option<Tensor>,
}

/// Read guards on what a backward reads: x, W, U, Vh, the op's result and
/// the upstream gradient, in that order.
pub(crate) struct Locked<'a>([(StorageRef<'a>, &'a Layout); 6]);

/// The storages of [`Locked`] on one device (`S`: candle's CPU or CUDA
/// storage), and the loss op's upstream gradient as a scalar.
pub(crate) struct Ins<'a, S> {
    pub(crate) x: (&'a S, &'a Layout),
    pub(crate) w: (&'a S, &'a Layout),
    pub(crate) u: (&'a S, &'a Layout),
    pub(crate) vh: (&'a S, &'a Layout),
    pub(crate) res: (&'a S, &'a Layout),
    pub(crate) grad: (&'a S, &'a Layout),
    pub(crate) grad_loss: f32,
}

impl<'a> Locked<'a> {
    pub(crate) fn new(p: &'a Params, x: &'a Tensor, res: &'a Tensor, grad: &'a Tensor) -> Self {
        Locked([x, &p.w, &p.u, &p.vh, res, grad].map(Tensor::storage_and_layout))
    }

    /// The six as `S` (`get`: the device's storage accessor, an `Err` for a
    /// storage on another device).
    pub(crate) fn ins<'s, S>(
        &'s self,
        get: fn(&'s Storage, &str) -> Result<&'s S>,
        grad_loss: f32,
    ) -> Result<Ins<'s, S>> {
        let [x, w, u, vh, res, grad] = &self.0;
        let one =
            |(s, l): &'s (StorageRef<'a>, &'a Layout), what: &str| Ok::<_, candle_core::Error>((get(s, what)?, *l));
        Ok(Ins {
            x: one(x, "x")?,
            w: one(w, "W")?,
            u: one(u, "U")?,
            vh: one(vh, "Vh")?,
            res: one(res, "the op's result")?,
            grad: one(grad, "the upstream gradient")?,
            grad_loss,
        })
    }
}

fn backward(p: &Params, kind: &Kind, x: &Tensor, res: &Tensor, grad: &Tensor, want_dw: bool) -> Result<OpGrads> {
    let grad = grad.contiguous()?;
    // The loss's upstream gradient is one scalar the backward takes by value.
    let grad_loss = match kind {
        Kind::Loss { .. } => grad.get(0)?.to_scalar::<f32>()?,
        _ => 0.0,
    };
    let locked = Locked::new(p, x, res, &grad);
    match x.device() {
        Device::Cpu => host::backward(p, kind, x, &locked.ins(host::cpu_storage, grad_loss)?, want_dw),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            super::cuda::backward(p, kind, x, d, &locked.ins(super::cuda::cuda_storage, grad_loss)?, want_dw)
        }
        d => Err(msg(format!("no tiedlora backend for {:?}", d.location()))),
    }
}

/// LoRA mode: `x.apply_op3(U, Vh)`, W captured.
pub(crate) struct LoraOp {
    pub(crate) kind: Kind,
    pub(crate) params: Params,
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        vh: &CpuStorage,
        lvh: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, lw) = self.params.w.storage_and_layout();
        let w = host::cpu_storage(&w, "W")?;
        host::forward(&self.params, &self.kind, (x, lx), (w, lw), (u, lu), (vh, lvh))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        vh: &candle_core::CudaStorage,
        lvh: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, lw) = self.params.w.storage_and_layout();
        let w = super::cuda::cuda_storage(&w, "W")?;
        super::cuda::forward(&self.params, &self.kind, (x, lx), (w, lw), (u, lu), (vh, lvh))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _u: &Tensor,
        _vh: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = backward(&self.params, &self.kind, x, res, grad, false)?;
        Ok((g.dx, Some(g.du), Some(g.dvh)))
    }
}

/// Full mode: `x.apply_op2(W)`, U and Vh captured (frozen).
pub(crate) struct FullOp {
    pub(crate) kind: Kind,
    pub(crate) params: Params,
}

impl CustomOp2 for FullOp {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let (u, lu) = self.params.u.storage_and_layout();
        let (vh, lvh) = self.params.vh.storage_and_layout();
        let (u, vh) = (host::cpu_storage(&u, "U")?, host::cpu_storage(&vh, "Vh")?);
        host::forward(&self.params, &self.kind, (x, lx), (w, lw), (u, lu), (vh, lvh))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (u, lu) = self.params.u.storage_and_layout();
        let (vh, lvh) = self.params.vh.storage_and_layout();
        let (u, vh) = (super::cuda::cuda_storage(&u, "U")?, super::cuda::cuda_storage(&vh, "Vh")?);
        super::cuda::forward(&self.params, &self.kind, (x, lx), (w, lw), (u, lu), (vh, lvh))
    }

    fn bwd(&self, x: &Tensor, _w: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = backward(&self.params, &self.kind, x, res, grad, true)?;
        Ok((g.dx, g.dw))
    }
}
