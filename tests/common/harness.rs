//! One golden runner for every backend. A backend plugs in by implementing
//! [`Harness`] over host vectors (a device backend uploads and downloads
//! inside its impl); the runner does the rest: loads inputs, poisons
//! outputs, runs every op, compares every expected tensor.

use super::golden::{rel_err, CasePath, Check, Golden};
use tiedlora::io::TensorFile;
use tiedlora::{bf16, f16, Backend, CpuReference, DType, Element, Grads, LoraConfig, Result, Weights};

/// The tied parameters on the host.
#[derive(Clone, Copy)]
pub struct HostWeights<'a, T> {
    pub w: &'a [T],
    pub u: &'a [f32],
    pub vh: &'a [f32],
}

/// Gradient accumulators on the host.
#[derive(Debug, Clone)]
pub struct HostGrads {
    pub lora_vocab: Vec<f32>,
    pub lora_hidden: Vec<f32>,
    pub w: Option<Vec<f32>>,
}

impl HostGrads {
    pub fn zeros(cfg: &LoraConfig, with_w: bool) -> Self {
        HostGrads {
            lora_vocab: vec![0.0; cfg.vocab() * cfg.rank()],
            lora_hidden: vec![0.0; cfg.rank() * cfg.hidden()],
            w: with_w.then(|| vec![0.0; cfg.vocab() * cfg.hidden()]),
        }
    }
}

/// What a backend must offer the golden runner. Outputs come back as fresh
/// vectors; implementations must poison (NaN-fill) output buffers before the op.
pub trait Harness {
    fn name(&self) -> String;
    /// Tolerance for an output of dtype `out` in a case stored as `storage`.
    /// Default: the CPU-reference rule (by the output's own dtype).
    fn tolerance(&self, _storage: DType, out: DType) -> f64 {
        out.tolerance()
    }
    /// Whether the backend implements `op` (a golden op name); unsupported ops
    /// are reported as skipped lines, never silently passed.
    fn supports(&self, _op: &str) -> bool {
        true
    }
    fn embed_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, ids: &[i64]) -> Result<Vec<T>>;
    fn embed_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        ids: &[i64],
        d_embed: &[G],
        grads: &mut HostGrads,
    ) -> Result<()>;
    fn head_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, h: &[T]) -> Result<Vec<T>>;
    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        d_logits: &[G],
        grads: &mut HostGrads,
    ) -> Result<Vec<T>>;
    fn xent_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        targets: &[i64],
    ) -> Result<(f32, Vec<f32>)>;
    #[allow(clippy::too_many_arguments)]
    fn xent_backward<T: Element>(
        &self,
        cfg: &LoraConfig,
        wt: HostWeights<T>,
        h: &[T],
        targets: &[i64],
        lse: &[f32],
        grad_loss: f32,
        grads: &mut HostGrads,
    ) -> Result<Vec<T>>;
    fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32], sign: f64) -> Result<()>;
}

pub fn nan<T: Element>(n: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); n]
}

