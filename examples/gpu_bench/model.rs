//! The benchmark's tied weight, LoRA factors and token ids on the device.

use super::*;

/// One shape's persistent inputs (allocated and filled outside any measurement).
pub(crate) struct Model {
    pub(crate) shape: Shape,
    pub(crate) cfg: LoraConfig,
    pub(crate) s: f32,
    pub(crate) c: f32,
    pub(crate) w: CudaSlice<bf16>,
    pub(crate) u: CudaSlice<f32>,
    pub(crate) vh: CudaSlice<f32>,
    /// bf16 copies of U and Vh for the unfused (bf16 adapter) baselines.
    pub(crate) u_b: CudaSlice<bf16>,
    pub(crate) vh_b: CudaSlice<bf16>,
}

impl Model {
    pub(crate) fn new(gpu: &Gpu, shape: Shape) -> Res<Self> {
        let (v, d, r) = (shape.vocab, shape.hidden, shape.rank);
        let cfg =
            LoraConfig::builder(v, d, r).alpha(shape.alpha).embed_scale(shape.embed_scale).build().ctx("LoraConfig")?;
        let mut w = gpu.alloc::<bf16>(v * d)?;
        gpu.fill_bf16(&mut w, 0.05, 1)?;
        let mut u = gpu.alloc::<f32>(v * r)?;
        gpu.fill_f32(&mut u, 0.05, 2)?;
        let mut vh = gpu.alloc::<f32>(r * d)?;
        gpu.fill_f32(&mut vh, 0.1, 3)?;
        let u_b = gpu.cast_bf16(&u)?;
        let vh_b = gpu.cast_bf16(&vh)?;
        Ok(Model { shape, s: cfg.scale() as f32, c: cfg.embed_scale() as f32, cfg, w, u, vh, u_b, vh_b })
    }

    pub(crate) fn weights(&self) -> Weights<'_, Cuda, bf16> {
        Weights { w: self.w.as_view(), lora_vocab: self.u.as_view(), lora_hidden: self.vh.as_view() }
    }

    pub(crate) fn dims(&self) -> (usize, usize, usize, usize) {
        (self.shape.tokens, self.shape.vocab, self.shape.hidden, self.shape.rank)
    }
}

pub(crate) fn make_ids(gpu: &Gpu, tokens: usize, vocab: usize, seed: u64) -> Res<(Ids, Vec<u32>)> {
    // xorshift64*: uniform ids, reproducible.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let host: Vec<u32> = (0..tokens)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % vocab as u64) as u32
        })
        .collect();
    let buf = gpu.stream.clone_htod(&host).ctx("upload ids")?;
    Ok((Ids { buf, vocab }, host))
}
