//! Benchmark of the lazy image file system (issue 3), as root:
//!
//! 1. A never-seen image of ~SIZE (mixed file sizes) behind a slow store (per-request
//!    latency + a shared bandwidth cap, both printed) whose "start" reads <= 5% of it:
//!    lazy (empty cache, build + mount + read the start set) vs eager (materialize the
//!    whole image from the same store, then read the start set from local disk). Also
//!    a second lazy start on another empty cache warmed by prefetching the first
//!    start's access log.
//! 2. Sequential read of one SIZE file: local disk, through the FS cold (slow store),
//!    through the FS from the chunk cache (same process, and after a cache "restart"
//!    that re-verifies chunks on first load). Page caches are dropped before each run.
//!
//! `cargo run --release -p flare-imagefs --example imagefs_bench` (env:
//! FLARE_BENCH_IMAGE_MB, default 1024; FLARE_BENCH_LATENCY_MS, default 5;
//! FLARE_BENCH_MBPS, default 200). Writes bench/results/imagefs.json.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_cas::{BlobInfo, BlobStore, Digest, Entry, LocalStore, Manifest};
use flare_imagefs::{ChunkCache, ImageFs, ImageFsOptions};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

/// A store standing in for remote storage: each request waits `latency`, and bytes
/// go through one shared link of `bytes_per_sec` (concurrent requests queue on it).
struct SlowStore {
    inner: LocalStore,
    latency: Duration,
    bytes_per_sec: f64,
    link_free_at: Mutex<Instant>,
}

impl SlowStore {
    fn delay(&self, len: usize) {
        let start = Instant::now();
        let transfer = Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
        let done = {
            let mut free = self.link_free_at.lock().unwrap();
            let begin = (*free).max(start + self.latency);
            *free = begin + transfer;
            *free
        };
        if let Some(wait) = done.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

impl BlobStore for SlowStore {
    fn put(&self, data: &[u8]) -> flare_cas::Result<Digest> {
        self.inner.put(data)
    }
    fn put_file(&self, path: &Path) -> flare_cas::Result<Digest> {
        self.inner.put_file(path)
    }
    fn get(&self, digest: &Digest) -> flare_cas::Result<Vec<u8>> {
        let data = self.inner.get(digest)?;
        self.delay(data.len());
        Ok(data)
    }
    fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> flare_cas::Result<Vec<u8>> {
        let data = self.inner.read_range(digest, offset, len)?;
        self.delay(data.len());
        Ok(data)
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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

/// Read `path` sequentially with a 1 MiB buffer; returns (bytes, seconds).
fn read_seq(path: &Path) -> (u64, f64) {
    let start = Instant::now();
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, start.elapsed().as_secs_f64())
}

/// The start set: (path, bytes to read from its beginning).
fn read_start(root: &Path, set: &[(String, u64)]) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    for (path, len) in set {
        let mut f = fs::File::open(root.join(path)).unwrap();
        let mut left = *len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).unwrap();
            if n == 0 {
                break;
            }
            left -= n as u64;
            total += n as u64;
        }
    }
    total
}

