//! The process's budget of decoded input-image bytes. An edit's images are small on the wire and can be
//! huge decoded (a 500 KB PNG at the pixel limit decodes to 512 MB), so the memory that concurrent
//! edits decode at once is bounded here, over all requests: each decode reserves its exact buffer size
//! (read from the image's header, `api::images::ProbedImage::decoded_bytes`) for as long as it runs,
//! and a request that finds no room within `Limits::decode_wait` gets a 503 to retry.

use std::sync::Arc;

use api::ApiError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The budget is counted in KiB: a semaphore's permits are counted in `u32` per acquisition.
const UNIT: u64 = 1024;

/// Seconds a refused client is told to wait: decodes take a second or two.
const RETRY_AFTER_SECS: u64 = 1;

/// Decoded bytes in flight, shared by every request of the process (clones share it).
#[derive(Clone, Debug)]
pub struct DecodeBudget {
    semaphore: Arc<Semaphore>,
    total_units: u32,
}

/// Room for one decode in the budget, given back when dropped.
#[derive(Debug)]
#[must_use = "the room is given back as soon as the reservation is dropped"]
pub struct DecodeReservation {
    _permit: OwnedSemaphorePermit,
}

impl DecodeBudget {
    /// A budget of `max_bytes` (rounded up to a KiB).
    pub fn new(max_bytes: u64) -> DecodeBudget {
        let total_units = u32::try_from(max_bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        DecodeBudget { semaphore: Arc::new(Semaphore::new(total_units as usize)), total_units }
    }

    /// The whole budget, in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    /// What no decode holds now, in bytes.
    pub fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }

    /// Reserves `bytes` (all of the budget if it is smaller), waiting until `deadline` for room; then a
    /// 503 `server_busy` with `Retry-After`. Waiting requests are served first come, first served.
    pub async fn reserve(&self, bytes: u64, deadline: Instant) -> Result<DecodeReservation, ApiError> {
        let units = self.units(bytes);
        // `timeout_at` polls the acquisition before the clock: room that is free is taken even when
        // the deadline has passed (the later images of a request that waited for its first).
        match tokio::time::timeout_at(deadline, self.semaphore.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(DecodeReservation { _permit: permit }),
            // Timed out (the semaphore is never closed).
            _ => Err(api::images::decode_busy(RETRY_AFTER_SECS)),
        }
    }

    /// Reserves `bytes` if there is room now (tests hold the budget with it).
    pub fn try_reserve(&self, bytes: u64) -> Option<DecodeReservation> {
        let units = self.units(bytes);
        self.semaphore.clone().try_acquire_many_owned(units).ok().map(|permit| DecodeReservation { _permit: permit })
    }

    fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).min(self.total_units)
    }
}
