//! The kernels executed on the CPU (feature `cpu-kernels`): [`HostExec`]
//! replays every op's launches through the shim, and [`CpuKernels`] is the
//! [`Backend`] over host slices that tests compare with the reference.

use super::dense::{host_gemm, DenseGemm};
use super::exec::{Executor, KernelOptions};
use super::ops::{self, id_kind, GradAddrs, WeightAddrs};
use super::params::KernelParams;
use super::plan::LaunchPlan;
use super::scratch_meter::ScratchMeter;
use super::shim::{self, ShimEntry};
use crate::backend::{Backend, Grads, Weights};
use crate::config::LoraConfig;
use crate::cpu::{grad_lens, weight_lens};
use crate::dtype::{Element, TokenId};
use crate::error::{Error, Result};
use crate::validate;

macro_rules! shim_table {
    ($($name:ident),* $(,)?) => {
        super::shim::shim_kernels!($($name),*);
        /// Every kernel the ops launch, by symbol.
        static TABLE: &[(&str, ShimEntry)] = &[$((stringify!($name), $name as ShimEntry)),*];
    };
}

shim_table!(
    tl_prepare_ids_u32,
    tl_prepare_ids_i64,
    tl_lora_down_f32_f32,
    tl_lora_down_f16_f16,
    tl_lora_down_f16_f32,
    tl_lora_down_bf16_bf16,
    tl_lora_down_bf16_f32,
    tl_lora_up_partial_f32,
    tl_lora_up_partial_f16,
    tl_lora_up_partial_bf16,
    tl_lora_up_reduce,
    tl_head_forward_f32,
    tl_head_forward_f16,
    tl_head_forward_bf16,
    tl_head_grad_h_f32_f32_rx16,
    tl_head_grad_h_f32_f32_rx32,
    tl_head_grad_h_f32_f32_rx64,
    tl_head_grad_h_f16_f16_rx16,
    tl_head_grad_h_f16_f16_rx32,
    tl_head_grad_h_f16_f16_rx64,
    tl_head_grad_h_f16_f32_rx16,
    tl_head_grad_h_f16_f32_rx32,
    tl_head_grad_h_f16_f32_rx64,
    tl_head_grad_h_bf16_bf16_rx16,
    tl_head_grad_h_bf16_bf16_rx32,
    tl_head_grad_h_bf16_bf16_rx64,
    tl_head_grad_h_bf16_f32_rx16,
    tl_head_grad_h_bf16_f32_rx32,
    tl_head_grad_h_bf16_f32_rx64,
    tl_head_grad_param_f32_f32_n64,
    tl_head_grad_param_f32_f32_n128,
    tl_head_grad_param_f16_f16_n64,
    tl_head_grad_param_f16_f16_n128,
    tl_head_grad_param_f16_f32_n64,
    tl_head_grad_param_f16_f32_n128,
    tl_head_grad_param_bf16_bf16_n64,
    tl_head_grad_param_bf16_bf16_n128,
    tl_head_grad_param_bf16_f32_n64,
    tl_head_grad_param_bf16_f32_n128,
    tl_embed_forward_f32_r8,
    tl_embed_forward_f32_r16,
    tl_embed_forward_f32_r32,
    tl_embed_forward_f32_r64,
    tl_embed_forward_f16_r8,
    tl_embed_forward_f16_r16,
    tl_embed_forward_f16_r32,
    tl_embed_forward_f16_r64,
    tl_embed_forward_bf16_r8,
    tl_embed_forward_bf16_r16,
    tl_embed_forward_bf16_r32,
    tl_embed_forward_bf16_r64,
    tl_sort_ids_hist,
    tl_sort_ids_scan,
    tl_sort_ids_scatter,
    tl_group_rows_partial_f32,
    tl_group_rows_partial_f16,
    tl_group_rows_partial_bf16,
    tl_group_rows_combine,
    tl_merge_f32,
    tl_merge_f16,
    tl_merge_bf16,
    tl_xent_partial_f32,
    tl_xent_partial_f16,
    tl_xent_partial_bf16,
    tl_xent_combine,
    tl_xent_grad_logits_f32,
    tl_xent_grad_logits_f16,
    tl_xent_grad_logits_bf16,
    tl_xent_grad_finish_f32,
    tl_xent_grad_finish_f16,
    tl_xent_grad_finish_bf16,
    tl_head_forward_f16_s3,
    tl_head_forward_bf16_s3,
    tl_head_forward_f16_w256,
    tl_head_forward_bf16_w256,
    tl_head_forward_f16_mma,
    tl_head_forward_bf16_mma,
    tl_head_forward_f16_w256_mma,
    tl_head_forward_bf16_w256_mma,
    tl_head_forward_f16_wgmma,
    tl_head_forward_bf16_wgmma,
    tl_head_forward_f16_w256_wgmma,
    tl_head_forward_bf16_w256_wgmma,
    tl_xent_partial_f16_mma,
    tl_xent_partial_bf16_mma,
    tl_xent_partial_f16_wgmma,
    tl_xent_partial_bf16_wgmma,
    tl_xent_grad_logits_f16_mma,
    tl_xent_grad_logits_bf16_mma,
    tl_head_grad_param_f16_f16_n64_wgmma,
    tl_head_grad_param_f16_f16_n128_wgmma,
    tl_head_grad_param_bf16_bf16_n64_wgmma,
    tl_head_grad_param_bf16_bf16_n128_wgmma,
    tl_lora_pack_f16,
    tl_lora_pack_bf16,
    tl_head_grad_h_f16_f16_rx16_wgmma,
    tl_head_grad_h_f16_f16_rx32_wgmma,
    tl_head_grad_h_f16_f16_rx64_wgmma,
    tl_head_grad_h_bf16_bf16_rx16_wgmma,
    tl_head_grad_h_bf16_bf16_rx32_wgmma,
    tl_head_grad_h_bf16_bf16_rx64_wgmma,
    tl_xent_grad_logits_f16_wgmma,
    tl_xent_grad_logits_bf16_wgmma,
    tl_head_grad_h_f16_f16_rx16_mma,
    tl_head_grad_h_f16_f16_rx32_mma,
    tl_head_grad_h_f16_f16_rx64_mma,
    tl_head_grad_h_bf16_bf16_rx16_mma,
    tl_head_grad_h_bf16_bf16_rx32_mma,
    tl_head_grad_h_bf16_bf16_rx64_mma,
    tl_head_grad_param_f16_f16_n64_mma,
    tl_head_grad_param_f16_f16_n128_mma,
    tl_head_grad_param_bf16_bf16_n64_mma,
    tl_head_grad_param_bf16_bf16_n128_mma,
    tl_head_grad_h_f16_f16_rx16_o2,
    tl_head_grad_h_f16_f32_rx16_o2,
    tl_head_grad_h_bf16_bf16_rx16_o2,
    tl_head_grad_h_bf16_f32_rx16_o2,
    tl_head_grad_h_f16_f16_rx16_s3,
    tl_head_grad_h_f16_f16_rx32_s3,
    tl_head_grad_h_f16_f16_rx64_s3,
    tl_head_grad_param_f16_f16_n64_s3,
    tl_head_grad_param_f16_f16_n128_s3,
    tl_head_grad_h_bf16_bf16_rx16_s3,
    tl_head_grad_h_bf16_bf16_rx32_s3,
    tl_head_grad_h_bf16_bf16_rx64_s3,
    tl_head_grad_param_bf16_bf16_n64_s3,
    tl_head_grad_param_bf16_bf16_n128_s3,
    tl_concat_rows_f32,
    tl_concat_rows_f16,
    tl_concat_rows_bf16,
    tl_xent_chunk_partial,
    tl_xent_chunk_grad_f32,
    tl_xent_chunk_grad_f16,
    tl_xent_chunk_grad_bf16,
);

