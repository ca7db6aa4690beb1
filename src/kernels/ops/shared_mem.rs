//! Dynamic shared memory of the GEMM kernels' plans, the same formulas as
//! the kernel headers (`kernels/tile_gemm.cuh`, `kernels/wg_gemm.cuh`).

/// Dynamic shared memory of `tl::GemmShape` in `kernels/tile_gemm.cuh` (same formula).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_shared_bytes(
    elem: usize,
    bm: usize,
    bn: usize,
    bk: usize,
    a_col: bool,
    b_col: bool,
    rx: usize,
    stages: usize,
) -> u32 {
    let pad = 16 / elem;
    let (a_out, a_in) = if a_col { (bk, bm) } else { (bm, bk) };
    let (b_out, b_in) = if b_col { (bn, bk) } else { (bk, bn) };
    let x = if rx > 0 { bk * (rx + pad) } else { 0 };
    let tile = (a_out * (a_in + pad) + b_out * (b_in + pad) + x) * elem * stages;
    let epi = (bm * rx + 8 * 256) * 4;
    tile.max(epi) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel (kernels/wg_gemm.cuh,
/// `WgShape::SMEM_BYTES`): `stages` slots of a 128-row A tile and a `bn`-row B
/// tile, 128 bytes per row, plus 1024 bytes to align the slots.
#[cfg(feature = "experimental-kernels")]
pub(super) fn wg_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 + bn) * 128 * stages + 1024) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel with an N-major B
/// (`WgBNMajor<CT, bn, RX>` on `stages` slots): a 128-row A tile and
/// `bn / 64 + 1` B atoms of 8 KiB per slot, plus 1024 bytes of alignment.
#[cfg(feature = "experimental-kernels")]
pub(super) fn wg_nmajor_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 * 128 + (bn / 64 + 1) * 8192) * stages + 1024) as u32
}

/// Dynamic shared memory of a `wg_gemm` kernel with an M-major A and an
/// N-major B of `bn` columns (`WgShapeMN`): per slot a 128-column A tile (16
/// KiB) and `bn / 64` B atoms of 8 KiB, plus 1024 bytes of alignment.
#[cfg(feature = "experimental-kernels")]
pub(super) fn wg_mn_shared_bytes(bn: usize, stages: usize) -> u32 {
    ((128 * 128 + bn / 64 * 8192) * stages + 1024) as u32
}
