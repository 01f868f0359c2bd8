//! End-to-end tests of the lazy image file system: real FUSE mounts (as root, with
//! /dev/fuse; skipped with a printed reason otherwise) of manifests snapshotted from a
//! temp tree, behind counting / failing / slow store wrappers.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flare_cas::{BlobInfo, BlobStore, CasError, Digest, EntryKind, LocalStore, Manifest};
use flare_imagefs::{ChunkCache, IdShift, ImageFs, ImageFsOptions, MountHandle, Source, OVERFLOW_ID};
use rand::{Rng, RngCore, SeedableRng};
use tempfile::TempDir;

/// A store wrapper that counts and records `get`s, can be told to fail, and can be slow.
struct TestStore {
    inner: LocalStore,
    gets: AtomicU64,
    fetched: Mutex<Vec<Digest>>,
    fail: AtomicBool,
    delay: Duration,
}

impl TestStore {
    fn new(root: &Path) -> Arc<TestStore> {
        Self::with_delay(root, Duration::ZERO)
    }
    fn with_delay(root: &Path, delay: Duration) -> Arc<TestStore> {
        Arc::new(TestStore {
            inner: LocalStore::open(root).unwrap(),
            gets: AtomicU64::new(0),
            fetched: Mutex::new(Vec::new()),
            fail: AtomicBool::new(false),
            delay,
        })
    }
    fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }
    fn fetched(&self) -> BTreeSet<Digest> {
        self.fetched.lock().unwrap().iter().copied().collect()
    }
    fn unreachable() -> CasError {
        CasError::Io {
            context: "blob store".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "unreachable (test)"),
        }
    }
}

impl BlobStore for TestStore {
    fn put(&self, data: &[u8]) -> flare_cas::Result<Digest> {
        self.inner.put(data)
    }
    fn put_file(&self, path: &Path) -> flare_cas::Result<Digest> {
        self.inner.put_file(path)
    }
    fn get(&self, digest: &Digest) -> flare_cas::Result<Vec<u8>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        std::thread::sleep(self.delay);
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.fetched.lock().unwrap().push(*digest);
        self.inner.get(digest)
    }
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> flare_cas::Result<Vec<u8>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.read_range(digest, offset, len)
    }
    fn has(&self, digest: &Digest) -> flare_cas::Result<bool> {
        self.inner.has(digest)
    }
    fn touch(&self, digest: &Digest) -> flare_cas::Result<bool> {
        self.inner.touch(digest)
    }
    fn stat(&self, digest: &Digest) -> flare_cas::Result<Option<BlobInfo>> {
        self.inner.stat(digest)
    }
    fn list(&self) -> flare_cas::Result<Vec<Digest>> {
        self.inner.list()
    }
    fn delete(&self, digest: &Digest) -> flare_cas::Result<bool> {
        self.inner.delete(digest)
    }
}

fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIP: not running as root (FUSE mounts need it)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is missing");
        return false;
    }
    true
}

/// A source tree, its manifest in a store, a cache dir and mount points.
struct Fixture {
    tmp: TempDir,
    src: PathBuf,
    store: Arc<TestStore>,
    manifest: Arc<Manifest>,
}

const BIG: usize = 6 << 20;
const BIG2: usize = 3 << 20;

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    fs::create_dir_all(src.join("usr/lib/python3/site")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("empty-dir")).unwrap();
    let mut big = vec![0u8; BIG];
    rng.fill_bytes(&mut big);
    fs::write(src.join("usr/lib/big.bin"), &big).unwrap();
    let mut big2 = vec![0u8; BIG2];
    rng.fill_bytes(&mut big2);
    fs::write(src.join("usr/lib/python3/other.bin"), &big2).unwrap();
    fs::write(src.join("usr/lib/python3/site/mod.py"), b"print('hello from the image')\n").unwrap();
    fs::write(src.join("etc/hostname"), b"flare\n").unwrap();
    fs::write(src.join("etc/empty"), b"").unwrap();
    let exe = src.join("usr/run.sh");
    fs::write(&exe, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("etc/hostname"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("../usr/lib/big.bin", src.join("etc/link")).unwrap();
    let old = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    fs::File::options().write(true).open(src.join("etc/hostname")).unwrap().set_modified(old).unwrap();

    let store = TestStore::new(&tmp.path().join("store"));
    let mut manifest = flare_cas::snapshot_dir(store.as_ref(), &src, None).unwrap();
    manifest.entries.get_mut("etc/hostname").unwrap().xattrs.insert("user.flare".into(), b"image".to_vec());
    let big_chunks = match &manifest.get("usr/lib/big.bin").unwrap().kind {
        EntryKind::File(c) => c.chunks.len(),
        _ => unreachable!(),
    };
    assert!(big_chunks >= 3, "big file should span several chunks, got {big_chunks}");
    // Snapshotting read everything through the store's put path, not get.
    assert_eq!(store.gets(), 0);
    Fixture { tmp, src, store, manifest: Arc::new(manifest) }
}

impl Fixture {
    fn cache(&self, name: &str) -> Arc<ChunkCache> {
        Arc::new(ChunkCache::open(&self.tmp.path().join(name), 1 << 30).unwrap())
    }
    fn fs(&self, cache: &Arc<ChunkCache>) -> ImageFs {
        self.fs_with(cache, ImageFsOptions::default())
    }
    /// Without directory-locality prefetch: only what is read (and chunk read-ahead
    /// within a file) is fetched.
    fn fs_strict(&self, cache: &Arc<ChunkCache>) -> ImageFs {
        self.fs_with(cache, strict())
    }
    fn fs_with(&self, cache: &Arc<ChunkCache>, opts: ImageFsOptions) -> ImageFs {
        ImageFs::new(self.manifest.clone(), self.store.clone(), cache.clone(), opts).unwrap()
    }
    fn mount(&self, fs: &ImageFs, name: &str) -> (PathBuf, MountHandle) {
        let mnt = self.tmp.path().join(name);
        fs::create_dir_all(&mnt).unwrap();
        let handle = fs.mount(&mnt).unwrap();
        (mnt, handle)
    }
    fn chunks_of(&self, path: &str) -> BTreeSet<Digest> {
        match &self.manifest.get(path).unwrap().kind {
            EntryKind::File(c) => c.chunks.iter().map(|c| c.digest).collect(),
            _ => panic!("{path} is not a file"),
        }
    }
}

fn strict() -> ImageFsOptions {
    ImageFsOptions { dir_prefetch_file_max: 0, ..ImageFsOptions::default() }
}

fn mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Wait (bounded) until the assembled copy at `view` is built, while the image is still
/// mounted. The copy is queued when the FUSE daemon handles the last RELEASE of the file,
/// and `close(2)` does not wait for that: the kernel sends RELEASE in the background. So
/// right after `fs::read` returns, the assembly may not be queued yet
/// ([`ChunkCache::wait_assembly`] then has nothing to wait for), and an unmount at that
/// moment ends the connection with the RELEASE still queued, so it is never handled.
fn wait_for_view(cache: &ChunkCache, view: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !view.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no assembled copy at {} 20 s after the file was closed: {:?}",
            view.display(),
            cache.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    cache.wait_assembly();
}

fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.insert(rel);
        }
    }
    out
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