thread_local! {
    static SCRATCH: ScratchMeter = const { ScratchMeter::new() };
}

/// Total bytes of scratch the kernel ops called on this thread have allocated
/// (each request counted as at least 16 bytes, like the CUDA backend's
/// `Cuda::scratch_bytes_allocated`).
pub fn thread_scratch_bytes() -> usize {
    SCRATCH.with(|m| m.allocated())
}

/// The most scratch bytes live at once on this thread since the last
/// [`reset_thread_scratch_peak`] (like `Cuda::scratch_peak_bytes`). Every op
/// frees its scratch when it returns, so resetting before one call and
/// reading after it gives that call's peak extra memory.
pub fn thread_scratch_peak() -> usize {
    SCRATCH.with(|m| m.peak())
}

/// Starts a new peak for [`thread_scratch_peak`]; returns the old one.
pub fn reset_thread_scratch_peak() -> usize {
    SCRATCH.with(|m| m.reset_peak())
}

/// Runs launches on CPU threads through the shim; scratch lives in host memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostExec {
    /// As [`Executor::options`].
    pub options: KernelOptions,
    /// As [`Executor::deferred_id_record`] (host address of [`ops::ID_RECORD_LEN`] × i64); the
    /// crate's own tests set it, nothing public runs ops on a `HostExec`.
    pub(crate) deferred_id_record: Option<u64>,
}

