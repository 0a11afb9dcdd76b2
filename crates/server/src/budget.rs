//! A process-wide budget of bytes in memory, for [`crate::decode`] and [`crate::body`]: a FIFO
//! semaphore counted in KiB (a semaphore's permits are counted in `u32` per acquisition).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

const UNIT: u64 = 1024;

/// Bytes in memory, shared by every request of the process (clones share it).
#[derive(Clone, Debug)]
pub(crate) struct ByteBudget {
    semaphore: Arc<Semaphore>,
    total_units: u32,
}

impl ByteBudget {
    /// A budget of `max_bytes` (rounded up to a KiB).
    pub(crate) fn new(max_bytes: u64) -> ByteBudget {
        let total_units = u32::try_from(max_bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        ByteBudget { semaphore: Arc::new(Semaphore::new(total_units as usize)), total_units }
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    pub(crate) fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }

    /// The units `bytes` take (all of the budget if it is smaller).
    pub(crate) fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).min(self.total_units)
    }

    /// `units` of room, waiting until `deadline` (first come, first served); `None` when none came.
    pub(crate) async fn acquire(&self, units: u32, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        // `timeout_at` polls the acquisition before the clock: room that is free is taken even when
        // the deadline has passed (the later images of a request that waited for its first).
        match tokio::time::timeout_at(deadline, self.semaphore.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Some(permit),
            // Timed out (the semaphore is never closed).
            _ => None,
        }
    }

    /// `units` of room if there is room now.
    pub(crate) fn try_acquire(&self, units: u32) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().try_acquire_many_owned(units).ok()
    }
}
