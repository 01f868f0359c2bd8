//! Integration tests: real stores in temp dirs, real files.

use std::fs::{self, File};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flare_cas::{
    gc, get_manifest, materialize, put_manifest, read_file_range, shared_bytes, snapshot_dir,
    snapshot_dir_with_stats, store_file, BlobInfo, BlobStore, CasError, Digest, Durability, Entry, EntryKind,
    FileContent, LocalStore, Manifest, Result,
};
use rand::{Rng, RngCore, SeedableRng};

fn store_in(dir: &Path) -> LocalStore {
    LocalStore::open(&dir.join("cas")).unwrap()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn age(path: &Path, by: Duration) {
    File::open(path).unwrap().set_modified(SystemTime::now() - by).unwrap();
}

/// Forwards to a store and counts calls, to see what an operation really touched.
#[derive(Default)]
struct Counts {
    puts: AtomicU64,
    gets: AtomicU64,
    ranges: AtomicU64,
}

struct CountingStore<S> {
    inner: S,
    counts: Counts,
}

impl<S: BlobStore> CountingStore<S> {
    fn new(inner: S) -> Self {
        CountingStore { inner, counts: Counts::default() }
    }
    fn puts(&self) -> u64 {
        self.counts.puts.load(Ordering::SeqCst)
    }
}

impl<S: BlobStore> BlobStore for CountingStore<S> {
    fn put(&self, data: &[u8]) -> Result<Digest> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(data)
    }
    fn put_file(&self, path: &Path) -> Result<Digest> {
        self.counts.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_file(path)
    }
    fn get(&self, d: &Digest) -> Result<Vec<u8>> {
        self.counts.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(d)
    }
    fn read_range(&self, d: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.counts.ranges.fetch_add(1, Ordering::SeqCst);
        self.inner.read_range(d, offset, len)
    }
    fn has(&self, d: &Digest) -> Result<bool> {
        self.inner.has(d)
    }
    fn touch(&self, d: &Digest) -> Result<bool> {
        self.inner.touch(d)
    }
    fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        self.inner.stat(d)
    }
    fn list(&self) -> Result<Vec<Digest>> {
        self.inner.list()
    }
    fn delete(&self, d: &Digest) -> Result<bool> {
        self.inner.delete(d)
    }
}

// ---------------------------------------------------------------- blob store

#[test]
fn put_get_has_size_list_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let d = store.put(b"hello world").unwrap();
    assert_eq!(d, Digest::of(b"hello world"));
    assert_eq!(store.put(b"hello world").unwrap(), d, "idempotent");
    let other = store.put(b"other").unwrap();
    assert_eq!(store.get(&d).unwrap(), b"hello world");
    assert!(store.has(&d).unwrap());
    assert_eq!(store.size(&d).unwrap(), Some(11));
    let mut listed = store.list().unwrap();
    listed.sort();
    let mut want = vec![d, other];
    want.sort();
    assert_eq!(listed, want);

    let path = store.path_of(&d);
    let hex = d.hex();
    assert!(path.ends_with(format!("blobs/blake3/{}/{hex}", &hex[..2])), "{}", path.display());
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o444, "blobs are read-only");

    assert_eq!(store.read_range(&d, 6, 5).unwrap(), b"world");
    assert!(matches!(store.read_range(&d, 6, 6), Err(CasError::OutOfRange { .. })));

    assert!(store.delete(&d).unwrap());
    assert!(!store.delete(&d).unwrap());
    assert!(!store.has(&d).unwrap());
    assert_eq!(store.size(&d).unwrap(), None);
    assert!(matches!(store.get(&d), Err(CasError::NotFound { digest }) if digest == d));
    assert_eq!(store.list().unwrap(), vec![other]);
}

#[test]
fn put_file_streams_to_the_same_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let data = random_bytes(3 << 20, 1);
    let src = tmp.path().join("src.bin");
    fs::write(&src, &data).unwrap();
    let d = store.put_file(&src).unwrap();
    assert_eq!(d, Digest::of(&data));
    assert_eq!(store.get(&d).unwrap(), data);
    assert_eq!(store.put_file(&src).unwrap(), d);
    assert_eq!(fs::read_dir(tmp.path().join("cas/tmp")).unwrap().count(), 0, "no temp files left");
    assert!(store.put_file(&tmp.path().join("missing")).is_err());
    store.flush().unwrap();

    // Every durability mode stores the same blobs.
    for (i, mode) in [Durability::EachBlob, Durability::Batched, Durability::None].into_iter().enumerate() {
        let s = LocalStore::open(&tmp.path().join(format!("cas{i}"))).unwrap().with_durability(mode);
        assert_eq!(s.put_file(&src).unwrap(), d);
        assert_eq!(s.put(b"x").unwrap(), Digest::of(b"x"));
        s.flush().unwrap();
        assert_eq!(s.get(&d).unwrap(), data);
    }
}