/// Host scratch: 16-byte aligned; counted on this thread's meter until dropped.
#[derive(Debug)]
pub struct HostScratch {
    buf: Vec<u128>,
    counted: usize,
}

impl HostScratch {
    /// `bytes` (at least 16) filled with `fill`, counted on this thread's meter.
    fn new(bytes: usize, fill: u128) -> Self {
        let counted = bytes.max(16);
        SCRATCH.with(|m| m.alloc(counted));
        HostScratch { buf: vec![fill; counted.div_ceil(16)], counted }
    }
}

impl Drop for HostScratch {
    fn drop(&mut self) {
        // `try_with`: a scratch dropped during thread teardown has no meter left.
        let _ = SCRATCH.try_with(|m| m.free(self.counted));
    }
}

impl Executor for HostExec {
    type Scratch = HostScratch;

    fn scratch(&self, bytes: usize) -> Result<HostScratch> {
        Ok(HostScratch::new(bytes, 0))
    }
    fn scratch_uninit(&self, bytes: usize) -> Result<HostScratch> {
        // Poison, not zeros: a kernel that reads before it writes gets NaN / -1.
        Ok(HostScratch::new(bytes, u128::MAX))
    }
    fn addr(&self, s: &HostScratch) -> u64 {
        s.buf.as_ptr() as u64
    }
    fn upload(&self, s: &mut HostScratch, data: &[u8]) -> Result<()> {
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut s.buf);
        let cap = dst.len();
        dst.get_mut(..data.len())
            .ok_or_else(|| Error::Backend(format!("upload of {} bytes into {cap} bytes of scratch", data.len())))?
            .copy_from_slice(data);
        Ok(())
    }
    fn download(&self, s: &HostScratch, out: &mut [u8]) -> Result<()> {
        let src: &[u8] = bytemuck::cast_slice(&s.buf);
        out.copy_from_slice(
            src.get(..out.len())
                .ok_or_else(|| Error::Backend(format!("download of {} bytes from {} bytes", out.len(), src.len())))?,
        );
        Ok(())
    }
    fn read_at(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: callers pass an address inside a live caller buffer with at
        // least out.len() readable bytes (ops::prepare_ids reads one id of a
        // buffer whose length was checked); launches are synchronous here.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }
    fn multiprocessors(&self) -> u32 {
        // Few blocks: the shim runs them one after another.
        2
    }
    fn options(&self) -> KernelOptions {
        self.options
    }
    fn deferred_id_record(&self) -> Option<u64> {
        self.deferred_id_record
    }
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan, params: &P) -> Result<()> {
        let entry = TABLE
            .iter()
            .find(|(name, _)| *name == plan.kernel)
            .map(|(_, e)| *e)
            .ok_or_else(|| Error::Backend(format!("kernel {} is not in the shim table", plan.kernel)))?;
        // SAFETY: the table maps each symbol to its own entry point, and the
        // caller guarantees params/addresses fit the kernel (Executor::launch).
        unsafe { shim::launch(entry, plan, params) }
    }
    unsafe fn gemm(&self, g: &DenseGemm) -> Result<()> {
        if !self.options.cublas {
            return Err(Error::Backend("a GEMM-engine call with `cublas` off".into()));
        }
        // SAFETY: the caller guarantees the addresses hold the matrices g
        // describes (Executor::gemm); launches are synchronous here.
        unsafe { host_gemm(g) }
    }
}

