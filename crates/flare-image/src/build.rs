//! The builder: resolves an [`ImageSpec`] layer by layer against the layer cache and
//! builds what is missing. A step that runs commands runs them in a flare container
//! whose root is overlay(lower = the parent image, lazily mounted; upper = a directory
//! on disk); the upper dir, snapshotted into the store, is the layer. Nothing is
//! recorded for a step that fails, so a failed build leaves no half-built layer.
//!
//! With a user namespace (`Runtime::userns`), the parent image is mounted with its
//! owners shifted into the namespace's range and the upper dir's owners are shifted
//! back when it becomes a layer ([`crate::upper::Owners`]). A step's upper dir lives
//! on a file system as big as its disk quota ([`crate::layer_disk`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flare_api::hostpaths::{host_bind_policy, no_symlinks_below, validate_mount_id, HostBindPolicy};
use flare_cas::{get_manifest, put_manifest, BlobStore, Digest, EntryKind, Hasher, Manifest};
use flare_imagefs::{ChunkCache, IdShift, ImageFs, ImageFsOptions};
use flare_proto::{ImageMount, ImageUse};
use flare_runtime::{set_env, Bind, CommandRunner, CommandSpec, Limits, Network, Rootfs, UserNamespace};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::files::FileIndex;
use crate::layer_disk::{apparent_size_over, human_bytes, LayerDisk, Usage};
use crate::records::{ImageConfig, ImageRecord, LayerRecord, Records};
use crate::spec::{abs_dest, Base, ImageSpec, Layer, FUNCTION_IN_BUILD, REQUIREMENTS_IN_BUILD};
use crate::upper::Owners;
use crate::{debian, now_ts, ImageError};

/// One line of build progress, streamed to the client as NDJSON.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    Step {
        index: usize,
        total: usize,
        description: String,
        cached: bool,
    },
    Log {
        index: usize,
        text: String,
    },
    StepDone {
        index: usize,
        seconds: f64,
    },
    Done {
        image_id: String,
        python: Option<String>,
        seconds: f64,
        base_key: String,
    },
    Error {
        index: Option<usize>,
        message: String,
        log_tail: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
}

/// Where the builder keeps things.
pub struct BuilderConfig {
    /// `FLARE_HOME`: records in `images/`, uploads index in `files/`, scratch in `build/`.
    pub home: PathBuf,
    pub store: Arc<dyn BlobStore>,
    pub cache: Arc<ChunkCache>,
    /// What runs build steps' commands in containers (the worker's container path,
    /// `flare_worker::sandbox::Sandboxes`); `None`: only steps without commands can build.
    pub runner: Option<Arc<dyn CommandRunner>>,
    /// The cpu, memory and pids limits of a build step's container (see
    /// [`step_limits_from_env`]); its disk is `step_disk_quota`.
    pub step_limits: Limits,
    /// The cloudpickle package directory on this host, bound into `run_function` steps.
    pub cloudpickle_dir: Option<PathBuf>,
    /// The disk quota of a build step's writable layer, in bytes (at least
    /// [`crate::layer_disk::MIN_QUOTA`]); `None`: unlimited. See
    /// [`step_disk_quota_from_env`].
    pub step_disk_quota: Option<u64>,
}

/// The default disk quota of a build step: 10 GiB.
pub const DEFAULT_STEP_DISK_QUOTA: u64 = 10 << 30;

/// The build step disk quota the operator set with `FLARE_BUILD_DISK_QUOTA_GB` (GiB,
/// fractions allowed; `0` turns the quota off), or [`DEFAULT_STEP_DISK_QUOTA`].
pub fn step_disk_quota_from_env() -> Result<Option<u64>, String> {
    let Ok(v) = std::env::var("FLARE_BUILD_DISK_QUOTA_GB") else { return Ok(Some(DEFAULT_STEP_DISK_QUOTA)) };
    let gib: f64 = v.trim().parse().ok().filter(|g: &f64| g.is_finite() && *g >= 0.0).ok_or_else(|| {
        format!("FLARE_BUILD_DISK_QUOTA_GB={v:?} is not a size in GiB (0 turns the quota off)")
    })?;
    if gib == 0.0 {
        return Ok(None);
    }
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    if bytes < crate::layer_disk::MIN_QUOTA {
        return Err(format!(
            "FLARE_BUILD_DISK_QUOTA_GB={v} is below the smallest quota, {}",
            human_bytes(crate::layer_disk::MIN_QUOTA)
        ));
    }
    Ok(Some(bytes))
}

/// The default memory limit of a build step's container: 8 GiB.
pub const DEFAULT_STEP_MEMORY: u64 = 8 << 30;

/// The limits of a build step's container the operator set: `FLARE_BUILD_CPU` (cores,
/// fractions allowed; default: every core of this machine), `FLARE_BUILD_MEMORY_GB`
/// (GiB; default [`DEFAULT_STEP_MEMORY`]; `0`: none), `FLARE_BUILD_PIDS` (default
/// [`flare_runtime::DEFAULT_PIDS_MAX`]).
pub fn step_limits_from_env() -> Result<Limits, String> {
    step_limits_from(|k| std::env::var(k).ok())
}

