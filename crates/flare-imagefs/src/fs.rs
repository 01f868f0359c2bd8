//! [`ImageFs`]: the inode table built from a manifest, the FUSE operations, lazy reads,
//! access recording and prefetch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flare_cas::{BlobStore, Digest, EntryKind, FileContent, Manifest};
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use tracing::{debug, error, warn};

use crate::cache::{ChunkCache, Source};
use crate::error::{ImageFsError, Result};
use crate::ids::IdShift;
use crate::mount::{mount_fs, MountHandle};
use crate::readahead::ReadAhead;

/// Options of an [`ImageFs`].
#[derive(Debug, Clone)]
pub struct ImageFsOptions {
    /// How long the kernel may cache attributes and name lookups. The file system is
    /// immutable, so this is long by default (one day).
    pub ttl: Duration,
    /// FUSE request threads (reads of different chunks proceed in parallel).
    pub threads: usize,
    /// Let users other than the mounting one (container processes) use the mount
    /// (`allow_other`); the kernel still checks modes (`default_permissions`).
    pub allow_other: bool,
    /// Honour setuid/setgid bits (like the image materialized on disk would).
    pub suid: bool,
    /// Mode of the root directory (the manifest has no entry for it).
    pub root_mode: u32,
    /// Name shown as the mount's source in /proc/self/mountinfo.
    pub fsname: String,
    /// Kernel readahead window for the mount, in KiB (`None`: the kernel's 128 KiB).
    pub read_ahead_kb: Option<u32>,
    /// Chunk-level read-ahead: at most this many chunks past the last one read are
    /// fetched in the background (0 turns it off). It starts only when a read of the
    /// file misses the cache and the file is read sequentially (from its first chunk,
    /// or continuing where the last read ended); the window starts at one chunk and
    /// doubles with each new chunk read, up to this bound. A random jump stops it.
    /// So reading a little of a huge file fetches at most one chunk beyond what was
    /// read, and never more than this many chunks (and `read_ahead_max_bytes`) ahead.
    pub read_ahead_chunks: u32,
    /// Byte bound of the chunk-level read-ahead window (whole chunks are fetched; the
    /// first chunk past the bound is not).
    pub read_ahead_max_bytes: u64,
    /// Threads fetching read-ahead chunks (shared by all files of this image fs).
    pub read_ahead_threads: usize,
    /// Directory-locality prefetch: the first open of a file in a directory fetches,
    /// in the background, the directory's other small files (at most this many bytes
    /// each; 0 turns it off). A directory with fewer than
    /// [`DIR_PREFETCH_MIN_FILES`] such files widens the scope to its parent's subtree
    /// (never to the root's). Each scope is prefetched once, up to
    /// `dir_prefetch_max_bytes`; large files are never prefetched, so the image stays
    /// lazy: a start that touches a few files of a package gets the package's small
    /// files (sources, configs, metadata) without a round trip each.
    pub dir_prefetch_file_max: u64,
    /// Byte budget of one directory-locality prefetch.
    pub dir_prefetch_max_bytes: u64,
    /// Threads fetching directory-locality prefetches (shared by the image fs).
    pub dir_prefetch_threads: usize,
    /// FUSE passthrough (Linux >= 6.9, needs CAP_SYS_ADMIN): an open of a file whose
    /// content is one cached chunk, or that has an assembled copy in the cache, hands
    /// the kernel that file, so reads bypass this process (verified chunks only). Where
    /// the kernel refuses, opens fall back to ordinary reads.
    pub passthrough: bool,
    /// Multi-chunk files of at least this size, once all their chunks are cached and
    /// the last reader closes them, are assembled into one cache file in the background
    /// (see `ChunkCache::assemble`) so later opens can use passthrough. `u64::MAX`
    /// turns assembly off. Costs cache space equal to the file size.
    pub assemble_min_bytes: u64,
    /// Report every owner `n` of the manifest (and the root-owned directories the
    /// manifest leaves out) as host id `to_host(n)` (`lookup`, `getattr`, and so the
    /// kernel's permission checks), for mounts used by containers in a user namespace:
    /// root inside then owns what the image gives to root. File capabilities are made
    /// valid for that root (`security.capability` revision 3). `None`: as recorded.
    pub ids: Option<IdShift>,
}

/// See [`ImageFsOptions::dir_prefetch_file_max`].
pub const DIR_PREFETCH_MIN_FILES: usize = 4;