/// Implements [`Harness`] for a backend whose buffers are host slices.
/// `$kernel_tol`: true for kernel backends (storage-dtype tolerance on every output).
macro_rules! host_harness {
    ($backend:ty, $kernel_tol:expr, $supports:expr) => {
        impl Harness for $backend {
            fn name(&self) -> String {
                Backend::name(self).to_string()
            }
            fn tolerance(&self, storage: DType, out: DType) -> f64 {
                if $kernel_tol {
                    storage.tolerance()
                } else {
                    out.tolerance()
                }
            }
            fn supports(&self, op: &str) -> bool {
                ($supports)(op)
            }
            fn embed_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, ids: &[i64]) -> Result<Vec<T>> {
                let mut out = nan(ids.len() * cfg.hidden());
                Backend::embed_forward(self, cfg, &weights(wt), ids, &mut out)?;
                Ok(out)
            }
            fn embed_backward<T: Element, G: Element>(
                &self,
                cfg: &LoraConfig,
                wt: HostWeights<T>,
                ids: &[i64],
                d_embed: &[G],
                g: &mut HostGrads,
            ) -> Result<()> {
                Backend::embed_backward(self, cfg, &weights(wt), ids, d_embed, &mut grads(g))
            }
            fn head_forward<T: Element>(&self, cfg: &LoraConfig, wt: HostWeights<T>, h: &[T]) -> Result<Vec<T>> {
                let mut out = nan(h.len() / cfg.hidden() * cfg.vocab());
                Backend::head_forward(self, cfg, &weights(wt), h, &mut out)?;
                Ok(out)
            }
            fn head_backward<T: Element, G: Element>(
                &self,
                cfg: &LoraConfig,
                wt: HostWeights<T>,
                h: &[T],
                d_logits: &[G],
                g: &mut HostGrads,
            ) -> Result<Vec<T>> {
                let mut dh = nan(h.len());
                Backend::head_backward(self, cfg, &weights(wt), h, d_logits, &mut dh, &mut grads(g))?;
                Ok(dh)
            }
            fn xent_forward<T: Element>(
                &self,
                cfg: &LoraConfig,
                wt: HostWeights<T>,
                h: &[T],
                targets: &[i64],
            ) -> Result<(f32, Vec<f32>)> {
                let mut loss = [f32::NAN];
                let mut lse = nan(targets.len());
                Backend::head_xent_forward(self, cfg, &weights(wt), h, targets, &mut loss, &mut lse)?;
                Ok((loss[0], lse))
            }
            fn xent_backward<T: Element>(
                &self,
                cfg: &LoraConfig,
                wt: HostWeights<T>,
                h: &[T],
                targets: &[i64],
                lse: &[f32],
                grad_loss: f32,
                g: &mut HostGrads,
            ) -> Result<Vec<T>> {
                let mut dh = nan(h.len());
                Backend::head_xent_backward(
                    self,
                    cfg,
                    &weights(wt),
                    h,
                    targets,
                    lse,
                    grad_loss,
                    &mut dh,
                    &mut grads(g),
                )?;
                Ok(dh)
            }
            fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32], sign: f64) -> Result<()> {
                if sign > 0.0 {
                    Backend::merge(self, cfg, w, u, vh)
                } else {
                    Backend::unmerge(self, cfg, w, u, vh)
                }
            }
        }
    };
}

host_harness!(CpuReference, false, |_: &str| true);

fn weights<'a, B, T: Element>(wt: HostWeights<'a, T>) -> Weights<'a, B, T>
where
    B: for<'b> Backend<Src<'b, T> = &'b [T], Src<'b, f32> = &'b [f32]>,
{
    Weights { w: wt.w, lora_vocab: wt.u, lora_hidden: wt.vh }
}

fn grads<B>(g: &mut HostGrads) -> Grads<'_, B>
where
    B: for<'b> Backend<Dst<'b, f32> = &'b mut [f32]>,
{
    Grads { lora_vocab: &mut g.lora_vocab, lora_hidden: &mut g.lora_hidden, w: g.w.as_deref_mut() }
}

pub fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Collects comparisons for one case.
struct Recorder<'a, H: Harness> {
    h: &'a H,
    case: String,
    storage: DType,
    checks: Vec<Check>,
}

impl<H: Harness> Recorder<'_, H> {
    fn check(&mut self, op: &'static str, tensor: &str, out_dtype: DType, out: &[f64], expected: &[f64]) {
        self.checks.push(Check {
            case: self.case.clone(),
            op,
            backend: self.h.name(),
            tensor: tensor.to_string(),
            err: rel_err(out, expected),
            tol: self.h.tolerance(self.storage, out_dtype),
            skipped: false,
        });
    }
    /// Whether to run `op`; records a SKIP line if the backend lacks it.
    fn run(&mut self, op: &'static str) -> bool {
        if self.h.supports(op) {
            return true;
        }
        self.checks.push(Check {
            case: self.case.clone(),
            op,
            backend: self.h.name(),
            tensor: String::new(),
            err: f64::NAN,
            tol: 0.0,
            skipped: true,
        });
        false
    }
    fn grads(&mut self, op: &'static str, g: &Golden, prefix: &str, got: &HostGrads) -> Result<()> {
        let cfg = &g.cfg;
        let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
        let name = format!("{prefix}_grad_lora_vocab");
        let e = g.expected(&name, v * r)?;
        self.check(op, &name, DType::F32, &widen(&got.lora_vocab), &e);
        let name = format!("{prefix}_grad_lora_hidden");
        let e = g.expected(&name, r * d)?;
        self.check(op, &name, DType::F32, &widen(&got.lora_hidden), &e);
        let name = format!("{prefix}_grad_w");
        if g.file.contains(&name) {
            let e = g.expected(&name, v * d)?;
            let got_w = got.w.as_ref().expect("grad_w requested");
            self.check(op, &name, DType::F32, &widen(got_w), &e);
        }
        Ok(())
    }
}