/// [`step_limits_from_env`] with the variables from `lookup`.
fn step_limits_from(lookup: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
    let var = |k: &str| lookup(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let number = |k: &str, v: &str| -> Result<f64, String> {
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .ok_or_else(|| format!("{k}={v:?} is not a number"))
    };
    let cores = match var("FLARE_BUILD_CPU") {
        Some(v) => number("FLARE_BUILD_CPU", &v).and_then(|c| {
            if c > 0.0 {
                Ok(c)
            } else {
                Err(format!("FLARE_BUILD_CPU={v} must be more than 0 cores"))
            }
        })?,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64,
    };
    let memory = match var("FLARE_BUILD_MEMORY_GB") {
        Some(v) => Some(number("FLARE_BUILD_MEMORY_GB", &v)?)
            .filter(|g| *g > 0.0)
            .map(|g| (g * (1u64 << 30) as f64) as u64),
        None => Some(DEFAULT_STEP_MEMORY),
    };
    let pids = match var("FLARE_BUILD_PIDS") {
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("FLARE_BUILD_PIDS={v:?} is not a positive count"))?,
        None => flare_runtime::DEFAULT_PIDS_MAX,
    };
    Ok(Limits {
        cpu_millicores: Some((cores * 1000.0).round().max(1.0) as u64),
        memory_bytes: memory,
        pids_max: Some(pids),
        ..Limits::default()
    })
}

/// The image owner shift for a user namespace.
fn id_shift(userns: Option<UserNamespace>) -> Option<IdShift> {
    userns.map(|ns| IdShift { host_base: ns.host_base, size: ns.size })
}

/// What one command of a build step left.
struct CommandRun {
    /// The last lines of its output.
    tail: String,
    /// Whether it ran in a user namespace.
    in_userns: Option<bool>,
}

/// Builds and resolves images. Share it behind an `Arc`.
pub struct Builder {
    cfg: BuilderConfig,
    files: FileIndex,
    records: Records,
    oci: flare_oci::Client,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Python interpreters looked for in an image, in order.
const PYTHONS: [&str; 5] = [
    "usr/local/bin/python3",
    "usr/bin/python3",
    "opt/conda/bin/python3",
    "usr/local/bin/python",
    "usr/bin/python",
];

/// The Python interpreter of a tree, if it has one.
pub fn find_python(m: &Manifest) -> Option<String> {
    PYTHONS
        .iter()
        .find(|p| {
            matches!(m.get(p).map(|e| &e.kind), Some(EntryKind::File(_)) | Some(EntryKind::Symlink { .. }))
        })
        .map(|p| format!("/{p}"))
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().to_string()
}

/// The server's CA bundle inside build containers (see `FLARE_BUILD_CA_BUNDLE`).
const HOST_CA_IN_BUILD: &str = "/run/flare-build/host-ca.crt";

type Log<'a> = &'a mut dyn FnMut(&str);

impl Builder {
    pub fn new(cfg: BuilderConfig) -> Result<Builder, ImageError> {
        let files = FileIndex::open(cfg.store.clone(), cfg.home.join("files"))?;
        let records = Records::open(&cfg.home.join("images"))?;
        let build = cfg.home.join("build");
        // Scratch of builds that were running when the server stopped (their layer
        // disks and image mounts first).
        let stale = crate::layer_disk::unmount_below(&build);
        if stale > 0 {
            tracing::info!(mounts = stale, "unmounted what interrupted builds left mounted");
        }
        let _ = std::fs::remove_dir_all(&build);
        std::fs::create_dir_all(&build)
            .map_err(|e| ImageError::io(format!("creating {}", build.display()), e))?;
        Ok(Builder { cfg, files, records, oci: flare_oci::Client::new(), locks: Mutex::new(HashMap::new()) })
    }

    pub fn files(&self) -> &FileIndex {
        &self.files
    }

    pub fn records(&self) -> &Records {
        &self.records
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.cfg.store
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(key.to_owned()).or_default().clone()
    }

    /// Image `image_id`'s record and its last layer (the merged tree and config).
    pub fn final_layer(&self, image_id: &str) -> Result<(ImageRecord, LayerRecord), ImageError> {
        let img = self
            .records
            .image(image_id)?
            .ok_or_else(|| ImageError::NotFound(format!("image {image_id} not found")))?;
        let last = img
            .layers
            .last()
            .ok_or_else(|| ImageError::Invalid(format!("image {image_id} has no layers")))?;
        let layer = self
            .records
            .layer(last)?
            .ok_or_else(|| ImageError::NotFound(format!("layer {last} of {image_id} is gone")))?;
        Ok((img, layer))
    }