impl Default for ImageFsOptions {
    fn default() -> Self {
        ImageFsOptions {
            ttl: Duration::from_secs(24 * 3600),
            threads: 4,
            allow_other: true,
            suid: true,
            root_mode: 0o755,
            fsname: "flare-imagefs".to_owned(),
            read_ahead_kb: Some(4096),
            read_ahead_chunks: 8,
            read_ahead_max_bytes: 16 << 20,
            read_ahead_threads: 4,
            dir_prefetch_file_max: 64 << 10,
            dir_prefetch_max_bytes: 1 << 20,
            dir_prefetch_threads: 8,
            passthrough: true,
            assemble_min_bytes: 8 << 20,
            ids: None,
        }
    }
}

/// Counters of one [`ImageFs`] since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageFsStats {
    /// `read` requests served (successfully or not).
    pub reads: u64,
    /// Bytes returned to readers.
    pub bytes: u64,
    /// Chunk reads served from the cache.
    pub cache_hits: u64,
    /// Chunk reads that were not in the cache (fetched, or joined another fetch).
    pub cache_misses: u64,
    /// Chunks this image fetched from the blob store (reads and read-ahead).
    pub fetches: u64,
    /// Of `fetches`, those fetched in the background by chunk-level read-ahead.
    pub read_ahead_fetches: u64,
    /// Reads that failed (EIO to the reader); each is logged.
    pub errors: u64,
    /// Of `fetches`, those fetched by directory-locality prefetch.
    pub dir_prefetch_fetches: u64,
    /// Opens served by FUSE passthrough (their reads bypass this process and are not
    /// counted in `reads`/`bytes`).
    pub passthrough_opens: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    bytes: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    fetches: AtomicU64,
    errors: AtomicU64,
    passthrough_opens: AtomicU64,
}

/// What [`ImageFs::prefetch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Digests asked for (after removing duplicates).
    pub requested: usize,
    /// Already in the cache.
    pub cached: usize,
    /// Fetched from the store (or joined a concurrent fetch).
    pub fetched: usize,
    /// Could not be fetched (logged).
    pub failed: usize,
}

enum NodeKind {
    Dir { children: BTreeMap<OsString, u64> },
    File(FileContent),
    Symlink(OsString),
}

struct Node {
    parent: u64,
    attr: FileAttr,
    kind: NodeKind,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
struct AccessLog {
    seen: HashSet<Digest>,
    order: Vec<Digest>,
}

pub(crate) struct Inner {
    /// Index = inode number - 1 (the root is inode 1).
    nodes: Vec<Node>,
    store: Arc<dyn BlobStore>,
    cache: Arc<ChunkCache>,
    opts: ImageFsOptions,
    counters: Counters,
    access: Mutex<AccessLog>,
    total_bytes: u64,
    readahead: Arc<ReadAhead>,
    /// Per inode (index = ino - 1): the sequential-read state of chunk read-ahead,
    /// `next chunk expected << 32 | window` (window 0: not reading ahead).
    ra_state: Vec<AtomicU64>,
    /// Directory-locality prefetch pool, and per inode whether that directory's
    /// prefetch was done.
    dir_prefetch: Arc<ReadAhead>,
    dir_prefetched: Vec<AtomicBool>,
    /// Whether the kernel accepted passthrough at init (and no backing open failed).
    passthrough: AtomicBool,
    /// Per inode with open handles: how they are served.
    opens: Mutex<HashMap<u64, OpenState>>,
}

/// The open handles of one inode. The kernel refuses to mix passthrough and ordinary
/// (page-cached) opens of an inode, and needs one backing file for all its passthrough
/// opens, so a new open follows the mode of those still open.
#[derive(Default)]
struct OpenState {
    cached: u32,
    passthrough: u32,
    backing: Option<BackingId>,
}

/// File handle of an ordinary open.
const FH_CACHED: u64 = 0;
/// File handle of a passthrough open.
const FH_PASSTHROUGH: u64 = 1;

impl Drop for Inner {
    fn drop(&mut self) {
        self.readahead.shutdown();
        self.dir_prefetch.shutdown();
    }
}

/// A read-only file system of a [`Manifest`] whose file contents are fetched lazily,
/// chunk by chunk, from a [`BlobStore`] through a shared [`ChunkCache`].
///
/// All metadata (the inode table, modes, owners, mtimes, xattrs, symlink targets) is
/// built in memory at construction; only `read` touches the cache or the store. Cheap
/// to clone (shared state); [`ImageFs::mount`] can be called more than once.
#[derive(Clone)]
pub struct ImageFs {
    inner: Arc<Inner>,
}

fn time_of(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec.into())
    }
}