#[test]
fn concurrent_puts_are_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(store_in(tmp.path()));
    let shared = random_bytes(2 << 20, 2);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (store, shared) = (store.clone(), shared.clone());
            std::thread::spawn(move || {
                for round in 0..5u8 {
                    assert_eq!(store.put(&shared).unwrap(), Digest::of(&shared));
                    let own = vec![i as u8 ^ round; 1000 + i];
                    let d = store.put(&own).unwrap();
                    assert_eq!(store.get(&d).unwrap(), own);
                    assert_eq!(store.get(&Digest::of(&shared)).unwrap().len(), shared.len());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.get(&Digest::of(&shared)).unwrap(), shared);
    assert_eq!(fs::read_dir(tmp.path().join("cas/tmp")).unwrap().count(), 0);
}

fn flip_byte(path: &Path, at: usize) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

#[test]
fn corruption_is_detected_and_repairable() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let data = random_bytes(100_000, 3);
    let d = store.put(&data).unwrap();
    flip_byte(&store.path_of(&d), 500);
    assert!(matches!(store.get(&d), Err(CasError::Corrupt { digest }) if digest == d));
    assert!(!store.has(&d).unwrap(), "corrupt blob removed from view");
    assert_eq!(fs::read_dir(tmp.path().join("cas/quarantine")).unwrap().count(), 1);
    store.put(&data).unwrap();
    assert_eq!(store.get(&d).unwrap(), data, "a refetch repairs it");

    // read_range verifies the whole blob on first read in a process (fresh store).
    flip_byte(&store.path_of(&d), 99_000);
    let fresh = store_in(tmp.path());
    assert!(matches!(fresh.read_range(&d, 0, 10), Err(CasError::Corrupt { .. })));
    assert!(!fresh.has(&d).unwrap());
}

// ---------------------------------------------------------------- files and chunks

#[test]
fn big_file_is_chunked_and_ranges_read_only_what_they_need() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CountingStore::new(store_in(tmp.path()));
    let data = random_bytes(10 << 20, 4);
    let path = tmp.path().join("big.bin");
    fs::write(&path, &data).unwrap();
    let content = store_file(&store, &path).unwrap();
    assert_eq!(content.size, data.len() as u64);
    assert!(content.chunks.len() >= 4, "{} chunks", content.chunks.len());
    content.validate().unwrap();
    assert_eq!(read_file_range(&store, &content, 0, content.size).unwrap(), data);

    let boundary = content.chunks[2].offset;
    let (gets, ranges) =
        (store.counts.gets.load(Ordering::SeqCst), store.counts.ranges.load(Ordering::SeqCst));
    let got = read_file_range(&store, &content, boundary - 1000, 3000).unwrap();
    assert_eq!(got, &data[boundary as usize - 1000..boundary as usize + 2000]);
    assert_eq!(store.counts.gets.load(Ordering::SeqCst), gets, "partial chunks are read by range");
    assert_eq!(store.counts.ranges.load(Ordering::SeqCst), ranges + 2, "exactly the two chunks touched");

    let tail = read_file_range(&store, &content, content.size - 10, 1000).unwrap();
    assert_eq!(tail, &data[data.len() - 10..], "reads past the end are cut short");
    assert!(read_file_range(&store, &content, content.size + 5, 10).unwrap().is_empty());
}

#[test]
fn small_and_empty_files() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    fs::write(tmp.path().join("small"), b"tiny").unwrap();
    fs::write(tmp.path().join("empty"), b"").unwrap();
    let small = store_file(&store, &tmp.path().join("small")).unwrap();
    assert_eq!(small.chunks.len(), 1);
    assert_eq!(small.chunks[0].digest, Digest::of(b"tiny"));
    assert_eq!(store_file(&store, &tmp.path().join("empty")).unwrap(), FileContent::default());
}