    /// What a worker needs to run a function on image `image_id`.
    pub fn resolve(&self, image_id: &str) -> Result<ImageUse, ImageError> {
        let (img, layer) = self.final_layer(image_id)?;
        let python = layer.config.python.clone().ok_or_else(|| {
            ImageError::Invalid(format!(
                "image {image_id} has no Python interpreter (looked for {}); add one, e.g. .apt_install(\"python3\")",
                PYTHONS.iter().map(|p| format!("/{p}")).collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(ImageUse {
            image_id: image_id.to_owned(),
            manifest: layer.manifest,
            python,
            env: layer.config.env,
            workdir: layer.config.workdir,
            mounts: img.mounts,
            host_roots: layer.config.host_roots,
        })
    }

    /// The checks of `spec` that need no build (a failure is a 400 before anything is
    /// streamed; [`Builder::build`] runs them too). Returns the cloudpickle dir bound into
    /// its `run_function` steps (`None` when it has none).
    ///
    /// - `sdk_mount` is a mount id of this server's store, never a path; `run_function`
    ///   steps get its `cloudpickle/`. A `cloudpickle_path` (a host path the client
    ///   chose) is then ignored, as it is when no step runs a function; otherwise it is
    ///   bound only if the operator allows it (`--host-bind-allow`, never FLARE_HOME or a
    ///   kernel file system, no symlinks on the way), else refused.
    /// - A captured environment (`local_python` roots) cannot name or reach into the
    ///   server's data dir or a kernel file system.
    pub fn check_spec(&self, spec: &ImageSpec) -> Result<Option<PathBuf>, ImageError> {
        if let Base::LocalPython { roots: Some(roots), .. } = &spec.base {
            self.check_env_roots(roots)?;
        }
        let runs_functions = spec.layers.iter().any(|l| matches!(l, Layer::RunFunction { .. }));
        if let Some(id) = &spec.sdk_mount {
            validate_mount_id("sdk_mount", id).map_err(|e| ImageError::Invalid(format!("sdk_mount {e}")))?;
            if spec.cloudpickle_path.is_some() {
                tracing::debug!(sdk_mount = %id, "build spec: cloudpickle_path ignored (the SDK mount is used)");
            }
            if !runs_functions {
                return Ok(None);
            }
            let mounts = self.cfg.home.join("mounts");
            let rel = format!("{id}/cloudpickle");
            let meta = no_symlinks_below(&mounts, &rel).map_err(|e| {
                ImageError::Invalid(format!(
                    "sdk_mount {id}: no cloudpickle in it on this server ({}); create the SDK mount first \
                     (POST /v1/mounts)",
                    e.reason
                ))
            })?;
            if !meta.is_dir() {
                return Err(ImageError::Invalid(format!(
                    "sdk_mount {id}: its cloudpickle is not a directory"
                )));
            }
            return Ok(Some(mounts.join(rel)));
        }
        let Some(path) = &spec.cloudpickle_path else {
            return Ok(self.cfg.cloudpickle_dir.clone().filter(|_| runs_functions));
        };
        if !runs_functions {
            tracing::debug!(path = %path, "build spec: cloudpickle_path ignored (no run_function step)");
            return Ok(None);
        }
        let refused = |e: flare_api::HostPathError| {
            ImageError::Invalid(format!(
                "cloudpickle_path {}: {}; the server never binds a client's path into build steps: \
                 send the SDK mount (`sdk_mount`, as this SDK does) instead",
                e.path, e.reason
            ))
        };
        HostBindPolicy::none(Some(&self.cfg.home)).may_name(path).map_err(refused)?;
        Ok(Some(host_bind_policy().check_on_host(path).map_err(refused)?))
    }

    /// A captured environment's roots and every entry under them: clean absolute paths
    /// outside the server's data dir (this builder's home and the process's policy's)
    /// and the kernel file systems.
    fn check_env_roots(&self, roots: &[crate::spec::EnvRoot]) -> Result<(), ImageError> {
        let own = HostBindPolicy::none(Some(&self.cfg.home));
        let refused = |e: flare_api::HostPathError| {
            ImageError::Invalid(format!(
                "local_python root {e}; a captured environment cannot name the server's data or a kernel file system"
            ))
        };
        let check = |p: &str| -> Result<(), ImageError> {
            own.may_name(p).map_err(refused)?;
            host_bind_policy().may_name(p).map_err(refused)
        };
        for r in roots {
            check(&r.path)?;
            let base = r.path.trim_end_matches('/');
            for e in &r.entries {
                // The entries' own paths are checked (relative, clean) when they are stored.
                check(&format!("{base}/{}", e.path().trim_start_matches('/'))).map_err(|err| match err {
                    ImageError::Invalid(m) => ImageError::Invalid(format!("{m} (root {})", r.path)),
                    other => other,
                })?;
            }
        }
        Ok(())
    }

    /// Build `spec`, sending progress to `events`; returns the image record.
    pub async fn build(
        self: &Arc<Self>,
        spec: ImageSpec,
        events: mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<ImageRecord, ImageError> {
        let started = Instant::now();
        let step_cloudpickle = self.check_spec(&spec)?;
        let total = spec.layers.len() + 1;
        let send = |e: BuildEvent| {
            let _ = events.send(e);
        };
        // Base.
        let base_desc = match &spec.base {
            Base::DebianSlim { python_version } => {
                format!("debian_slim python {}", python_version.as_deref().unwrap_or(debian::SUITES[0].0))
            }
            Base::Registry { reference, .. } => format!("from_registry {reference}"),
            Base::LocalPython { python, .. } => {
                if !spec.layers.is_empty() {
                    return Err(ImageError::Invalid(
                        "Image.from_local_python() cannot take build steps: start from Image.debian_slim() or \
                         Image.from_registry(...) to add packages"
                            .into(),
                    ));
                }
                format!("local python {}", python.as_deref().unwrap_or("?"))
            }
        };
        let base_key = match &spec.base {
            Base::DebianSlim { python_version } => {
                let suite = debian::suite_for_spec(python_version.as_deref())?;
                key_of(&["debian_slim", suite, debian::BASE_REVISION, std::env::consts::ARCH])
            }
            Base::Registry { reference, .. } => key_of(&["registry", reference]),
            Base::LocalPython { key: Some(k), roots: None, .. } => {
                let known = match self.records.layer(k)? {
                    Some(rec) => match rec.manifest.parse::<Digest>() {
                        Ok(d) => self.cfg.store.has(&d)?,
                        Err(_) => false,
                    },
                    None => false,
                };
                if !known {
                    return Err(ImageError::UnknownBase(k.clone()));
                }
                k.clone()
            }
            Base::LocalPython { python, roots: Some(roots), .. } => {
                let json = serde_json::to_string(roots).map_err(|e| ImageError::Invalid(e.to_string()))?;
                key_of(&["local_python", python.as_deref().unwrap_or(""), &json])
            }
            Base::LocalPython { .. } => {
                return Err(ImageError::Invalid("local_python needs `roots` or a known `key`".into()))
            }
        };
        // A local environment sent by key is never rebuilt (its files are not in the request).
        let force_base = spec.force_build && !matches!(spec.base, Base::LocalPython { roots: None, .. });
        let mut parent = self
            .layer_step(0, total, &base_key, None, &base_desc, force_base, &events, {
                let this = self.clone();
                let base = spec.base.clone();
                move |log: Log<'_>| this.build_base(&base, log)
            })
            .await?;
        let mut keys = vec![parent.key.clone()];
        let base_key = parent.key.clone();
        for (i, layer) in spec.layers.iter().enumerate() {
            let index = i + 1;
            let step_json = serde_json::to_string(layer).map_err(|e| ImageError::Invalid(e.to_string()))?;
            let key = key_of(&["layer", &parent.key, &step_json]);
            let this = self.clone();
            let layer2 = layer.clone();
            let parent2 = parent.clone();
            let cloudpickle = step_cloudpickle.clone();
            parent = self
                .layer_step(
                    index,
                    total,
                    &key,
                    Some(&parent.key),
                    &layer.describe(),
                    spec.force_build,
                    &events,
                    move |log: Log<'_>| {
                        this.build_layer(&parent2, &layer2, index, cloudpickle.as_deref(), log)
                    },
                )
                .await?;
            keys.push(parent.key.clone());
        }
        // Mounts (not baked): file lists as manifests.
        let mut mounts = Vec::new();
        for m in &spec.mounts {
            let dest = abs_dest(&m.dest)?;
            if dest.is_empty() {
                return Err(ImageError::Invalid("a mount cannot replace the root directory".into()));
            }
            let manifest = self.files.manifest("", &m.entries)?;
            let d = put_manifest(self.cfg.store.as_ref(), &manifest)?;
            mounts.push(ImageMount { dest: format!("/{dest}"), manifest: d.to_string() });
        }
        let mounts_json = serde_json::to_string(&mounts).map_err(|e| ImageError::Invalid(e.to_string()))?;
        let id_digest = key_of(&["image", &parent.key, &mounts_json]);
        let image_id = format!("im-{}", &id_digest.trim_start_matches("blake3:")[..24]);
        let record = match self.records.image(&image_id)? {
            Some(r) => r,
            None => {
                let description = std::iter::once(base_desc)
                    .chain(spec.layers.iter().map(|l| l.describe()))
                    .collect::<Vec<_>>()
                    .join(" | ");
                let r = ImageRecord {
                    image_id: image_id.clone(),
                    layers: keys,
                    mounts,
                    description,
                    created_at: now_ts(),
                };
                self.records.put_image(&r)?;
                r
            }
        };
        send(BuildEvent::Done {
            image_id,
            python: parent.config.python.clone(),
            seconds: started.elapsed().as_secs_f64(),
            base_key,
        });
        Ok(record)
    }

    /// One step: a cache hit, or `run` (blocking, on a thread) under the key's lock.
    #[allow(clippy::too_many_arguments)]
    async fn layer_step<F>(
        self: &Arc<Self>,
        index: usize,
        total: usize,
        key: &str,
        parent: Option<&str>,
        description: &str,
        force: bool,
        events: &mpsc::UnboundedSender<BuildEvent>,
        run: F,
    ) -> Result<LayerRecord, ImageError>
    where
        F: FnOnce(Log<'_>) -> Result<(Manifest, ImageConfig), ImageError> + Send + 'static,
    {
        let lock = self.lock_for(key);
        let _guard = lock.lock().await;
        if !force {
            if let Some(rec) = self.records.layer(key)? {
                if self.cfg.store.has(
                    &rec.manifest
                        .parse::<Digest>()
                        .map_err(|_| ImageError::Invalid("bad manifest digest".into()))?,
                )? {
                    let _ = events.send(BuildEvent::Step {
                        index,
                        total,
                        description: description.to_owned(),
                        cached: true,
                    });
                    return Ok(rec);
                }
            }
        }
        let _ = events.send(BuildEvent::Step {
            index,
            total,
            description: description.to_owned(),
            cached: false,
        });
        let started = Instant::now();
        let ev = events.clone();
        let (merged, config) = tokio::task::spawn_blocking(move || {
            let mut log = |text: &str| {
                let _ = ev.send(BuildEvent::Log { index, text: text.to_owned() });
            };
            run(&mut log)
        })
        .await
        .map_err(|e| ImageError::Invalid(format!("build step panicked: {e}")))??;
        let parent_rec = match parent {
            Some(p) => self.records.layer(p)?,
            None => None,
        };
        let parent_manifest = match &parent_rec {
            Some(p) => Some(get_manifest(
                self.cfg.store.as_ref(),
                &p.manifest.parse().map_err(|_| ImageError::Invalid("bad digest".into()))?,
            )?),
            None => None,
        };
        let added_bytes = added_bytes(parent_manifest.as_ref(), &merged);
        let digest = put_manifest(self.cfg.store.as_ref(), &merged)?;
        let stats = merged.stats();
        let seconds = started.elapsed().as_secs_f64();
        let rec = LayerRecord {
            key: key.to_owned(),
            parent: parent.map(str::to_owned),
            description: description.to_owned(),
            manifest: digest.to_string(),
            config,
            files: stats.files,
            total_bytes: stats.total_bytes,
            added_bytes,
            build_seconds: seconds,
            created_at: now_ts(),
        };
        self.records.put_layer(&rec)?;
        let _ = events.send(BuildEvent::StepDone { index, seconds });
        Ok(rec)
    }

    fn build_base(&self, base: &Base, log: Log<'_>) -> Result<(Manifest, ImageConfig), ImageError> {
        match base {
            Base::DebianSlim { python_version } => {
                let suite = debian::suite_for_spec(python_version.as_deref())?;
                let scratch = Scratch::new(&self.cfg.home)?;
                let root = scratch.0.join("rootfs");
                debian::bootstrap(suite, &root, log)?;
                log("storing the root file system\n");
                let m = flare_cas::snapshot_dir(self.cfg.store.as_ref(), &root, None)?;
                let python = find_python(&m);
                let env = vec![(
                    "PATH".to_owned(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                )];
                Ok((m, ImageConfig { python, env, workdir: None, host_roots: vec![] }))
            }
            Base::Registry { reference, insecure } => {
                let r = flare_oci::ImageRef::parse(reference)?;
                let client =
                    if *insecure { self.oci.clone().with_plain_http(&r.registry) } else { self.oci.clone() };
                log(&format!("pulling {r}\n"));
                let handle = tokio::runtime::Handle::current();
                let pulled = handle.block_on(flare_oci::pull(
                    &client,
                    &r,
                    self.cfg.store.as_ref(),
                    &flare_oci::Platform::linux_amd64(),
                ))?;
                log(&format!(
                    "pulled {} ({} layers, {} entries)\n",
                    pulled.image_digest,
                    pulled.layers.len(),
                    pulled.manifest.entries.len()
                ));
                let python = find_python(&pulled.manifest);
                let config = ImageConfig {
                    python,
                    env: pulled.env(),
                    workdir: pulled.workdir().filter(|w| !w.is_empty()),
                    host_roots: vec![],
                };
                Ok((pulled.manifest, config))
            }
            Base::LocalPython { python, roots: Some(roots), .. } => {
                let mut m = Manifest::new();
                let mut host_roots = Vec::new();
                let mut n = 0;
                for r in roots {
                    let prefix = abs_dest(&r.path)?;
                    if prefix.is_empty() {
                        return Err(ImageError::Invalid(
                            "the root directory cannot be an environment root".into(),
                        ));
                    }
                    let part = self.files.manifest(&prefix, &r.entries)?;
                    n += part.entries.len();
                    m.apply_layer(&part)?;
                    host_roots.push(format!("/{prefix}"));
                }
                log(&format!("captured {n} entries in {} dirs\n", host_roots.len()));
                Ok((m, ImageConfig { python: python.clone(), env: vec![], workdir: None, host_roots }))
            }
            Base::LocalPython { .. } => Err(ImageError::Invalid("local_python needs `roots`".into())),
        }
    }

    fn build_layer(
        &self,
        parent: &LayerRecord,
        layer: &Layer,
        index: usize,
        cloudpickle: Option<&Path>,
        log: Log<'_>,
    ) -> Result<(Manifest, ImageConfig), ImageError> {
        let store = self.cfg.store.as_ref();
        let parent_digest: Digest =
            parent.manifest.parse().map_err(|_| ImageError::Invalid("bad manifest digest".into()))?;
        let mut config = parent.config.clone();
        match layer {
            Layer::Env { vars } => {
                for (k, v) in vars {
                    config.env.retain(|(ek, _)| ek != k);
                    config.env.push((k.clone(), v.clone()));
                }
                return Ok((get_manifest(store, &parent_digest)?, config));
            }
            Layer::Workdir { path } => {
                // Like a Dockerfile's WORKDIR: the directory is created if missing.
                let rel = abs_dest(path)?;
                let mut merged = get_manifest(store, &parent_digest)?;
                if !rel.is_empty() && !merged.get(&rel).is_some_and(|e| e.is_dir()) {
                    let mut layer_m = Manifest::new();
                    layer_m.insert(&rel, flare_cas::Entry::dir(0o755))?;
                    merged.apply_layer(&layer_m)?;
                }
                config.workdir = Some(format!("/{rel}"));
                return Ok((merged, config));
            }
            Layer::Copy { dest, entries } => {
                let prefix = abs_dest(dest)?;
                let layer_m = self.files.manifest(&prefix, entries)?;
                let mut merged = get_manifest(store, &parent_digest)?;
                merged.apply_layer(&layer_m)?;
                config.python = find_python(&merged).or(config.python);
                return Ok((merged, config));
            }
            _ => {}
        }
        let commands = layer.commands(config.python.as_deref())?;
        let parent_manifest = get_manifest(store, &parent_digest)?;
        if commands.is_empty() {
            return Ok((parent_manifest, config));
        }
        if parent_manifest.get("bin/sh").is_none() && parent_manifest.get("usr/bin/sh").is_none() {
            return Err(ImageError::Invalid(format!(
                "{}: the image has no /bin/sh to run commands with",
                layer.describe()
            )));
        }
        let runner = self.cfg.runner.clone().ok_or_else(|| {
            ImageError::Unavailable(
                "this server cannot run build steps (no container runtime; run flared as root)".into(),
            )
        })?;
        let scratch = Scratch::new(&self.cfg.home)?;
        let lower = scratch.0.join("lower");
        let upper = scratch.0.join("layer");
        let inputs = scratch.0.join("inputs");
        for d in [&lower, &upper, &inputs] {
            std::fs::create_dir_all(d).map_err(|e| ImageError::io(format!("creating {}", d.display()), e))?;
        }
        // The step's writable layer on a file system of the quota's size (unmounted
        // before the scratch dir is removed: declared after it).
        let disk = match self.cfg.step_disk_quota {
            Some(limit) => Some(LayerDisk::create(&scratch.0.join("layer.img"), &upper, limit)?),
            None => None,
        };
        let ids = id_shift(runner.userns());
        match layer {
            Layer::PipInstallFromRequirements { requirements, .. } => {
                write_input(&inputs, REQUIREMENTS_IN_BUILD, requirements.as_bytes())?;
            }
            Layer::RunFunction { pickled, .. } => {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(pickled)
                    .map_err(|e| ImageError::Invalid(format!("run_function: bad base64: {e}")))?;
                write_input(&inputs, FUNCTION_IN_BUILD, &data)?;
            }
            _ => {}
        }
        // The server's CA bundle, so steps work behind a TLS-inspecting proxy the host
        // trusts (it is only used while building, never stored in the image).
        let ca = std::env::var_os("FLARE_BUILD_CA_BUNDLE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
        let has_ca = !ca.as_os_str().is_empty() && std::fs::copy(&ca, inputs.join("host-ca.crt")).is_ok();
        let fs = ImageFs::new(
            Arc::new(parent_manifest),
            self.cfg.store.clone(),
            self.cfg.cache.clone(),
            ImageFsOptions {
                fsname: format!("flare-build-{}", &parent_digest.hex()[..12]),
                ids,
                ..Default::default()
            },
        )?;
        let mount = fs.mount(&lower)?;
        let mut result = Ok(());
        // Whether every command ran in the user namespace (the runtime may run without).
        let mut in_userns = ids.is_some();
        // Only a step that runs a function sees cloudpickle (from the SDK mount).
        let cloudpickle = cloudpickle.filter(|_| matches!(layer, Layer::RunFunction { .. }));
        for (n, cmd) in commands.iter().enumerate() {
            log(&format!("$ {cmd}\n"));
            let r = self.run_in_container(
                runner.as_ref(),
                &lower,
                &scratch.0,
                &inputs,
                &config,
                cloudpickle,
                has_ca,
                cmd,
                &format!("{index}-{n}"),
                log,
            );
            let (r, tail) = match r {
                Ok(run) => {
                    in_userns &= run.in_userns.unwrap_or(in_userns);
                    (Ok(()), run.tail)
                }
                Err(ImageError::StepFailed { message, log_tail }) => {
                    (Err(ImageError::StepFailed { message, log_tail: log_tail.clone() }), log_tail)
                }
                Err(e) => (Err(e), String::new()),
            };
            // Exhausted: whatever the command made of it (it may have carried on with a
            // truncated file). Near the limit: the reason if the command failed.
            let hit = |d: &&LayerDisk| match d.usage() {
                Usage::Exhausted => true,
                Usage::NearLimit => r.is_err(),
                Usage::Within => false,
            };
            if let Some(disk) = disk.as_ref().filter(hit) {
                result = Err(ImageError::StepFailed {
                    message: format!(
                        "`{cmd}` ran out of disk: a build step's writable layer has a disk quota of {} \
                         (the server's FLARE_BUILD_DISK_QUOTA_GB sets it)",
                        human_bytes(disk.limit())
                    ),
                    log_tail: tail,
                });
                break;
            }
            if r.is_err() {
                result = r;
                break;
            }
            // Sparse files take no blocks, so the file system's quota does not see them, but
            // the layer would be read, hashed and stored in full: its apparent size counts.
            if let Some(limit) = self.cfg.step_disk_quota {
                let top = upper.join("upper");
                let over = apparent_size_over(&top, limit)
                    .map_err(|e| ImageError::io(format!("measuring {}", top.display()), e))?;
                if let Some(seen) = over {
                    result = Err(ImageError::StepFailed {
                        message: format!(
                            "`{cmd}` made a layer of more than {} (at least {} in apparent size, sparse files \
                             counted in full): a build step's writable layer has a disk quota of {} (the \
                             server's FLARE_BUILD_DISK_QUOTA_GB sets it)",
                            human_bytes(limit),
                            human_bytes(seen),
                            human_bytes(limit)
                        ),
                        log_tail: tail,
                    });
                    break;
                }
            }
        }
        drop(mount);
        result?;
        if let Some(d) = &disk {
            tracing::debug!(used = d.used(), limit = d.limit(), "build step layer size");
        }
        let owners = Owners { ids, in_userns };
        let layer_m = crate::upper::snapshot_upper(store, &upper.join("upper"), owners)?;
        drop(disk);
        let mut merged = get_manifest(store, &parent_digest)?;
        merged.apply_layer(&layer_m)?;
        config.python = find_python(&merged);
        Ok((merged, config))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_in_container(
        &self,
        runner: &dyn CommandRunner,
        lower: &Path,
        scratch: &Path,
        inputs: &Path,
        config: &ImageConfig,
        cloudpickle: Option<&Path>,
        host_ca: bool,
        cmd: &str,
        tag: &str,
        log: Log<'_>,
    ) -> Result<CommandRun, ImageError> {
        let nat = runner.nat_available().is_none();
        if !nat {
            log("warning: no outbound network for build steps on this server (NAT unavailable)\n");
        }
        let spec = step_spec(StepInputs {
            id: format!("build-{}-{tag}", uuid::Uuid::new_v4().simple()),
            cmd,
            config,
            lower,
            upper_dir: &scratch.join("layer"),
            inputs,
            cloudpickle,
            host_ca,
            resolv_conf: Path::new("/etc/resolv.conf").exists(),
            nat,
            limits: self.cfg.step_limits.clone(),
        });
        let mut tail = Tail::default();
        let run = runner.run(spec, &mut |text: &str| {
            tail.push(text);
            log(text);
        })?;
        if run.exit.code == Some(0) {
            return Ok(CommandRun { tail: tail.text(), in_userns: run.in_userns });
        }
        Err(ImageError::StepFailed {
            message: format!(
                "`{cmd}` failed ({})",
                flare_proto::exit_status_text(run.exit.code, run.exit.signal, run.exit.oom_killed)
            ),
            log_tail: tail.text(),
        })
    }
}

/// What a build step's container is made of.
struct StepInputs<'a> {
    id: String,
    cmd: &'a str,
    /// The parent image's config (env, workdir).
    config: &'a ImageConfig,
    /// The parent image, mounted: the overlay's lower dir.
    lower: &'a Path,
    /// Where the overlay's upper dir is kept (the step's layer disk).
    upper_dir: &'a Path,
    /// The step's inputs dir, bound read-only at `/run/flare-build`.
    inputs: &'a Path,
    cloudpickle: Option<&'a Path>,
    /// Whether the server's CA bundle is among the inputs.
    host_ca: bool,
    /// Whether the host has an `/etc/resolv.conf` to bind.
    resolv_conf: bool,
    nat: bool,
    limits: Limits,
}

/// The container spec of one build step's command (pure). Environment, lowest first:
/// [`flare_runtime::BASE_ENV`], the build defaults (`DEBIAN_FRONTEND`,
/// `PYTHONUNBUFFERED`, `PIP_PROGRESS_BAR`), the CA bundle variables, the image's env.
fn step_spec(s: StepInputs<'_>) -> CommandSpec {
    let mut env = flare_runtime::base_env();
    for (k, v) in
        [("DEBIAN_FRONTEND", "noninteractive"), ("PYTHONUNBUFFERED", "1"), ("PIP_PROGRESS_BAR", "off")]
    {
        set_env(&mut env, k, v.into());
    }
    if s.host_ca {
        for k in ["PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
            set_env(&mut env, k, HOST_CA_IN_BUILD.into());
        }
    }
    for (k, v) in &s.config.env {
        set_env(&mut env, k, v.clone());
    }
    let mut binds =
        vec![Bind { src: s.inputs.to_path_buf(), dst: "/run/flare-build".into(), readonly: true }];
    if s.resolv_conf {
        binds.push(Bind { src: "/etc/resolv.conf".into(), dst: "/etc/resolv.conf".into(), readonly: true });
    }
    if let Some(cp) = s.cloudpickle {
        binds.push(Bind { src: cp.to_path_buf(), dst: "/__flare/cloudpickle".into(), readonly: true });
    }
    CommandSpec {
        id: s.id,
        hostname: "flare-build".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), s.cmd.to_owned()],
        env,
        cwd: s.config.workdir.clone().unwrap_or_else(|| "/".into()),
        rootfs: Rootfs::Dir(s.lower.to_path_buf()),
        binds,
        limits: s.limits,
        network: if s.nat { Network::Nat } else { Network::Isolated },
        upper_dir: Some(s.upper_dir.to_path_buf()),
        checkpointable: false,
    }
}

/// Bytes of file content in `merged` that `parent` did not have at the same path.
fn added_bytes(parent: Option<&Manifest>, merged: &Manifest) -> u64 {
    merged
        .entries
        .iter()
        .filter_map(|(p, e)| match &e.kind {
            EntryKind::File(c) => {
                let same = parent.and_then(|pm| pm.get(p)).is_some_and(|pe| pe.kind == e.kind);
                (!same).then_some(c.size)
            }
            _ => None,
        })
        .sum()
}

fn write_input(dir: &Path, in_container: &str, data: &[u8]) -> Result<(), ImageError> {
    let name = Path::new(in_container).file_name().expect("constant has a file name");
    let p = dir.join(name);
    std::fs::write(&p, data).map_err(|e| ImageError::io(format!("writing {}", p.display()), e))
}

/// The last lines of a step's output.
#[derive(Default)]
struct Tail {
    lines: std::collections::VecDeque<String>,
    partial: String,
}

impl Tail {
    const LINES: usize = 30;

    fn push(&mut self, text: &str) {
        self.partial.push_str(text);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.lines.push_back(line.trim_end().to_owned());
            if self.lines.len() > Self::LINES {
                self.lines.pop_front();
            }
        }
    }

    fn text(&self) -> String {
        let mut v: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        if !self.partial.is_empty() {
            v.push(&self.partial);
        }
        v.join("\n")
    }
}

/// A build's scratch directory, removed when dropped (also after a failure).
struct Scratch(PathBuf);

impl Scratch {
    fn new(home: &Path) -> Result<Scratch, ImageError> {
        let p = home.join("build").join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&p).map_err(|e| ImageError::io(format!("creating {}", p.display()), e))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "could not remove build scratch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str())
    }

    fn inputs<'a>(
        config: &'a ImageConfig,
        cloudpickle: Option<&'a Path>,
        host_ca: bool,
        nat: bool,
    ) -> StepInputs<'a> {
        StepInputs {
            id: "build-x-0-0".into(),
            cmd: "pip install x",
            config,
            lower: Path::new("/h/build/s/lower"),
            upper_dir: Path::new("/h/build/s/layer"),
            inputs: Path::new("/h/build/s/inputs"),
            cloudpickle,
            host_ca,
            resolv_conf: true,
            nat,
            limits: Limits { memory_bytes: Some(1 << 30), ..Limits::default() },
        }
    }

    #[test]
    fn step_spec_env_binds_and_limits() {
        let config = ImageConfig {
            env: vec![("PIP_CERT".into(), "/mine.crt".into()), ("LANG".into(), "de_DE.UTF-8".into())],
            workdir: Some("/app".into()),
            ..Default::default()
        };
        let s = step_spec(inputs(&config, Some(Path::new("/h/mounts/sdk/cloudpickle")), true, true));
        assert_eq!(s.argv, ["/bin/sh", "-c", "pip install x"]);
        assert_eq!(s.cwd, "/app");
        assert_eq!(s.rootfs, Rootfs::Dir("/h/build/s/lower".into()));
        assert_eq!(s.upper_dir.as_deref(), Some(Path::new("/h/build/s/layer")));
        assert_eq!(s.network, Network::Nat);
        assert_eq!(s.limits.memory_bytes, Some(1 << 30));
        // The image's env wins over the CA variables and the base.
        assert_eq!(get(&s.env, "PIP_CERT"), Some("/mine.crt"));
        assert_eq!(get(&s.env, "SSL_CERT_FILE"), Some(HOST_CA_IN_BUILD));
        assert_eq!(get(&s.env, "LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get(&s.env, "DEBIAN_FRONTEND"), Some("noninteractive"));
        assert_eq!(get(&s.env, "HOME"), Some("/root"));
        let dsts: Vec<_> = s.binds.iter().map(|b| (b.dst.display().to_string(), b.readonly)).collect();
        assert_eq!(
            dsts,
            [("/run/flare-build", true), ("/etc/resolv.conf", true), ("/__flare/cloudpickle", true)]
                .map(|(d, r)| (d.to_owned(), r))
        );

        let config = ImageConfig::default();
        let s = step_spec(inputs(&config, None, false, false));
        assert_eq!(s.cwd, "/");
        assert_eq!(s.network, Network::Isolated);
        assert_eq!(get(&s.env, "SSL_CERT_FILE"), None);
        assert_eq!(s.binds.len(), 2);
    }

    #[test]
    fn step_limits() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(pk, _)| *pk == k).map(|(_, v)| v.to_string())
        };
        let d = step_limits_from(vars(&[])).unwrap();
        assert_eq!(d.memory_bytes, Some(DEFAULT_STEP_MEMORY));
        assert_eq!(d.pids_max, Some(flare_runtime::DEFAULT_PIDS_MAX));
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
        assert_eq!(d.cpu_millicores, Some(cores * 1000));
        let l = step_limits_from(vars(&[
            ("FLARE_BUILD_CPU", "1.5"),
            ("FLARE_BUILD_MEMORY_GB", "0.5"),
            ("FLARE_BUILD_PIDS", "100"),
        ]))
        .unwrap();
        assert_eq!((l.cpu_millicores, l.memory_bytes, l.pids_max), (Some(1500), Some(512 << 20), Some(100)));
        assert_eq!(step_limits_from(vars(&[("FLARE_BUILD_MEMORY_GB", "0")])).unwrap().memory_bytes, None);
        for bad in [
            ("FLARE_BUILD_CPU", "0"),
            ("FLARE_BUILD_CPU", "x"),
            ("FLARE_BUILD_PIDS", "-1"),
            ("FLARE_BUILD_MEMORY_GB", "-2"),
        ] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([bad]));
            assert!(step_limits_from(vars(pairs)).is_err(), "{bad:?}");
        }
    }
}
