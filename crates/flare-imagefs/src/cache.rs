//! [`ChunkCache`]: the worker-local, size-bounded, LRU, restart-surviving cache of
//! chunks shared by every image mounted on a worker.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use flare_cas::{BlobStore, CasError, Chunk, Digest};
use tracing::{debug, warn};

use crate::error::{io_ctx, ImageFsError, Result};

/// How a chunk read was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the cache directory (or from memory right after this read fetched it
    /// for another reader).
    Hit,
    /// This call fetched it from the blob store.
    Fetched,
    /// Another thread was fetching it; this call waited for that fetch.
    Joined,
}

/// Counters of a [`ChunkCache`], since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunk reads served from the cache directory.
    pub hits: u64,
    /// Chunk reads that had to fetch (or wait for a fetch).
    pub misses: u64,
    /// Chunks fetched from a blob store.
    pub fetches: u64,
    /// Bytes fetched from blob stores.
    pub fetched_bytes: u64,
    /// Chunk files removed to stay under the size bound.
    pub evictions: u64,
    /// Cached chunk files that failed digest verification (removed and refetched).
    pub corrupt: u64,
    /// Chunks that could not be written to the cache (served from memory anyway).
    pub write_errors: u64,
    /// Writes that found the cache's disk full (ENOSPC/EDQUOT). Each is logged; the
    /// cache then evicts least recently used chunks to make room and retries once
    /// (a failed retry is a `write_errors`).
    pub disk_full: u64,
    /// Assembled file copies built for passthrough (see [`ChunkCache::assemble`]).
    pub assembled: u64,
    /// Assemblies that failed (logged; the file is then served chunk by chunk).
    pub assemble_errors: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    write_errors: AtomicU64,
    disk_full: AtomicU64,
    assembled: AtomicU64,
    assemble_errors: AtomicU64,
}

struct Meta {
    size: u64,
    tick: u64,
    /// Hashed since this process opened the cache (files found by the start-up scan
    /// are verified on their first load).
    verified: bool,
    /// An assembled file (under `views/`), not a chunk.
    view: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<Digest, Meta>,
    /// tick -> digest, oldest first.
    lru: BTreeMap<u64, Digest>,
    total: u64,
    tick: u64,
}

impl State {
    fn bump(&mut self, digest: &Digest) -> Option<(u64, bool)> {
        self.tick += 1;
        let tick = self.tick;
        let meta = self.entries.get_mut(digest)?;
        self.lru.remove(&meta.tick);
        meta.tick = tick;
        self.lru.insert(tick, *digest);
        Some((meta.size, meta.verified))
    }

    fn remove(&mut self, digest: &Digest) -> bool {
        match self.entries.remove(digest) {
            Some(meta) => {
                self.lru.remove(&meta.tick);
                self.total -= meta.size;
                true
            }
            None => false,
        }
    }
}

/// A fetch in progress, waited on by other readers of the same chunk.
struct Inflight {
    done: Mutex<Option<std::result::Result<Arc<Vec<u8>>, String>>>,
    cv: Condvar,
}