fn attr(ino: u64, kind: FileType, size: u64, mode: u32, uid: u32, gid: u32, mtime: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: (mode & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl ImageFs {
    /// Build the inode table of `manifest`. Parent directories a manifest leaves out
    /// are created (mode 0755, root-owned). Fails if the manifest's paths are invalid,
    /// a file's chunks do not add up, or an entry sits below a non-directory.
    pub fn new(
        manifest: Arc<Manifest>,
        store: Arc<dyn BlobStore>,
        cache: Arc<ChunkCache>,
        opts: ImageFsOptions,
    ) -> Result<ImageFs> {
        manifest.validate_paths().map_err(|e| ImageFsError::InvalidManifest(e.to_string()))?;
        // Owners as the kernel is to see them (shifted once here: attributes are built
        // in memory and never change).
        let ids = opts.ids;
        let host = move |id: u32| ids.map_or(id, |s| s.to_host(id));
        let root_id = host(0);
        let root = Node {
            parent: 1,
            attr: attr(1, FileType::Directory, 0, opts.root_mode, root_id, root_id, UNIX_EPOCH),
            kind: NodeKind::Dir { children: BTreeMap::new() },
            xattrs: BTreeMap::new(),
        };
        let mut nodes = vec![root];
        let mut by_path: HashMap<String, u64> = HashMap::new();
        let mut total_bytes = 0u64;

        fn dir_ino(
            nodes: &mut Vec<Node>,
            by_path: &mut HashMap<String, u64>,
            path: &str,
            root_id: u32,
        ) -> Result<u64> {
            if path.is_empty() {
                return Ok(1);
            }
            if let Some(&ino) = by_path.get(path) {
                return match nodes[ino as usize - 1].kind {
                    NodeKind::Dir { .. } => Ok(ino),
                    _ => Err(ImageFsError::InvalidManifest(format!(
                        "{path:?} has entries below it but is not a directory"
                    ))),
                };
            }
            let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
            let parent = dir_ino(nodes, by_path, parent_path, root_id)?;
            let ino = nodes.len() as u64 + 1;
            nodes.push(Node {
                parent,
                attr: attr(ino, FileType::Directory, 0, 0o755, root_id, root_id, UNIX_EPOCH),
                kind: NodeKind::Dir { children: BTreeMap::new() },
                xattrs: BTreeMap::new(),
            });
            link(nodes, parent, name, ino);
            by_path.insert(path.to_owned(), ino);
            Ok(ino)
        }
        fn link(nodes: &mut [Node], parent: u64, name: &str, ino: u64) {
            if let NodeKind::Dir { children } = &mut nodes[parent as usize - 1].kind {
                children.insert(OsString::from(name), ino);
            }
        }

        for (path, entry) in &manifest.entries {
            let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            let parent = dir_ino(&mut nodes, &mut by_path, parent_path, root_id)?;
            let mtime = time_of(entry.mtime, entry.mtime_nsec);
            let (kind, ftype, size) = match &entry.kind {
                EntryKind::Dir => (NodeKind::Dir { children: BTreeMap::new() }, FileType::Directory, 0),
                EntryKind::File(content) => {
                    content.validate().map_err(|e| ImageFsError::InvalidManifest(format!("{path}: {e}")))?;
                    total_bytes += content.size;
                    (NodeKind::File(content.clone()), FileType::RegularFile, content.size)
                }
                EntryKind::Symlink { target } => {
                    (NodeKind::Symlink(OsString::from(target)), FileType::Symlink, target.len() as u64)
                }
            };
            let existing = by_path.get(path.as_str()).copied();
            let ino = match existing {
                // An implicit directory created for an earlier child; fill in its metadata.
                Some(ino) if matches!(kind, NodeKind::Dir { .. }) => ino,
                Some(_) => {
                    return Err(ImageFsError::InvalidManifest(format!(
                        "{path:?} is both a directory and not"
                    )))
                }
                None => {
                    let ino = nodes.len() as u64 + 1;
                    nodes.push(Node {
                        parent,
                        attr: attr(ino, ftype, 0, 0, 0, 0, mtime),
                        kind,
                        xattrs: BTreeMap::new(),
                    });
                    link(&mut nodes, parent, name, ino);
                    by_path.insert(path.clone(), ino);
                    ino
                }
            };
            let node = &mut nodes[ino as usize - 1];
            node.attr = attr(ino, ftype, size, entry.mode, host(entry.uid), host(entry.gid), mtime);
            node.xattrs = entry.xattrs.clone();
            if let Some(shift) = ids {
                shift_file_caps(&mut node.xattrs, shift);
            }
        }
        // Directory link counts: 2 + number of subdirectories.
        let mut subdirs = vec![0u32; nodes.len()];
        for (i, node) in nodes.iter().enumerate() {
            if i > 0 && matches!(node.kind, NodeKind::Dir { .. }) {
                subdirs[node.parent as usize - 1] += 1;
            }
        }
        for (node, n) in nodes.iter_mut().zip(subdirs) {
            if matches!(node.kind, NodeKind::Dir { .. }) {
                node.attr.nlink = 2 + n;
            }
        }
        debug!(inodes = nodes.len(), bytes = total_bytes, "image fs built");
        let ra_state = (0..nodes.len()).map(|_| AtomicU64::new(0)).collect();
        let readahead = ReadAhead::new(if opts.read_ahead_chunks > 0 { opts.read_ahead_threads } else { 0 });
        let dir_prefetch =
            ReadAhead::new(if opts.dir_prefetch_file_max > 0 { opts.dir_prefetch_threads } else { 0 });
        let dir_prefetched = (0..nodes.len()).map(|_| AtomicBool::new(false)).collect();
        Ok(ImageFs {
            inner: Arc::new(Inner {
                dir_prefetch,
                dir_prefetched,
                passthrough: AtomicBool::new(false),
                opens: Mutex::new(HashMap::new()),
                ra_state,
                readahead,
                nodes,
                store,
                cache,
                opts,
                counters: Counters::default(),
                access: Mutex::new(AccessLog::default()),
                total_bytes,
            }),
        })
    }

    /// Mount at `mountpoint` (an existing directory), served by background threads
    /// until the returned handle is unmounted or dropped. Needs root (or
    /// CAP_SYS_ADMIN): the mount is a direct `mount(2)` of `/dev/fuse`; without the
    /// privilege, fuser falls back to the `fusermount3` helper if it is installed.
    pub fn mount(&self, mountpoint: &Path) -> Result<MountHandle> {
        mount_fs(FuseAdapter { inner: self.inner.clone() }, mountpoint, &self.inner.opts)
    }

    /// Counters since this image fs was created.
    pub fn stats(&self) -> ImageFsStats {
        let c = &self.inner.counters;
        ImageFsStats {
            reads: c.reads.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed)
                + self.inner.readahead.fetched.load(Ordering::Relaxed)
                + self.inner.dir_prefetch.fetched.load(Ordering::Relaxed),
            read_ahead_fetches: self.inner.readahead.fetched.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dir_prefetch_fetches: self.inner.dir_prefetch.fetched.load(Ordering::Relaxed),
            passthrough_opens: c.passthrough_opens.load(Ordering::Relaxed),
        }
    }

    /// The chunk digests read through this image fs since it was created, in the order
    /// they were first read. Persist it per image and pass it to [`ImageFs::prefetch`]
    /// on the next start.
    pub fn access_log(&self) -> Vec<Digest> {
        self.inner.access.lock().unwrap_or_else(|p| p.into_inner()).order.clone()
    }

    /// Block until no chunk read-ahead or directory-locality prefetch is queued or in
    /// flight (for tests and benchmarks that count fetches).
    pub fn wait_read_ahead(&self) {
        self.inner.readahead.wait_idle();
        self.inner.dir_prefetch.wait_idle();
    }

    /// Number of inodes (including the root).
    pub fn inode_count(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Sum of all file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.inner.total_bytes
    }

    /// The cache this image reads through.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.inner.cache
    }

    /// Fetch `digests` into the cache with up to `parallelism` threads, skipping those
    /// already cached. Failures are logged and counted in the report, not returned.
    pub fn prefetch(&self, digests: &[Digest], parallelism: usize) -> PrefetchReport {
        let mut seen = HashSet::new();
        let todo: Vec<Digest> = digests.iter().copied().filter(|d| seen.insert(*d)).collect();
        let next = AtomicUsize::new(0);
        let cached = AtomicUsize::new(0);
        let fetched = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let workers = parallelism.clamp(1, todo.len().max(1));
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(digest) = todo.get(i) else { break };
                    match self.inner.cache.ensure(self.inner.store.as_ref(), digest) {
                        Ok(Source::Hit) => cached.fetch_add(1, Ordering::Relaxed),
                        Ok(Source::Fetched | Source::Joined) => fetched.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            error!(%digest, error = %e, "prefetch failed");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                });
            }
        });
        let report = PrefetchReport {
            requested: todo.len(),
            cached: cached.into_inner(),
            fetched: fetched.into_inner(),
            failed: failed.into_inner(),
        };
        debug!(?report, "prefetch done");
        report
    }
}