#[test]
fn tree_metadata_contents_and_read_only() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    let imagefs = fx.fs(&cache);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");

    // Listing.
    assert_eq!(walk(&mnt), walk(&fx.src));

    // Metadata of every entry equals the source's.
    for rel in walk(&fx.src) {
        let a = fs::symlink_metadata(fx.src.join(&rel)).unwrap();
        let b = fs::symlink_metadata(mnt.join(&rel)).unwrap();
        assert_eq!(a.mode(), b.mode(), "mode of {rel}");
        assert_eq!(a.uid(), b.uid(), "uid of {rel}");
        assert_eq!(a.gid(), b.gid(), "gid of {rel}");
        if !a.is_dir() {
            assert_eq!(a.len(), b.len(), "size of {rel}");
        }
        if !a.file_type().is_symlink() {
            assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()), "mtime of {rel}");
        }
    }
    let host = fs::metadata(mnt.join("etc/hostname")).unwrap();
    assert_eq!((host.mtime(), host.mtime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!(host.mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(mnt.join("usr/run.sh")).unwrap().mode() & 0o777, 0o755);

    // Contents, whole.
    for rel in ["usr/lib/big.bin", "usr/lib/python3/other.bin", "usr/run.sh", "etc/hostname", "etc/empty"] {
        assert_eq!(fs::read(fx.src.join(rel)).unwrap(), fs::read(mnt.join(rel)).unwrap(), "content of {rel}");
    }
    assert!(fs::read(mnt.join("etc/empty")).unwrap().is_empty());
    // Random ranges, across chunk boundaries.
    let want = fs::read(fx.src.join("usr/lib/big.bin")).unwrap();
    let mut f = fs::File::open(mnt.join("usr/lib/big.bin")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..200 {
        let off = rng.gen_range(0..want.len() + 10);
        let len = rng.gen_range(0..3 << 20);
        f.seek(SeekFrom::Start(off as u64)).unwrap();
        let mut got = Vec::new();
        (&mut f).take(len as u64).read_to_end(&mut got).unwrap();
        let end = (off + len).min(want.len());
        let exp = if off >= want.len() { &[][..] } else { &want[off..end] };
        assert!(got == exp, "range {off}+{len}");
    }
    // Symlinks.
    assert_eq!(fs::read_link(mnt.join("etc/link")).unwrap(), PathBuf::from("../usr/lib/big.bin"));
    assert_eq!(fs::read(mnt.join("etc/link")).unwrap().len(), BIG);
    // Executables run.
    let out = std::process::Command::new(mnt.join("usr/run.sh")).output().unwrap();
    assert_eq!(out.stdout, b"hi\n");
    // Extended attributes recorded in the manifest.
    let path = CString::new(mnt.join("etc/hostname").as_os_str().as_bytes()).unwrap();
    let name = CString::new("user.flare").unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..n as usize], b"image");
    // SAFETY: as above.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast::<libc::c_char>(), buf.len()) };
    assert_eq!(&buf[..n as usize], b"user.flare\0");
    // statfs sees the image's size.
    let stat = fs::metadata(&mnt).unwrap();
    assert!(stat.is_dir());

    // Read-only: every kind of write is EROFS.
    let erofs = libc::EROFS;
    assert_eq!(errno(&fs::write(mnt.join("etc/new"), b"x").unwrap_err()), erofs);
    assert_eq!(errno(&fs::OpenOptions::new().write(true).open(mnt.join("etc/hostname")).unwrap_err()), erofs);
    assert_eq!(errno(&fs::create_dir(mnt.join("d")).unwrap_err()), erofs);
    assert_eq!(errno(&fs::remove_file(mnt.join("etc/hostname")).unwrap_err()), erofs);
    assert_eq!(errno(&fs::rename(mnt.join("etc/hostname"), mnt.join("etc/h2")).unwrap_err()), erofs);
    assert_eq!(
        errno(&fs::set_permissions(mnt.join("usr/run.sh"), fs::Permissions::from_mode(0o700)).unwrap_err()),
        erofs
    );
    assert_eq!(errno(&std::os::unix::fs::symlink("x", mnt.join("s")).unwrap_err()), erofs);

    let stats = imagefs.stats();
    assert!(stats.reads > 0 && stats.bytes > 0);
    assert_eq!(stats.errors, 0);
    handle.unmount().unwrap();
    assert!(!mounted(&mnt));
}

