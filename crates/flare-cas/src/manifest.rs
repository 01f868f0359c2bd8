//! Manifests: a merged file tree (path → entry) with content in the blob store, and
//! OCI-style layering with whiteouts.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chunk::FileContent;
use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::store::BlobStore;

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Prefix of an OCI whiteout entry: `dir/.wh.NAME` deletes `dir/NAME` from lower layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of an OCI opaque marker: `dir/.wh..wh..opq` hides everything below `dir` in
/// lower layers.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File(FileContent),
    Symlink { target: String },
}

/// One node of the tree with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time (used to detect changed files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime_nsec: u32,
    /// Extended attributes (values base64 in JSON).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "b64_map")]
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Entry {
    /// A directory owned by root with the given mode and a zero mtime.
    pub fn dir(mode: u32) -> Entry {
        Entry { kind: EntryKind::Dir, mode, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, xattrs: BTreeMap::new() }
    }

    /// A regular file owned by root.
    pub fn file(content: FileContent, mode: u32) -> Entry {
        Entry { kind: EntryKind::File(content), ..Entry::dir(mode) }
    }

    /// A symlink owned by root (mode 0777).
    pub fn symlink(target: &str) -> Entry {
        Entry { kind: EntryKind::Symlink { target: target.to_owned() }, ..Entry::dir(0o777) }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }
}

