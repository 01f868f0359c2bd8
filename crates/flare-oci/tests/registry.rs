//! Pull tests against a real local registry (Debian's `docker-registry`), seeded by the
//! tests themselves through the distribution API, plus auth tests against a tiny fake
//! registry. Registry tests are skipped (with a message) if the binary is missing.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flare_cas::{read_file_range, BlobStore, EntryKind, LocalStore, Manifest};
use flare_oci::{pull, Client, Credentials, ImageRef, OciError, Platform, PulledImage};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

// ---------------------------------------------------------------- the registry

struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    /// Start a registry on a free port, or `None` (test skipped) without the binary.
    async fn start() -> Option<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            eprintln!(
                "SKIP: {REGISTRY_BIN} not installed (apt-get install docker-registry; scripts/setup.sh does)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        let mut reg = Registry { child, port, dir, http };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((status, _, _)) = reg.request(Method::GET, &reg.url("/v2/"), None, Bytes::new()).await {
                if status == StatusCode::OK {
                    break;
                }
            }
            if let Ok(Some(status)) = reg.child.try_wait() {
                let log = std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer /v2/ within 20s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(reg)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.host())
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), String> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = self.http.request(req.body(Full::new(body)).unwrap()).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// Upload a blob (POST then PUT with the digest); returns its digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let (status, headers, body) = self
            .request(Method::POST, &self.url(&format!("/v2/{repo}/blobs/uploads/")), None, Bytes::new())
            .await
            .unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
        let location = headers["location"].to_str().unwrap();
        let location = if location.starts_with('/') { self.url(location) } else { location.to_owned() };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let (status, _, body) = self
            .request(Method::PUT, &url, Some("application/octet-stream"), Bytes::copy_from_slice(data))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        digest
    }

    /// PUT a manifest (or index) under `reference`; returns (digest, size).
    async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        json: &serde_json::Value,
    ) -> (String, usize) {
        let bytes = serde_json::to_vec(json).unwrap();
        let (status, _, body) = self
            .request(
                Method::PUT,
                &self.url(&format!("/v2/{repo}/manifests/{reference}")),
                Some(media_type),
                Bytes::from(bytes.clone()),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
        (sha256(&bytes), bytes.len())
    }

    /// Push layers + config and an image manifest under `tag`; returns (digest, size).
    async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Layer],
        config: serde_json::Value,
    ) -> (String, usize) {
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config).await;
        let mut descs = Vec::new();
        for layer in layers {
            let digest = self.push_blob(repo, &layer.blob).await;
            descs.push(serde_json::json!({"mediaType": layer.media_type, "digest": digest, "size": layer.blob.len()}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": descs,
        });
        self.push_manifest(repo, tag, OCI_MANIFEST, &manifest).await
    }

    /// Where the registry's filesystem driver keeps a blob's bytes.
    fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

// ---------------------------------------------------------------- building layers

enum Item<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, Vec<u8>),
    Owned(&'a str, u32, u64, u64, Vec<u8>),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    CharDev(&'a str),
}

/// A tar with exactly these entries (names written raw, so `../evil` goes in as is).
fn tar(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (name, data): (&str, Vec<u8>) = match item {
            Item::Dir(name, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (name, vec![])
            }
            Item::File(name, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (name, data.clone())
            }
            Item::Owned(name, mode, uid, gid, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                (name, data.clone())
            }
            Item::Symlink(name, target) | Item::Hardlink(name, target) => {
                let ty = if matches!(item, Item::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                h.set_entry_type(ty);
                h.set_mode(0o777);
                let ln = &mut h.as_old_mut().linkname;
                ln[..target.len()].copy_from_slice(target.as_bytes());
                (name, vec![])
            }
            Item::CharDev(name) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                (name, vec![])
            }
        };
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Two zstd frames with a skippable frame between (like zstd:chunked writers).
fn zstd_multiframe(data: &[u8]) -> Vec<u8> {
    let (a, b) = data.split_at(data.len() / 3);
    let mut out = ruzstd::encoding::compress_to_vec(a, ruzstd::encoding::CompressionLevel::Fastest);
    out.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(b"skip");
    out.extend(ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest));
    out
}