#[test]
fn lazy_fetch_cache_and_restart() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    let imagefs = fx.fs_strict(&cache);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");

    // Metadata costs no fetch at all.
    walk(&mnt);
    fs::metadata(mnt.join("usr/lib/big.bin")).unwrap();
    assert_eq!(fx.store.gets(), 0, "metadata must come from memory");

    // Reading one file fetches exactly its chunks.
    let other = fs::read(mnt.join("usr/lib/python3/other.bin")).unwrap();
    assert_eq!(other, fs::read(fx.src.join("usr/lib/python3/other.bin")).unwrap());
    assert_eq!(fx.store.fetched(), fx.chunks_of("usr/lib/python3/other.bin"));
    // Reading a part of the big file fetches only the chunk(s) under that part.
    let mut f = fs::File::open(mnt.join("usr/lib/big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact(&mut buf).unwrap();
    // Chunk read-ahead runs in the background: let it finish before counting.
    imagefs.wait_read_ahead();
    let big_first = match &fx.manifest.get("usr/lib/big.bin").unwrap().kind {
        EntryKind::File(c) => c.chunks[0].digest,
        _ => unreachable!(),
    };
    let fetched = fx.store.fetched();
    assert!(fetched.contains(&big_first));
    assert!(
        fetched.len()
            < fx.chunks_of("usr/lib/python3/other.bin").len() + fx.chunks_of("usr/lib/big.bin").len()
    );
    let gets = fx.store.gets();
    assert_eq!(gets as usize, fetched.len(), "each chunk fetched once");
    // Files nobody opened are never fetched (read-ahead stays within a file).
    for untouched in ["usr/lib/python3/site/mod.py", "etc/hostname", "usr/run.sh"] {
        assert!(fetched.is_disjoint(&fx.chunks_of(untouched)), "{untouched} was fetched");
    }

    // Second read: no new fetch (this mount: page cache or chunk cache).
    assert_eq!(fs::read(mnt.join("usr/lib/python3/other.bin")).unwrap(), other);
    assert_eq!(fx.store.gets(), gets);
    let s = imagefs.stats();
    assert_eq!(s.fetches, gets);
    assert_eq!(s.errors, 0);
    handle.unmount().unwrap();

    // A second image fs over the same cache (fresh page cache): served by the cache.
    let imagefs2 = fx.fs_strict(&cache);
    let (mnt2, handle2) = fx.mount(&imagefs2, "mnt2");
    assert_eq!(fs::read(mnt2.join("usr/lib/python3/other.bin")).unwrap(), other);
    assert_eq!(fx.store.gets(), gets, "cached chunks must not be fetched again");
    assert!(imagefs2.stats().cache_hits > 0);
    assert_eq!(imagefs2.stats().fetches, 0);
    drop(handle2);
    assert!(!mounted(&mnt2));

    // Restart: a new ChunkCache over the same dir rebuilds its index from disk.
    drop(imagefs2);
    drop(imagefs);
    drop(cache);
    let cache = fx.cache("cache");
    assert!(cache.len() >= fx.chunks_of("usr/lib/python3/other.bin").len());
    let imagefs3 = fx.fs_strict(&cache);
    let (mnt3, handle3) = fx.mount(&imagefs3, "mnt3");
    assert_eq!(fs::read(mnt3.join("usr/lib/python3/other.bin")).unwrap(), other);
    assert_eq!(fx.store.gets(), gets, "after a restart, cached chunks must not be fetched");
    assert_eq!(imagefs3.stats().fetches, 0);
    // The rest of the big file is still lazily fetched, and correct.
    assert_eq!(
        fs::read(mnt3.join("usr/lib/big.bin")).unwrap(),
        fs::read(fx.src.join("usr/lib/big.bin")).unwrap()
    );
    assert!(fx.store.gets() > gets);
    handle3.unmount().unwrap();
}

#[test]
fn corrupt_cached_chunk_is_refetched() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let want = fs::read(fx.src.join("usr/lib/python3/other.bin")).unwrap();
    let chunks = fx.chunks_of("usr/lib/python3/other.bin");
    {
        let cache = fx.cache("cache");
        let imagefs = fx.fs_strict(&cache);
        let report = imagefs.prefetch(&chunks.iter().copied().collect::<Vec<_>>(), 4);
        assert_eq!(report.fetched, chunks.len());
    }
    let gets = fx.store.gets();
    // Corrupt one cached chunk file on disk (flip a byte), then "restart".
    let victim = *chunks.iter().next().unwrap();
    let path = fx.cache("cache").path_of(&victim);
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, &bytes).unwrap();

    let cache = fx.cache("cache");
    let imagefs = fx.fs_strict(&cache);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    assert_eq!(
        fs::read(mnt.join("usr/lib/python3/other.bin")).unwrap(),
        want,
        "corruption must never reach a reader"
    );
    assert_eq!(fx.store.gets(), gets + 1, "exactly the corrupt chunk is refetched");
    assert_eq!(cache.stats().corrupt, 1);
    assert_eq!(imagefs.stats().errors, 0);
    // The repaired file is good on disk.
    assert_eq!(Digest::of(&fs::read(&path).unwrap()), victim);
    handle.unmount().unwrap();
}

#[test]
fn failing_store_gives_eio_and_mount_survives() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    let imagefs = fx.fs(&cache);
    // Cache one file without reading it through the mount (no page cache involved).
    let cached = fx.chunks_of("usr/lib/python3/other.bin");
    imagefs.prefetch(&cached.iter().copied().collect::<Vec<_>>(), 2);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    fx.store.fail.store(true, Ordering::SeqCst);

    let err = fs::read(mnt.join("usr/lib/big.bin")).unwrap_err();
    assert_eq!(errno(&err), libc::EIO, "unexpected error {err}");
    let err = fs::read(mnt.join("etc/hostname")).unwrap_err();
    assert_eq!(errno(&err), libc::EIO);
    assert!(imagefs.stats().errors >= 2);
    // The mount and the process are fine: metadata, and cached files, still work.
    assert_eq!(walk(&mnt), walk(&fx.src));
    assert_eq!(
        fs::read(mnt.join("usr/lib/python3/other.bin")).unwrap(),
        fs::read(fx.src.join("usr/lib/python3/other.bin")).unwrap()
    );
    // The store comes back: the same reads now succeed.
    fx.store.fail.store(false, Ordering::SeqCst);
    assert_eq!(fs::read(mnt.join("etc/hostname")).unwrap(), b"flare\n");
    handle.unmount().unwrap();
    assert!(!mounted(&mnt));
}