/// Runs every op of a standard golden case through `h`.
pub fn run_standard<H: Harness>(h: &H, path: &std::path::Path, case: &str) -> Result<Vec<Check>> {
    let g = Golden::open(path)?;
    match g.dtype {
        DType::F32 => run_typed::<f32, H>(h, &g, case),
        DType::F16 => run_typed::<f16, H>(h, &g, case),
        DType::BF16 => run_typed::<bf16, H>(h, &g, case),
    }
}

fn run_typed<T: Element, H: Harness>(h: &H, g: &Golden, case: &str) -> Result<Vec<Check>> {
    let cfg = &g.cfg;
    let (v, d) = (cfg.vocab(), cfg.hidden());
    let (w, _) = g.file.exact::<T>("w")?;
    let (u, _) = g.file.f32("lora_vocab")?;
    let (vh, _) = g.file.f32("lora_hidden")?;
    let (hs, _) = g.file.exact::<T>("h")?;
    let ids = g.tokens("ids")?;
    let targets = g.tokens("targets")?;
    let t = ids.len();
    let (d_embed, _) = g.file.f32("d_embed")?;
    let (d_logits, _) = g.file.f32("d_logits")?;
    let wt = HostWeights { w: &w, u: &u, vh: &vh };
    let mut rec = Recorder { h, case: case.to_string(), storage: T::DTYPE, checks: Vec::new() };
    let want_w = |prefix: &str| g.file.contains(&format!("{prefix}_grad_w"));

    let expected_e = g.expected("embed_out", t * d)?;
    if rec.run("embed_forward") {
        let e = h.embed_forward(cfg, wt, &ids)?;
        rec.check("embed_forward", "embed_out", T::DTYPE, &widen(&e), &expected_e);
    }

    if rec.run("embed_backward") {
        let mut gr = HostGrads::zeros(cfg, want_w("embed"));
        h.embed_backward(cfg, wt, &ids, &d_embed, &mut gr)?;
        rec.grads("embed_backward", g, "embed", &gr)?;
    }

    if rec.run("head_forward") {
        let z = h.head_forward(cfg, wt, &hs)?;
        rec.check("head_forward", "logits", T::DTYPE, &widen(&z), &g.expected("logits", t * v)?);
    }

    if rec.run("head_backward") {
        let mut gr = HostGrads::zeros(cfg, want_w("head"));
        let dh = h.head_backward(cfg, wt, &hs, &d_logits, &mut gr)?;
        rec.check("head_backward", "head_grad_h", T::DTYPE, &widen(&dh), &g.expected("head_grad_h", t * d)?);
        rec.grads("head_backward", g, "head", &gr)?;
    }

    if rec.run("head_xent_forward") {
        let (loss, lse) = h.xent_forward(cfg, wt, &hs, &targets)?;
        rec.check("head_xent_forward", "xent_loss", DType::F32, &[loss as f64], &g.expected("xent_loss", 1)?);
        rec.check("head_xent_forward", "xent_lse", DType::F32, &widen(&lse), &g.expected("xent_lse", t)?);
        if rec.run("head_xent_backward") {
            let mut gr = HostGrads::zeros(cfg, want_w("xent"));
            let dh = h.xent_backward(cfg, wt, &hs, &targets, &lse, 1.0, &mut gr)?;
            rec.check("head_xent_backward", "xent_grad_h", T::DTYPE, &widen(&dh), &g.expected("xent_grad_h", t * d)?);
            rec.grads("head_xent_backward", g, "xent", &gr)?;
        }
    }

    // merge: the merged W looked up with no LoRA must give the golden embedding
    // (c·(W + s·U·Vh)[ids]); unmerge must give W back up to one rounding.
    if rec.run("merge") {
        let mut merged = w.clone();
        h.merge(cfg, &mut merged, &u, &vh, 1.0)?;
        let c = cfg.embed_scale();
        let looked_up: Vec<f64> = ids
            .iter()
            .flat_map(|&i| merged[i as usize * d..(i as usize + 1) * d].iter().map(move |x| c * x.to_f64()))
            .collect();
        rec.check("merge", "embed_out(merged W)", T::DTYPE, &looked_up, &expected_e);
        let mut restored = merged.clone();
        h.merge(cfg, &mut restored, &u, &vh, -1.0)?;
        rec.check("unmerge", "w", T::DTYPE, &widen(&restored), &widen(&w));
    }
    Ok(rec.checks)
}

