//! Turning one layer blob (a tar, maybe gzip or zstd compressed) into a per-layer
//! [`Manifest`], streaming, with the blob's sha256 checked as it goes by.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};

use flare_cas::{normalize_path, store_reader, BlobStore, Entry, EntryKind, FileContent, Manifest};
use sha2::{Digest as _, Sha256};

use crate::error::{OciError, Result};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type (OCI and Docker, distributable or not).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        let known = media_type.starts_with("application/vnd.oci.image.layer.")
            || media_type.starts_with("application/vnd.docker.image.rootfs.");
        if !known {
            return None;
        }
        if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
            Some(Compression::Gzip)
        } else if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
            Some(Compression::Zstd)
        } else if media_type.ends_with(".tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// A reader that hashes (sha256) and counts everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Read (and hash) whatever is left, then return `sha256:<hex>` and the byte count.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{}", hex_lower(&self.hasher.finalize())), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex_lower(&Sha256::digest(data)))
}

/// Decodes a stream of zstd frames (skippable frames are skipped), as layers written by
/// zstd:chunked tools have many frames.
struct ZstdReader<R: BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(src: R) -> Self {
        ZstdReader { src, dec: ruzstd::decoding::FrameDecoder::new(), in_frame: false }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.dec.reset(&mut self.src) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                        length,
                        ..
                    })) => {
                        let skipped =
                            io::copy(&mut (&mut self.src).take(u64::from(length)), &mut io::sink())?;
                        if skipped != u64::from(length) {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "truncated skippable zstd frame",
                            ));
                        }
                        continue;
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))),
                }
            }
            while self.dec.can_collect() < buf.len() && !self.dec.is_finished() {
                let want = buf.len() - self.dec.can_collect();
                self.dec
                    .decode_blocks(&mut self.src, ruzstd::decoding::BlockDecodingStrategy::UptoBytes(want))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            }
            let n = self.dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.dec.is_finished() {
                self.in_frame = false;
            }
        }
    }
}

/// What unpacking one layer found.
#[derive(Debug, Default)]
pub(crate) struct Unpacked {
    pub manifest: Manifest,
    /// `sha256:<hex>` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub warnings: Vec<String>,
}

/// Unpack a layer (everything `raw` yields, compressed as `compression`) into `store`.
/// `lower` is the image so far, for hardlinks to files of earlier layers. The caller
/// checks the raw digest; this returns the uncompressed digest.
pub(crate) fn unpack_layer(
    raw: &mut dyn Read,
    compression: Compression,
    store: &dyn BlobStore,
    layer: &str,
    lower: &Manifest,
) -> Result<Unpacked> {
    let layer_err = |message: String| OciError::Layer { layer: layer.to_owned(), message };
    let decoder: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, raw)))
        }
        Compression::Zstd => Box::new(ZstdReader::new(BufReader::with_capacity(1 << 16, raw))),
    };
    let mut tar_stream = HashingReader::new(decoder);
    let mut out = Unpacked::default();
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        let entries = archive.entries().map_err(|e| layer_err(format!("reading tar: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| layer_err(format!("reading tar: {e}")))?;
            add_entry(entry, store, layer, lower, &mut out)?;
        }
    }
    let (diff_id, size) = tar_stream.finish().map_err(|e| layer_err(format!("decompressing: {e}")))?;
    out.diff_id = diff_id;
    out.uncompressed_size = size;
    Ok(out)
}