#[test]
fn access_log_and_prefetch_warm_a_new_cache() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache-a");
    let imagefs = fx.fs_strict(&cache);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    // A "start" that reads a few files.
    fs::read(mnt.join("usr/lib/python3/site/mod.py")).unwrap();
    fs::read(mnt.join("etc/hostname")).unwrap();
    let mut f = fs::File::open(mnt.join("usr/lib/big.bin")).unwrap();
    let mut buf = vec![0u8; 1000];
    f.read_exact(&mut buf).unwrap();
    drop(f);
    handle.unmount().unwrap();
    imagefs.wait_read_ahead();
    let log = imagefs.access_log();
    let first_two: Vec<Digest> = ["usr/lib/python3/site/mod.py", "etc/hostname"]
        .iter()
        .map(|p| *fx.chunks_of(p).iter().next().unwrap())
        .collect();
    assert_eq!(&log[..2], &first_two[..], "log is in first-read order");
    assert!(log.len() >= 3);
    let unique: BTreeSet<_> = log.iter().collect();
    assert_eq!(unique.len(), log.len(), "no duplicates");

    // Next start: an empty cache on another worker, warmed from the log (without
    // directory-locality prefetch, which would fetch files outside the log).
    let cache_b = fx.cache("cache-b");
    let imagefs_b = fx.fs_strict(&cache_b);
    let before = fx.store.gets();
    let report = imagefs_b.prefetch(&log, 4);
    assert_eq!(report.requested, log.len());
    assert_eq!(report.fetched, log.len());
    assert_eq!(report.failed, 0);
    assert_eq!(fx.store.gets() - before, log.len() as u64);
    // Prefetching again is a no-op.
    assert_eq!(imagefs_b.prefetch(&log, 4).cached, log.len());
    let (mnt_b, handle_b) = fx.mount(&imagefs_b, "mnt-b");
    let gets = fx.store.gets();
    fs::read(mnt_b.join("usr/lib/python3/site/mod.py")).unwrap();
    fs::read(mnt_b.join("etc/hostname")).unwrap();
    let mut f = fs::File::open(mnt_b.join("usr/lib/big.bin")).unwrap();
    f.read_exact(&mut buf).unwrap();
    drop(f);
    assert_eq!(fx.store.gets(), gets, "the prefetched start fetches nothing");
    assert_eq!(imagefs_b.stats().fetches, 0);
    handle_b.unmount().unwrap();
}

#[test]
fn unmount_leaves_nothing_even_when_busy() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    let imagefs = fx.fs(&cache);

    // Drop unmounts.
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    assert!(mounted(&mnt));
    drop(handle);
    assert!(!mounted(&mnt));

    // Unmount with a file still open: lazy detach, connection aborted, no hang.
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    let mut open = fs::File::open(mnt.join("etc/hostname")).unwrap();
    let cwd_holder = fs::read_dir(mnt.join("usr")).unwrap();
    let started = std::time::Instant::now();
    handle.unmount().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!mounted(&mnt));
    // The open file now fails instead of hanging.
    let mut s = String::new();
    let _ = open.read_to_string(&mut s);
    drop(cwd_holder);

    // A mount whose image fs is gone (session ended underneath) is cleaned up too.
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    assert!(flare_imagefs::force_unmount(&mnt).unwrap());
    assert!(!mounted(&mnt));
    handle.unmount().unwrap();
    assert!(!flare_imagefs::force_unmount(&mnt).unwrap());
}

#[test]
fn overlay_with_image_as_lower() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    let imagefs = fx.fs(&cache);
    let (lower, handle) = fx.mount(&imagefs, "lower");
    let scratch = fx.tmp.path().join("scratch");
    let merged = fx.tmp.path().join("merged");
    fs::create_dir_all(&scratch).unwrap();
    fs::create_dir_all(&merged).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    run(&["mount", "-t", "tmpfs", "tmpfs", &s(&scratch)]);
    fs::create_dir_all(scratch.join("upper")).unwrap();
    fs::create_dir_all(scratch.join("work")).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&lower),
        s(&scratch.join("upper")),
        s(&scratch.join("work"))
    );
    run(&["mount", "-t", "overlay", "overlay", "-o", &opts, &s(&merged)]);

    // Read lower files through the overlay.
    assert_eq!(fs::read(merged.join("etc/hostname")).unwrap(), b"flare\n");
    assert_eq!(
        fs::read(merged.join("usr/lib/big.bin")).unwrap(),
        fs::read(fx.src.join("usr/lib/big.bin")).unwrap()
    );
    // Write a new file and modify a lower one (copy-up).
    fs::write(merged.join("etc/new.txt"), b"written in the container").unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(merged.join("etc/hostname")).unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    assert_eq!(fs::read(merged.join("etc/new.txt")).unwrap(), b"written in the container");
    assert_eq!(fs::read(merged.join("etc/hostname")).unwrap(), b"flare\nmore\n");
    assert_eq!(fs::read(scratch.join("upper/etc/hostname")).unwrap(), b"flare\nmore\n");
    // The image itself is untouched.
    assert_eq!(fs::read(lower.join("etc/hostname")).unwrap(), b"flare\n");
    assert!(!lower.join("etc/new.txt").exists());

    run(&["umount", &s(&merged)]);
    run(&["umount", &s(&scratch)]);
    handle.unmount().unwrap();
    assert!(!mounted(&lower));
}

/// `fds[0]` reads, `fds[1]` writes; both close on exec.
fn cloexec_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) }
}