/// The PEFT end-to-end pipeline: embed → tanh → head + cross-entropy → tanh' → embed backward,
/// both paths adding into ONE pair of gradient buffers, with the adapter read from PEFT's files.
pub fn run_peft_e2e<H: Harness>(h: &H, dir: &std::path::Path, case: &str) -> Result<Vec<Check>> {
    let e2e = TensorFile::open(dir.join("e2e.safetensors"))?;
    let adapter = tiedlora::peft::PeftAdapter::read(dir)?;
    let embedding_module = e2e.meta("peft_embedding_module")?;
    if !adapter.embedding_module().ends_with(embedding_module) {
        return Err(e2e.err(format!(
            "e2e says the embedding module is {embedding_module:?}, the adapter has {:?}",
            adapter.embedding_module()
        )));
    }
    let reduction = tiedlora::Reduction::parse(e2e.meta("reduction")?)
        .ok_or_else(|| e2e.err("metadata `reduction` is not mean or sum"))?;
    let softcap: f64 = e2e.meta("logit_softcap")?.parse().map_err(|_| e2e.err("bad logit_softcap"))?;
    let ignore: i64 = e2e.meta("ignore_index")?.parse().map_err(|_| e2e.err("bad ignore_index"))?;
    let embed_scale: f64 = e2e.meta("embed_scale")?.parse().map_err(|_| e2e.err("bad embed_scale"))?;
    let cfg = adapter
        .config_builder()
        .embed_scale(embed_scale)
        .logit_softcap_opt(Some(softcap))
        .ignore_index(ignore)
        .reduction(reduction)
        .build()?;
    let dtype = e2e.meta("dtype")?;
    if dtype != "f32" {
        return Err(e2e.err(format!("PEFT e2e cases are f32, this one says {dtype:?}")));
    }
    let (v, d, r) = (cfg.vocab(), cfg.hidden(), cfg.rank());
    let (w, _) = e2e.exact::<f32>("w")?;
    let (ids, _) = e2e.i64("ids")?;
    let (targets, _) = e2e.i64("targets")?;
    let t = ids.len();
    let expect = |name: &str, len: usize| -> Result<Vec<f64>> {
        let (x, shape) = e2e.f64(name)?;
        if x.len() != len {
            return Err(e2e.err(format!("`{name}` has shape {shape:?}, expected {len} values")));
        }
        Ok(x)
    };
    let wt = HostWeights { w: &w, u: &adapter.lora_vocab, vh: &adapter.lora_hidden };
    let mut rec = Recorder { h, case: case.to_string(), storage: DType::F32, checks: Vec::new() };
    for op in ["embed_forward", "head_forward", "head_backward", "embed_backward"] {
        if !rec.run(op) {
            return Ok(rec.checks);
        }
    }
    let e = h.embed_forward(&cfg, wt, &ids)?;
    rec.check("e2e embed_forward", "embed_out", DType::F32, &widen(&e), &expect("embed_out", t * d)?);
    let hs: Vec<f32> = e.iter().map(|x| x.tanh()).collect();
    let z = h.head_forward(&cfg, wt, &hs)?;
    rec.check("e2e head_forward", "logits", DType::F32, &widen(&z), &expect("logits", t * v)?);
    // Two routes to the loss gradient, each composed with the embedding
    // backward into ONE set of gradient buffers: the fused cross-entropy
    // (no logits in memory), and the materialized one (the loss and its
    // gradient over the backend's own logits on the host in f64, then the
    // backend's head backward).
    let (loss, g) = xent_over_logits(&cfg, &z, &targets);
    rec.check("e2e materialized xent", "e2e_loss", DType::F32, &[loss], &expect("e2e_loss", 1)?);
    let mut routes = vec![("materialized", HostGrads::zeros(&cfg, false))];
    let dh_mat = h.head_backward(&cfg, wt, &hs, &g, &mut routes[0].1)?;
    let mut dhs = vec![dh_mat];
    if rec.run("head_xent_forward") && rec.run("head_xent_backward") {
        let (loss, lse) = h.xent_forward(&cfg, wt, &hs, &targets)?;
        rec.check("e2e head_xent_forward", "e2e_loss", DType::F32, &[loss as f64], &expect("e2e_loss", 1)?);
        let mut grads = HostGrads::zeros(&cfg, false);
        dhs.push(h.xent_backward(&cfg, wt, &hs, &targets, &lse, 1.0, &mut grads)?);
        routes.push(("fused", grads));
    }
    for ((route, grads), dh) in routes.iter_mut().zip(&dhs) {
        let de: Vec<f32> = dh.iter().zip(&hs).map(|(g, y)| g * (1.0 - y * y)).collect();
        h.embed_backward(&cfg, wt, &ids, &de, grads)?;
        let op: &'static str = if *route == "fused" { "e2e fused xent + embed" } else { "e2e materialized + embed" };
        rec.check(
            op,
            "e2e_grad_lora_vocab",
            DType::F32,
            &widen(&grads.lora_vocab),
            &expect("e2e_grad_lora_vocab", v * r)?,
        );
        rec.check(
            op,
            "e2e_grad_lora_hidden",
            DType::F32,
            &widen(&grads.lora_hidden),
            &expect("e2e_grad_lora_hidden", r * d)?,
        );
    }
    Ok(rec.checks)
}