/// A directory of verified chunks shared by every image on a worker:
///
/// ```text
/// ROOT/chunks/ab/ab12…(64 hex)   one file per chunk (blob), named by its BLAKE3 digest
/// ROOT/views/ab/ab12…(64 hex)    assembled copies of whole multi-chunk files, named by
///                                [`ChunkCache::view_key`]; rebuilt per process (emptied at open)
/// ROOT/tmp/                      writes in progress; emptied at open
/// ```
///
/// - **Bounded**: when the total size of chunk files passes `capacity` bytes, the least
///   recently used chunks are deleted (never the one just added).
/// - **Survives a restart**: [`ChunkCache::open`] rebuilds its index by scanning the
///   directory; recency across restarts comes from file mtimes, which are refreshed
///   when a chunk is first used by a process.
/// - **Verified**: a chunk fetched from the store is hashed before it is used or
///   written; a chunk file is hashed the first time this process loads it (they are
///   written once, read-only, and only by this cache, so later loads in the same process
///   trust it). A mismatch deletes the file and refetches.
/// - **Atomic writes**: temp file + rename, so a reader sees a chunk whole or not at
///   all. No fsync: a file torn by a crash fails verification and is refetched.
/// - **De-duplicated fetches**: concurrent misses of one chunk make one store request;
///   the others wait for it (read-ahead fetches go through the same path).
/// - **Open files kept**: up to [`OPEN_FILES`] verified chunk files stay open (LRU)
///   between reads, so a hit is one `pread`; an evicted chunk's file is closed.
/// - **Disk full**: a write that fails with ENOSPC/EDQUOT evicts least recently used
///   entries (about the chunk's size) and retries once; if that fails too, the chunk is
///   served from memory uncached. Both are logged and counted ([`CacheStats`]).
/// - **Assembled files**: a multi-chunk file whose chunks are all cached can be copied
///   into one file ([`ChunkCache::assemble`], in the background), so the FUSE layer can
///   hand the kernel one backing file (passthrough). Built only from chunks verified by
///   this process and never trusted across a restart (the directory is emptied at
///   open), they count toward the size bound and are evicted like chunks.
pub struct ChunkCache {
    root: PathBuf,
    capacity: u64,
    state: Mutex<State>,
    inflight: Mutex<HashMap<Digest, Arc<Inflight>>>,
    /// Open chunk files (verified ones only), so hot reads are one `pread`.
    fds: Mutex<FdCache>,
    counters: Counters,
    seq: AtomicU64,
    /// Background assembly of whole-file copies.
    assembly: Mutex<AssemblyQueue>,
    assembly_idle: Condvar,
}

/// A queued [`ChunkCache::assemble`] job: the view key and the file's chunks.
type AssemblyJob = (Digest, Vec<Chunk>);

#[derive(Default)]
struct AssemblyQueue {
    todo: std::collections::VecDeque<AssemblyJob>,
    /// Queued or being built.
    pending: std::collections::HashSet<Digest>,
    /// Whether the (single) assembly thread is running.
    running: bool,
}

/// How many chunk files a [`ChunkCache`] keeps open between reads (LRU).
pub const OPEN_FILES: usize = 256;

/// A bounded LRU of open chunk files, keyed by digest. Holds only files that have been
/// verified by this process; a chunk dropped from the index is dropped here too.
#[derive(Default)]
struct FdCache {
    files: HashMap<Digest, (Arc<File>, u64)>,
    lru: BTreeMap<u64, Digest>,
    tick: u64,
}

impl FdCache {
    fn get(&mut self, digest: &Digest) -> Option<Arc<File>> {
        self.tick += 1;
        let tick = self.tick;
        let (file, t) = self.files.get_mut(digest)?;
        self.lru.remove(t);
        *t = tick;
        self.lru.insert(tick, *digest);
        Some(file.clone())
    }

    fn put(&mut self, digest: &Digest, file: Arc<File>) {
        self.remove(digest);
        self.tick += 1;
        self.files.insert(*digest, (file, self.tick));
        self.lru.insert(self.tick, *digest);
        while self.files.len() > OPEN_FILES {
            let Some((_, oldest)) = self.lru.pop_first() else { break };
            self.files.remove(&oldest);
        }
    }