#[test]
fn cdc_dedups_across_an_insertion_near_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let v1 = random_bytes(32 << 20, 5);
    let mut v2 = v1.clone();
    v2.splice(5000..5000, random_bytes(777, 6));
    fs::write(tmp.path().join("v1"), &v1).unwrap();
    fs::write(tmp.path().join("v2"), &v2).unwrap();
    let c1 = store_file(&store, &tmp.path().join("v1")).unwrap();
    let c2 = store_file(&store, &tmp.path().join("v2")).unwrap();
    let mut m1 = Manifest::new();
    m1.insert("f", Entry::file(c1.clone(), 0o644)).unwrap();
    let mut m2 = Manifest::new();
    m2.insert("f", Entry::file(c2.clone(), 0o644)).unwrap();
    let shared = shared_bytes(&m1, &m2);
    let ratio = shared as f64 / v1.len() as f64;
    assert!(
        ratio > 0.85,
        "only {ratio:.3} of the bytes shared ({} vs {} chunks)",
        c1.chunks.len(),
        c2.chunks.len()
    );
    assert_eq!(read_file_range(&store, &c2, 0, c2.size).unwrap(), v2);
}

// ---------------------------------------------------------------- snapshots

fn make_tree(root: &Path, outside: &Path) {
    fs::create_dir_all(root.join("pkg/sub/deeper")).unwrap();
    fs::write(root.join("pkg/__init__.py"), b"print('hi')\n").unwrap();
    fs::write(root.join("pkg/sub/mod.py"), b"x = 1\n").unwrap();
    fs::write(root.join("pkg/sub/deeper/data.bin"), random_bytes(3 << 20, 7)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(root.join("pkg/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(outside.join("secret"), b"outside").unwrap();
    symlink(outside.join("secret"), root.join("escape")).unwrap();
    symlink("../../outside", root.join("pkg/rel-escape")).unwrap();
    symlink(outside, root.join("dirlink")).unwrap();
}

#[test]
fn snapshot_records_tree_without_following_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir_all(&outside).unwrap();
    make_tree(&root, &outside);
    let status = std::process::Command::new("mkfifo").arg(root.join("fifo")).status();
    let have_fifo = status.map(|s| s.success()).unwrap_or(false);
    let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();

    let store = store_in(tmp.path());
    let (m, stats) = snapshot_dir_with_stats(&store, &root, None).unwrap();
    m.validate().unwrap();
    let keys: Vec<&str> = m.entries.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "dirlink",
            "empty",
            "escape",
            "pkg",
            "pkg/__init__.py",
            "pkg/rel-escape",
            "pkg/sub",
            "pkg/sub/deeper",
            "pkg/sub/deeper/data.bin",
            "pkg/sub/mod.py",
            "run.sh"
        ]
    );
    assert_eq!(stats.skipped_special, 1 + u64::from(have_fifo));
    assert_eq!(
        m.get("escape").unwrap().kind,
        EntryKind::Symlink { target: outside.join("secret").display().to_string() }
    );
    assert_eq!(m.get("pkg/rel-escape").unwrap().kind, EntryKind::Symlink { target: "../../outside".into() });
    assert!(matches!(m.get("dirlink").unwrap().kind, EntryKind::Symlink { .. }), "dir symlink not descended");
    assert_eq!(m.get("run.sh").unwrap().mode, 0o755);
    assert_eq!(m.get("pkg/sub").unwrap().mode, 0o750);
    let EntryKind::File(empty) = &m.get("empty").unwrap().kind else { panic!("empty is a file") };
    assert_eq!(empty.size, 0);
    let EntryKind::File(big) = &m.get("pkg/sub/deeper/data.bin").unwrap().kind else { panic!() };
    assert!(big.chunks.len() > 1);
    let s = m.stats();
    assert_eq!((s.files, s.dirs, s.symlinks), (5, 3, 3));
    assert_eq!(s.total_bytes, (3 << 20) + 12 + 6 + 19);

    let d = put_manifest(&store, &m).unwrap();
    assert_eq!(d, m.digest().unwrap());
    assert_eq!(get_manifest(&store, &d).unwrap(), m);
}