/// Loss and ∂loss/∂z of the cross-entropy over stored logits `z` [T, V]
/// (softcap, ignore_index and reduction from `cfg`), in f64.
fn xent_over_logits(cfg: &LoraConfig, z: &[f32], targets: &[i64]) -> (f64, Vec<f32>) {
    let v = cfg.vocab();
    let valid = targets.iter().filter(|&&y| y != cfg.ignore_index()).count();
    let factor = match cfg.reduction() {
        _ if valid == 0 => 0.0,
        tiedlora::Reduction::Mean => 1.0 / valid as f64,
        tiedlora::Reduction::Sum => 1.0,
    };
    let mut loss = 0.0;
    let mut g = vec![0f32; z.len()];
    for (t, &y) in targets.iter().enumerate() {
        if y == cfg.ignore_index() {
            continue;
        }
        let row: Vec<(f64, f64)> = z[t * v..(t + 1) * v]
            .iter()
            .map(|&x| match cfg.logit_softcap() {
                Some(k) => {
                    let th = (x as f64 / k).tanh();
                    (k * th, 1.0 - th * th)
                }
                None => (x as f64, 1.0),
            })
            .collect();
        let capped: Vec<f64> = row.iter().map(|p| p.0).collect();
        let lse = tiedlora::reference::logsumexp(&capped);
        loss += (lse - capped[y as usize]) * factor;
        for (vi, &(c, slope)) in row.iter().enumerate() {
            let onehot = if vi == y as usize { 1.0 } else { 0.0 };
            g[t * v + vi] = (((c - lse).exp() - onehot) * slope * factor) as f32;
        }
    }
    (loss, g)
}

/// Runs one case of either kind.
pub fn run_case<H: Harness>(h: &H, case: &CasePath, label: &str) -> Result<Vec<Check>> {
    let name = format!("{label}/{}", case.name());
    match case {
        CasePath::Standard(p) => run_standard(h, p, &name),
        CasePath::PeftE2e(p) => run_peft_e2e(h, p, &name),
    }
}

/// Every golden case (and `TIEDLORA_GOLDENS`) through `h`: the failed checks
/// and errors, one line each (empty when all pass).
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn golden_failures<H: Harness>(h: &H) -> Vec<String> {
    let cases = match super::golden::all_cases() {
        Ok(c) => c,
        Err(e) => return vec![format!("golden discovery: {e}")],
    };
    let mut failures = Vec::new();
    for (label, case) in &cases {
        match run_case(h, case, label) {
            Ok(checks) => failures.extend(checks.iter().filter(|c| !c.passed()).map(|c| c.to_string())),
            Err(e) => failures.push(format!("{label}/{}: {e}", case.name())),
        }
    }
    failures
}

/// Ops the kernel backends implement: all of them.
pub fn kernel_ops(_op: &str) -> bool {
    true
}

#[cfg(feature = "cpu-kernels")]
host_harness!(tiedlora::kernels::CpuKernels, true, kernel_ops);

// The fast CPU backend computes in f32 like the kernels: their tolerances.
host_harness!(tiedlora::Cpu, true, kernel_ops);
