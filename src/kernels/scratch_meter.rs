//! Counts the scratch memory the kernel ops allocate: the running total, the
//! bytes live now and the peak of live bytes, which is what a memory bound
//! is about (an op that allocates one block of scratch per loop iteration and
//! frees it before the next has a peak of one block, whatever its total).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Scratch counters of one executor (the CUDA backend's, or one host thread's).
/// Every request is counted as at least 16 bytes, as allocated.
#[derive(Debug, Default)]
pub struct ScratchMeter {
    allocated: AtomicUsize,
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl ScratchMeter {
    /// A meter at zero.
    pub const fn new() -> Self {
        ScratchMeter { allocated: AtomicUsize::new(0), live: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
    }

    /// Counts an allocation of `bytes`.
    pub fn alloc(&self, bytes: usize) {
        self.allocated.fetch_add(bytes, Ordering::Relaxed);
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    /// Counts the release of an allocation of `bytes` (saturating: a meter
    /// never wraps, whatever the order of drops).
    pub fn free(&self, bytes: usize) {
        let _ = self.live.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l.saturating_sub(bytes)));
    }

    /// Total bytes allocated so far.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Bytes allocated and not yet released.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`ScratchMeter::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from the bytes live now (between ops: 0), and
    /// returns the old one.
    pub fn reset_peak(&self) -> usize {
        self.peak.swap(self.live(), Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::ScratchMeter;

    #[test]
    fn peak_is_the_most_live_at_once_not_the_total() {
        let m = ScratchMeter::new();
        m.alloc(100);
        for _ in 0..5 {
            m.alloc(40);
            m.free(40);
        }
        assert_eq!((m.allocated(), m.live(), m.peak()), (300, 100, 140));
        m.free(100);
        assert_eq!(m.reset_peak(), 140);
        assert_eq!((m.live(), m.peak()), (0, 0));
        m.alloc(8);
        assert_eq!(m.peak(), 8);
        m.free(50); // more than live: saturates at 0
        assert_eq!(m.live(), 0);
    }
}