struct Layer {
    media_type: &'static str,
    blob: Vec<u8>,
    diff_id: String,
}

fn layer(media_type: &'static str, tar: Vec<u8>) -> Layer {
    let diff_id = sha256(&tar);
    let blob = match media_type {
        LAYER_GZIP => gzip(&tar),
        LAYER_ZSTD => zstd_multiframe(&tar),
        _ => tar,
    };
    Layer { media_type, blob, diff_id }
}

fn big_data() -> Vec<u8> {
    // ~1.5 MiB of varied bytes: stored as several content-defined chunks.
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..1_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn base_layers() -> Vec<Layer> {
    let l0 = tar(&[
        Item::Dir("./", 0o755),
        Item::Dir("etc/", 0o755),
        Item::File("etc/hostname", 0o644, b"base\n".to_vec()),
        Item::File("etc/deleteme", 0o644, b"gone soon".to_vec()),
        Item::Dir("opt/old/", 0o750),
        Item::File("opt/old/a", 0o644, b"a".to_vec()),
        Item::File("opt/old/b", 0o644, b"b".to_vec()),
        Item::Dir("usr/bin/", 0o755),
        Item::Owned("usr/bin/tool", 0o4755, 1000, 1001, b"#!/bin/sh\necho tool\n".to_vec()),
        Item::Symlink("usr/bin/alias", "tool"),
        Item::Hardlink("usr/bin/tool2", "usr/bin/tool"),
        Item::File("data/big.bin", 0o600, big_data()),
        Item::CharDev("dev/null"),
    ]);
    let l1 = tar(&[
        Item::File("etc/.wh.deleteme", 0o644, vec![]),
        Item::Dir("opt/old/", 0o755),
        Item::File("opt/old/.wh..wh..opq", 0o644, vec![]),
        Item::File("opt/old/c", 0o644, b"c".to_vec()),
        Item::File("etc/hostname", 0o644, b"layer1\n".to_vec()),
        Item::Hardlink("usr/bin/tool3", "usr/bin/tool"),
    ]);
    let l2 = tar(&[Item::Dir("app", 0o755), Item::File("app/main.py", 0o644, b"print('hi')\n".to_vec())]);
    vec![layer(LAYER_GZIP, l0), layer(LAYER_ZSTD, l1), layer(LAYER_TAR, l2)]
}

fn config_for(layers: &[Layer], arch: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin", "MODE=prod"],
            "WorkingDir": "/app",
            "Cmd": ["python3", "main.py"],
            "User": "1000"
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()}
    })
}

/// Push the 3-layer amd64 image, an arm64 one-layer image, an index of both (`multi`),
/// the amd64 manifest alone (`single`) and an arm64-only index (`armonly`).
async fn seed(reg: &Registry, repo: &str) -> String {
    let layers = base_layers();
    let (amd_digest, amd_size) = reg.push_image(repo, "single", &layers, config_for(&layers, "amd64")).await;
    let arm_layers = vec![layer(LAYER_GZIP, tar(&[Item::File("ARM", 0o644, b"arm".to_vec())]))];
    let (arm_digest, arm_size) =
        reg.push_image(repo, "arm", &arm_layers, config_for(&arm_layers, "arm64")).await;
    let entry = |digest: &str, size: usize, arch: &str| {
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                           "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [entry(&arm_digest, arm_size, "arm64"), entry(&amd_digest, amd_size, "amd64")]});
    reg.push_manifest(repo, "multi", OCI_INDEX, &index).await;
    let arm_only = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry(&arm_digest, arm_size, "arm64")]});
    reg.push_manifest(repo, "armonly", OCI_INDEX, &arm_only).await;
    amd_digest
}

fn read_all(store: &dyn BlobStore, m: &Manifest, path: &str) -> Vec<u8> {
    match &m.get(path).unwrap_or_else(|| panic!("{path} missing")).kind {
        EntryKind::File(content) => read_file_range(store, content, 0, content.size).unwrap(),
        other => panic!("{path} is {other:?}"),
    }
}