/// The `kernels/*.cu` sources executed on the CPU, as a [`Backend`] over host
/// slices: the same launches, plans and params as the GPU, run by the shim.
/// Slow (one OS thread per CUDA thread); meant for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuKernels {
    /// Run the head GEMMs with the 3-stage cp.async main loop (`_s3` kernels).
    pub pipelined: bool,
    /// Bytes of each per-block buffer of the fused cross-entropy (0 = the
    /// default, [`super::XENT_CHUNK_BYTES`]; see `KernelOptions::xent_chunk_bytes`);
    /// tests make it small to run several token blocks and chunks on small shapes.
    pub xent_chunk_bytes: usize,
    /// Run `head_forward` (f16 / bf16) on the wide-tile kernels (`_w256`).
    pub wide_tiles: bool,
    /// Run the GEMMs with an `_mma` variant on it (ldmatrix + mma.sync), as
    /// [`crate::cuda::Cuda::with_mma`].
    pub mma: bool,
    /// Run `head_forward` (f16 / bf16) on the Hopper warpgroup-MMA kernels
    /// (`_wgmma`), as [`crate::cuda::Cuda::with_wgmma`]; the shim evaluates
    /// the MMAs from the same swizzled shared tiles and descriptors.
    pub wgmma: bool,
    /// With `wgmma`: the grad_h at 64 extra columns for every rank, as
    /// [`crate::cuda::Cuda::with_wgmma_whole_atoms`].
    pub wgmma_whole_atoms: bool,
    /// Run the head's GEMMs on a GEMM engine, as
    /// [`crate::cuda::Cuda::with_cublas`]; here a plain f32 host GEMM
    /// ([`super::dense::host_gemm`]) stands in for cuBLAS, so the tests check
    /// the op sequence around it.
    pub cublas: bool,
}

impl CpuKernels {
    /// The kernel variants these settings select (what the memory formulas
    /// take, as `Cuda::kernel_options` on the GPU).
    pub fn kernel_options(&self) -> KernelOptions {
        KernelOptions {
            gemm_stages: if self.pipelined { 3 } else { 1 },
            xent_chunk_bytes: self.xent_chunk_bytes,
            wide_tiles: self.wide_tiles,
            mma: self.mma,
            wgmma: self.wgmma,
            wgmma_whole_atoms: self.wgmma_whole_atoms,
            cublas: self.cublas,
            ..KernelOptions::default()
        }
    }

    fn exec(&self) -> HostExec {
        HostExec { options: self.kernel_options(), deferred_id_record: None }
    }
}

fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

fn weight_addrs<T: Element>(w: &Weights<'_, CpuKernels, T>) -> WeightAddrs {
    WeightAddrs { w: addr(w.w), u: addr(w.lora_vocab), vh: addr(w.lora_hidden) }
}

fn grad_addrs(g: &mut Grads<'_, CpuKernels>) -> GradAddrs {
    GradAddrs { u: addr_mut(g.lora_vocab), vh: addr_mut(g.lora_hidden), w: g.w.as_deref_mut().map(addr_mut) }
}

fn wl<T: Element>(w: &Weights<'_, CpuKernels, T>) -> validate::WeightLens {
    weight_lens(w.w, w.lora_vocab, w.lora_hidden)
}

fn gl(g: &Grads<'_, CpuKernels>) -> validate::GradLens {
    grad_lens(g.lora_vocab, g.lora_hidden, g.w.as_deref())
}

impl Backend for CpuKernels {
    type Src<'a, T: 'static> = &'a [T];
    type Dst<'a, T: 'static> = &'a mut [T];

