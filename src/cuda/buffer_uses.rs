//! [`BufferUses`]: the caller's buffers of one op, as cudarc wants them used
//! across streams.
//!
//! cudarc (with its default event tracking, active once a context has a
//! second stream) makes a stream wait for a buffer's earlier writes when its
//! address is taken, and records the buffer's use on that stream when the
//! returned guard drops. The guard must therefore live until every launch
//! that reads or writes the buffer is enqueued: dropped at once, the recorded
//! use would precede the op's kernels, and another stream of the trainer (an
//! optimizer step, a copy) could read a gradient or overwrite an input while
//! the kernels still run.
//!
//! It also refuses a buffer of another CUDA context (another GPU, or a
//! context other than the device's primary one): cudarc would hand out its
//! address all the same, and a kernel of ours dereferencing it would fault
//! and leave the context unusable.

use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop,
};

/// The addresses of one op's buffers on the backend's stream, with their
/// cudarc guards held until this value drops (after the op has enqueued its
/// launches).
pub(crate) struct BufferUses<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> BufferUses<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        BufferUses { stream, guards: Vec::with_capacity(8) }
    }

    /// The device address of a buffer the op reads.
    pub(crate) fn read<T>(&mut self, arg: &'static str, v: &'a CudaView<'_, T>) -> Result<u64> {
        self.check(arg, v.stream().context())?;
        let (ptr, guard) = v.device_ptr(self.stream);
        self.guards.push(guard);
        Ok(ptr)
    }

    /// The device address of a buffer the op writes (or adds into).
    pub(crate) fn write<T>(&mut self, arg: &'static str, v: &'a mut CudaViewMut<'_, T>) -> Result<u64> {
        self.check(arg, v.stream().context())?;
        let (ptr, guard) = v.device_ptr_mut(self.stream);
        self.guards.push(guard);
        Ok(ptr)
    }

    /// `Err(WrongDevice)` unless the buffer's context is the stream's.
    fn check(&self, arg: &'static str, ctx: &CudaContext) -> Result<()> {
        let ours = self.stream.context();
        if ctx.cu_ctx() == ours.cu_ctx() {
            return Ok(());
        }
        let place = |c: &CudaContext| {
            if c.ordinal() == ours.ordinal() && c.ordinal() == ctx.ordinal() {
                format!("device {} (context {:p})", c.ordinal(), c.cu_ctx())
            } else {
                format!("device {}", c.ordinal())
            }
        };
        Err(Error::WrongDevice { arg, buffer: place(ctx), backend: place(ours) })
    }
}
