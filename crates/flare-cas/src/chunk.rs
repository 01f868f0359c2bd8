//! Files as blobs: small files whole, large files split by content-defined chunking.
//!
//! Chunking is FastCDC-style: a gear rolling hash (`h = (h << 1) + GEAR[byte]`) looks
//! for a cut point after [`MIN_CHUNK`] bytes, with a stricter mask (22 bits) before
//! [`AVG_CHUNK`] and a looser one (18 bits) after it ("normalized chunking"), and a hard
//! cut at [`MAX_CHUNK`]. The top bits of the hash are tested, so a cut depends on the
//! last 64 bytes only: inserting or deleting bytes in a file moves the cut points near
//! the edit and leaves the others (and thus their chunks) the same.
//!
//! Files of at most [`WHOLE_FILE_MAX`] bytes are one blob (most files of a Python
//! environment), and an empty file has no chunks at all.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{io_ctx, CasError, Result};
use crate::store::BlobStore;

/// Files up to this size are stored as a single blob (1 MiB).
pub const WHOLE_FILE_MAX: u64 = 1 << 20;
/// No content-defined cut before this many bytes of a chunk (256 KiB).
pub const MIN_CHUNK: usize = 256 << 10;
/// Target average chunk size (1 MiB).
pub const AVG_CHUNK: usize = 1 << 20;
/// Hard upper bound of a chunk (4 MiB).
pub const MAX_CHUNK: usize = 4 << 20;

/// Cut when the top 22 bits are zero (before the average size: cuts are rarer).
const MASK_SMALL: u64 = !0u64 << (64 - 22);
/// Cut when the top 18 bits are zero (after the average size: cuts are likelier).
const MASK_LARGE: u64 = !0u64 << (64 - 18);