/// Run `script` with /bin/sh as root of a new user namespace whose ids 0..size are host
/// ids host_base.. (what a container of a worker with that range runs as); its stdout.
fn sh_in_userns(ns: IdShift, script: &str) -> String {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (ready_r, ready_w) = cloexec_pipe();
    let (go_r, go_w) = cloexec_pipe();
    let (ready_w_fd, go_r_fd) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", script]);
    // SAFETY: the hook only makes raw system calls (async-signal-safe) on fds that
    // stay open until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return fail();
            }
            let pid = libc::getpid().to_le_bytes();
            if libc::write(ready_w_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return fail();
            }
            let mut go = [0u8; 1];
            if libc::read(go_r_fd, go.as_mut_ptr().cast(), 1) != 1 {
                return fail();
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(0, 0, 0) != 0
                || libc::setresuid(0, 0, 0) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    let mapper = std::thread::spawn(move || {
        let mut pid = [0u8; 4];
        fs::File::from(ready_r).read_exact(&mut pid).unwrap();
        let pid = i32::from_le_bytes(pid);
        let map = format!("0 {} {}\n", ns.host_base, ns.size);
        fs::write(format!("/proc/{pid}/uid_map"), &map).unwrap();
        fs::write(format!("/proc/{pid}/gid_map"), &map).unwrap();
        fs::File::from(go_w).write_all(b"1").unwrap();
    });
    let out = cmd.output().unwrap();
    drop((ready_w, go_r));
    mapper.join().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn owner_shift_for_a_user_namespace() {
    if !can_mount() {
        return;
    }
    const NS: IdShift = IdShift { host_base: 1_000_000_000, size: 65_536 };
    let fx = fixture();
    let mut manifest = (*fx.manifest).clone();
    for (path, uid, gid) in [("etc/hostname", 1000, 1001), ("usr/run.sh", 70_000, 70_000), ("etc/link", 7, 8)]
    {
        let e = manifest.entries.get_mut(path).unwrap();
        (e.uid, e.gid) = (uid, gid);
    }
    let cache = fx.cache("cache");
    let opts = ImageFsOptions { ids: Some(NS), ..ImageFsOptions::default() };
    let imagefs = ImageFs::new(Arc::new(manifest), fx.store.clone(), cache, opts).unwrap();
    let (lower, handle) = fx.mount(&imagefs, "lower");

    // On the host: every owner shifted; past the range, the overflow id.
    let owner = |p: &Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let base = NS.host_base;
    assert_eq!(owner(&lower), (base, base));
    assert_eq!(owner(&lower.join("usr/lib")), (base, base));
    assert_eq!(owner(&lower.join("etc/hostname")), (base + 1000, base + 1001));
    assert_eq!(owner(&lower.join("etc/link")), (base + 7, base + 8));
    assert_eq!(owner(&lower.join("usr/run.sh")), (OVERFLOW_ID, OVERFLOW_ID));

    // An overlay mounted by host root over it, its upper dir owned by the range's root
    // (as the runtime makes it), used by root of a user namespace with that range.
    let scratch = fx.tmp.path().join("scratch");
    let merged = fx.tmp.path().join("merged");
    fs::create_dir_all(&merged).unwrap();
    fs::set_permissions(fx.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["upper", "work"] {
        fs::create_dir_all(scratch.join(d)).unwrap();
    }
    std::os::unix::fs::chown(scratch.join("upper"), Some(base), Some(base)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&lower),
        s(&scratch.join("upper")),
        s(&scratch.join("work"))
    );
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts, &s(&merged)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = s(&merged);
    let seen = sh_in_userns(
        NS,
        &format!(
            "set -e; id -u; stat -c '%u:%g' {m} {m}/etc/hostname {m}/usr/run.sh; \
             echo new > {m}/new; mkdir {m}/etc/d; echo more >> {m}/etc/hostname; \
             echo owned > {m}/u1000; chown 1000:1000 {m}/u1000; \
             if echo x >> {m}/usr/run.sh 2>/dev/null; then echo wrote-unmapped; fi"
        ),
    );
    // Root inside sees the image's owners, writes lower files (copy-up) and new ones;
    // a file of an unmapped owner stays out of its reach.
    assert_eq!(seen, "0\n0:0\n1000:1001\n65534:65534\n", "{seen}");
    let upper = scratch.join("upper");
    assert_eq!(owner(&upper.join("new")), (base, base));
    assert_eq!(owner(&upper.join("etc/d")), (base, base));
    assert_eq!(owner(&upper.join("etc/hostname")), (base + 1000, base + 1001));
    assert_eq!(fs::read(upper.join("etc/hostname")).unwrap(), b"flare\nmore\n");
    assert_eq!(owner(&upper.join("u1000")), (base + 1000, base + 1000));
    assert!(!upper.join("usr/run.sh").exists());

    let out = std::process::Command::new("umount").arg(&merged).output().unwrap();
    assert!(out.status.success());
    handle.unmount().unwrap();
}

// ---- ChunkCache alone (no FUSE needed) ----

fn store_with_blobs(dir: &Path, n: usize, size: usize) -> (Arc<TestStore>, Vec<(Digest, Vec<u8>)>) {
    let store = TestStore::new(dir);
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    let blobs = (0..n)
        .map(|_| {
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            (store.put(&data).unwrap(), data)
        })
        .collect();
    (store, blobs)
}

#[test]
fn cache_evicts_least_recently_used_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, blobs) = store_with_blobs(&tmp.path().join("store"), 4, 1000);
    let root = tmp.path().join("cache");
    let cache = ChunkCache::open(&root, 3000).unwrap();
    for (d, data) in &blobs[..3] {
        let (got, source) = cache.read(store.as_ref(), d, 0, u64::MAX).unwrap();
        assert_eq!(&got, data);
        assert_eq!(source, Source::Fetched);
    }
    assert_eq!(cache.used_bytes(), 3000);
    // Use blob 0 again, so blob 1 is now the least recently used.
    let (got, source) = cache.read(store.as_ref(), &blobs[0].0, 10, 20).unwrap();
    assert_eq!((got.as_slice(), source), (&blobs[0].1[10..30], Source::Hit));
    cache.read(store.as_ref(), &blobs[3].0, 0, 5).unwrap();
    assert!(!cache.contains(&blobs[1].0), "LRU entry evicted");
    assert!(!cache.path_of(&blobs[1].0).exists(), "its file deleted");
    for i in [0, 2, 3] {
        assert!(cache.contains(&blobs[i].0));
    }
    assert_eq!(cache.used_bytes(), 3000);
    assert_eq!(cache.stats().evictions, 1);
    drop(cache);

    // Reopen with a smaller bound: index rebuilt from disk, trimmed to fit.
    let cache = ChunkCache::open(&root, 2000).unwrap();
    assert_eq!(cache.len(), 2);
    assert!(cache.used_bytes() <= 2000);
    let gets = store.gets();
    for (d, data) in &blobs {
        if cache.contains(d) {
            assert_eq!(&cache.read(store.as_ref(), d, 0, u64::MAX).unwrap().0, data);
        }
    }
    assert_eq!(store.gets(), gets);
    // Leftover temp files from a crash are cleaned at open.
    fs::write(root.join("tmp/partial"), b"torn").unwrap();
    drop(cache);
    ChunkCache::open(&root, 2000).unwrap();
    assert!(!root.join("tmp/partial").exists());
}