#[test]
fn resnapshot_hashes_only_changed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir_all(&outside).unwrap();
    make_tree(&root, &outside);
    let store = CountingStore::new(store_in(tmp.path()));
    let first = snapshot_dir(&store, &root, None).unwrap();
    let puts_before = store.puts();

    // Same size, new content and mtime: must be noticed.
    fs::write(root.join("pkg/sub/mod.py"), b"x = 2\n").unwrap();
    age(&root.join("pkg/sub/mod.py"), Duration::from_secs(5));
    fs::write(root.join("pkg/new.py"), b"new\n").unwrap();
    let (second, stats) = snapshot_dir_with_stats(&store, &root, Some(&first)).unwrap();
    assert_eq!(stats.files_hashed, 2, "{stats:?}");
    assert_eq!(stats.files_reused, 4, "{stats:?}");
    assert_eq!(stats.bytes_hashed, 6 + 4);
    assert_eq!(store.puts() - puts_before, 2, "only the changed and the new file were stored");
    assert_ne!(second.get("pkg/sub/mod.py"), first.get("pkg/sub/mod.py"));
    assert_eq!(second.get("pkg/sub/deeper/data.bin"), first.get("pkg/sub/deeper/data.bin"));

    // A reused entry whose blob vanished from the store is re-read, not trusted.
    let EntryKind::File(c) = &first.get("run.sh").unwrap().kind else { panic!() };
    store.delete(&c.chunks[0].digest).unwrap();
    let (_, stats) = snapshot_dir_with_stats(&store, &root, Some(&second)).unwrap();
    assert_eq!(stats.files_hashed, 1, "{stats:?}");
    assert!(store.has(&c.chunks[0].digest).unwrap());
}

// ---------------------------------------------------------------- materialize

/// Path, kind, mode, uid, gid and (except for symlinks) mtime.
type Comparable = (String, EntryKind, u32, u32, u32, Option<(i64, u32)>);

fn comparable(m: &Manifest) -> Vec<Comparable> {
    m.entries
        .iter()
        .map(|(p, e)| {
            // Symlink mtimes are not restored.
            let mtime = (!matches!(e.kind, EntryKind::Symlink { .. })).then_some((e.mtime, e.mtime_nsec));
            (p.clone(), e.kind.clone(), e.mode, e.uid, e.gid, mtime)
        })
        .collect()
}

#[test]
fn materialize_roundtrips() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir_all(&outside).unwrap();
    make_tree(&root, &outside);
    fs::create_dir(root.join("ro")).unwrap();
    fs::write(root.join("ro/file"), b"read only").unwrap();
    fs::set_permissions(root.join("ro/file"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let store = store_in(tmp.path());
    let m = snapshot_dir(&store, &root, None).unwrap();
    let dest = tmp.path().join("dest");
    materialize(&store, &m, &dest).unwrap();
    let again = snapshot_dir(&store, &dest, None).unwrap();
    assert_eq!(comparable(&again), comparable(&m));
    assert_eq!(
        fs::read(dest.join("pkg/sub/deeper/data.bin")).unwrap(),
        fs::read(root.join("pkg/sub/deeper/data.bin")).unwrap()
    );
    assert_eq!(fs::read_link(dest.join("escape")).unwrap(), outside.join("secret"));
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dest.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn materialize_never_writes_outside_dest() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let store = store_in(tmp.path());
    let payload = store_file(&store, &{
        let p = tmp.path().join("payload");
        fs::write(&p, b"pwned").unwrap();
        p
    })
    .unwrap();

    // 1. A manifest that puts a file below its own symlink is refused outright.
    let mut evil = Manifest::new();
    evil.insert("link", Entry::symlink(outside.to_str().unwrap())).unwrap();
    evil.insert("link/pwned", Entry::file(payload.clone(), 0o644)).unwrap();
    let dest = tmp.path().join("dest1");
    assert!(matches!(materialize(&store, &evil, &dest), Err(CasError::InvalidManifest(_))));
    assert!(!outside.join("pwned").exists());

    // 2. A symlink already planted in dest is replaced, never followed.
    let dest = tmp.path().join("dest2");
    fs::create_dir_all(&dest).unwrap();
    symlink(&outside, dest.join("link")).unwrap();
    symlink(outside.join("target-file"), dest.join("file")).unwrap();
    let mut m = Manifest::new();
    m.insert("link", Entry::dir(0o755)).unwrap();
    m.insert("link/pwned", Entry::file(payload.clone(), 0o644)).unwrap();
    m.insert("file", Entry::file(payload, 0o644)).unwrap();
    materialize(&store, &m, &dest).unwrap();
    assert!(fs::symlink_metadata(dest.join("link")).unwrap().is_dir());
    assert_eq!(fs::read(dest.join("link/pwned")).unwrap(), b"pwned");
    assert!(fs::symlink_metadata(dest.join("file")).unwrap().is_file());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside");

    // 3. Paths with `..` or absolute paths never get into a manifest.
    let mut bad = Manifest::new();
    assert!(matches!(bad.insert("../x", Entry::dir(0o755)), Err(CasError::InvalidPath { .. })));
    assert!(matches!(bad.insert("/etc/x", Entry::dir(0o755)), Err(CasError::InvalidPath { .. })));
    bad.entries.insert("a/../../x".into(), Entry::dir(0o755));
    assert!(matches!(
        materialize(&store, &bad, &tmp.path().join("dest3")),
        Err(CasError::InvalidPath { .. })
    ));
}

#[test]
fn layers_apply_onto_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let base_dir = tmp.path().join("base");
    fs::create_dir_all(base_dir.join("etc")).unwrap();
    fs::create_dir_all(base_dir.join("cache/x")).unwrap();
    fs::write(base_dir.join("etc/a"), b"a").unwrap();
    fs::write(base_dir.join("etc/b"), b"b").unwrap();
    fs::write(base_dir.join("cache/x/f"), b"f").unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("etc")).unwrap();
    fs::create_dir_all(upper.join("cache")).unwrap();
    fs::write(upper.join("etc/.wh.a"), b"").unwrap();
    fs::write(upper.join("cache/.wh..wh..opq"), b"").unwrap();
    fs::write(upper.join("cache/new"), b"n").unwrap();
    let mut merged = snapshot_dir(&store, &base_dir, None).unwrap();
    merged.apply_layer(&snapshot_dir(&store, &upper, None).unwrap()).unwrap();
    let keys: Vec<&str> = merged.entries.keys().map(String::as_str).collect();
    assert_eq!(keys, ["cache", "cache/new", "etc", "etc/b"]);
    let dest = tmp.path().join("merged");
    materialize(&store, &merged, &dest).unwrap();
    assert_eq!(fs::read(dest.join("cache/new")).unwrap(), b"n");
    assert!(!dest.join("etc/a").exists());
}