/// A path from a tar header, checked: absolute paths and `..` are rejected, `.` and
/// empty components dropped. `None` is the root itself (`./`).
fn checked_path(layer: &str, raw: &[u8]) -> Result<Option<String>> {
    let unsafe_path = |reason: &str| OciError::UnsafePath {
        layer: layer.to_owned(),
        path: String::from_utf8_lossy(raw).into_owned(),
        reason: reason.to_owned(),
    };
    let path = std::str::from_utf8(raw).map_err(|_| unsafe_path("not valid UTF-8"))?;
    if path.starts_with('/') {
        return Err(unsafe_path("absolute paths are not allowed in a layer"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(unsafe_path("`..` components are not allowed in a layer"));
    }
    if path.split('/').all(|c| c.is_empty() || c == ".") {
        return Ok(None);
    }
    normalize_path(path).map(Some).map_err(|e| unsafe_path(&e.to_string()))
}

fn add_entry<R: Read>(
    mut entry: tar::Entry<'_, R>,
    store: &dyn BlobStore,
    layer: &str,
    lower: &Manifest,
    out: &mut Unpacked,
) -> Result<()> {
    let layer_err = |message: String| OciError::Layer { layer: layer.to_owned(), message };
    let raw_path = entry.path_bytes().into_owned();
    let kind = entry.header().entry_type();
    let Some(path) = checked_path(layer, &raw_path)? else {
        // The root directory itself: nothing to record.
        return Ok(());
    };
    let header = entry.header();
    let mode = header.mode().map_err(|e| layer_err(format!("{path}: bad mode: {e}")))? & 0o7777;
    let uid = header.uid().map_err(|e| layer_err(format!("{path}: bad uid: {e}")))?;
    let gid = header.gid().map_err(|e| layer_err(format!("{path}: bad gid: {e}")))?;
    let mtime = header.mtime().map_err(|e| layer_err(format!("{path}: bad mtime: {e}")))?;
    let mut xattrs = BTreeMap::new();
    if let Some(exts) =
        entry.pax_extensions().map_err(|e| layer_err(format!("{path}: bad pax header: {e}")))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| layer_err(format!("{path}: bad pax header: {e}")))?;
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_owned(), ext.value_bytes().to_vec());
                }
            }
        }
    }
    let meta = |kind: EntryKind| Entry {
        kind,
        mode,
        uid: u32::try_from(uid).unwrap_or(u32::MAX),
        gid: u32::try_from(gid).unwrap_or(u32::MAX),
        mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        mtime_nsec: 0,
        xattrs: xattrs.clone(),
    };
    use tar::EntryType as T;
    let new = match kind {
        T::Regular | T::Continuous => {
            let content = store_reader(store, &mut entry).map_err(|e| match e {
                flare_cas::CasError::Io { context, source } => {
                    layer_err(format!("{path}: {context}: {source}"))
                }
                other => OciError::Cas(other),
            })?;
            meta(EntryKind::File(content))
        }
        T::Directory => meta(EntryKind::Dir),
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| layer_err(format!("{path}: symlink without a target")))?;
            let target = std::str::from_utf8(&target)
                .map_err(|_| layer_err(format!("{path}: symlink target is not UTF-8")))?
                .to_owned();
            meta(EntryKind::Symlink { target })
        }
        T::Link => {
            let target_raw = entry
                .link_name_bytes()
                .ok_or_else(|| layer_err(format!("{path}: hardlink without a target")))?
                .into_owned();
            let Some(target) = checked_path(layer, &target_raw)? else {
                return Err(layer_err(format!("{path}: hardlink to the root directory")));
            };
            let content = match out.manifest.get(&target).or_else(|| lower.get(&target)) {
                Some(Entry { kind: EntryKind::File(content), .. }) => content.clone(),
                Some(_) => {
                    return Err(layer_err(format!("{path}: hardlink to {target:?}, which is not a file")))
                }
                None => {
                    return Err(layer_err(format!("{path}: hardlink to {target:?}, which does not exist")))
                }
            };
            meta(EntryKind::File(content))
        }
        T::Char | T::Block | T::Fifo => {
            let what = match kind {
                T::Char => "character device",
                T::Block => "block device",
                _ => "fifo",
            };
            let msg = format!("layer {layer}: skipped {what} {path}");
            tracing::warn!("{msg}");
            out.warnings.push(msg);
            return Ok(());
        }
        T::GNUSparse => return Err(layer_err(format!("{path}: sparse files are not supported"))),
        other => {
            let msg = format!("layer {layer}: skipped {path} of unsupported tar type {other:?}");
            tracing::warn!("{msg}");
            out.warnings.push(msg);
            return Ok(());
        }
    };
    // A whiteout must stay a plain marker whatever its tar type was.
    let new = if path.rsplit('/').next().is_some_and(|n| n.starts_with(flare_cas::WHITEOUT_PREFIX)) {
        Entry { kind: EntryKind::File(FileContent::default()), ..new }
    } else {
        new
    };
    out.manifest.insert(&path, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Some(Gzip)),
            ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
            ("application/json", Option::None),
        ] {
            assert_eq!(Compression::from_media_type(mt), c, "{mt}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(checked_path("l", b"./a//b/").unwrap().as_deref(), Some("a/b"));
        assert_eq!(checked_path("l", b"./").unwrap(), None);
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/.."] {
            let e = checked_path("l0", bad).unwrap_err().to_string();
            assert!(e.contains("l0") && e.contains("unsafe path"), "{e}");
        }
    }
}