#[test]
fn concurrent_misses_fetch_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::with_delay(&tmp.path().join("store"), Duration::from_millis(100));
    let data = vec![42u8; 100_000];
    let digest = store.put(&data).unwrap();
    let cache = Arc::new(ChunkCache::open(&tmp.path().join("cache"), 1 << 20).unwrap());
    let sources: Vec<Source> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let cache = cache.clone();
                let store = store.clone();
                s.spawn(move || {
                    let (got, source) = cache.read(store.as_ref(), &digest, i * 10, 10).unwrap();
                    assert_eq!(got, vec![42u8; 10]);
                    source
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(store.gets(), 1, "one fetch for eight concurrent readers: {sources:?}");
    assert_eq!(sources.iter().filter(|s| **s == Source::Fetched).count(), 1);
}

#[test]
fn corrupt_store_is_an_error_not_bad_data() {
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::new(&tmp.path().join("store"));
    let digest = store.put(b"some chunk").unwrap();
    // Corrupt the blob inside the store.
    let path = store.inner.path_of(&digest);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"some chonk").unwrap();
    let cache = ChunkCache::open(&tmp.path().join("cache"), 1 << 20).unwrap();
    let err = cache.read(store.as_ref(), &digest, 0, 10).unwrap_err();
    assert!(!cache.contains(&digest));
    eprintln!("corrupt store error: {err}");
    // Unreachable store: a clear error, nothing cached.
    store.fail.store(true, Ordering::SeqCst);
    let d2 = Digest::of(b"other");
    assert!(cache.read(store.as_ref(), &d2, 0, 1).is_err());
    let _ = SystemTime::now();
}