// ---------------------------------------------------------------- gc

#[test]
fn gc_keeps_reachable_and_young_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let root = tmp.path().join("tree");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("live"), b"live content").unwrap();
    let m = snapshot_dir(&store, &root, None).unwrap();
    let md = put_manifest(&store, &m).unwrap();
    let live = Digest::of(b"live content");
    let old_orphan = store.put(b"old orphan").unwrap();
    let young_orphan = store.put(b"young orphan, a build in progress").unwrap();
    let touched_orphan = store.put(b"old but just reused by a build").unwrap();
    let hour = Duration::from_secs(3600);
    for d in [md, live, old_orphan, touched_orphan] {
        age(&store.path_of(&d), 2 * hour);
    }
    // A build that found this blob present touches it instead of re-putting it.
    assert!(store.touch(&touched_orphan).unwrap());

    let report = gc(&store, &[md], hour).unwrap();
    assert_eq!(report.reachable, 2);
    assert_eq!(report.scanned, 5);
    assert_eq!(report.deleted, 1);
    assert_eq!(report.deleted_bytes, 10);
    assert_eq!(report.kept_young, 2);
    assert_eq!(report.missing, 0);
    for d in [md, live, young_orphan, touched_orphan] {
        assert!(store.has(&d).unwrap(), "{d} kept");
    }
    assert!(!store.has(&old_orphan).unwrap());
    assert_eq!(get_manifest(&store, &md).unwrap(), m);
    assert_eq!(fs::read_dir(tmp.path().join("cas/trash")).unwrap().count(), 0);

    // A root that cannot be read aborts instead of sweeping with an incomplete mark.
    let absent = Digest::of(b"no such manifest");
    assert!(matches!(gc(&store, &[absent], hour), Err(CasError::NotFound { .. })));
    // Without roots and without grace, everything unreferenced goes.
    let report = gc(&store, &[], Duration::ZERO).unwrap();
    assert_eq!(report.deleted, 4);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn random_ranges_match_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path());
    let data = random_bytes(6 << 20, 9);
    let path = tmp.path().join("f");
    fs::write(&path, &data).unwrap();
    let content = store_file(&store, &path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    for _ in 0..50 {
        let off = rng.gen_range(0..data.len());
        let len = rng.gen_range(0..(3 << 20));
        let end = (off + len).min(data.len());
        assert_eq!(read_file_range(&store, &content, off as u64, len as u64).unwrap(), &data[off..end]);
    }
}
