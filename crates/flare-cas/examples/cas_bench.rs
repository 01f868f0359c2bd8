//! Throughput of the content-addressed store: put/get of a 256 MiB file through
//! `store_file`/`read_file_range`, lazy range reads, and snapshots of a directory of many
//! small files (the host's /usr/lib/python3.* if present, else a generated tree).
//!
//! `cargo run --release -p flare-cas --example cas_bench` — prints a table and writes
//! `bench/results/cas.json`. Set `CAS_BENCH_MB` to change the big file's size.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flare_cas::{
    put_manifest, read_file_range, snapshot_dir_with_stats, store_file, write_file_to, BlobStore, Digest,
    Durability, LocalStore,
};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: f64 = 1024.0 * 1024.0;

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

fn python_lib_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("python3.") && p.is_dir()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

fn generated_tree(root: &Path) -> PathBuf {
    let dir = root.join("generated");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for pkg in 0..100 {
        let p = dir.join(format!("pkg{pkg}/sub"));
        fs::create_dir_all(&p).unwrap();
        for f in 0..50 {
            let mut data = vec![0u8; rng.gen_range(100..20_000)];
            rng.fill_bytes(&mut data);
            fs::write(p.join(format!("m{f}.py")), data).unwrap();
        }
    }
    dir
}

fn main() {
    let mb: usize = std::env::var("CAS_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let work = tempfile::tempdir().expect("temp dir");
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut results = serde_json::Map::new();
    let mut record = |key: &str, label: String, value: Value| {
        rows.push((key.to_owned(), label));
        results.insert(key.to_owned(), value);
    };

    // Big file.
    let mut data = vec![0u8; mb << 20];
    rand::rngs::StdRng::seed_from_u64(42).fill_bytes(&mut data);
    let big = work.path().join("big.bin");
    fs::write(&big, &data).unwrap();
    let size = data.len() as f64;
    let (_, hash_s) = timed(|| Digest::of(&data));
    drop(data);
    record("blake3_hash_mb_s", format!("{:.0} MB/s", size / MIB / hash_s), json!(size / MIB / hash_s));
    let (_, copy_s) = timed(|| fs::copy(&big, work.path().join("copy.bin")).unwrap());
    fs::remove_file(work.path().join("copy.bin")).unwrap();
    record("fs_copy_mb_s (anchor)", format!("{:.0} MB/s", size / MIB / copy_s), json!(size / MIB / copy_s));

    for (durability, tag) in [(Durability::Batched, "batched"), (Durability::EachBlob, "each_blob_fsync")] {
        let root = work.path().join(format!("cas-{tag}"));
        let store = LocalStore::open(&root).unwrap().with_durability(durability);
        let (content, put_s) = timed(|| {
            let c = store_file(&store, &big).unwrap();
            store.flush().unwrap();
            c
        });
        record(
            &format!("put_cold_{tag}_mb_s"),
            format!("{:.0} MB/s ({} chunks)", size / MIB / put_s, content.chunks.len()),
            json!(size / MIB / put_s),
        );
        if durability == Durability::EachBlob {
            continue;
        }
        let (_, reput_s) = timed(|| store_file(&store, &big).unwrap());
        record("put_existing_mb_s", format!("{:.0} MB/s", size / MIB / reput_s), json!(size / MIB / reput_s));
        let (bytes, get_s) = timed(|| read_file_range(&store, &content, 0, content.size).unwrap());
        assert_eq!(bytes.len() as u64, content.size);
        drop(bytes);
        record("get_verified_mb_s", format!("{:.0} MB/s", size / MIB / get_s), json!(size / MIB / get_s));
        let (_, stream_s) = timed(|| write_file_to(&store, &content, &mut std::io::sink()).unwrap());
        record(
            "stream_to_sink_mb_s",
            format!("{:.0} MB/s", size / MIB / stream_s),
            json!(size / MIB / stream_s),
        );

        // Lazy reads: 64 KiB at random offsets, first on a fresh store (each chunk is
        // verified whole on first touch), then again (trusted).
        let fresh = LocalStore::open(&root).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let offsets: Vec<u64> = (0..2000).map(|_| rng.gen_range(0..content.size - 65536)).collect();
        let (_, cold_s) = timed(|| {
            for &o in &offsets {
                read_file_range(&fresh, &content, o, 65536).unwrap();
            }
        });
        let (_, warm_s) = timed(|| {
            for &o in &offsets {
                read_file_range(&fresh, &content, o, 65536).unwrap();
            }
        });
        record(
            "range_64k_first_us",
            format!("{:.0} us/read (verifies chunk on first touch)", cold_s * 1e6 / offsets.len() as f64),
            json!(cold_s * 1e6 / offsets.len() as f64),
        );
        record(
            "range_64k_trusted_us",
            format!("{:.1} us/read", warm_s * 1e6 / offsets.len() as f64),
            json!(warm_s * 1e6 / offsets.len() as f64),
        );
    }
    fs::remove_file(&big).unwrap();

    // Many small files.
    let tree = python_lib_dir().unwrap_or_else(|| generated_tree(work.path()));
    let store = LocalStore::open(&work.path().join("cas-tree")).unwrap();
    let ((m, stats), snap_s) = timed(|| {
        let out = snapshot_dir_with_stats(&store, &tree, None).unwrap();
        put_manifest(&store, &out.0).unwrap();
        out
    });
    let s = m.stats();
    record(
        "tree",
        format!("{} ({} files, {:.1} MiB)", tree.display(), s.files, s.total_bytes as f64 / MIB),
        json!({
            "path": tree.display().to_string(), "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks,
            "bytes": s.total_bytes, "unique_bytes": s.unique_bytes,
        }),
    );
    record(
        "snapshot_cold_batched_s",
        format!("{snap_s:.3} s ({:.0} files/s, {} hashed)", s.files as f64 / snap_s, stats.files_hashed),
        json!(snap_s),
    );
    let ((_, stats2), resnap_s) = timed(|| snapshot_dir_with_stats(&store, &tree, Some(&m)).unwrap());
    record(
        "resnapshot_unchanged_s",
        format!("{resnap_s:.3} s ({} reused, {} hashed)", stats2.files_reused, stats2.files_hashed),
        json!(resnap_s),
    );
    let slow =
        LocalStore::open(&work.path().join("cas-tree-each")).unwrap().with_durability(Durability::EachBlob);
    let (_, snap_each_s) = timed(|| snapshot_dir_with_stats(&slow, &tree, None).unwrap());
    record("snapshot_cold_each_blob_fsync_s", format!("{snap_each_s:.3} s"), json!(snap_each_s));
    let dest = work.path().join("materialized");
    let (_, mat_s) = timed(|| flare_cas::materialize(&store, &m, &dest).unwrap());
    record("materialize_s", format!("{mat_s:.3} s"), json!(mat_s));
    let json_len = m.to_canonical_json().unwrap().len();
    record("manifest_json_bytes", format!("{json_len}"), json!(json_len));

    println!("{:<32} value", "metric");
    for (k, v) in &rows {
        println!("{k:<32} {v}");
    }
    results.insert("big_file_mib".into(), json!(mb));
    results.insert("temp_dir".into(), json!(work.path().display().to_string()));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/cas.json");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    fs::write(&out, serde_json::to_string_pretty(&Value::Object(results)).unwrap() + "\n").unwrap();
    println!("wrote {}", out.display());
}
