//! Uploaded files: whole-file digests (what clients hash) mapped to stored content, and
//! file lists turned into manifests.

use std::path::PathBuf;
use std::sync::Arc;

use flare_cas::{
    normalize_path, store_reader, BlobStore, Chunk, Digest, Entry, EntryKind, FileContent, Manifest,
    WHOLE_FILE_MAX,
};

use crate::spec::FileEntry;
use crate::ImageError;

/// Whole files by digest. Files up to [`WHOLE_FILE_MAX`] are one blob whose digest is
/// the file's; larger ones are chunked and an index file records their chunks.
#[derive(Clone)]
pub struct FileIndex {
    store: Arc<dyn BlobStore>,
    dir: PathBuf,
}

impl FileIndex {
    pub fn open(store: Arc<dyn BlobStore>, dir: PathBuf) -> Result<FileIndex, ImageError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ImageError::io(format!("creating {}", dir.display()), e))?;
        Ok(FileIndex { store, dir })
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    fn index_path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    /// Is the whole file with this digest stored?
    pub fn has(&self, d: &Digest) -> Result<bool, ImageError> {
        match std::fs::read(self.index_path(d)) {
            Ok(json) => {
                // Garbage collection may have swept the chunks of a file nothing used.
                let Ok(c) = serde_json::from_slice::<FileContent>(&json) else { return Ok(false) };
                for chunk in &c.chunks {
                    if !self.store.touch(&chunk.digest)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Err(_) => Ok(self.store.touch(d)?),
        }
    }

    /// Store an uploaded file after checking that its content has digest `expect`.
    pub fn put(&self, expect: &Digest, data: &[u8]) -> Result<FileContent, ImageError> {
        let got = Digest::of(data);
        if &got != expect {
            return Err(ImageError::Invalid(format!("uploaded content has digest {got}, not {expect}")));
        }
        if data.len() as u64 <= WHOLE_FILE_MAX {
            self.store.put(data)?;
            return Ok(small(expect, data.len() as u64));
        }
        let content = store_reader(self.store.as_ref(), data)?;
        let tmp = self.dir.join(format!(".{}.{}", expect.hex(), uuid::Uuid::new_v4().simple()));
        let json = serde_json::to_vec(&content).map_err(|e| ImageError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(|e| ImageError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, self.index_path(expect))
            .map_err(|e| ImageError::io(format!("renaming {}", tmp.display()), e))?;
        Ok(content)
    }

    /// The stored content of a whole file.
    pub fn content(&self, d: &Digest, size: u64) -> Result<FileContent, ImageError> {
        match std::fs::read(self.index_path(d)) {
            Ok(json) => {
                let c: FileContent = serde_json::from_slice(&json)
                    .map_err(|e| ImageError::Invalid(format!("file index of {d}: {e}")))?;
                if c.size != size {
                    return Err(ImageError::Invalid(format!("file {d} has size {}, not {size}", c.size)));
                }
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if size > WHOLE_FILE_MAX || !self.store.has(d)? {
                    return Err(ImageError::MissingBlob(d.to_string()));
                }
                Ok(small(d, size))
            }
            Err(e) => Err(ImageError::io(format!("reading the file index of {d}"), e)),
        }
    }

    /// A manifest of `entries` placed under `prefix` (relative, `""` for the root).
    pub fn manifest(&self, prefix: &str, entries: &[FileEntry]) -> Result<Manifest, ImageError> {
        let mut m = Manifest::new();
        if !prefix.is_empty() {
            m.insert(prefix, Entry::dir(0o755))?;
        }
        for e in entries {
            let rel = normalize_path(e.path())
                .map_err(|err| ImageError::Invalid(format!("{:?}: {err}", e.path())))?;
            let path = if prefix.is_empty() { rel } else { format!("{prefix}/{rel}") };
            let entry = match e {
                FileEntry::File { mode, digest, size, mtime, .. } => {
                    let d: Digest =
                        digest.parse().map_err(|_| ImageError::Invalid(format!("bad digest {digest:?}")))?;
                    let mut e = Entry::file(self.content(&d, *size)?, mode & 0o7777);
                    e.mtime = mtime.unwrap_or(0);
                    e
                }
                FileEntry::Symlink { target, .. } => Entry::symlink(target),
                FileEntry::Dir { mode, .. } => Entry::dir(mode & 0o7777),
            };
            if let EntryKind::Dir = entry.kind {
                if m.get(&path).is_some() {
                    continue;
                }
            }
            m.insert(&path, entry)?;
        }
        Ok(m)
    }
}

fn small(d: &Digest, size: u64) -> FileContent {
    if size == 0 {
        return FileContent { size: 0, chunks: vec![] };
    }
    FileContent { size, chunks: vec![Chunk { digest: *d, offset: 0, len: size }] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_cas::LocalStore;

    #[test]
    fn uploads_are_verified_and_indexed() {
        let tmp = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::open(&tmp.path().join("cas")).unwrap());
        let idx = FileIndex::open(store.clone(), tmp.path().join("files")).unwrap();
        let small_data = b"hello".to_vec();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let ds = Digest::of(&small_data);
        let db = Digest::of(&big);
        assert!(!idx.has(&ds).unwrap());
        assert!(matches!(idx.put(&db, &small_data), Err(ImageError::Invalid(_))));
        idx.put(&ds, &small_data).unwrap();
        let c = idx.put(&db, &big).unwrap();
        assert_eq!(c.size, big.len() as u64);
        assert!(idx.has(&ds).unwrap() && idx.has(&db).unwrap());
        let m = idx
            .manifest(
                "app",
                &[
                    FileEntry::File {
                        path: "a/s.txt".into(),
                        mode: 0o644,
                        digest: ds.to_string(),
                        size: 5,
                        mtime: Some(7),
                    },
                    FileEntry::File {
                        path: "big".into(),
                        mode: 0o755,
                        digest: db.to_string(),
                        size: big.len() as u64,
                        mtime: None,
                    },
                    FileEntry::Symlink { path: "l".into(), target: "/etc/passwd".into() },
                ],
            )
            .unwrap();
        assert_eq!(m.get("app/a/s.txt").map(|e| e.mtime), Some(7));
        assert!(m.get("app/big").is_some());
        let missing = Digest::of(b"nope");
        let err = idx
            .manifest(
                "",
                &[FileEntry::File {
                    path: "x".into(),
                    mode: 0o644,
                    digest: missing.to_string(),
                    size: 4,
                    mtime: None,
                }],
            )
            .unwrap_err();
        assert!(matches!(err, ImageError::MissingBlob(_)));
        assert!(idx.manifest("", &[FileEntry::Dir { path: "../x".into(), mode: 0o755 }]).is_err());
    }
}