    fn remove(&mut self, digest: &Digest) {
        if let Some((_, t)) = self.files.remove(digest) {
            self.lru.remove(&t);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ChunkCache {
    /// Open (creating if needed) the cache at `root`, bounded to `capacity` bytes of
    /// chunk files. Scans existing chunk files into the index (unverified until first
    /// use), removes leftover temp files and evicts down to the bound.
    pub fn open(root: &Path, capacity: u64) -> Result<ChunkCache> {
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        let views = root.join("views");
        // Assembled copies are never trusted across a restart: rebuilt from chunks that
        // this process verifies.
        if views.exists() {
            fs::remove_dir_all(&views).map_err(io_ctx(format!("emptying {}", views.display())))?;
        }
        for dir in [&chunks, &tmp, &views] {
            fs::create_dir_all(dir).map_err(io_ctx(format!("creating {}", dir.display())))?;
        }
        for leftover in fs::read_dir(&tmp).map_err(io_ctx(format!("listing {}", tmp.display())))?.flatten() {
            let _ = fs::remove_file(leftover.path());
        }
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for fan in fs::read_dir(&chunks).map_err(io_ctx(format!("listing {}", chunks.display())))?.flatten() {
            let Ok(files) = fs::read_dir(fan.path()) else { continue };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(digest) = name.to_str().and_then(|n| Digest::from_hex(n).ok()) else {
                    warn!(path = %file.path().display(), "ignoring a stray file in the chunk cache");
                    continue;
                };
                let Ok(md) = file.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                found.push((md.modified().unwrap_or(SystemTime::UNIX_EPOCH), digest, md.len()));
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, digest, size) in found {
            state.tick += 1;
            state.entries.insert(digest, Meta { size, tick: state.tick, verified: false, view: false });
            state.lru.insert(state.tick, digest);
            state.total += size;
        }
        let cache = ChunkCache {
            root: root.to_path_buf(),
            capacity,
            state: Mutex::new(state),
            inflight: Mutex::new(HashMap::new()),
            fds: Mutex::new(FdCache::default()),
            counters: Counters::default(),
            seq: AtomicU64::new(0),
            assembly: Mutex::new(AssemblyQueue::default()),
            assembly_idle: Condvar::new(),
        };
        let victims = cache.evict_locked(&mut lock(&cache.state), None, 0);
        cache.delete_files(victims);
        let st = lock(&cache.state);
        debug!(root = %root.display(), chunks = st.entries.len(), bytes = st.total, capacity, "chunk cache opened");
        drop(st);
        Ok(cache)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The size bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of chunk files currently indexed.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.state).total
    }

    /// Number of chunks currently indexed.
    pub fn len(&self) -> usize {
        lock(&self.state).entries.len()
    }

    /// Whether the cache holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the chunk is indexed (it may still fail verification when loaded).
    pub fn contains(&self, digest: &Digest) -> bool {
        lock(&self.state).entries.contains_key(digest)
    }

    /// Where the chunk's file lives (or would live).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Counters since the cache was opened.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            disk_full: c.disk_full.load(Ordering::Relaxed),
            assembled: c.assembled.load(Ordering::Relaxed),
            assemble_errors: c.assemble_errors.load(Ordering::Relaxed),
        }
    }

    /// `len` bytes at `from` of chunk `digest` (cut short at its end), from the cache, or
    /// fetched from `store` (verified, then cached) on a miss.
    pub fn read(
        &self,
        store: &dyn BlobStore,
        digest: &Digest,
        from: u64,
        len: u64,
    ) -> Result<(Vec<u8>, Source)> {
        let mut out = Vec::new();
        let source = self.read_into(store, digest, from, len, &mut out)?;
        Ok((out, source))
    }