    fn name(&self) -> &'static str {
        if self.cublas {
            return "kernels-on-cpu-gemm-engine";
        }
        match (self.pipelined, self.wide_tiles, self.mma) {
            (_, true, true) => "kernels-on-cpu-wide-mma",
            (_, true, false) => "kernels-on-cpu-wide",
            (_, false, true) => "kernels-on-cpu-mma",
            (true, false, false) => "kernels-on-cpu-s3",
            (false, false, false) => "kernels-on-cpu",
        }
    }

    fn embed_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: &[I],
        out: &mut [T],
    ) -> Result<()> {
        let t = validate::embed_forward_lens(cfg, wl(weights), ids.len(), out.len())?;
        ops::embed_forward(
            &self.exec(),
            cfg,
            T::DTYPE,
            weight_addrs(weights),
            addr(ids),
            id_kind::<I>(),
            addr_mut(out),
            t,
        )
    }

    fn embed_backward<T: Element, G: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        ids: &[I],
        d_embed: &[G],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::embed_backward_lens(cfg, wl(weights), ids.len(), d_embed.len(), gl(grads))?;
        let g = grad_addrs(grads);
        ops::embed_backward(
            &self.exec(),
            cfg,
            G::DTYPE,
            weight_addrs(weights),
            addr(ids),
            id_kind::<I>(),
            addr(d_embed),
            g,
            t,
        )
    }

    fn head_forward<T: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        logits: &mut [T],
    ) -> Result<()> {
        let t = validate::head_forward_lens(cfg, wl(weights), h.len(), logits.len())?;
        ops::head_forward(&self.exec(), cfg, T::DTYPE, weight_addrs(weights), addr(h), addr_mut(logits), t)
    }

    fn head_backward<T: Element, G: Element>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        d_logits: &[G],
        dh: &mut [T],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::head_backward_lens(cfg, wl(weights), h.len(), d_logits.len(), dh.len(), gl(grads))?;
        let g = grad_addrs(grads);
        ops::head_backward(
            &self.exec(),
            cfg,
            T::DTYPE,
            G::DTYPE,
            weight_addrs(weights),
            addr(h),
            addr(d_logits),
            addr_mut(dh),
            g,
            t,
        )
    }

    fn head_xent_forward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        targets: &[I],
        loss: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let t = validate::xent_forward_lens(cfg, wl(weights), h.len(), targets.len(), loss.len(), lse.len())?;
        ops::head_xent_forward(
            &self.exec(),
            cfg,
            T::DTYPE,
            weight_addrs(weights),
            addr(h),
            addr(targets),
            id_kind::<I>(),
            addr_mut(loss),
            addr_mut(lse),
            t,
        )
    }

    fn head_xent_backward<T: Element, I: TokenId>(
        &self,
        cfg: &LoraConfig,
        weights: &Weights<'_, Self, T>,
        h: &[T],
        targets: &[I],
        lse: &[f32],
        grad_loss: f32,
        dh: &mut [T],
        grads: &mut Grads<'_, Self>,
    ) -> Result<()> {
        let t = validate::xent_backward_lens(cfg, wl(weights), h.len(), targets.len(), lse.len(), dh.len(), gl(grads))?;
        let g = grad_addrs(grads);
        ops::head_xent_backward(
            &self.exec(),
            cfg,
            T::DTYPE,
            weight_addrs(weights),
            addr(h),
            addr(targets),
            id_kind::<I>(),
            addr(lse),
            grad_loss,
            addr_mut(dh),
            g,
            t,
        )
    }

    fn merge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32]) -> Result<()> {
        validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
        ops::merge(&self.exec(), cfg, T::DTYPE, addr_mut(w), addr(u), addr(vh), false)
    }

    fn unmerge<T: Element>(&self, cfg: &LoraConfig, w: &mut [T], u: &[f32], vh: &[f32]) -> Result<()> {
        validate::check_weights(cfg, w.len(), u.len(), vh.len())?;
        ops::merge(&self.exec(), cfg, T::DTYPE, addr_mut(w), addr(u), addr(vh), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::kernels::ops::{self, IdKind};

    fn addr<T>(s: &[T]) -> u64 {
        s.as_ptr() as u64
    }

    /// sort_ids (kernels/sort_ids.cu): ascending keys with skipped ids (< 0)
    /// as the key V at the end, and the positions of equal keys in increasing
    /// order (stable), for 1, 2 and 3 radix passes (V = 300, 5000, 300000 at
    /// 9 bits per pass: the result lands in the caller's buffers after an
    /// odd and an even number of passes), one and three sort blocks, T = 1,
    /// and a heavy duplicate. Fresh random ids (seed printed).
    #[test]
    fn sort_ids_is_a_stable_sort_for_every_pass_count() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("sort seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let exec = HostExec::default();
        for v in [300usize, 5000, 300_000] {
            for t in [1usize, 4000, 9000] {
                let ids: Vec<i32> = (0..t)
                    .map(|i| match rng.random_range(0..10) {
                        0 => -2,
                        1 => (v / 2) as i32,
                        _ if i % 3 == 0 => v as i32 - 1,
                        _ => rng.random_range(0..v as i32),
                    })
                    .collect();
                let (keys, perm) = ops::sort_ids(&exec, addr(&ids), t, v).unwrap();
                let (mut k, mut p) = (vec![0u8; t * 4], vec![0u8; t * 4]);
                exec.download(&keys, &mut k).unwrap();
                exec.download(&perm, &mut p).unwrap();
                let (k, p): (&[i32], &[i32]) = (bytemuck::cast_slice(&k), bytemuck::cast_slice(&p));
                let key = |i: i32| if i < 0 { v as i32 } else { i };
                let mut want: Vec<(i32, i32)> = (0..t as i32).map(|i| (key(ids[i as usize]), i)).collect();
                want.sort();
                let got: Vec<(i32, i32)> = k.iter().copied().zip(p.iter().copied()).collect();
                assert!(got == want, "V={v} T={t}: not the stable sort (seed {seed})");
            }
        }
    }

    /// lora_down and lora_up against f64 sums, on shapes that take every
    /// staging path: d = 600 (three 256-column Vh steps, the last partial),
    /// r = 20 (two rank chunks), 300 rows (the last block's upper warps have
    /// no rows but must still stage and meet the barriers), and for lora_up
    /// T = 2100 gathered tokens (8 chunks of 263 on the shim's 2
    /// multiprocessors: two 256-token stages, the second a partial batch)
    /// with skipped ids (< 0). Fresh random inputs (seed printed).
    #[test]
    fn lora_down_and_up_match_f64_across_their_staging_steps() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("lora_small seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let rel = |got: &[f32], want: &[f64]| {
            let diff: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
            let norm: f64 = want.iter().map(|b| b * b).sum();
            (diff / norm).sqrt()
        };
        let exec = HostExec::default();

        let (rows, d, r) = (300usize, 600usize, 20usize);
        let cfg = LoraConfig::builder(50, d, r).build().unwrap();
        let (x, vh) = (draw(rows * d), draw(r * d));
        let mut out = vec![f32::NAN; rows * r];
        ops::lora_down(&exec, &cfg, DType::F32, DType::F32, addr(&x), addr(&vh), out.as_mut_ptr() as u64, rows, 0.5)
            .unwrap();
        let want: Vec<f64> = (0..rows * r)
            .map(|i| 0.5 * (0..d).map(|k| x[i / r * d + k] as f64 * vh[i % r * d + k] as f64).sum::<f64>())
            .collect();
        let err = rel(&out, &want);
        assert!(err < 1e-5, "lora_down rel err {err} (seed {seed})");

        let (v, d, t) = (50usize, 40usize, 2100usize);
        let cfg = LoraConfig::builder(v, d, r).build().unwrap();
        let (u, y, base) = (draw(v * r), draw(t * d), draw(r * d));
        let ids: Vec<i32> = (0..t).map(|i| if i % 7 == 3 { -1 } else { ((i * 31 + i / 5) % v) as i32 }).collect();
        let mut grad = base.clone();
        ops::lora_up(&exec, &cfg, DType::F32, addr(&u), addr(&ids), addr(&y), grad.as_mut_ptr() as u64, t, 0.25)
            .unwrap();
        let added: Vec<f32> = grad.iter().zip(&base).map(|(g, b)| g - b).collect();
        let want: Vec<f64> = (0..r * d)
            .map(|i| {
                let (j, k) = (i / d, i % d);
                let dot = (0..t)
                    .filter(|&tt| ids[tt] >= 0)
                    .map(|tt| u[ids[tt] as usize * r + j] as f64 * y[tt * d + k] as f64)
                    .sum::<f64>();
                0.25 * dot
            })
            .collect();
        let err = rel(&added, &want);
        assert!(err < 1e-5, "lora_up rel err {err} (seed {seed})");
    }

    /// Deferred id errors (`Cuda::with_deferred_id_errors`, here through the
    /// shim): the embedding ops return Ok without reading the check back, bad
    /// ids touch no memory (NaN rows, dropped tokens), and the record holds the
    /// first bad call's count, index and value; later bad calls only add to
    /// the count. Good rows and gradients equal the checked ops' on the same
    /// tokens without the bad ones.
    #[test]
    fn deferred_id_errors_record_the_first_bad_id() {
        let (v, d, r) = (50usize, 24usize, 4usize);
        let cfg = LoraConfig::builder(v, d, r).alpha(8.0).build().unwrap();
        let w: Vec<f32> = (0..v * d).map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5).collect();
        let u: Vec<f32> = (0..v * r).map(|i| ((i * 104_729) % 991) as f32 / 991.0 - 0.5).collect();
        let vh: Vec<f32> = (0..r * d).map(|i| ((i * 1299) % 983) as f32 / 983.0 - 0.5).collect();
        let wt = WeightAddrs { w: addr(&w), u: addr(&u), vh: addr(&vh) };
        let mut ids: Vec<u32> = (0..40u32).map(|t| (t * 13) % v as u32).collect();
        ids[7] = v as u32 + 3;
        ids[20] = u32::MAX;
        let good: Vec<usize> = (0..ids.len()).filter(|&t| t != 7 && t != 20).collect();
        let mut record = vec![0i64; ops::ID_RECORD_LEN];
        let exec = HostExec { deferred_id_record: Some(record.as_mut_ptr() as u64), ..HostExec::default() };

        let mut out = vec![0f32; ids.len() * d];
        ops::embed_forward(&exec, &cfg, DType::F32, wt, addr(&ids), IdKind::U32, out.as_mut_ptr() as u64, ids.len())
            .expect("deferred: no error at the call");
        assert_eq!(record, [2, i64::from(ops::DEFERRED_ARG_IDS), 7, v as i64 + 3, v as i64, 0, 0, 0]);
        let ids_good: Vec<u32> = good.iter().map(|&t| ids[t]).collect();
        let mut want = vec![0f32; ids_good.len() * d];
        let checked = HostExec::default();
        ops::embed_forward(
            &checked,
            &cfg,
            DType::F32,
            wt,
            addr(&ids_good),
            IdKind::U32,
            want.as_mut_ptr() as u64,
            good.len(),
        )
        .unwrap();
        for (k, &t) in good.iter().enumerate() {
            assert_eq!(out[t * d..(t + 1) * d], want[k * d..(k + 1) * d], "row {t}");
        }
        assert!(out[7 * d..8 * d].iter().chain(&out[20 * d..21 * d]).all(|x| x.is_nan()));

        // The backward, on other bad ids (3 and 20): their tokens are dropped,
        // the count grows, the record keeps the first call's index and value.
        let mut ids_b = ids.clone();
        (ids_b[7], ids_b[3]) = (1, v as u32 + 9);
        let good_b: Vec<usize> = (0..ids_b.len()).filter(|&t| t != 3 && t != 20).collect();
        let de: Vec<f32> = (0..ids_b.len() * d).map(|i| ((i * 31) % 101) as f32 / 101.0 - 0.5).collect();
        let (mut du, mut dvh) = (vec![0f32; v * r], vec![0f32; r * d]);
        let grads = GradAddrs { u: du.as_mut_ptr() as u64, vh: dvh.as_mut_ptr() as u64, w: None };
        ops::embed_backward(&exec, &cfg, DType::F32, wt, addr(&ids_b), IdKind::U32, addr(&de), grads, ids_b.len())
            .unwrap();
        assert_eq!(record, [4, i64::from(ops::DEFERRED_ARG_IDS), 7, v as i64 + 3, v as i64, 0, 0, 0]);
        let ids_good: Vec<u32> = good_b.iter().map(|&t| ids_b[t]).collect();
        let de_good: Vec<f32> = good_b.iter().flat_map(|&t| de[t * d..(t + 1) * d].iter().copied()).collect();
        let (mut du_w, mut dvh_w) = (vec![0f32; v * r], vec![0f32; r * d]);
        let grads = GradAddrs { u: du_w.as_mut_ptr() as u64, vh: dvh_w.as_mut_ptr() as u64, w: None };
        ops::embed_backward(
            &checked,
            &cfg,
            DType::F32,
            wt,
            addr(&ids_good),
            IdKind::U32,
            addr(&de_good),
            grads,
            good_b.len(),
        )
        .unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));
        assert!(close(&du, &du_w) && close(&dvh, &dvh_w));
        assert!(du.iter().any(|&x| x != 0.0), "the backward did run");

        // Checked (the default): the same bad ids are an error at the call.
        let err = ops::embed_forward(
            &checked,
            &cfg,
            DType::F32,
            wt,
            addr(&ids),
            IdKind::U32,
            out.as_mut_ptr() as u64,
            ids.len(),
        )
        .unwrap_err();
        assert_eq!(err, Error::TokenOutOfRange { arg: "ids", index: 7, value: v as i64 + 3, vocab: v });
    }

    /// The deferred embedding forward is one launch that checks and records
    /// its own bad ids: on grids of several blocks in both directions (d =
    /// 300 is 3 column blocks of f32, and each id is loaded by the column
    /// blocks, which must count it once), on the generic path (d = 301), for
    /// u32 and i64 ids, with bad ids in several blocks of tokens, the record
    /// holds the exact count, the smallest bad index and its value, and its
    /// per-launch words are cleared for the next launch.
    #[test]
    fn deferred_embed_forward_records_bad_ids_in_one_launch() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        println!("deferred embed seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (v, r) = (70usize, 5usize);
        for (d, tokens) in [(24usize, 9usize), (300, 700), (301, 333)] {
            let cfg = LoraConfig::builder(v, d, r).alpha(4.0).build().unwrap();
            let w: Vec<f32> = (0..v * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let u: Vec<f32> = (0..v * r).map(|_| rng.random_range(-1.0..1.0)).collect();
            let vh: Vec<f32> = (0..r * d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wt = WeightAddrs { w: addr(&w), u: addr(&u), vh: addr(&vh) };
            let ids: Vec<i64> = (0..tokens).map(|_| rng.random_range(0..v as i64)).collect();
            // Bad ids: past the vocabulary, negative (i64) or huge, in several token blocks.
            let mut bad: Vec<usize> = (0..1 + tokens / 100).map(|_| rng.random_range(0..tokens)).collect();
            bad.sort_unstable();
            bad.dedup();
            let bad_value = |k: usize| match k % 3 {
                0 => v as i64,
                1 => -1 - k as i64,
                _ => i64::from(u32::MAX),
            };
            let mut ids_bad = ids.clone();
            for (k, &t) in bad.iter().enumerate() {
                ids_bad[t] = bad_value(k);
            }
            for kind in [IdKind::U32, IdKind::I64] {
                let raw: Vec<u8> = match kind {
                    IdKind::U32 => ids_bad.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect(),
                    IdKind::I64 => ids_bad.iter().flat_map(|&x| x.to_le_bytes()).collect(),
                };
                let first_value = match kind {
                    IdKind::U32 => i64::from(bad_value(0) as u32),
                    IdKind::I64 => bad_value(0),
                };
                let raw_ok: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
                let mut want = vec![f32::NAN; tokens * d];
                ops::embed_forward(
                    &HostExec::default(),
                    &cfg,
                    DType::F32,
                    wt,
                    addr(&raw_ok),
                    IdKind::U32,
                    want.as_mut_ptr() as u64,
                    tokens,
                )
                .unwrap();
                let mut record = vec![0i64; ops::ID_RECORD_LEN];
                let exec = HostExec { deferred_id_record: Some(record.as_mut_ptr() as u64), ..HostExec::default() };
                for call in 1..=2i64 {
                    let mut out = vec![0f32; tokens * d];
                    ops::embed_forward(&exec, &cfg, DType::F32, wt, addr(&raw), kind, out.as_mut_ptr() as u64, tokens)
                        .unwrap();
                    let n = bad.len() as i64;
                    let arg = i64::from(ops::DEFERRED_ARG_IDS);
                    let expect = [call * n, arg, bad[0] as i64, first_value, v as i64, 0, 0, 0];
                    assert_eq!(record, expect, "d {d} T {tokens} {kind:?} call {call} (seed {seed})");
                    for tt in 0..tokens {
                        let row = &out[tt * d..(tt + 1) * d];
                        if bad.binary_search(&tt).is_ok() {
                            assert!(row.iter().all(|x| x.is_nan()), "bad row {tt} is NaN (seed {seed})");
                        } else {
                            assert_eq!(row, &want[tt * d..(tt + 1) * d], "row {tt} (seed {seed})");
                        }
                    }
                }
                // The backward's validation launch (blocks of 256 ids) records the same way.
                let mut record = vec![0i64; ops::ID_RECORD_LEN];
                let exec = HostExec { deferred_id_record: Some(record.as_mut_ptr() as u64), ..HostExec::default() };
                let de: Vec<f32> = (0..tokens * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut du, mut dvh) = (vec![0f32; v * r], vec![0f32; r * d]);
                let grads = GradAddrs { u: du.as_mut_ptr() as u64, vh: dvh.as_mut_ptr() as u64, w: None };
                ops::embed_backward(&exec, &cfg, DType::F32, wt, addr(&raw), kind, addr(&de), grads, tokens).unwrap();
                let arg = i64::from(ops::DEFERRED_ARG_IDS);
                let expect = [bad.len() as i64, arg, bad[0] as i64, first_value, v as i64, 0, 0, 0];
                assert_eq!(record, expect, "backward: d {d} T {tokens} {kind:?} (seed {seed})");
                assert!(du.iter().all(|x| x.is_finite()) && dvh.iter().any(|&x| x != 0.0));
            }
        }
    }
}