impl Inner {
    fn node(&self, ino: INodeNo) -> Option<&Node> {
        let i = ino.0.checked_sub(1)? as usize;
        self.nodes.get(i)
    }

    /// Directory-locality prefetch for an open of file `ino` (see
    /// [`ImageFsOptions::dir_prefetch_file_max`]): queues the small, uncached files of
    /// its directory (or of its parent's subtree, when the directory has fewer than
    /// [`DIR_PREFETCH_MIN_FILES`] of them), once per scope.
    fn dir_prefetch(&self, ino: u64) {
        let max_file = self.opts.dir_prefetch_file_max;
        if max_file == 0 {
            return;
        }
        let Some(node) = self.node(INodeNo(ino)) else { return };
        let dir = node.parent;
        let done = |d: u64| &self.dir_prefetched[d as usize - 1];
        if done(dir).load(Ordering::Relaxed) {
            return;
        }
        let small = |n: &Node| matches!(&n.kind, NodeKind::File(c) if c.size > 0 && c.size <= max_file);
        let children = |d: u64| match &self.nodes[d as usize - 1].kind {
            NodeKind::Dir { children } => Some(children),
            _ => None,
        };
        let here = children(dir)
            .map(|c| c.values().filter(|&&i| i != ino && small(&self.nodes[i as usize - 1])).count())
            .unwrap_or(0);
        let grand = self.nodes[dir as usize - 1].parent;
        let scope = if here < DIR_PREFETCH_MIN_FILES && dir != 1 && grand != 1 { grand } else { dir };
        done(dir).store(true, Ordering::Relaxed);
        if scope != dir && done(scope).swap(true, Ordering::Relaxed) {
            return;
        }
        // Walk the scope (bounded), collecting uncached chunks of small files.
        let mut todo = Vec::new();
        let mut bytes = 0u64;
        let mut stack = vec![scope];
        let mut visited = 0usize;
        'walk: while let Some(d) = stack.pop() {
            let Some(kids) = children(d) else { continue };
            for &child in kids.values() {
                visited += 1;
                if visited > 100_000 {
                    break 'walk;
                }
                let n = &self.nodes[child as usize - 1];
                match &n.kind {
                    NodeKind::Dir { .. } => stack.push(child),
                    NodeKind::File(c) if child != ino && small(n) => {
                        if bytes + c.size > self.opts.dir_prefetch_max_bytes {
                            break 'walk;
                        }
                        let missing: Vec<Digest> = c
                            .chunks
                            .iter()
                            .filter(|c| !self.cache.contains(&c.digest))
                            .map(|c| c.digest)
                            .collect();
                        if !missing.is_empty() {
                            bytes += c.size;
                            todo.extend(missing);
                        }
                    }
                    _ => {}
                }
            }
        }
        if !todo.is_empty() {
            debug!(ino, scope, chunks = todo.len(), bytes, "directory-locality prefetch");
            self.dir_prefetch.submit(todo, &self.cache, &self.store);
        }
    }

    /// The cache file that can back a passthrough open of `content`, if there is one:
    /// the chunk file of a one-chunk file, or the assembled copy of a bigger one.
    fn backing_file(&self, content: &FileContent) -> Option<Arc<std::fs::File>> {
        match content.chunks.as_slice() {
            [] => None,
            [one] => self.cache.verified_file(&one.digest),
            chunks if content.size >= self.opts.assemble_min_bytes => {
                self.cache.view_file(&ChunkCache::view_key(chunks))
            }
            _ => None,
        }
    }

    fn record(&self, digest: &Digest) {
        let mut log = self.access.lock().unwrap_or_else(|p| p.into_inner());
        if log.seen.insert(*digest) {
            log.order.push(*digest);
        }
    }

    /// Read `size` bytes at `offset` of file `ino`, chunk by chunk through the cache.
    fn read_file(&self, ino: u64, content: &FileContent, offset: u64, size: u64) -> Result<Vec<u8>> {
        let end = offset.saturating_add(size).min(content.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let first = content.chunks.partition_point(|c| c.offset + c.len <= offset);
        let last = content.chunks.partition_point(|c| c.offset < end).max(first + 1) - 1;
        let mut missed = false;
        for (i, chunk) in content.chunks.iter().enumerate().take(last + 1).skip(first) {
            let from = offset.max(chunk.offset) - chunk.offset;
            let to = end.min(chunk.offset + chunk.len) - chunk.offset;
            self.record(&chunk.digest);
            let before = out.len();
            let source =
                self.cache.read_into(self.store.as_ref(), &chunk.digest, from, to - from, &mut out)?;
            match source {
                Source::Hit => self.counters.cache_hits.fetch_add(1, Ordering::Relaxed),
                Source::Fetched => {
                    missed = true;
                    self.counters.fetches.fetch_add(1, Ordering::Relaxed);
                    self.counters.cache_misses.fetch_add(1, Ordering::Relaxed)
                }
                Source::Joined => {
                    missed = true;
                    self.counters.cache_misses.fetch_add(1, Ordering::Relaxed)
                }
            };
            let got = (out.len() - before) as u64;
            if got != to - from {
                return Err(ImageFsError::WrongLength {
                    digest: chunk.digest,
                    got: from + got,
                    expected: chunk.len,
                });
            }
            // Once the first chunk is in hand (and we know whether it missed), queue
            // the rest of this read and the window after it: those fetches overlap
            // with the rest of this read and with the reader's next ones.
            if i == first {
                self.read_ahead(ino, content, first, last, missed);
            }
        }
        Ok(out)
    }

    /// Chunk-level sequential read-ahead for a read of chunks `first..=last` of file
    /// `ino` whose first chunk was just served (see
    /// [`ImageFsOptions::read_ahead_chunks`]): queues the read's other chunks and up to
    /// the window's worth after `last`, skipping cached ones.
    fn read_ahead(&self, ino: u64, content: &FileContent, first: usize, last: usize, missed: bool) {
        let max = self.opts.read_ahead_chunks;
        let n = content.chunks.len();
        if max == 0 || n < 2 {
            return;
        }
        let Some(state) = self.ra_state.get(ino as usize - 1) else { return };
        let prev = state.load(Ordering::Relaxed);
        let (next, window) = ((prev >> 32) as usize, prev as u32);
        let fresh = prev == 0 && first == 0;
        let sequential = fresh || first + 1 == next || first == next;
        let advanced = fresh || last + 1 > next;
        let new_window = if !sequential {
            0
        } else if !advanced {
            window
        } else if missed || window > 0 {
            (window * 2).clamp(1, max)
        } else {
            0
        };
        let new_next = (last + 1).max(if sequential { next } else { 0 });
        state.store(((new_next as u64) << 32) | u64::from(new_window), Ordering::Relaxed);
        if sequential && advanced {
            // Cached chunks ahead: have the local disk start reading them (chunk files
            // are separate files, so the kernel's readahead never crosses into them).
            for c in content.chunks[(last + 1).min(n)..].iter().take(2) {
                self.cache.will_need(&c.digest);
            }
        }
        if new_window == 0 || !advanced {
            return;
        }
        let mut bytes = 0u64;
        let todo = content.chunks[(first + 1).min(n)..]
            .iter()
            .take(last - first + new_window as usize)
            .take_while(|c| {
                bytes += c.len;
                bytes <= self.opts.read_ahead_max_bytes
            })
            .filter(|c| !self.cache.contains(&c.digest))
            .map(|c| c.digest)
            .collect::<Vec<_>>();
        if !todo.is_empty() {
            self.readahead.submit(todo, &self.cache, &self.store);
        }
    }
}

