//! The process's budget of request-body bytes in memory. Each request may send up to
//! `Limits::max_body_bytes`, but a thousand connections sending that much at once would take whatever
//! memory the machine has: the bytes of every body read whole (JSON bodies, multipart fields) count
//! here from the moment they arrive until the last copy of them is dropped (a body travels on to the
//! decoder and the upstream), and a request that finds no room within `Limits::decode_wait` gets a 503
//! to retry. Large bodies live in pages mapped for them alone ([`api::buffer`]), which return to the OS
//! when they are dropped.

use api::ApiError;
use api::buffer::ByteBuffer;
use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::budget::ByteBudget;

/// Seconds a refused client is told to wait.
const RETRY_AFTER_SECS: u64 = 1;

/// Body bytes in memory, shared by every request of the process (clones share it).
#[derive(Clone, Debug)]
pub struct BodyBudget(ByteBudget);

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the request's limit (413).
    TooLarge,
    /// No room in the budget in time (a 503 to retry), or no memory to map it.
    Busy(ApiError),
    /// The body itself failed: the connection broke, or its deadline passed.
    Read(String),
}

impl BodyBudget {
    /// A budget of `max_bytes` (rounded up to a KiB).
    pub fn new(max_bytes: u64) -> BodyBudget {
        BodyBudget(ByteBudget::new(max_bytes))
    }

    /// What no body holds now, in bytes.
    pub fn available_bytes(&self) -> u64 {
        self.0.available_bytes()
    }

    /// A collector of one body (or one multipart field) of at most `limit` bytes, waiting for room
    /// until `deadline`.
    pub fn collector(&self, limit: usize, deadline: Instant) -> Collector {
        Collector { budget: self.0.clone(), buffer: ByteBuffer::new(limit), permit: None, units: 0, deadline }
    }

    /// Reads `body` whole (see [`BodyBudget::collector`]).
    pub async fn read(&self, body: Body, limit: usize, deadline: Instant) -> Result<Bytes, BodyError> {
        let mut collector = self.collector(limit, deadline);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
            collector.push(&chunk).await?;
        }
        Ok(collector.finish())
    }
}

/// One body being read: its bytes so far and the room they hold in the budget.
pub struct Collector {
    budget: ByteBudget,
    buffer: ByteBuffer,
    permit: Option<OwnedSemaphorePermit>,
    units: u32,
    deadline: Instant,
}

impl Collector {
    /// Appends `chunk`, first taking room for it in the budget.
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        let len = self.buffer.len().saturating_add(chunk.len()) as u64;
        let needed = self.budget.units(len);
        if needed > self.units {
            let Some(permit) = self.budget.acquire(needed - self.units, self.deadline).await else {
                return Err(BodyError::Busy(busy()));
            };
            match &mut self.permit {
                Some(held) => held.merge(permit),
                None => self.permit = Some(permit),
            }
            self.units = needed;
        }
        match self.buffer.extend_from_slice(chunk) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(api::buffer::TooLarge)) => Err(BodyError::TooLarge),
            // Mapping fails only when the machine is out of memory.
            Err(_) => Err(BodyError::Busy(busy())),
        }
    }

    /// The bytes read, holding their room in the budget until the last copy of them is dropped.
    pub fn finish(self) -> Bytes {
        self.buffer.into_bytes_with(self.permit)
    }
}

fn busy() -> ApiError {
    let mut e = ApiError::new(
        503,
        "server_error",
        None,
        Some("server_busy"),
        "The server is receiving too many large requests at the moment. Please retry your request after a brief wait."
            .to_owned(),
    );
    e.retry_after = Some(RETRY_AFTER_SECS);
    e
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn a_body_holds_its_room_until_its_last_copy_drops() {
        let budget = BodyBudget::new(64 * 1024);
        let body = budget.read(Body::from(vec![3u8; 40 * 1024]), 1 << 20, soon()).await.unwrap();
        assert_eq!(body.len(), 40 * 1024);
        assert_eq!(budget.available_bytes(), 24 * 1024);
        let part = body.slice(..10);
        drop(body);
        assert_eq!(budget.available_bytes(), 24 * 1024, "a slice still holds the body");
        drop(part);
        assert_eq!(budget.available_bytes(), 64 * 1024);
    }

    #[tokio::test]
    async fn a_body_without_room_is_refused_with_a_503_and_takes_nothing() {
        let budget = BodyBudget::new(64 * 1024);
        let held = budget.read(Body::from(vec![1u8; 48 * 1024]), 1 << 20, soon()).await.unwrap();
        match budget.read(Body::from(vec![2u8; 32 * 1024]), 1 << 20, soon()).await {
            Err(BodyError::Busy(e)) => {
                assert_eq!((e.status, e.retry_after), (503, Some(RETRY_AFTER_SECS)));
                assert_eq!(e.body.code.as_deref(), Some("server_busy"));
            }
            other => panic!("expected a 503, got {other:?}"),
        }
        assert_eq!(budget.available_bytes(), 16 * 1024, "the refused body gave back what it took");
        drop(held);
        let body = budget.read(Body::from(vec![2u8; 32 * 1024]), 1 << 20, soon()).await.unwrap();
        assert_eq!(body.len(), 32 * 1024, "room again once the first body is gone");
    }

    #[tokio::test]
    async fn a_waiting_body_gets_the_room_another_gives_back() {
        let budget = BodyBudget::new(64 * 1024);
        let held = budget.read(Body::from(vec![1u8; 48 * 1024]), 1 << 20, soon()).await.unwrap();
        let waiting = {
            let budget = budget.clone();
            let deadline = Instant::now() + Duration::from_secs(600);
            tokio::spawn(async move { budget.read(Body::from(vec![2u8; 32 * 1024]), 1 << 20, deadline).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "it waits for room");
        drop(held);
        assert_eq!(waiting.await.unwrap().unwrap().len(), 32 * 1024);
    }

    #[tokio::test]
    async fn a_body_over_its_limit_is_too_large() {
        let budget = BodyBudget::new(1 << 20);
        let result = budget.read(Body::from(vec![0u8; 1001]), 1000, soon()).await;
        assert!(matches!(result, Err(BodyError::TooLarge)), "{result:?}");
        assert_eq!(budget.available_bytes(), 1 << 20);
    }
}