async fn do_pull(reg: &Registry, reference: &str, store: &dyn BlobStore) -> Result<PulledImage, OciError> {
    let image = ImageRef::parse(&format!("{}/{reference}", reg.host())).unwrap();
    pull(&Client::new(), &image, store, &Platform::linux_amd64()).await
}

fn check_image(store: &dyn BlobStore, pulled: &PulledImage) {
    let m = &pulled.manifest;
    assert_eq!(read_all(store, m, "etc/hostname"), b"layer1\n");
    assert!(m.get("etc/deleteme").is_none(), "whiteout not applied");
    assert!(m.get("etc/.wh.deleteme").is_none());
    assert!(m.get("opt/old/a").is_none() && m.get("opt/old/b").is_none(), "opaque dir not applied");
    assert_eq!(read_all(store, m, "opt/old/c"), b"c");
    assert!(m.get("opt/old/.wh..wh..opq").is_none());
    assert_eq!(m.get("opt/old").unwrap().mode, 0o755);
    let tool = m.get("usr/bin/tool").unwrap();
    assert_eq!((tool.mode, tool.uid, tool.gid, tool.mtime), (0o4755, 1000, 1001, 1_700_000_000));
    assert_eq!(read_all(store, m, "usr/bin/tool2"), b"#!/bin/sh\necho tool\n");
    assert_eq!(read_all(store, m, "usr/bin/tool3"), b"#!/bin/sh\necho tool\n");
    assert_eq!(m.get("usr/bin/alias").unwrap().kind, EntryKind::Symlink { target: "tool".into() });
    assert_eq!(read_all(store, m, "data/big.bin"), big_data());
    match &m.get("data/big.bin").unwrap().kind {
        EntryKind::File(c) => {
            assert!(c.chunks.len() > 1, "big file should be chunked");
            assert_eq!(read_file_range(store, c, 1_000_000, 10).unwrap(), &big_data()[1_000_000..1_000_010]);
        }
        _ => unreachable!(),
    }
    assert!(m.get("dev/null").is_none(), "device nodes are skipped");
    assert!(pulled.warnings.iter().any(|w| w.contains("dev/null")), "{:?}", pulled.warnings);
    assert_eq!(read_all(store, m, "app/main.py"), b"print('hi')\n");
    assert!(m.get("ARM").is_none(), "got the arm64 image");
    assert!(m.get("usr").unwrap().is_dir());
    // Config.
    assert_eq!(pulled.workdir().as_deref(), Some("/app"));
    assert_eq!(pulled.cmd().unwrap(), ["python3", "main.py"]);
    assert_eq!(pulled.user().as_deref(), Some("1000"));
    assert!(pulled.env().contains(&("MODE".into(), "prod".into())));
    // Layers and the stored manifest.
    assert_eq!(pulled.layers.len(), 3);
    assert_eq!(flare_cas::get_manifest(store, &pulled.manifest_digest).unwrap(), *m);
    for l in &pulled.layers {
        assert!(flare_cas::get_manifest(store, &l.manifest_digest).is_ok());
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_index_and_manifest_with_all_layer_kinds() {
    let Some(reg) = Registry::start().await else { return };
    let amd_digest = seed(&reg, "flare/test").await;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();

    let pulled = do_pull(&reg, "flare/test:multi", &store).await.unwrap();
    check_image(&store, &pulled);
    assert_eq!(pulled.image_digest, amd_digest);

    let single = do_pull(&reg, "flare/test:single", &store).await.unwrap();
    check_image(&store, &single);
    assert_eq!(single.manifest_digest, pulled.manifest_digest, "same image, same stored tree");

    let by_digest = do_pull(&reg, &format!("flare/test@{amd_digest}"), &store).await.unwrap();
    assert_eq!(by_digest.manifest_digest, pulled.manifest_digest);

    // Another platform from the same index.
    let image = ImageRef::parse(&format!("{}/flare/test:multi", reg.host())).unwrap();
    let arm = pull(&Client::new(), &image, &store, &Platform::parse("linux/arm64").unwrap()).await.unwrap();
    assert_eq!(read_all(&store, &arm.manifest, "ARM"), b"arm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_reference_is_not_found() {
    let Some(reg) = Registry::start().await else { return };
    seed(&reg, "flare/test").await;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    for reference in ["flare/test:nope", "flare/nothing:latest"] {
        let err = do_pull(&reg, reference, &store).await.unwrap_err();
        assert!(matches!(err, OciError::NotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not found") && msg.contains(reference), "{msg}");
    }
    let missing = format!("flare/test@sha256:{}", "0".repeat(64));
    let err = do_pull(&reg, &missing, &store).await.unwrap_err();
    assert!(matches!(err, OciError::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_without_linux_amd64_is_a_clear_error() {
    let Some(reg) = Registry::start().await else { return };
    seed(&reg, "flare/test").await;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let err = do_pull(&reg, "flare/test:armonly", &store).await.unwrap_err();
    assert!(matches!(err, OciError::NoMatchingPlatform { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("linux/amd64") && msg.contains("linux/arm64") && msg.contains("armonly"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_escaping_the_root_is_rejected() {
    let Some(reg) = Registry::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let cases: [(&str, Vec<Item<'_>>, &str); 4] = [
        (
            "dotdot",
            vec![Item::File("ok", 0o644, b"ok".to_vec()), Item::File("../evil", 0o644, b"x".to_vec())],
            "../evil",
        ),
        ("nested", vec![Item::File("a/../../evil", 0o644, b"x".to_vec())], "a/../../evil"),
        ("absolute", vec![Item::File("/etc/evil", 0o644, b"x".to_vec())], "/etc/evil"),
        ("hardlink", vec![Item::Hardlink("innocent", "../../etc/shadow")], "../../etc/shadow"),
    ];
    for (tag, items, bad_path) in cases {
        let layers = vec![layer(LAYER_GZIP, tar(&items))];
        reg.push_image("flare/evil", tag, &layers, config_for(&layers, "amd64")).await;
        let err = do_pull(&reg, &format!("flare/evil:{tag}"), &store).await.unwrap_err();
        assert!(matches!(err, OciError::UnsafePath { .. }), "{tag}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(bad_path) && msg.contains("layer 0"), "{tag}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_a_digest_error() {
    let Some(reg) = Registry::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let layers = base_layers();
    reg.push_image("flare/corrupt", "v1", &layers, config_for(&layers, "amd64")).await;
    // The registry verifies uploads, so corrupt the stored bytes behind its back: same
    // size, one byte flipped in the middle of the zstd layer.
    let victim = sha256(&layers[1].blob);
    let path = reg.blob_path(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = do_pull(&reg, "flare/corrupt:v1", &store).await.unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("digest mismatch") && msg.contains(&victim) && msg.contains("layer 1"), "{msg}");

    // A corrupt config blob too.
    let layers = vec![layer(LAYER_TAR, tar(&[Item::File("f", 0o644, b"f".to_vec())]))];
    let config = serde_json::to_vec(&config_for(&layers, "amd64")).unwrap();
    reg.push_image("flare/corrupt", "v2", &layers, config_for(&layers, "amd64")).await;
    let path = reg.blob_path(&sha256(&config));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] = b' ';
    std::fs::write(&path, &bytes).unwrap();
    let err = do_pull(&reg, "flare/corrupt:v2", &store).await.unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }) && err.to_string().contains("config"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_id_mismatch_is_an_error() {
    let Some(reg) = Registry::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let layers = vec![layer(LAYER_GZIP, tar(&[Item::File("f", 0o644, b"f".to_vec())]))];
    let mut config = config_for(&layers, "amd64");
    config["rootfs"]["diff_ids"][0] = serde_json::json!(format!("sha256:{}", "1".repeat(64)));
    reg.push_image("flare/diffid", "v1", &layers, config).await;
    let err = do_pull(&reg, "flare/diffid:v1", &store).await.unwrap_err();
    assert!(err.to_string().contains("diff_id"), "{err}");
}

// ---------------------------------------------------------------- auth (fake registry)

async fn fake_auth_registry() -> u16 {
    use axum::http::{HeaderMap, StatusCode as S, Uri};
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let good_basic =
        format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "user:pass"));
    let token = move |headers: HeaderMap| {
        let good_basic = good_basic.clone();
        async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(good_basic.as_str()) {
                (S::OK, r#"{"token":"good-token"}"#).into_response()
            } else {
                (S::UNAUTHORIZED, r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#)
                    .into_response()
            }
        }
    };
    let registry = move |uri: Uri, headers: HeaderMap| async move {
        let authed = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer good-token");
        if authed && !uri.path().contains("forbidden") {
            return (S::NOT_FOUND, r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#).into_response();
        }
        let challenge = format!(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:x:pull""#
        );
        (S::UNAUTHORIZED, [("www-authenticate", challenge)], r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#)
            .into_response()
    };
    let app = axum::Router::new().route("/token", axum::routing::get(token)).fallback(registry);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_flow_and_refusals() {
    let port = fake_auth_registry().await;
    let host = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let image = ImageRef::parse(&format!("{host}/team/app:v1")).unwrap();
    let creds = |p: &str| Credentials { username: "user".into(), password: p.into() };

    // Right credentials: the token works, and the (fake) registry says not found.
    let client = Client::new().with_credentials(&host, creds("pass"));
    let err = pull(&client, &image, &store, &Platform::default()).await.unwrap_err();
    assert!(matches!(err, OciError::NotFound { .. }), "{err}");

    // Anonymous and wrong password: the token service refuses.
    for client in [Client::new(), Client::new().with_credentials(&host, creds("wrong"))] {
        let err = pull(&client, &image, &store, &Platform::default()).await.unwrap_err();
        assert!(matches!(err, OciError::AuthRefused { .. }), "{err}");
        assert!(err.to_string().contains("auth refused") && err.to_string().contains("team/app"), "{err}");
    }

    // A token that the registry then refuses anyway.
    let forbidden = ImageRef::parse(&format!("{host}/team/forbidden:v1")).unwrap();
    let client = Client::new().with_credentials(&host, creds("pass"));
    let err = pull(&client, &forbidden, &store, &Platform::default()).await.unwrap_err();
    assert!(matches!(err, OciError::AuthRefused { .. }), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_runtime_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let image = ImageRef::parse("localhost:1/x").unwrap();
    let err = pull(&Client::new(), &image, &store, &Platform::default()).await.unwrap_err();
    assert!(err.to_string().contains("multi-threaded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_v2_manifest_list_and_manifest() {
    let Some(reg) = Registry::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let repo = "flare/docker";
    let tar = tar(&[Item::Dir("srv", 0o755), Item::File("srv/index.html", 0o644, b"<h1>hi</h1>".to_vec())]);
    let blob = gzip(&tar);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]}
    }))
    .unwrap();
    let config_digest = reg.push_blob(repo, &config).await;
    let layer_digest = reg.push_blob(repo, &blob).await;
    let docker_manifest = "application/vnd.docker.distribution.manifest.v2+json";
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": docker_manifest,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer_digest, "size": blob.len()}],
    });
    let (digest, size) = reg.push_manifest(repo, "one", docker_manifest, &manifest).await;
    let list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    let list = serde_json::json!({"schemaVersion": 2, "mediaType": list_type, "manifests": [
        {"mediaType": docker_manifest, "digest": digest, "size": size, "platform": {"os": "linux", "architecture": "amd64"}}
    ]});
    reg.push_manifest(repo, "list", list_type, &list).await;
    for tag in ["one", "list"] {
        let pulled = do_pull(&reg, &format!("{repo}:{tag}"), &store).await.unwrap();
        assert_eq!(read_all(&store, &pulled.manifest, "srv/index.html"), b"<h1>hi</h1>", "{tag}");
        assert_eq!(pulled.env(), [("A".to_owned(), "1".to_owned())]);
        assert_eq!(pulled.image_digest, digest);
    }
}