fn store_bytes(store: &dyn BlobStore, data: &[u8]) -> flare_cas::FileContent {
    if data.len() as u64 <= flare_cas::WHOLE_FILE_MAX {
        if data.is_empty() {
            return flare_cas::FileContent::default();
        }
        let digest = store.put(data).unwrap();
        return flare_cas::FileContent {
            size: data.len() as u64,
            chunks: vec![flare_cas::Chunk { digest, offset: 0, len: data.len() as u64 }],
        };
    }
    flare_cas::store_reader(store, data).unwrap()
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("imagefs_bench needs root and /dev/fuse");
        std::process::exit(2);
    }
    let image_mb = env_u64("FLARE_BENCH_IMAGE_MB", 1024);
    let latency_ms = env_u64("FLARE_BENCH_LATENCY_MS", 5);
    let mbps = env_u64("FLARE_BENCH_MBPS", 200);
    let image_bytes = image_mb * MIB;
    // FLARE_BENCH_PARTS: "start", "seq" or both (default), to iterate on one half.
    let parts = std::env::var("FLARE_BENCH_PARTS").unwrap_or_else(|_| "start,seq".to_owned());
    let (run_start, run_seq) = (parts.contains("start"), parts.contains("seq"));
    let work = tempfile::Builder::new().prefix("imagefs-bench").tempdir_in("/var/tmp").unwrap();
    let w = work.path();
    println!("imagefs bench: image {image_mb} MiB, store latency {latency_ms} ms/request, bandwidth cap {mbps} MB/s (shared), work dir {}", w.display());

    // ---- Build the image straight into a local store (never seen by any cache). ----
    let t = Instant::now();
    let local = LocalStore::open(&w.join("store")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut manifest = Manifest::new();
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut total = 0u64;
    let mut i = 0;
    let mut buf = Vec::new();
    while total < image_bytes {
        // ~60% of files small (1-32 KiB), ~37% medium (32 KiB-1 MiB), ~3% large (2-32 MiB).
        let r: f64 = rng.gen();
        let size = if r < 0.60 {
            rng.gen_range(1 << 10..32 << 10)
        } else if r < 0.97 {
            rng.gen_range(32 << 10..1 << 20)
        } else {
            rng.gen_range(2 << 20..32 << 20)
        }
        .min(image_bytes - total);
        buf.resize(size as usize, 0);
        rng.fill_bytes(&mut buf);
        let content = store_bytes(&local, &buf);
        let path = format!("pkg{:03}/mod{:02}/file{i:05}.bin", i % 97, i % 13);
        manifest.insert(&path, Entry { mtime: 1_700_000_000, ..Entry::file(content, 0o644) }).unwrap();
        files.push((path, size));
        total += size;
        i += 1;
    }
    // Parents.
    let dirs: Vec<String> = manifest
        .entries
        .keys()
        .flat_map(|p| p.match_indices('/').map(|(i, _)| p[..i].to_owned()).collect::<Vec<_>>())
        .collect();
    for d in dirs {
        manifest.entries.entry(d).or_insert_with(|| Entry::dir(0o755));
    }
    manifest.validate().unwrap();
    let stats = manifest.stats();
    println!(
        "image: {} files, {} dirs, {:.0} MiB, built in {:.1}s",
        stats.files,
        stats.dirs,
        stats.total_bytes as f64 / MIB as f64,
        t.elapsed().as_secs_f64()
    );
    let manifest = Arc::new(manifest);

    // The start set: files in random order, small ones whole, big ones' first 512 KiB,
    // until 4.5% of the image is read.
    let mut order = files.clone();
    order.shuffle(&mut rng);
    let budget = stats.total_bytes * 45 / 1000;
    let mut start_set = Vec::new();
    let mut start_bytes = 0;
    for (path, size) in order {
        if start_bytes >= budget {
            break;
        }
        let len = if size <= MIB { size } else { 512 << 10 };
        start_bytes += len;
        start_set.push((path, len));
    }
    println!(
        "start set: {} files, {:.1} MiB read ({:.2}% of the image)",
        start_set.len(),
        start_bytes as f64 / MIB as f64,
        100.0 * start_bytes as f64 / stats.total_bytes as f64
    );

    let slow = |root: &Path| -> Arc<SlowStore> {
        Arc::new(SlowStore {
            inner: LocalStore::open(root).unwrap(),
            latency: Duration::from_millis(latency_ms),
            bytes_per_sec: mbps as f64 * 1e6,
            link_free_at: Mutex::new(Instant::now()),
        })
    };
    let ra_kb = env_u64("FLARE_BENCH_RA_KB", 4096) as u32;
    let opts = ImageFsOptions { threads: 4, read_ahead_kb: Some(ra_kb), ..ImageFsOptions::default() };
    let dropped = drop_caches();

    let (mount_s, lazy_s, lazy_fetched, prefetched_s, materialize_s, eager_s) = if run_start {
        // ---- 1a. Lazy start. ----
        let store = slow(&w.join("store"));
        let t = Instant::now();
        let cache = Arc::new(ChunkCache::open(&w.join("cache-a"), 8 << 30).unwrap());
        let imagefs = ImageFs::new(manifest.clone(), store.clone(), cache.clone(), opts.clone()).unwrap();
        let mnt = w.join("mnt-a");
        fs::create_dir_all(&mnt).unwrap();
        let handle = imagefs.mount(&mnt).unwrap();
        let mount_s = t.elapsed().as_secs_f64();
        let read = read_start(&mnt, &start_set);
        let lazy_s = t.elapsed().as_secs_f64();
        assert_eq!(read, start_bytes);
        // Background fetches still in flight count as fetched (not as time).
        imagefs.wait_read_ahead();
        let lazy_fetched = cache.stats().fetched_bytes;
        let access_log = imagefs.access_log();
        handle.unmount().unwrap();
        println!(
            "lazy start: {lazy_s:.2}s (build+mount {:.1} ms), fetched {:.1} MiB in {} chunks ({} by directory prefetch, {} by read-ahead; {:.2}% of the image)",
            mount_s * 1e3,
            lazy_fetched as f64 / MIB as f64,
            cache.stats().fetches,
            imagefs.stats().dir_prefetch_fetches,
            imagefs.stats().read_ahead_fetches,
            100.0 * lazy_fetched as f64 / stats.total_bytes as f64
        );

        // ---- 1b. Lazy start with the first start's access log prefetched (8 threads). ----
        drop_caches();
        let store_b = slow(&w.join("store"));
        let t = Instant::now();
        let cache_b = Arc::new(ChunkCache::open(&w.join("cache-b"), 8 << 30).unwrap());
        let imagefs_b = ImageFs::new(manifest.clone(), store_b, cache_b.clone(), opts.clone()).unwrap();
        let report = imagefs_b.prefetch(&access_log, 8);
        let prefetch_s = t.elapsed().as_secs_f64();
        let mnt_b = w.join("mnt-b");
        fs::create_dir_all(&mnt_b).unwrap();
        let handle_b = imagefs_b.mount(&mnt_b).unwrap();
        read_start(&mnt_b, &start_set);
        let prefetched_s = t.elapsed().as_secs_f64();
        handle_b.unmount().unwrap();
        println!(
            "prefetched start: {prefetched_s:.2}s (prefetch of {} chunks: {prefetch_s:.2}s; {} fetched during the start)",
            report.requested,
            imagefs_b.stats().fetches
        );

        // ---- 1c. Eager: materialize everything, then start from local disk. ----
        drop_caches();
        let store_c = slow(&w.join("store"));
        let dest = w.join("materialized");
        let t = Instant::now();
        flare_cas::materialize(store_c.as_ref(), &manifest, &dest).unwrap();
        let materialize_s = t.elapsed().as_secs_f64();
        read_start(&dest, &start_set);
        let eager_s = t.elapsed().as_secs_f64();
        fs::remove_dir_all(&dest).unwrap();
        println!("eager start: {eager_s:.2}s (materialize {materialize_s:.2}s)");
        drop((imagefs, imagefs_b, cache, cache_b));
        let _ = fs::remove_dir_all(w.join("cache-a"));
        let _ = fs::remove_dir_all(w.join("cache-b"));
        (mount_s, lazy_s, lazy_fetched, prefetched_s, materialize_s, eager_s)
    } else {
        (f64::NAN, f64::NAN, 0, f64::NAN, f64::NAN, f64::NAN)
    };
    let start_ratio = eager_s / lazy_s;

    let seq_bytes = image_bytes;
    let reps = env_u64("FLARE_BENCH_REPS", 5).max(1);
    let mut seq_runs = (Vec::new(), Vec::new());
    let (
        chunks,
        local_mbs,
        local_warm_mbs,
        cold_mbs,
        cached_mbs,
        restart_mbs,
        warm_mbs,
        chunked_mbs,
        cached_pt,
    ) = if run_seq {
        // ---- 2. Sequential read of one big file. ----
        let big = w.join("big.bin");
        {
            let mut f = fs::File::create(&big).unwrap();
            let mut left = seq_bytes;
            let mut chunk = vec![0u8; 8 << 20];
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                rng.fill_bytes(&mut chunk[..n]);
                std::io::Write::write_all(&mut f, &chunk[..n]).unwrap();
                left -= n as u64;
            }
            f.sync_all().unwrap();
        }
        let seq_store_dir = w.join("store2");
        let content = flare_cas::store_file(&LocalStore::open(&seq_store_dir).unwrap(), &big).unwrap();
        let chunks = content.chunks.len();
        let mut m2 = Manifest::new();
        m2.insert("big.bin", Entry { mtime: 1_700_000_000, ..Entry::file(content, 0o644) }).unwrap();
        let m2 = Arc::new(m2);
        let mbs = |(b, s): (u64, f64)| b as f64 / 1e6 / s;

        drop_caches();
        let first_local_mbs = mbs(read_seq(&big));
        let local_warm_mbs = mbs(read_seq(&big));

        let cache_dir = w.join("cache-seq");
        let cache = Arc::new(ChunkCache::open(&cache_dir, 8 << 30).unwrap());
        // Each run ends by waiting for the cache's background assembly (the one-file
        // copy of a fully cached big file, used for passthrough), so no run competes
        // with the previous one's; its time is reported.
        let assembly_s = std::cell::Cell::new(0.0f64);
        let mount_read_with = |cache: &Arc<ChunkCache>, name: &str, drop: bool, opts: &ImageFsOptions| {
            let fs_ = ImageFs::new(m2.clone(), slow(&seq_store_dir), cache.clone(), opts.clone()).unwrap();
            let mnt = w.join(name);
            fs::create_dir_all(&mnt).unwrap();
            let h = fs_.mount(&mnt).unwrap();
            if drop {
                drop_caches();
            }
            let r = mbs(read_seq(&mnt.join("big.bin")));
            h.unmount().unwrap();
            let t = Instant::now();
            cache.wait_assembly();
            assembly_s.set(assembly_s.get().max(t.elapsed().as_secs_f64()));
            (r, fs_)
        };
        let mount_read =
            |cache: &Arc<ChunkCache>, name: &str, drop: bool| mount_read_with(cache, name, drop, &opts);
        let (cold_mbs, _) = mount_read(&cache, "mnt-cold", true);
        let no_pt = ImageFsOptions { passthrough: false, ..opts.clone() };
        let (chunked_mbs, _) = mount_read_with(&cache, "mnt-chunked", true, &no_pt);
        // Local disk and the chunk cache, both from a cold page cache, interleaved
        // FLARE_BENCH_REPS times (default 5); medians are reported. (Single runs on a
        // shared VM vary by 2-3x, for local disk too.)
        let mut locals = vec![first_local_mbs];
        let mut cacheds = Vec::new();
        let mut cached_pt = true;
        for i in 0..reps {
            if i > 0 {
                drop_caches();
                locals.push(mbs(read_seq(&big)));
            }
            let (mbs_, fs_cached) = mount_read(&cache, "mnt-cached", true);
            assert_eq!(fs_cached.stats().fetches, 0);
            cached_pt &= fs_cached.stats().passthrough_opens > 0;
            cacheds.push(mbs_);
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (local_mbs, cached_mbs) = (median(&locals), median(&cacheds));
        println!("local disk runs (MB/s): {locals:.0?}; chunk cache runs: {cacheds:.0?}");
        println!(
            "cached read: passthrough {cached_pt}; cache holds {:.0} MiB (chunks + assembled copy), assembly waited {:.2}s",
            cache.used_bytes() as f64 / MIB as f64,
            assembly_s.get()
        );
        drop(cache);
        let cache = Arc::new(ChunkCache::open(&cache_dir, 8 << 30).unwrap());
        let (restart_mbs, fs_restart) = mount_read(&cache, "mnt-restart", true);
        assert_eq!(fs_restart.stats().fetches, 0);
        // Page cache warm: a second read in one mount is served by the kernel.
        let fs_ = ImageFs::new(m2.clone(), slow(&seq_store_dir), cache.clone(), opts.clone()).unwrap();
        let mnt = w.join("mnt-warm");
        fs::create_dir_all(&mnt).unwrap();
        let h = fs_.mount(&mnt).unwrap();
        read_seq(&mnt.join("big.bin"));
        let warm_mbs = mbs(read_seq(&mnt.join("big.bin")));
        h.unmount().unwrap();
        seq_runs = (locals, cacheds);
        (
            chunks,
            local_mbs,
            local_warm_mbs,
            cold_mbs,
            cached_mbs,
            restart_mbs,
            warm_mbs,
            chunked_mbs,
            cached_pt,
        )
    } else {
        (0, f64::NAN, f64::NAN, f64::NAN, f64::NAN, f64::NAN, f64::NAN, f64::NAN, false)
    };
    let cached_ratio = cached_mbs / local_mbs;
    println!();
    println!("{:<58} {:>12}", "measurement", "value");
    println!("{:<58} {:>12}", "-".repeat(58), "-".repeat(12));
    let row = |k: &str, v: String| println!("{k:<58} {v:>12}");
    row("image size (MiB)", format!("{:.0}", stats.total_bytes as f64 / MIB as f64));
    row("store latency per request (ms) / bandwidth cap (MB/s)", format!("{latency_ms} / {mbps}"));
    row(
        "start set read (% of image)",
        format!("{:.2}", 100.0 * start_bytes as f64 / stats.total_bytes as f64),
    );
    row("lazy start (s)", format!("{lazy_s:.2}"));
    row("lazy start with prefetched access log (s)", format!("{prefetched_s:.2}"));
    row("eager start: materialize + read (s)", format!("{eager_s:.2}"));
    row(
        "lazy start: fetched (% of image)",
        format!("{:.2}", 100.0 * lazy_fetched as f64 / stats.total_bytes as f64),
    );
    row("eager / lazy (target >= 10x)", format!("{start_ratio:.1}x"));
    row(
        &format!("seq read {} MiB: local disk, cold page cache (MB/s)*", seq_bytes / MIB),
        format!("{local_mbs:.0}"),
    );
    row("seq read: local disk, warm page cache (MB/s)", format!("{local_warm_mbs:.0}"));
    row("seq read via imagefs: cold, from slow store (MB/s)", format!("{cold_mbs:.0}"));
    row("seq read via imagefs: chunk cache, no passthrough (MB/s)", format!("{chunked_mbs:.0}"));
    row("seq read via imagefs: chunk cache, cold page cache (MB/s)*", format!("{cached_mbs:.0}"));
    row(
        "  ... first run after the cache was filled (MB/s)",
        format!("{:.0}", seq_runs.1.first().copied().unwrap_or(f64::NAN)),
    );
    row("  ... served by passthrough", format!("{cached_pt}"));
    row("seq read via imagefs: chunk cache after restart (MB/s)", format!("{restart_mbs:.0}"));
    row("seq read via imagefs: warm page cache (MB/s)", format!("{warm_mbs:.0}"));
    row("cached / local disk (target >= 0.8x)", format!("{cached_ratio:.2}x"));
    row("page caches dropped between runs", format!("{dropped}"));
    row("* median of interleaved runs", format!("{reps}"));
    row("imagefs readahead window (KiB)", format!("{ra_kb}"));

    let json = serde_json::json!({
        "bench": "imagefs",
        "image_mib": stats.total_bytes / MIB,
        "image_files": stats.files,
        "store_latency_ms": latency_ms,
        "store_bandwidth_mb_s": mbps,
        "start_read_fraction": start_bytes as f64 / stats.total_bytes as f64,
        "start_fetched_fraction": lazy_fetched as f64 / stats.total_bytes as f64,
        "lazy_start_s": lazy_s,
        "lazy_mount_s": mount_s,
        "prefetched_start_s": prefetched_s,
        "eager_start_s": eager_s,
        "eager_materialize_s": materialize_s,
        "eager_over_lazy": start_ratio,
        "seq_file_mib": seq_bytes / MIB,
        "seq_file_chunks": chunks,
        "seq_local_cold_mb_s": local_mbs,
        "seq_local_cold_runs_mb_s": seq_runs.0,
        "seq_imagefs_cached_runs_mb_s": seq_runs.1,
        "seq_local_warm_mb_s": local_warm_mbs,
        "seq_imagefs_cold_store_mb_s": cold_mbs,
        "seq_imagefs_cached_no_passthrough_mb_s": chunked_mbs,
        "seq_imagefs_cached_mb_s": cached_mbs,
        "seq_imagefs_cached_passthrough": cached_pt,
        "seq_imagefs_cached_after_restart_mb_s": restart_mbs,
        "seq_imagefs_page_cache_mb_s": warm_mbs,
        "cached_over_local": cached_ratio,
        "page_caches_dropped": dropped,
        "read_ahead_kb": ra_kb,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/imagefs.json");
    fs::write(&out, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("\nwrote {}", out.display());
}