/// Gear table: 256 pseudo-random words from a fixed-seed splitmix64 (must never change,
/// or chunk boundaries, and so dedup against existing blobs, change).
const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x666c_6172_6563_6463; // "flarecdc"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// The length of the first chunk of `data`. `data` must hold at least [`MAX_CHUNK`]
/// bytes unless it is the end of the input.
pub fn cut_point(data: &[u8]) -> usize {
    let len = data.len();
    if len <= MIN_CHUNK {
        return len;
    }
    let max = len.min(MAX_CHUNK);
    let normal = len.min(AVG_CHUNK);
    let mut hash: u64 = 0;
    let mut i = MIN_CHUNK;
    while i < normal {
        hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
        if hash & MASK_SMALL == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < max {
        hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
        if hash & MASK_LARGE == 0 {
            return i + 1;
        }
        i += 1;
    }
    max
}

/// Splits a byte stream into content-defined chunks, holding at most `2 * MAX_CHUNK`
/// bytes in memory.
pub struct Chunker<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    /// Chunk everything `reader` yields.
    pub fn new(reader: R) -> Chunker<R> {
        Chunker { reader, buf: vec![0u8; 2 * MAX_CHUNK], start: 0, end: 0, eof: false }
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.end - self.start >= MAX_CHUNK || self.eof {
            return Ok(());
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < MAX_CHUNK && !self.eof {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The next chunk, or `None` at the end of the input.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        self.fill()?;
        if self.start == self.end {
            return Ok(None);
        }
        let cut = cut_point(&self.buf[self.start..self.end]);
        let chunk = &self.buf[self.start..self.start + cut];
        self.start += cut;
        Ok(Some(chunk))
    }
}

/// One piece of a file: `len` bytes at `offset`, stored as blob `digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub digest: Digest,
    pub offset: u64,
    pub len: u64,
}

/// A file's content: its size and the chunks that make it up, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

impl FileContent {
    /// Check that chunks are contiguous from 0 and add up to `size`.
    pub fn validate(&self) -> Result<()> {
        let mut expect = 0u64;
        for c in &self.chunks {
            if c.offset != expect || c.len == 0 {
                return Err(CasError::InvalidManifest(format!(
                    "chunk {} at offset {} (len {}) where offset {expect} was expected",
                    c.digest, c.offset, c.len
                )));
            }
            expect += c.len;
        }
        if expect != self.size {
            return Err(CasError::InvalidManifest(format!(
                "chunks add up to {expect}, size is {}",
                self.size
            )));
        }
        Ok(())
    }
}

/// Store the file at `path` (whole if small, chunked if large) and describe its content.
/// The size recorded is what was actually read.
pub fn store_file(store: &dyn BlobStore, path: &Path) -> Result<FileContent> {
    let mut file = File::open(path).map_err(io_ctx(format!("opening {}", path.display())))?;
    let len = file.metadata().map_err(io_ctx(format!("stat {}", path.display())))?.len();
    if len <= WHOLE_FILE_MAX {
        let mut data = Vec::with_capacity(len as usize);
        file.read_to_end(&mut data).map_err(io_ctx(format!("reading {}", path.display())))?;
        if data.len() as u64 <= WHOLE_FILE_MAX {
            return store_small(store, &data);
        }
        return store_reader(store, &data[..]);
    }
    store_reader(store, file).map_err(|e| match e {
        CasError::Io { context, source } => {
            CasError::Io { context: format!("{context} ({})", path.display()), source }
        }
        other => other,
    })
}

fn store_small(store: &dyn BlobStore, data: &[u8]) -> Result<FileContent> {
    if data.is_empty() {
        return Ok(FileContent::default());
    }
    let digest = store.put(data)?;
    Ok(FileContent {
        size: data.len() as u64,
        chunks: vec![Chunk { digest, offset: 0, len: data.len() as u64 }],
    })
}

/// Store everything `reader` yields as content-defined chunks.
pub fn store_reader<R: Read>(store: &dyn BlobStore, reader: R) -> Result<FileContent> {
    let mut chunker = Chunker::new(reader);
    let mut content = FileContent::default();
    while let Some(chunk) = chunker.next_chunk().map_err(io_ctx("reading input to chunk"))? {
        let digest = store.put(chunk)?;
        content.chunks.push(Chunk { digest, offset: content.size, len: chunk.len() as u64 });
        content.size += chunk.len() as u64;
    }
    Ok(content)
}

/// Read `len` bytes at `offset` of a stored file, fetching only the chunks that overlap
/// the range. Like `pread`, a range past the end is cut short at the end of the file.
pub fn read_file_range(store: &dyn BlobStore, file: &FileContent, offset: u64, len: u64) -> Result<Vec<u8>> {
    let end = offset.saturating_add(len).min(file.size);
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    let first = file.chunks.partition_point(|c| c.offset + c.len <= offset);
    for chunk in file.chunks[first..].iter().take_while(|c| c.offset < end) {
        let from = offset.max(chunk.offset) - chunk.offset;
        let to = end.min(chunk.offset + chunk.len) - chunk.offset;
        if from == 0 && to == chunk.len {
            out.extend_from_slice(&store.get(&chunk.digest)?);
        } else {
            out.extend_from_slice(&store.read_range(&chunk.digest, from, to - from)?);
        }
    }
    Ok(out)
}

/// Write a stored file's whole content to `out`, one verified chunk at a time.
pub fn write_file_to(store: &dyn BlobStore, file: &FileContent, out: &mut dyn Write) -> Result<()> {
    for chunk in &file.chunks {
        let data = store.get(&chunk.digest)?;
        if data.len() as u64 != chunk.len {
            return Err(CasError::InvalidManifest(format!(
                "chunk {} is {} bytes, manifest says {}",
                chunk.digest,
                data.len(),
                chunk.len
            )));
        }
        out.write_all(&data).map_err(io_ctx("writing file content"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    fn chunk_all(data: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let cut = cut_point(rest);
            out.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        out
    }

    #[test]
    fn chunk_sizes_respect_bounds() {
        let data = pseudo_random(24 << 20, 7);
        let chunks = chunk_all(&data);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), data.len());
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= MIN_CHUNK && c.len() <= MAX_CHUNK, "{}", c.len());
        }
        let avg = data.len() / chunks.len();
        assert!(avg > AVG_CHUNK / 2 && avg < AVG_CHUNK * 2, "average chunk {avg}");
    }

    #[test]
    fn streaming_chunker_matches_in_memory() {
        let data = pseudo_random(9 << 20, 3);
        // A reader that returns small, odd-sized pieces.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(77_777);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut chunker = Chunker::new(Trickle(&data));
        let mut streamed = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            streamed.push(c.len());
        }
        let in_memory: Vec<usize> = chunk_all(&data).iter().map(|c| c.len()).collect();
        assert_eq!(streamed, in_memory);
    }

    #[test]
    fn gear_table_is_stable() {
        // Changing the table silently breaks dedup against existing stores.
        assert_eq!(GEAR[0], gear_table()[0]);
        let sum = GEAR.iter().fold(0u64, |a, &g| a.wrapping_add(g));
        assert_eq!(sum, GEAR_CHECKSUM);
    }

    const GEAR_CHECKSUM: u64 = 11_986_979_673_002_445_627;
}
