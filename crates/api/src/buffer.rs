//! Bytes that may be large (request bodies, uploaded and base64-decoded images): small ones on the
//! allocator, large ones in pages mapped for them alone, which go back to the OS as soon as the last
//! reference to them drops. The `imagegate` binary's allocator keeps what it frees for the engine to
//! reuse, so without this one burst of large uploads would stay in the process for its lifetime.

use bytes::Bytes;
use memmap2::MmapMut;

/// Buffers from this size on are mapped. Lower than decoded images' threshold: a body grows by doubling
/// until it moves to its map, and what it took on the way stays with the allocator, for every upload at
/// once (12 concurrent 60 MiB uploads kept 96 MiB with an 8 MiB threshold); a map of a megabyte or
/// more costs little next to receiving it.
pub const MAPPED_MIN_BYTES: usize = 1024 * 1024;

/// A buffer filled by appending, at most `limit` bytes long.
pub struct ByteBuffer {
    storage: Storage,
    limit: usize,
}

enum Storage {
    Heap(Vec<u8>),
    /// A map of `limit` bytes, of which the first `len` are written (only written pages take memory).
    Mapped {
        map: MmapMut,
        len: usize,
    },
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Heap(v) => v,
            Storage::Mapped { map, len } => &map[..*len],
        }
    }
}

/// Appending would pass the buffer's limit.
#[derive(Debug)]
pub struct TooLarge;

/// What a finished buffer's [`Bytes`] own: its storage and whatever must live as long as it does.
struct Owner<G> {
    storage: Storage,
    _guard: G,
}

impl<G> AsRef<[u8]> for Owner<G> {
    fn as_ref(&self) -> &[u8] {
        self.storage.as_slice()
    }
}

impl ByteBuffer {
    /// An empty buffer that will hold at most `limit` bytes.
    pub fn new(limit: usize) -> ByteBuffer {
        ByteBuffer { storage: Storage::Heap(Vec::new()), limit }
    }

    /// `len` zeroed bytes (mapped when large), to be written through [`ByteBuffer::as_mut_slice`] and
    /// cut to what was written with [`ByteBuffer::truncate`].
    pub fn zeroed(len: usize) -> std::io::Result<ByteBuffer> {
        let storage = if len < MAPPED_MIN_BYTES {
            Storage::Heap(vec![0; len])
        } else {
            Storage::Mapped { map: MmapMut::map_anon(len)?, len }
        };
        Ok(ByteBuffer { storage, limit: len })
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        self.storage.as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(v) => v,
            Storage::Mapped { map, len } => &mut map[..*len],
        }
    }

    /// Keeps the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        match &mut self.storage {
            Storage::Heap(v) => v.truncate(len),
            Storage::Mapped { len: written, .. } => *written = len.min(*written),
        }
    }

    /// Appends `data`, moving the contents to a map of `limit` bytes once they reach
    /// [`MAPPED_MIN_BYTES`]. `Ok(Err(TooLarge))` when the buffer would pass its limit (nothing is
    /// appended); `Err` when the map cannot be made.
    pub fn extend_from_slice(&mut self, data: &[u8]) -> std::io::Result<Result<(), TooLarge>> {
        let len = self.len();
        let Some(new_len) = len.checked_add(data.len()).filter(|n| *n <= self.limit) else { return Ok(Err(TooLarge)) };
        if let Storage::Heap(v) = &self.storage
            && new_len >= MAPPED_MIN_BYTES
        {
            let mut map = MmapMut::map_anon(self.limit)?;
            map[..v.len()].copy_from_slice(v);
            self.storage = Storage::Mapped { map, len };
        }
        match &mut self.storage {
            Storage::Heap(v) => v.extend_from_slice(data),
            Storage::Mapped { map, len } => {
                map[*len..new_len].copy_from_slice(data);
                *len = new_len;
            }
        }
        Ok(Ok(()))
    }

    /// The contents as [`Bytes`] (a mapped buffer is unmapped when the last clone drops).
    pub fn into_bytes(self) -> Bytes {
        self.into_bytes_with(())
    }

    /// The contents as [`Bytes`] that keep `guard` alive until the last clone drops (a reservation of
    /// the memory they take, say).
    pub fn into_bytes_with<G: Send + 'static>(self, guard: G) -> Bytes {
        Bytes::from_owner(Owner { storage: self.storage, _guard: guard })
    }

    /// Whether the contents live in a map of their own (tests).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn small_contents_stay_on_the_heap_and_large_ones_move_to_a_map_intact() {
        let mut buffer = ByteBuffer::new(3 * MAPPED_MIN_BYTES);
        let chunk: Vec<u8> = (0..=255u8).cycle().take(MAPPED_MIN_BYTES / 2 + 7).collect();
        buffer.extend_from_slice(&chunk).unwrap().unwrap();
        assert!(!buffer.is_mapped());
        buffer.extend_from_slice(&chunk).unwrap().unwrap();
        assert!(buffer.is_mapped(), "past the threshold");
        buffer.extend_from_slice(b"end").unwrap().unwrap();
        let expected: Vec<u8> = chunk.iter().chain(&chunk).chain(b"end").copied().collect();
        assert_eq!(buffer.into_bytes(), expected);
    }

    #[test]
    fn the_limit_is_never_passed() {
        let mut buffer = ByteBuffer::new(10);
        buffer.extend_from_slice(b"0123456789").unwrap().unwrap();
        assert!(buffer.extend_from_slice(b"x").unwrap().is_err());
        assert_eq!(buffer.as_slice(), b"0123456789", "nothing appended");
        let mut big = ByteBuffer::new(MAPPED_MIN_BYTES);
        assert!(big.extend_from_slice(&vec![1; MAPPED_MIN_BYTES + 1]).unwrap().is_err());
        assert!(big.is_empty() && !big.is_mapped());
    }

    #[test]
    fn zeroed_buffers_are_cut_to_what_was_written() {
        for len in [16, MAPPED_MIN_BYTES + 16] {
            let mut buffer = ByteBuffer::zeroed(len).unwrap();
            assert_eq!(buffer.is_mapped(), len >= MAPPED_MIN_BYTES);
            buffer.as_mut_slice()[..3].copy_from_slice(b"abc");
            buffer.truncate(3);
            assert_eq!(buffer.into_bytes(), &b"abc"[..]);
        }
    }

    #[test]
    fn the_guard_lives_as_long_as_the_last_clone() {
        let guard = Arc::new(());
        let mut buffer = ByteBuffer::new(MAPPED_MIN_BYTES * 2);
        buffer.extend_from_slice(&vec![7; MAPPED_MIN_BYTES]).unwrap().unwrap();
        let bytes = buffer.into_bytes_with(guard.clone());
        let clone = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(Arc::strong_count(&guard), 2, "a clone still holds it");
        assert_eq!(clone, vec![7; 10]);
        drop(clone);
        assert_eq!(Arc::strong_count(&guard), 1, "given back with the last clone");
    }
}
