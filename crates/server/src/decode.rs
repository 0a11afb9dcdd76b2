//! The process's budget of decoded input-image bytes. An edit's images are small on the wire and can be
//! huge decoded (a 500 KB PNG at the pixel limit decodes to 512 MB), so the memory that concurrent
//! edits decode at once is bounded here, over all requests: each decode reserves its exact buffer size
//! (read from the image's header, `api::images::ProbedImage::decoded_bytes`) for as long as it runs,
//! and a request that finds no room within `Limits::decode_wait` gets a 503 to retry.

use api::ApiError;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::budget::ByteBudget;

/// Seconds a refused client is told to wait: decodes take a second or two.
const RETRY_AFTER_SECS: u64 = 1;

/// Decoded bytes in flight, shared by every request of the process (clones share it).
#[derive(Clone, Debug)]
pub struct DecodeBudget(ByteBudget);

/// Room for one decode in the budget, given back when dropped.
#[derive(Debug)]
#[must_use = "the room is given back as soon as the reservation is dropped"]
pub struct DecodeReservation {
    _permit: OwnedSemaphorePermit,
}

impl DecodeBudget {
    /// A budget of `max_bytes` (rounded up to a KiB).
    pub fn new(max_bytes: u64) -> DecodeBudget {
        DecodeBudget(ByteBudget::new(max_bytes))
    }

    /// The whole budget, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.0.total_bytes()
    }

    /// What no decode holds now, in bytes.
    pub fn available_bytes(&self) -> u64 {
        self.0.available_bytes()
    }

    /// Reserves `bytes` (all of the budget if it is smaller), waiting until `deadline` for room; then a
    /// 503 `server_busy` with `Retry-After`. Waiting requests are served first come, first served.
    pub async fn reserve(&self, bytes: u64, deadline: Instant) -> Result<DecodeReservation, ApiError> {
        match self.0.acquire(self.0.units(bytes), deadline).await {
            Some(permit) => Ok(DecodeReservation { _permit: permit }),
            None => Err(api::images::decode_busy(RETRY_AFTER_SECS)),
        }
    }

    /// Reserves `bytes` if there is room now (tests hold the budget with it).
    pub fn try_reserve(&self, bytes: u64) -> Option<DecodeReservation> {
        self.0.try_acquire(self.0.units(bytes)).map(|permit| DecodeReservation { _permit: permit })
    }
}