    /// Like [`ChunkCache::read`], appending the bytes to `out` (no extra copy on a hit:
    /// one `pread` from a kept-open chunk file into `out`).
    pub fn read_into(
        &self,
        store: &dyn BlobStore,
        digest: &Digest,
        from: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<Source> {
        if self.read_cached(digest, from, len, out)? {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Source::Hit);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let (data, source) = self.fetch_dedup(store, digest)?;
        out.extend_from_slice(slice(&data, from, len));
        Ok(source)
    }

    /// Make sure the chunk is in the cache (fetching it if needed), without reading it
    /// back; for prefetching. Returns `Source::Hit` if it was already there.
    pub fn ensure(&self, store: &dyn BlobStore, digest: &Digest) -> Result<Source> {
        if self.contains(digest) {
            return Ok(Source::Hit);
        }
        Ok(self.fetch_dedup(store, digest)?.1)
    }

    /// Hint the kernel to start reading a cached chunk's file into the page cache
    /// (`posix_fadvise(WILLNEED)`, asynchronous); no-op for a chunk not cached.
    pub(crate) fn will_need(&self, digest: &Digest) {
        let verified = match lock(&self.state).entries.get(digest) {
            Some(meta) => meta.verified,
            None => return,
        };
        let kept = if verified { lock(&self.fds).get(digest) } else { None };
        let file = match kept {
            Some(f) => f,
            None => match File::open(self.path_of(digest)) {
                Ok(f) => Arc::new(f),
                Err(_) => return,
            },
        };
        // SAFETY: fadvise on an open fd we own; it only hints the page cache.
        unsafe {
            libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&*file), 0, 0, libc::POSIX_FADV_WILLNEED);
        }
    }

    /// Serve from the cache directory, appending to `out`; `Ok(false)` on a miss
    /// (including a chunk file that vanished or failed verification, which is dropped
    /// from the index). Verified chunks are read with `pread` from a kept-open file.
    fn read_cached(&self, digest: &Digest, from: u64, len: u64, out: &mut Vec<u8>) -> Result<bool> {
        let Some((size, verified)) = lock(&self.state).bump(digest) else {
            return Ok(false);
        };
        let path = self.path_of(digest);
        let open = if verified { lock(&self.fds).get(digest) } else { None };
        let reused = open.is_some();
        let file = match open {
            Some(f) => f,
            None => match File::open(&path) {
                Ok(f) => Arc::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    warn!(%digest, "cached chunk file vanished; refetching");
                    lock(&self.state).remove(digest);
                    lock(&self.fds).remove(digest);
                    return Ok(false);
                }
                Err(e) => return Err(io_ctx(format!("opening {}", path.display()))(e)),
            },
        };
        if !verified {
            let mut data = Vec::with_capacity(size as usize);
            (&*file).read_to_end(&mut data).map_err(io_ctx(format!("reading {}", path.display())))?;
            if Digest::of(&data) != *digest {
                // Several readers may find the same bad file at once: only the first
                // removes it (a good copy refetched meanwhile is verified, kept).
                let mut st = lock(&self.state);
                if st.entries.get(digest).is_some_and(|m| !m.verified) {
                    st.remove(digest);
                    let _ = fs::remove_file(&path);
                    drop(st);
                    warn!(%digest, path = %path.display(), "cached chunk is corrupt; removed, refetching");
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(false);
            }
            {
                let mut st = lock(&self.state);
                if let Some(meta) = st.entries.get_mut(digest) {
                    meta.verified = true;
                    // Only files still indexed are kept open (an eviction may have
                    // raced this load; the fd cache then simply misses).
                    lock(&self.fds).put(digest, file.clone());
                }
            }
            // Refresh the mtime: it is the recency the next start-up scan sees.
            let _ = file.set_modified(SystemTime::now());
            out.extend_from_slice(slice(&data, from, len));
            return Ok(true);
        }
        if !reused {
            let st = lock(&self.state);
            if st.entries.contains_key(digest) {
                lock(&self.fds).put(digest, file.clone());
            }
        }
        let end = from.saturating_add(len).min(size);
        if from >= end {
            return Ok(true);
        }
        let start = out.len();
        let want = (end - from) as usize;
        out.resize(start + want, 0);
        if let Err(e) = file.read_exact_at(&mut out[start..], from) {
            out.truncate(start);
            return Err(io_ctx(format!("reading {}", path.display()))(e));
        }
        Ok(true)
    }

    /// The key of the assembled copy of a file made of `chunks` (a digest of the chunk
    /// list, in a domain of its own: it never equals a chunk's digest in practice).
    pub fn view_key(chunks: &[Chunk]) -> Digest {
        let mut list = b"flare-imagefs assembled file v1\n".to_vec();
        for c in chunks {
            list.extend_from_slice(format!("{} {} {}\n", c.digest.hex(), c.offset, c.len).as_bytes());
        }
        Digest::of(&list)
    }

    /// Where the assembled copy with this key lives (or would live).
    pub fn view_path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.root.join("views").join(&hex[..2]).join(hex)
    }

    /// An open file of a cached chunk, verified by this process (verifying it now if it
    /// was found by the start-up scan); `None` if it is not cached (or was corrupt, and
    /// is now dropped). For handing the file to the kernel (passthrough).
    pub(crate) fn verified_file(&self, digest: &Digest) -> Option<Arc<File>> {
        let mut sink = Vec::new();
        if !matches!(self.read_cached(digest, 0, 0, &mut sink), Ok(true)) {
            return None;
        }
        if let Some(file) = lock(&self.fds).get(digest) {
            return Some(file);
        }
        File::open(self.path_of(digest)).ok().map(Arc::new)
    }

    /// The open assembled copy with key `key`, if there is one (it counts as a use).
    pub(crate) fn view_file(&self, key: &Digest) -> Option<Arc<File>> {
        lock(&self.state).bump(key)?;
        if let Some(file) = lock(&self.fds).get(key) {
            return Some(file);
        }
        match File::open(self.view_path(key)) {
            Ok(file) => {
                let file = Arc::new(file);
                let st = lock(&self.state);
                if st.entries.contains_key(key) {
                    lock(&self.fds).put(key, file.clone());
                }
                Some(file)
            }
            Err(e) => {
                warn!(%key, error = %e, "assembled file vanished; dropping it");
                lock(&self.state).remove(key);
                lock(&self.fds).remove(key);
                None
            }
        }
    }

    /// Whether every chunk of a file is cached (indexed).
    pub(crate) fn contains_all(&self, chunks: &[Chunk]) -> bool {
        let st = lock(&self.state);
        chunks.iter().all(|c| st.entries.contains_key(&c.digest))
    }

    /// Build the assembled copy of a file made of `chunks` (all cached) under
    /// [`ChunkCache::view_key`]: every chunk is verified by this process (hashed on its
    /// first load, as for reads) and copied in the kernel (`copy_file_range`) into a
    /// temp file that is then renamed into `views/`. `Ok(false)` if it already exists.
    /// Counted in [`CacheStats::assembled`]; a failure is returned (and the temp file
    /// removed), nothing else changes.
    pub fn assemble(&self, chunks: &[Chunk]) -> Result<bool> {
        let key = Self::view_key(chunks);
        if self.contains(&key) {
            return Ok(false);
        }
        let size: u64 = chunks.iter().map(|c| c.len).sum();
        let tmp = self.tmp_path(&key);
        let dest = self.view_path(&key);
        let build = || -> Result<()> {
            let out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .open(&tmp)
                .map_err(io_ctx(format!("creating {}", tmp.display())))?;
            for c in chunks {
                let Some(src) = self.verified_file(&c.digest) else {
                    return Err(ImageFsError::Io {
                        context: format!("assembling {key}"),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("chunk {} is not cached", c.digest),
                        ),
                    });
                };
                let len = src.metadata().map_err(io_ctx(format!("stat of chunk {}", c.digest)))?.len();
                if len != c.len {
                    return Err(ImageFsError::WrongLength { digest: c.digest, got: len, expected: c.len });
                }
                copy_range(&src, &out, c.offset, c.len).map_err(io_ctx(format!(
                    "copying chunk {} into {}",
                    c.digest,
                    tmp.display()
                )))?;
            }
            drop(out);
            fs::create_dir_all(dest.parent().expect("view path has a parent"))
                .and_then(|()| fs::rename(&tmp, &dest))
                .map_err(io_ctx(format!("renaming into {}", dest.display())))
        };
        if let Err(e) = build() {
            let _ = fs::remove_file(&tmp);
            if is_disk_full(&e) {
                self.counters.disk_full.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.assemble_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.index(&key, size, true);
        self.counters.assembled.fetch_add(1, Ordering::Relaxed);
        debug!(%key, size, chunks = chunks.len(), "assembled file");
        Ok(true)
    }

    /// Queue [`ChunkCache::assemble`] of a file made of `chunks` for a background
    /// thread (one per cache; it ends when the queue is empty). Skipped when the copy
    /// exists or is queued, or when the file is over a quarter of the size bound.
    pub(crate) fn submit_assembly(self: &Arc<Self>, chunks: &[Chunk]) {
        let size: u64 = chunks.iter().map(|c| c.len).sum();
        if size > self.capacity / 4 {
            return;
        }
        let key = Self::view_key(chunks);
        if self.contains(&key) {
            return;
        }
        let mut q = lock(&self.assembly);
        if !q.pending.insert(key) {
            return;
        }
        q.todo.push_back((key, chunks.to_vec()));
        if q.running {
            return;
        }
        q.running = true;
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("imagefs-assemble".into()).spawn(move || loop {
            let job = {
                let mut q = lock(&me.assembly);
                match q.todo.pop_front() {
                    Some(job) => job,
                    None => {
                        q.running = false;
                        me.assembly_idle.notify_all();
                        return;
                    }
                }
            };
            if let Err(e) = me.assemble(&job.1) {
                warn!(key = %job.0, error = %e, "could not assemble a file for passthrough; it is served chunk by chunk");
            }
            lock(&me.assembly).pending.remove(&job.0);
        });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the assembly thread");
            q.running = false;
            q.todo.clear();
            q.pending.clear();
        }
    }

    /// Block until no assembly is queued or running (for tests and benchmarks).
    pub fn wait_assembly(&self) {
        let mut q = lock(&self.assembly);
        while q.running || !q.todo.is_empty() {
            q = self.assembly_idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Fetch the chunk once however many threads ask at the same time.
    fn fetch_dedup(&self, store: &dyn BlobStore, digest: &Digest) -> Result<(Arc<Vec<u8>>, Source)> {
        let (slot, leader) = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(digest) {
                Some(slot) => (slot.clone(), false),
                None => {
                    let slot = Arc::new(Inflight { done: Mutex::new(None), cv: Condvar::new() });
                    inflight.insert(*digest, slot.clone());
                    (slot, true)
                }
            }
        };
        if !leader {
            let mut done = lock(&slot.done);
            while done.is_none() {
                done = slot.cv.wait(done).unwrap_or_else(|p| p.into_inner());
            }
            return match done.as_ref().expect("checked above") {
                Ok(data) => Ok((data.clone(), Source::Joined)),
                Err(message) => Err(ImageFsError::FetchFailed { digest: *digest, message: message.clone() }),
            };
        }
        // A fetch that finished just before we became leader may have cached it.
        let mut cached = Vec::new();
        let result = match self.read_cached(digest, 0, u64::MAX, &mut cached) {
            Ok(true) => Ok((Arc::new(cached), Source::Hit)),
            _ => self.fetch_verified(store, digest).map(|data| {
                let data = Arc::new(data);
                self.insert(digest, &data);
                (data, Source::Fetched)
            }),
        };
        *lock(&slot.done) = Some(match &result {
            Ok((data, _)) => Ok(data.clone()),
            Err(e) => Err(e.to_string()),
        });
        slot.cv.notify_all();
        lock(&self.inflight).remove(digest);
        result
    }

    /// Get the blob from the store and check its digest; one refetch on a mismatch.
    fn fetch_verified(&self, store: &dyn BlobStore, digest: &Digest) -> Result<Vec<u8>> {
        for attempt in 0..2 {
            match store.get(digest) {
                Ok(data) if Digest::of(&data) == *digest => {
                    self.counters.fetches.fetch_add(1, Ordering::Relaxed);
                    self.counters.fetched_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Ok(data);
                }
                Ok(_) => warn!(%digest, attempt, "blob store returned a corrupt chunk"),
                Err(CasError::Corrupt { .. }) if attempt == 0 => {
                    warn!(%digest, attempt, "blob store reports the chunk corrupt; refetching")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ImageFsError::Corrupt { digest: *digest })
    }

    /// Write a verified chunk into the cache (temp file + rename) and index it,
    /// evicting down to the bound. Failures are logged, counted and otherwise ignored:
    /// the caller already has the bytes.
    fn insert(&self, digest: &Digest, data: &[u8]) {
        let mut result = self.write_file(digest, data);
        if result.as_ref().is_err_and(is_disk_full) {
            self.counters.disk_full.fetch_add(1, Ordering::Relaxed);
            let freed = self.evict_for_space(data.len() as u64);
            warn!(%digest, size = data.len(), freed, "chunk cache disk is full; evicted to make room, retrying");
            if freed > 0 {
                result = self.write_file(digest, data);
            }
        }
        if let Err(e) = result {
            warn!(%digest, error = %e, "could not write chunk to the cache; serving it uncached");
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.index(digest, data.len() as u64, false);
    }

    /// Add a just-written, verified entry to the index and evict down to the bound.
    fn index(&self, key: &Digest, size: u64, view: bool) {
        let victims = {
            let mut st = lock(&self.state);
            if !st.entries.contains_key(key) {
                st.tick += 1;
                let tick = st.tick;
                st.entries.insert(*key, Meta { size, tick, verified: true, view });
                st.lru.insert(tick, *key);
                st.total += size;
            }
            self.evict_locked(&mut st, Some(key), 0)
        };
        self.delete_files(victims);
    }

    /// The disk under the cache is full: evict least recently used entries totalling at
    /// least `need` bytes (fewer if the cache holds less). Returns the bytes freed.
    fn evict_for_space(&self, need: u64) -> u64 {
        let (victims, freed) = {
            let mut st = lock(&self.state);
            let before = st.total;
            let victims = self.evict_locked(&mut st, None, need.max(1));
            (victims, before - st.total)
        };
        self.delete_files(victims);
        freed
    }

    fn tmp_path(&self, key: &Digest) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}.{}.{n}", key.hex(), std::process::id()))
    }

    fn write_file(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let tmp = self.tmp_path(digest);
        let dest = self.path_of(digest);
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o444).open(&tmp)?;
            f.write_all(data)?;
            drop(f);
            fs::create_dir_all(dest.parent().expect("chunk path has a parent"))?;
            fs::rename(&tmp, &dest)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_ctx(format!("writing {}", dest.display()))(e)
        })
    }

    /// Drop least recently used entries until under the bound (and, with `free` > 0,
    /// until at least `free` bytes are dropped); returns their keys and whether each
    /// is a view (files are deleted by the caller, outside the lock).
    fn evict_locked(&self, st: &mut State, keep: Option<&Digest>, free: u64) -> Vec<(Digest, bool)> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        while st.total > self.capacity || freed < free {
            let Some((&tick, &digest)) = st.lru.iter().find(|(_, d)| Some(*d) != keep) else { break };
            st.lru.remove(&tick);
            let mut view = false;
            if let Some(meta) = st.entries.remove(&digest) {
                st.total -= meta.size;
                freed += meta.size;
                view = meta.view;
            }
            victims.push((digest, view));
        }
        self.counters.evictions.fetch_add(victims.len() as u64, Ordering::Relaxed);
        victims
    }

    fn delete_files(&self, victims: Vec<(Digest, bool)>) {
        if victims.is_empty() {
            return;
        }
        {
            let mut fds = lock(&self.fds);
            for (digest, _) in &victims {
                fds.remove(digest);
            }
        }
        for (digest, view) in victims {
            debug!(%digest, view, "evicting");
            let path = if view { self.view_path(&digest) } else { self.path_of(&digest) };
            if let Err(e) = fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(%digest, error = %e, "could not delete evicted chunk");
                }
            }
        }
    }
}

/// Copy `len` bytes from the start of `src` to `dst` at `at`, in the kernel where it
/// can (`copy_file_range`), else through a buffer.
fn copy_range(src: &File, dst: &File, at: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut off_in, mut off_out) = (0i64, at as i64);
    let mut left = len;
    while left > 0 {
        // SAFETY: both fds are open for the duration of the call; the offset pointers
        // point to live locals, so neither file's own position is used or changed.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left as usize,
                0,
            )
        };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk file is shorter than expected"));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => break,
            _ => return Err(e),
        }
    }
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off_in as u64)?;
        dst.write_all_at(&buf[..n], off_out as u64)?;
        off_in += n as i64;
        off_out += n as i64;
        left -= n as u64;
    }
    Ok(())
}

fn is_disk_full(e: &ImageFsError) -> bool {
    matches!(e, ImageFsError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
}

fn slice(data: &[u8], from: u64, len: u64) -> &[u8] {
    let size = data.len() as u64;
    let start = from.min(size) as usize;
    let end = from.saturating_add(len).min(size) as usize;
    &data[start..end]
}