mod b64_map {
    use std::collections::BTreeMap;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| STANDARD.decode(v).map(|v| (k, v)).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Counts for `flare image inspect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes.
    pub total_bytes: u64,
    /// Bytes of distinct chunks (what the tree costs in the store).
    pub unique_bytes: u64,
}

/// A file tree. Keys are normalized relative paths (see [`normalize_path`]); the root
/// directory itself has no entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub entries: BTreeMap<String, Entry>,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest { version: MANIFEST_VERSION, entries: BTreeMap::new() }
    }
}

/// Normalize a relative path: drop empty and `.` components, reject absolute paths,
/// `..`, NUL bytes and the empty path.
pub fn normalize_path(path: &str) -> Result<String> {
    let bad = |reason: &str| Err(CasError::InvalidPath { path: path.to_owned(), reason: reason.to_owned() });
    if path.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    if path.contains('\0') {
        return bad("NUL byte in path");
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return bad("`..` components are not allowed");
    }
    if parts.is_empty() {
        return bad("empty path");
    }
    Ok(parts.join("/"))
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// Every proper ancestor of `path`, outermost first: `a/b/c` → `a`, `a/b`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

impl Manifest {
    /// An empty manifest.
    pub fn new() -> Manifest {
        Manifest::default()
    }

    /// Insert an entry at `path` (normalized first; rejects `..` and absolute paths).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = normalize_path(path)?;
        self.entries.insert(path, entry);
        Ok(())
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Check the version, that every key is a normalized path, and that chunk lists
    /// are consistent (a layer may omit parent directories).
    pub fn validate_paths(&self) -> Result<()> {
        if self.version != MANIFEST_VERSION {
            return Err(CasError::UnsupportedVersion { found: self.version, supported: MANIFEST_VERSION });
        }
        for (path, entry) in &self.entries {
            if normalize_path(path)? != *path {
                return Err(CasError::InvalidPath { path: path.clone(), reason: "not normalized".into() });
            }
            if let EntryKind::File(content) = &entry.kind {
                content.validate().map_err(|e| match e {
                    CasError::InvalidManifest(msg) => CasError::InvalidManifest(format!("{path}: {msg}")),
                    other => other,
                })?;
            }
        }
        Ok(())
    }

    /// [`Manifest::validate_paths`], plus: every entry's parent is a directory entry of
    /// this manifest (so nothing can sit below a symlink or a file).
    pub fn validate(&self) -> Result<()> {
        self.validate_paths()?;
        for path in self.entries.keys() {
            let (parent, _) = split_parent(path);
            if parent.is_empty() {
                continue;
            }
            match self.entries.get(parent) {
                Some(e) if e.is_dir() => {}
                Some(_) => {
                    return Err(CasError::InvalidManifest(format!(
                        "{path:?} is below {parent:?}, not a directory"
                    )))
                }
                None => {
                    return Err(CasError::InvalidManifest(format!("{path:?} has no parent directory entry")))
                }
            }
        }
        Ok(())
    }

    /// Remove `path` and everything below it.
    pub fn remove_tree(&mut self, path: &str) {
        self.entries.remove(path);
        self.remove_children(path);
    }

    /// Remove everything below `dir` (everything at all if `dir` is empty).
    fn remove_children(&mut self, dir: &str) {
        if dir.is_empty() {
            self.entries.clear();
            return;
        }
        let prefix = format!("{dir}/");
        let doomed: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    /// Overlay `layer` on top of this tree, OCI style:
    /// - `dir/.wh.NAME` in the layer removes `dir/NAME` and its subtree from below;
    /// - `dir/.wh..wh..opq` removes everything below `dir` from below (the dir stays);
    /// - other entries replace what is below; a directory over a directory keeps the
    ///   lower children, anything else over a directory removes its subtree;
    /// - missing parent directories are created (mode 0755), and a lower non-directory
    ///   where the layer needs a directory is replaced by one.
    ///
    /// Whiteouts only affect lower layers and never appear in the result.
    pub fn apply_layer(&mut self, layer: &Manifest) -> Result<()> {
        layer.validate_paths()?;
        for path in layer.entries.keys() {
            let (dir, name) = split_parent(path);
            if name == OPAQUE_MARKER {
                self.remove_children(dir);
            } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(CasError::InvalidPath {
                        path: path.clone(),
                        reason: "bad whiteout name".into(),
                    });
                }
                let target = if dir.is_empty() { hidden.to_owned() } else { format!("{dir}/{hidden}") };
                self.remove_tree(&target);
            }
        }
        for (path, entry) in &layer.entries {
            let (_, name) = split_parent(path);
            if name.starts_with(WHITEOUT_PREFIX) {
                continue;
            }
            self.ensure_dirs_above(path);
            match self.entries.get(path) {
                Some(lower) if lower.is_dir() && !entry.is_dir() => self.remove_children(path),
                _ => {}
            }
            self.entries.insert(path.clone(), entry.clone());
        }
        Ok(())
    }

    fn ensure_dirs_above(&mut self, path: &str) {
        for dir in ancestors(path) {
            match self.entries.get(dir) {
                Some(e) if e.is_dir() => {}
                _ => {
                    self.entries.insert(dir.to_owned(), Entry::dir(0o755));
                }
            }
        }
    }

    /// Counts of files, dirs, symlinks, total and distinct bytes.
    pub fn stats(&self) -> ManifestStats {
        let mut stats = ManifestStats::default();
        let mut seen = HashSet::new();
        for entry in self.entries.values() {
            match &entry.kind {
                EntryKind::Dir => stats.dirs += 1,
                EntryKind::Symlink { .. } => stats.symlinks += 1,
                EntryKind::File(content) => {
                    stats.files += 1;
                    stats.total_bytes += content.size;
                    for c in &content.chunks {
                        if seen.insert(c.digest) {
                            stats.unique_bytes += c.len;
                        }
                    }
                }
            }
        }
        stats
    }

    /// Every blob the manifest's files reference (each once, sizes included).
    pub fn chunk_digests(&self) -> HashMap<Digest, u64> {
        let mut out = HashMap::new();
        for entry in self.entries.values() {
            if let EntryKind::File(content) = &entry.kind {
                for c in &content.chunks {
                    out.insert(c.digest, c.len);
                }
            }
        }
        out
    }

    /// Canonical JSON: struct fields in declaration order, map keys sorted.
    pub fn to_canonical_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Digest of the canonical JSON (the manifest's id once stored).
    pub fn digest(&self) -> Result<Digest> {
        Ok(Digest::of(&self.to_canonical_json()?))
    }

    /// Parse and validate manifest JSON.
    pub fn from_json(data: &[u8]) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let version: VersionOnly = serde_json::from_slice(data)?;
        if version.version != MANIFEST_VERSION {
            return Err(CasError::UnsupportedVersion { found: version.version, supported: MANIFEST_VERSION });
        }
        let manifest: Manifest = serde_json::from_slice(data)?;
        manifest.validate_paths()?;
        Ok(manifest)
    }
}

/// Bytes of the chunks both manifests reference, each distinct chunk counted once.
pub fn shared_bytes(a: &Manifest, b: &Manifest) -> u64 {
    let a_chunks = a.chunk_digests();
    b.chunk_digests().iter().filter(|(d, _)| a_chunks.contains_key(d)).map(|(_, len)| len).sum()
}

/// Store a manifest as a blob; its digest is [`Manifest::digest`]. Flushes the store
/// first, so the blobs it references are durable before the manifest is, and again after,
/// so the manifest is durable before the caller publishes its digest.
pub fn put_manifest(store: &dyn BlobStore, manifest: &Manifest) -> Result<Digest> {
    manifest.validate_paths()?;
    store.flush()?;
    let digest = store.put(&manifest.to_canonical_json()?)?;
    store.flush()?;
    Ok(digest)
}

/// Load (digest-verified) and validate a stored manifest.
pub fn get_manifest(store: &dyn BlobStore, digest: &Digest) -> Result<Manifest> {
    Manifest::from_json(&store.get(digest)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Chunk;

    fn file(bytes: &[u8]) -> Entry {
        if bytes.is_empty() {
            return Entry::file(FileContent::default(), 0o644);
        }
        let content = FileContent {
            size: bytes.len() as u64,
            chunks: vec![Chunk { digest: Digest::of(bytes), offset: 0, len: bytes.len() as u64 }],
        };
        Entry::file(content, 0o644)
    }

    fn tree(paths: &[(&str, Entry)]) -> Manifest {
        let mut m = Manifest::new();
        for (p, e) in paths {
            m.insert(p, e.clone()).unwrap();
        }
        m
    }

    fn keys(m: &Manifest) -> Vec<&str> {
        m.entries.keys().map(String::as_str).collect()
    }

    #[test]
    fn normalize_and_reject() {
        assert_eq!(normalize_path("./usr//bin/").unwrap(), "usr/bin");
        for bad in ["/etc/passwd", "a/../b", "..", "", "./", "a/\0"] {
            let err = normalize_path(bad).unwrap_err();
            assert!(matches!(err, CasError::InvalidPath { .. }), "{bad:?}: {err}");
        }
        assert!(normalize_path("/x").unwrap_err().to_string().contains("absolute"));
        assert!(normalize_path("a/../b").unwrap_err().to_string().contains("`..`"));
        let mut m = Manifest::new();
        assert!(m.insert("../escape", file(b"x")).is_err());
        // A deserialized manifest with a bad key is rejected too.
        m.entries.insert("../escape".into(), file(b"x"));
        let json = serde_json::to_vec(&m).unwrap();
        assert!(matches!(Manifest::from_json(&json), Err(CasError::InvalidPath { .. })));
    }

    #[test]
    fn json_roundtrip_with_xattrs_and_version() {
        let mut e = file(b"hello");
        e.xattrs.insert("security.capability".into(), vec![0, 1, 2, 255]);
        let m = tree(&[("bin", Entry::dir(0o755)), ("bin/ping", e), ("lib", Entry::symlink("usr/lib"))]);
        let json = m.to_canonical_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.starts_with("{\"version\":1,"), "{text}");
        assert!(text.contains("\"security.capability\":\"AAEC/w==\""), "{text}");
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
        assert_eq!(Manifest::from_json(&json).unwrap().digest().unwrap(), m.digest().unwrap());
        let future = text.replacen("\"version\":1", "\"version\":99", 1);
        assert!(matches!(Manifest::from_json(future.as_bytes()), Err(CasError::UnsupportedVersion { .. })));
    }

    #[test]
    fn validate_rejects_entries_below_non_dirs() {
        let m = tree(&[("link", Entry::symlink("/etc")), ("link/passwd", file(b"x"))]);
        assert!(matches!(m.validate(), Err(CasError::InvalidManifest(_))));
        let orphan = tree(&[("a/b", file(b"x"))]);
        assert!(orphan.validate().is_err());
        assert!(orphan.validate_paths().is_ok());
    }

    #[test]
    fn layer_whiteouts_and_opaque_dirs() {
        let mut base = tree(&[
            ("etc", Entry::dir(0o755)),
            ("etc/a.conf", file(b"a")),
            ("etc/b.conf", file(b"b")),
            ("opt", Entry::dir(0o755)),
            ("opt/app", Entry::dir(0o755)),
            ("opt/app/old.py", file(b"old")),
            ("opt/app/sub", Entry::dir(0o755)),
            ("opt/app/sub/x", file(b"x")),
            ("var", Entry::dir(0o755)),
            ("var/cache", Entry::dir(0o755)),
            ("var/cache/big", file(b"big")),
            ("usr", Entry::dir(0o700)),
            ("usr/keep", file(b"keep")),
        ]);
        let layer = tree(&[
            ("etc", Entry::dir(0o755)),
            ("etc/.wh.a.conf", file(b"")),
            ("etc/new.conf", file(b"new")),
            ("opt", Entry::dir(0o755)),
            ("opt/app", Entry::dir(0o750)),
            ("opt/app/.wh..wh..opq", file(b"")),
            ("opt/app/new.py", file(b"new")),
            ("var/.wh.cache", file(b"")),
            ("usr", Entry::dir(0o755)),
            ("srv/deep/file", file(b"implicit parents")),
        ]);
        base.apply_layer(&layer).unwrap();
        assert_eq!(
            keys(&base),
            [
                "etc",
                "etc/b.conf",
                "etc/new.conf",
                "opt",
                "opt/app",
                "opt/app/new.py",
                "srv",
                "srv/deep",
                "srv/deep/file",
                "usr",
                "usr/keep",
                "var"
            ]
        );
        assert_eq!(base.get("opt/app").unwrap().mode, 0o750);
        assert_eq!(base.get("usr").unwrap().mode, 0o755, "dir over dir takes the upper metadata");
        base.validate().unwrap();
    }

    #[test]
    fn layer_type_changes() {
        let mut base = tree(&[("d", Entry::dir(0o755)), ("d/child", file(b"c")), ("f", file(b"f"))]);
        // A file replaces a directory (and its subtree); a dir is needed where a file was.
        let layer = tree(&[("d", file(b"now a file")), ("f/inner", file(b"i"))]);
        base.apply_layer(&layer).unwrap();
        assert_eq!(keys(&base), ["d", "f", "f/inner"]);
        assert!(base.get("f").unwrap().is_dir());
        base.validate().unwrap();
        // A whiteout in a layer never hides the same layer's entries, and a root-level
        // opaque marker clears everything below.
        let layer = tree(&[(".wh..wh..opq", file(b"")), ("only", file(b"o"))]);
        base.apply_layer(&layer).unwrap();
        assert_eq!(keys(&base), ["only"]);
    }

    #[test]
    fn stats_and_shared_bytes() {
        let a = tree(&[
            ("d", Entry::dir(0o755)),
            ("d/x", file(b"xxxx")),
            ("d/y", file(b"yy")),
            ("d/x2", file(b"xxxx")),
        ]);
        let b = tree(&[("x", file(b"xxxx")), ("z", file(b"zzz")), ("l", Entry::symlink("x"))]);
        let s = a.stats();
        assert_eq!((s.files, s.dirs, s.symlinks, s.total_bytes, s.unique_bytes), (3, 1, 0, 10, 6));
        assert_eq!(shared_bytes(&a, &b), 4);
        assert_eq!(shared_bytes(&b, &a), 4);
    }
}