#[test]
fn chunk_read_ahead_is_bounded_and_stays_in_the_file() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    // The kernel's own 128 KiB readahead stays within the first chunk (>= 256 KiB).
    let opts = ImageFsOptions { read_ahead_kb: None, ..strict() };
    let imagefs = ImageFs::new(fx.manifest.clone(), fx.store.clone(), cache.clone(), opts).unwrap();
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    let chunks = match &fx.manifest.get("usr/lib/big.bin").unwrap().kind {
        EntryKind::File(c) => c.chunks.iter().map(|c| c.digest).collect::<Vec<_>>(),
        _ => unreachable!(),
    };
    // A small read at the start of a multi-chunk file: its chunk, plus a read-ahead
    // window of one chunk (it doubles only as the reader moves on).
    let mut f = fs::File::open(mnt.join("usr/lib/big.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact(&mut buf).unwrap();
    imagefs.wait_read_ahead();
    assert_eq!(fx.store.fetched(), chunks[..2].iter().copied().collect::<BTreeSet<_>>());
    assert_eq!(imagefs.stats().read_ahead_fetches, 1);
    // Reading on to the end fetches the rest once each, and reads stay correct.
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    buf.extend_from_slice(&rest);
    assert_eq!(buf, fs::read(fx.src.join("usr/lib/big.bin")).unwrap());
    imagefs.wait_read_ahead();
    assert_eq!(fx.store.gets() as usize, chunks.len(), "each chunk fetched once");
    assert_eq!(fx.store.fetched(), chunks.iter().copied().collect::<BTreeSet<_>>());
    // Nothing else was touched.
    assert!(fx.store.fetched().is_disjoint(&fx.chunks_of("usr/lib/python3/other.bin")));
    handle.unmount().unwrap();

    // Off: only what is read is fetched.
    let cache2 = fx.cache("cache2");
    let opts = ImageFsOptions { read_ahead_kb: None, read_ahead_chunks: 0, ..strict() };
    let imagefs2 = ImageFs::new(fx.manifest.clone(), fx.store.clone(), cache2, opts).unwrap();
    let (mnt2, handle2) = fx.mount(&imagefs2, "mnt2");
    let gets = fx.store.gets();
    let mut f = fs::File::open(mnt2.join("usr/lib/big.bin")).unwrap();
    f.read_exact(&mut buf[..4096]).unwrap();
    imagefs2.wait_read_ahead();
    assert_eq!(fx.store.gets(), gets + 1);
    assert_eq!(imagefs2.stats().read_ahead_fetches, 0);
    drop(f);
    handle2.unmount().unwrap();
}

/// A source tree written from `(path, content)` pairs, snapshotted into a new store.
fn tree_fixture(files: &[(&str, Vec<u8>)]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for (path, data) in files {
        let p = src.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
    }
    let store = TestStore::new(&tmp.path().join("store"));
    let manifest = flare_cas::snapshot_dir(store.as_ref(), &src, None).unwrap();
    Fixture { tmp, src, store, manifest: Arc::new(manifest) }
}

fn random_bytes(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

#[test]
fn dir_prefetch_fetches_small_files_of_the_directory_only() {
    if !can_mount() {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut files: Vec<(String, Vec<u8>)> =
        (1..=6).map(|i| (format!("lib/pkg/mod{i}.py"), random_bytes(&mut rng, 2000 + i * 100))).collect();
    files.push(("lib/pkg/data.bin".into(), random_bytes(&mut rng, 200 << 10)));
    files.push(("lib/pkg/sub/x.py".into(), random_bytes(&mut rng, 1500)));
    files.push(("lib/other/y.py".into(), random_bytes(&mut rng, 1500)));
    files.push(("deep/leaf/only.py".into(), random_bytes(&mut rng, 1000)));
    files.push(("deep/w.py".into(), random_bytes(&mut rng, 1000)));
    files.push(("deep/other/z.py".into(), random_bytes(&mut rng, 1000)));
    files.push(("top/alone.py".into(), random_bytes(&mut rng, 1000)));
    files.push(("top2/t.py".into(), random_bytes(&mut rng, 1000)));
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let fx = tree_fixture(&files);
    let cache = fx.cache("cache");
    let imagefs = fx.fs(&cache);
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    let chunks = |paths: &[&str]| paths.iter().flat_map(|p| fx.chunks_of(p)).collect::<BTreeSet<_>>();

    // A directory with enough small files: they (and its subdirectories' ones) are
    // fetched in the background; the big file and other directories are not.
    assert_eq!(fs::read(mnt.join("lib/pkg/mod1.py")).unwrap(), files[0].1);
    imagefs.wait_read_ahead();
    let mods: Vec<String> = (1..=6).map(|i| format!("lib/pkg/mod{i}.py")).collect();
    let mut want: Vec<&str> = mods.iter().map(String::as_str).collect();
    want.push("lib/pkg/sub/x.py");
    assert_eq!(fx.store.fetched(), chunks(&want));
    assert_eq!(imagefs.stats().dir_prefetch_fetches, 6);
    // Reading a prefetched file costs no fetch.
    let gets = fx.store.gets();
    for (i, path) in mods.iter().enumerate() {
        assert_eq!(&fs::read(mnt.join(path)).unwrap(), &files[i].1);
    }
    assert_eq!(fs::read(mnt.join("lib/pkg/sub/x.py")).unwrap(), files[7].1);
    assert_eq!(fx.store.gets(), gets);

    // A directory with too few small files widens to its parent's subtree...
    fs::read(mnt.join("deep/leaf/only.py")).unwrap();
    imagefs.wait_read_ahead();
    let fetched = fx.store.fetched();
    assert!(fetched.is_superset(&chunks(&["deep/w.py", "deep/other/z.py"])));
    // ...but never to the root's.
    fs::read(mnt.join("top/alone.py")).unwrap();
    imagefs.wait_read_ahead();
    let fetched = fx.store.fetched();
    assert!(fetched.is_disjoint(&chunks(&["top2/t.py", "lib/other/y.py", "lib/pkg/data.bin"])));
    assert_eq!(imagefs.stats().errors, 0);
    handle.unmount().unwrap();

    // The byte budget bounds one prefetch.
    let cache2 = fx.cache("cache2");
    let opts = ImageFsOptions { dir_prefetch_max_bytes: 5000, ..ImageFsOptions::default() };
    let imagefs2 = fx.fs_with(&cache2, opts);
    let (mnt2, handle2) = fx.mount(&imagefs2, "mnt2");
    let before = fx.store.gets();
    fs::read(mnt2.join("lib/pkg/mod1.py")).unwrap();
    imagefs2.wait_read_ahead();
    assert_eq!(imagefs2.stats().dir_prefetch_fetches, 2, "two 2 KiB files fit in 5000 bytes");
    assert_eq!(fx.store.gets() - before, 3);
    handle2.unmount().unwrap();
}

#[test]
fn passthrough_serves_cached_files_and_assembled_copies() {
    if !can_mount() {
        return;
    }
    let fx = fixture();
    let cache = fx.cache("cache");
    // Assemble files of >= 1 MiB (the fixture's big files are 6 and 3 MiB).
    let opts = ImageFsOptions { assemble_min_bytes: 1 << 20, ..strict() };
    let big = fs::read(fx.src.join("usr/lib/big.bin")).unwrap();
    let big_chunks = match &fx.manifest.get("usr/lib/big.bin").unwrap().kind {
        EntryKind::File(c) => c.chunks.clone(),
        _ => unreachable!(),
    };
    let view = cache.view_path(&ChunkCache::view_key(&big_chunks));

    // First mount: nothing cached, every read goes through the image fs; once the big
    // file has been read whole (and closed), its assembled copy is built.
    let imagefs = fx.fs_with(&cache, opts.clone());
    let (mnt, handle) = fx.mount(&imagefs, "mnt");
    assert_eq!(fs::read(mnt.join("etc/hostname")).unwrap(), b"flare\n");
    assert_eq!(fs::read(mnt.join("usr/run.sh")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(fs::read(mnt.join("usr/lib/big.bin")).unwrap(), big);
    assert_eq!(imagefs.stats().passthrough_opens, 0);
    wait_for_view(&cache, &view);
    handle.unmount().unwrap();
    assert!(cache.stats().assembled >= 1);
    assert_eq!(fs::read(&view).unwrap(), big, "the assembled copy is the file");
    let gets = fx.store.gets();

    // Second mount: cached one-chunk files and the assembled file are passthrough.
    let imagefs2 = fx.fs_with(&cache, opts.clone());
    let (mnt2, handle2) = fx.mount(&imagefs2, "mnt2");
    assert_eq!(fs::read(mnt2.join("etc/hostname")).unwrap(), b"flare\n");
    let mut a = fs::File::open(mnt2.join("usr/lib/big.bin")).unwrap();
    // A second open while the first is open shares its backing file.
    let mut b = fs::File::open(mnt2.join("usr/lib/big.bin")).unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert!(got == big);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..50 {
        let off = rng.gen_range(0..big.len());
        let len = rng.gen_range(0..1 << 20);
        b.seek(SeekFrom::Start(off as u64)).unwrap();
        let mut part = Vec::new();
        (&mut b).take(len as u64).read_to_end(&mut part).unwrap();
        assert!(part == big[off..(off + len).min(big.len())], "range {off}+{len}");
    }
    drop((a, b));
    // Executables run from a passthrough file (exec maps it).
    let out = std::process::Command::new(mnt2.join("usr/run.sh")).output().unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let s2 = imagefs2.stats();
    assert!(s2.passthrough_opens >= 4, "{s2:?}");
    assert_eq!(s2.reads, 0, "passthrough reads bypass the image fs: {s2:?}");
    assert_eq!(fx.store.gets(), gets);
    // The access log still lists what was opened (a file's first chunk).
    let log = imagefs2.access_log();
    assert!(log.contains(&big_chunks[0].digest));
    assert!(log.contains(fx.chunks_of("etc/hostname").iter().next().unwrap()));
    handle2.unmount().unwrap();

    // A restart does not trust assembled copies: they are rebuilt from verified chunks.
    drop((imagefs, imagefs2, cache));
    let cache = fx.cache("cache");
    assert!(!view.exists());
    let imagefs3 = fx.fs_with(&cache, opts);
    let (mnt3, handle3) = fx.mount(&imagefs3, "mnt3");
    assert_eq!(fs::read(mnt3.join("usr/lib/big.bin")).unwrap(), big);
    assert!(imagefs3.stats().reads > 0, "served chunk by chunk until reassembled");
    wait_for_view(&cache, &view);
    handle3.unmount().unwrap();
    assert_eq!(fs::read(&view).unwrap(), big);
    assert_eq!(fx.store.gets(), gets, "everything came from the cache");
}

/// Mounts a tmpfs of `size` at `path` for the test's lifetime (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn cache_disk_full() {
    if !can_mount() {
        return;
    }
    // A ~23.5 MiB image on a cache disk (tmpfs) of 8 MiB: four 3 MiB files and one of
    // 9 MiB (several chunks each), and forty small ones.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut files: Vec<(String, Vec<u8>)> =
        (0..4).map(|i| (format!("data/big{i}.bin"), random_bytes(&mut rng, 3 << 20))).collect();
    files.push(("data/huge.bin".into(), random_bytes(&mut rng, 9 << 20)));
    for i in 0..40 {
        files.push((format!("small/f{i:02}.txt"), random_bytes(&mut rng, 64 << 10)));
    }
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let fx = tree_fixture(&files);
    let disk = fx.tmp.path().join("disk");
    let _tmpfs = Tmpfs::mount(&disk, "8m");
    // The cache's own bound is far above what the disk holds.
    let cache = Arc::new(ChunkCache::open(&disk.join("cache"), 1 << 30).unwrap());
    let opts = ImageFsOptions { assemble_min_bytes: 1 << 20, ..ImageFsOptions::default() };
    let imagefs = fx.fs_with(&cache, opts.clone());
    let (mnt, handle) = fx.mount(&imagefs, "mnt");

    // Everything reads back correctly although the disk fills up: the cache evicts to
    // make room. (The 3 MiB files' background assemblies race the reads of the next
    // files for the disk, so whether any of them finds it full is timing; the 9 MiB file
    // is never assembled: its chunks never fit at once. Assembly on a full disk is
    // checked on a disk of its own below.)
    for (path, data) in &files {
        assert!(&fs::read(mnt.join(path)).unwrap() == data, "content of {path}");
    }
    imagefs.wait_read_ahead();
    // Unmounted, nothing submits assemblies any more (they are queued on RELEASE, which
    // close() does not wait for): wait for those queued.
    handle.unmount().unwrap();
    cache.wait_assembly();
    let s = cache.stats();
    assert!(s.disk_full > 0, "the full disk was noticed: {s:?}");
    assert!(s.evictions > 0, "{s:?}");
    assert_eq!(imagefs.stats().errors, 0);
    assert!(cache.used_bytes() <= 8 << 20);
    let leftovers = |cache: &ChunkCache| fs::read_dir(cache.root().join("tmp")).unwrap().count();
    assert_eq!(leftovers(&cache), 0, "failed writes and assemblies leave no temp file: {s:?}");

    // Assembling a file on a full disk fails cleanly: counted, no temp file, no copy, the
    // chunks still cached and served; once there is room it succeeds. (A fresh 8 MiB
    // disk: a 3 MiB file's chunks, then ballast the cache cannot evict.)
    let disk3 = fx.tmp.path().join("disk3");
    let _tmpfs3 = Tmpfs::mount(&disk3, "8m");
    let cache3 = ChunkCache::open(&disk3.join("cache"), 1 << 30).unwrap();
    let big0 = match &fx.manifest.get("data/big0.bin").unwrap().kind {
        EntryKind::File(c) => c.chunks.clone(),
        _ => unreachable!(),
    };
    assert!(big0.len() > 1, "a multi-chunk file");
    for c in &big0 {
        assert_eq!(cache3.ensure(fx.store.as_ref(), &c.digest).unwrap(), Source::Fetched);
    }
    let ballast_path = disk3.join("ballast");
    let mut ballast = fs::File::create(&ballast_path).unwrap();
    let block = vec![7u8; 256 << 10];
    while ballast.write_all(&block).is_ok() {}
    drop(ballast);
    let err = cache3.assemble(&big0).unwrap_err();
    assert!(
        matches!(&err, flare_imagefs::ImageFsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    let s3 = cache3.stats();
    assert_eq!((s3.assemble_errors, s3.disk_full, s3.assembled, s3.write_errors), (1, 1, 0, 0), "{s3:?}");
    assert_eq!(leftovers(&cache3), 0, "the partial copy is removed");
    let view = cache3.view_path(&ChunkCache::view_key(&big0));
    assert!(!view.exists() && !cache3.contains(&ChunkCache::view_key(&big0)));
    let mut back = Vec::new();
    for c in &big0 {
        let (data, source) = cache3.read(fx.store.as_ref(), &c.digest, 0, u64::MAX).unwrap();
        assert_eq!(source, Source::Hit);
        back.extend_from_slice(&data);
    }
    assert!(back == files[0].1, "the chunks are intact");
    fs::remove_file(&ballast_path).unwrap();
    assert!(cache3.assemble(&big0).unwrap(), "assembled once there is room");
    assert!(fs::read(&view).unwrap() == files[0].1);
    assert_eq!(cache3.stats().assembled, 1);
    drop(cache3);

    // Now fill the disk with something the cache cannot evict: fetched chunks cannot
    // be cached at all, and are served from memory; each failure is counted.
    // (A second tmpfs: the first one's space is freed only when the last open chunk
    // file of the dropped cache is closed, by threads that end in their own time.)
    drop((imagefs, cache));
    let disk2 = fx.tmp.path().join("disk2");
    let _tmpfs2 = Tmpfs::mount(&disk2, "8m");
    let cache2 = Arc::new(ChunkCache::open(&disk2.join("cache"), 1 << 30).unwrap());
    let mut ballast = fs::File::create(disk2.join("ballast")).unwrap();
    let block = vec![7u8; 256 << 10];
    while ballast.write_all(&block).is_ok() {}
    drop(ballast);
    let imagefs2 = fx.fs_with(&cache2, opts);
    let (mnt2, handle2) = fx.mount(&imagefs2, "mnt2");
    for (path, data) in files.iter().rev().take(6) {
        assert!(&fs::read(mnt2.join(path)).unwrap() == data, "content of {path} on a full disk");
    }
    imagefs2.wait_read_ahead();
    let s2 = cache2.stats();
    assert!(s2.write_errors > 0 && s2.disk_full > 0, "{s2:?}");
    assert_eq!(cache2.len(), 0);
    assert_eq!(imagefs2.stats().errors, 0);
    // The mount is fine: metadata and other files still read.
    assert_eq!(walk(&mnt2), walk(&fx.src));
    assert!(fs::read(mnt2.join("data/big0.bin")).unwrap() == files[0].1);
    handle2.unmount().unwrap();
}