/// The `fuser::Filesystem` face of an [`ImageFs`].
pub(crate) struct FuseAdapter {
    inner: Arc<Inner>,
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Symlink targets never change: let the kernel cache them too.
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS | InitFlags::FUSE_PARALLEL_DIROPS);
        if self.inner.opts.passthrough {
            // Backing files live on an ordinary file system (stack depth 0); depth 1
            // still lets an overlay use this mount as a lower layer.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            debug!(passthrough = ok, "fuse init");
            self.inner.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(node) = self.inner.node(parent) else { return reply.error(Errno::ENOENT) };
        let NodeKind::Dir { children } = &node.kind else { return reply.error(Errno::ENOTDIR) };
        match children.get(name).and_then(|&ino| self.inner.node(INodeNo(ino))) {
            Some(child) => reply.entry(&self.inner.opts.ttl, &child.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.node(ino) {
            Some(node) => reply.attr(&self.inner.opts.ttl, &node.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inner.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let inner = &self.inner;
        let content = match inner.node(ino).map(|n| &n.kind) {
            Some(NodeKind::File(content)) => content,
            Some(NodeKind::Dir { .. }) => return reply.error(Errno::EISDIR),
            Some(NodeKind::Symlink(_)) => return reply.error(Errno::EINVAL),
            None => return reply.error(Errno::ENOENT),
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        inner.dir_prefetch(ino.0);
        let lock = || inner.opens.lock().unwrap_or_else(|p| p.into_inner());
        // With no handle open, passthrough if the cache has a backing file (looked up
        // outside the lock: it may verify a chunk) and the kernel takes it.
        let idle = lock().get(&ino.0).is_none_or(|st| st.cached == 0 && st.passthrough == 0);
        let mut fresh = None;
        if idle && inner.passthrough.load(Ordering::Relaxed) {
            if let Some(file) = inner.backing_file(content) {
                match reply.open_backing(&*file) {
                    Ok(backing) => fresh = Some(backing),
                    Err(e) => {
                        inner.passthrough.store(false, Ordering::Relaxed);
                        warn!(error = %e, "the kernel refused a passthrough backing file; serving reads ourselves from now on");
                    }
                }
            }
        }
        // Follow the mode of the handles open now (the kernel refuses to mix them); with
        // none, use the new backing file if there is one. (A backing id not kept is
        // closed when dropped.)
        let mut opens = lock();
        let st = opens.entry(ino.0).or_default();
        if st.cached == 0 {
            if st.backing.is_none() {
                st.backing = fresh.take();
            }
            if let Some(backing) = &st.backing {
                st.passthrough += 1;
                inner.counters.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                // Reads bypass us from here: log the file as read (its first chunk; all
                // of a big file's chunks would make a later prefetch over-eager).
                if let Some(first) = content.chunks.first() {
                    inner.record(&first.digest);
                }
                // The kernel refuses KEEP_CACHE with passthrough: the page cache used is
                // the backing file's.
                return reply.opened_passthrough(
                    FileHandle(FH_PASSTHROUGH),
                    FopenFlags::FOPEN_NOFLUSH,
                    backing,
                );
            }
        }
        st.cached += 1;
        drop(opens);
        // Contents never change: keep the page cache across opens; nothing to flush.
        reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let inner = &self.inner;
        let mut backing = None;
        let mut last_cached = false;
        {
            let mut opens = inner.opens.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = opens.get_mut(&ino.0) {
                if fh.0 == FH_PASSTHROUGH {
                    st.passthrough = st.passthrough.saturating_sub(1);
                    if st.passthrough == 0 {
                        backing = st.backing.take();
                    }
                } else {
                    st.cached = st.cached.saturating_sub(1);
                    last_cached = st.cached == 0;
                }
                if st.cached == 0 && st.passthrough == 0 {
                    opens.remove(&ino.0);
                }
            }
        }
        // Closing the backing id (on drop) only drops the kernel's reference for new
        // opens; nothing of ours is open on it any more.
        drop(backing);
        reply.ok();
        // A big file now fully cached: build its one-file copy for passthrough.
        if last_cached && inner.passthrough.load(Ordering::Relaxed) {
            if let Some(NodeKind::File(content)) = inner.node(ino).map(|n| &n.kind) {
                if content.chunks.len() > 1
                    && content.size >= inner.opts.assemble_min_bytes
                    && inner.cache.contains_all(&content.chunks)
                {
                    inner.cache.submit_assembly(&content.chunks);
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = &self.inner;
        inner.counters.reads.fetch_add(1, Ordering::Relaxed);
        let Some(NodeKind::File(content)) = inner.node(ino).map(|n| &n.kind) else {
            return reply.error(Errno::EINVAL);
        };
        match inner.read_file(ino.0, content, offset, size.into()) {
            Ok(data) => {
                inner.counters.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data);
            }
            Err(e) => {
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                error!(ino = ino.0, offset, size, error = %e, "lazy read failed; returning EIO");
                reply.error(Errno::EIO);
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Dir { .. }) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.inner.node(ino) else { return reply.error(Errno::ENOENT) };
        let NodeKind::Dir { children } = &node.kind else { return reply.error(Errno::ENOTDIR) };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (node.parent, FileType::Directory, OsStr::new("..")),
        ];
        let entries = dots.into_iter().chain(children.iter().filter_map(|(name, &child)| {
            self.inner.node(INodeNo(child)).map(|c| (child, c.attr.kind, name.as_os_str()))
        }));
        for (i, (child, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.inner.total_bytes.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.inner.nodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(node) = self.inner.node(ino) else { return reply.error(Errno::ENOENT) };
        let Some(value) = name.to_str().and_then(|n| node.xattrs.get(n)) else {
            return reply.error(Errno::NO_XATTR);
        };
        xattr_reply(value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(node) = self.inner.node(ino) else { return reply.error(Errno::ENOENT) };
        let mut names = Vec::new();
        for name in node.xattrs.keys() {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        xattr_reply(&names, size, reply);
    }

    /// No ioctls (e.g. FS_IOC_GETFLAGS from `ls`/pip probing): ENOTTY, quietly.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.inner.node(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    // Everything that would change the tree: read-only. (The mount is also `ro`, so
    // the kernel normally answers EROFS before asking.)
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _: &Request, _: INodeNo, _: &OsStr, _: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: INodeNo,
        _: &OsStr,
        _: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        _: u64,
        _: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(&self, _: &Request, _: INodeNo, _: &OsStr, _: &[u8], _: i32, _: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

/// File capabilities (`security.capability`) name the root they are valid for: a
/// revision 2 value means the host's root, which the kernel ignores inside a user
/// namespace, so it becomes revision 3 with the shifted root (a revision 3 root id is
/// shifted like an owner). Other values are left as they are.
fn shift_file_caps(xattrs: &mut BTreeMap<String, Vec<u8>>, shift: IdShift) {
    const NAME: &str = "security.capability";
    const REVISION_MASK: u32 = 0xFF00_0000;
    const REVISION_2: u32 = 0x0200_0000;
    const REVISION_3: u32 = 0x0300_0000;
    let Some(value) = xattrs.get_mut(NAME) else { return };
    let Some(magic) = value.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) else { return };
    match (magic & REVISION_MASK, value.len()) {
        (REVISION_2, 20) => {
            let magic = (magic & !REVISION_MASK) | REVISION_3;
            value[..4].copy_from_slice(&magic.to_le_bytes());
            value.extend_from_slice(&shift.to_host(0).to_le_bytes());
        }
        (REVISION_3, 24) => {
            let root = u32::from_le_bytes([value[20], value[21], value[22], value[23]]);
            value[20..].copy_from_slice(&shift.to_host(root).to_le_bytes());
        }
        _ => {}
    }
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: IdShift = IdShift { host_base: 1_000_000_000, size: 65_536 };

    fn caps(value: Vec<u8>) -> Vec<u8> {
        let mut x = BTreeMap::from([("security.capability".to_owned(), value)]);
        shift_file_caps(&mut x, NS);
        x.remove("security.capability").unwrap()
    }

    #[test]
    fn file_caps_of_host_root_become_caps_of_the_shifted_root() {
        // Revision 2, effective, cap_net_raw permitted.
        let mut v2 = (0x0200_0001u32).to_le_bytes().to_vec();
        v2.extend_from_slice(&[0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let v3 = caps(v2.clone());
        assert_eq!(v3.len(), 24);
        assert_eq!(&v3[..4], &(0x0300_0001u32).to_le_bytes());
        assert_eq!(&v3[4..20], &v2[4..20]);
        assert_eq!(&v3[20..], &1_000_000_000u32.to_le_bytes());
        // Revision 3 naming container uid 5: shifted like an owner.
        let mut r3 = v3.clone();
        r3[20..].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(&caps(r3)[20..], &1_000_000_005u32.to_le_bytes());
        // Anything else is left alone.
        assert_eq!(caps(vec![1, 2, 3]), vec![1, 2, 3]);
    }
}
