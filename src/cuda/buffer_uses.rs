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

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop};

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
    pub(crate) fn read<T>(&mut self, v: &'a CudaView<'_, T>) -> u64 {
        let (ptr, guard) = v.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// The device address of a buffer the op writes (or adds into).
    pub(crate) fn write<T>(&mut self, v: &'a mut CudaViewMut<'_, T>) -> u64 {
        let (ptr, guard) = v.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }
}
