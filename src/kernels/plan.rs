//! [`LaunchPlan`]: the one description of a kernel launch that both executors
//! consume, the GPU (cudarc) and the CPU shim (`kernels/shim/cuda_shim.h`).

use std::fmt;

/// Grid, block and dynamic shared memory of one launch of one kernel.
///
/// The kernel's arguments are one `#[repr(C)]` params struct passed next to
/// the plan (see `kernels/common.cuh` for the ABI); the same plan and struct go
/// to [`crate::kernels::shim::launch`] on the CPU and to the GPU launcher, so
/// both run the identical launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaunchPlan {
    /// The kernel's symbol (`extern "C"` name in `kernels/*.cu`).
    pub kernel: &'static str,
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes (`TL_DYNAMIC_SMEM`).
    pub shared_bytes: u32,
}

impl LaunchPlan {
    /// A 1-D launch: `grid` blocks of `block` threads, no dynamic shared memory.
    pub const fn linear(kernel: &'static str, grid: u32, block: u32) -> Self {
        LaunchPlan { kernel, grid: (grid, 1, 1), block: (block, 1, 1), shared_bytes: 0 }
    }

    /// The same plan with `bytes` of dynamic shared memory.
    pub const fn with_shared_bytes(self, bytes: u32) -> Self {
        LaunchPlan { shared_bytes: bytes, ..self }
    }

    /// Threads per block (product of the block dimensions).
    pub fn threads_per_block(&self) -> u64 {
        u64::from(self.block.0) * u64::from(self.block.1) * u64::from(self.block.2)
    }

    /// Blocks in the grid (product of the grid dimensions).
    pub fn blocks(&self) -> u64 {
        u64::from(self.grid.0) * u64::from(self.grid.1) * u64::from(self.grid.2)
    }

    /// Blocks needed to cover `n` items with `per_block` items per block.
    pub fn blocks_for(n: usize, per_block: u32) -> u32 {
        let per_block = per_block.max(1) as usize;
        u32::try_from(n.div_ceil(per_block)).unwrap_or(u32::MAX)
    }
}

impl fmt::Display for LaunchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}<<<({}, {}, {}), ({}, {}, {}), {} B>>>",
            self.kernel,
            self.grid.0,
            self.grid.1,
            self.grid.2,
            self.block.0,
            self.block.1,
            self.block.2,
            self.shared_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_display() {
        let p = LaunchPlan { kernel: "k", grid: (3, 2, 1), block: (32, 4, 2), shared_bytes: 64 };
        assert_eq!(p.threads_per_block(), 256);
        assert_eq!(p.blocks(), 6);
        assert_eq!(p.to_string(), "k<<<(3, 2, 1), (32, 4, 2), 64 B>>>");
        assert_eq!(LaunchPlan::blocks_for(1000, 256), 4);
        assert_eq!(LaunchPlan::linear("k", 4, 128).with_shared_bytes(8).shared_bytes, 8);
    }
}
