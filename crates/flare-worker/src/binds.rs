//! What of this machine a container sees: the binds of one container, decided here.
//!
//! The rule: the server, never the client, decides which host paths a container sees, and
//! the host never resolves a path a client chose.
//! - Host directories (a Python environment bound from the host, a legacy `sdk_path` /
//!   `cloudpickle_path`) only from the operator's allow-list
//!   ([`flare_api::HostBindPolicy`], `--host-bind-allow`), checked on this machine with
//!   every path component `lstat`-ed: none may be a symlink.
//! - Everything else comes from directories this server created: the code mount and the
//!   SDK mount (`FLARE_HOME/mounts/<id>`, ids are names, never paths), materialized
//!   start-time mounts (`imagefs/trees/<hex>`), lazy image mounts (`imagefs/mnt/<hex>`,
//!   walked without following symlinks).
//! - A start-time mount's symlinks stay symlinks that resolve inside the container: its
//!   top-level entries are bound one by one at `dest/<name>` (so a mount adds to what the
//!   image has at `dest`), except when one of them is a symlink, which cannot be a bind
//!   source without the host resolving it: then the whole tree is bound at `dest`.

use std::io;
use std::path::{Path, PathBuf};

use flare_api::hostpaths::{clean_absolute, no_symlinks_below, validate_mount_id};
use flare_proto::FunctionDef;
use flare_runtime::Bind;

use crate::{ImageDirs, WorkerConfig, API_SOCKET_IN_CONTAINER, SDK_IN_CONTAINER};

/// Where the caller's cloudpickle appears in containers on an image root (on PYTHONPATH).
const CLOUDPICKLE_IN_CONTAINER: &str = "/__flare/cloudpickle";
/// Where the SDK mount's `modal` compatibility package appears (on PYTHONPATH, so that
/// `import modal` works in containers).
const MODAL_IN_CONTAINER: &str = "/__flare/modal";

/// Container paths a mount or environment dir may not be bound at: the platform's own
/// dir and the kernel's file systems.
const RESERVED_IN_CONTAINER: &[&str] = &["/__flare", "/proc", "/sys", "/dev"];

fn refused(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.into())
}

/// `dest` as a clean absolute container path outside the reserved dirs.
fn container_dest(what: &str, dest: &str) -> io::Result<PathBuf> {
    let p = clean_absolute(dest).map_err(|e| refused(format!("{what} {e}")))?;
    if RESERVED_IN_CONTAINER.iter().any(|r| p.starts_with(r)) {
        return Err(refused(format!("{what} {dest}: a reserved path inside containers")));
    }
    Ok(p)
}

/// A directory of the server's mount store: `mounts/<id>[/<sub>]`, a real dir. With a
/// user namespace, the same in the mount's copy owned by the namespace's root
/// ([`crate::codemount::shifted_mount`]), so that its private files are readable inside.
fn mount_dir(cfg: &WorkerConfig, what: &str, id: &str, sub: &str) -> io::Result<PathBuf> {
    validate_mount_id(what, id).map_err(|e| refused(e.to_string()))?;
    let mut mounts = cfg.home.join("mounts");
    let mut rel = if sub.is_empty() { id.to_owned() } else { format!("{id}/{sub}") };
    let check = |base: &Path, rel: &str| -> io::Result<()> {
        let meta = no_symlinks_below(base, rel).map_err(|e| {
            io::Error::new(io::ErrorKind::NotFound, format!("{what} {id} is missing or unusable: {e}"))
        })?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{what} {id}: {rel} is not a directory"),
            ));
        }
        Ok(())
    };
    check(&mounts, &rel)?;
    if let Some(ns) = cfg.runtime.userns() {
        let shifted = crate::codemount::shifted_mount(&cfg.home, id, &mounts.join(id), ns)?;
        (mounts, rel) = (shifted, sub.to_owned());
        check(&mounts, &rel)?;
    }
    Ok(if rel.is_empty() { mounts } else { mounts.join(rel) })
}

/// A host path the client named (legacy fields, environments bound from the host):
/// allowed by the operator and free of symlinks on this machine.
fn host_path(cfg: &WorkerConfig, what: &str, path: &str) -> io::Result<PathBuf> {
    cfg.host_binds.check_on_host(path).map_err(|e| {
        refused(format!(
            "{what} {}: {}; the server decides which host paths containers see",
            e.path, e.reason
        ))
    })
}

/// The Python environment dirs a container of `def` gets bound (container path, source),
/// in mount order.
fn environment(
    cfg: &WorkerConfig,
    def: &FunctionDef,
    image: &ImageDirs,
) -> io::Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    match &def.image {
        // The caller's environment from this machine's own dirs (no capture).
        None => {
            let py = &def.python;
            for r in flare_api::python_roots(&py.executable, &py.prefixes, &py.paths) {
                let src = host_path(cfg, "python path", &r.display().to_string())?;
                out.push((r, src));
            }
        }
        Some(img) => {
            for r in &img.host_roots {
                let dst = container_dest("captured environment dir", r)?;
                let src = match &image.root {
                    // From the image's lazy mount: a tree the client described, so its
                    // symlinks are never followed here.
                    Some(mnt) => {
                        let rel = r.trim_start_matches('/');
                        let meta = no_symlinks_below(mnt, rel).map_err(|e| {
                            refused(format!("captured environment dir {r} of image {}: {e}", img.image_id))
                        })?;
                        if !meta.is_dir() {
                            return Err(refused(format!(
                                "captured environment dir {r} of image {} is not a directory",
                                img.image_id
                            )));
                        }
                        mnt.join(rel)
                    }
                    // From this machine (the worker checked it matches the image and is
                    // inside the allow-list before choosing this).
                    None => host_path(cfg, "captured environment dir", r)?,
                };
                out.push((dst, src));
            }
        }
    }
    Ok(out)
}

/// Start-time mounts (`add_local_*` without `copy`): (container path, source) pairs.
fn start_time_mounts(image: &ImageDirs, has_code_mount: bool) -> io::Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for (dest, dir) in &image.mounts {
        let dest = container_dest("mount destination", dest)?;
        let mut entries = Vec::new();
        let mut symlink = None;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            // DirEntry::file_type does not follow symlinks.
            if e.file_type()?.is_symlink() && symlink.is_none() {
                symlink = Some(e.file_name());
            }
            entries.push((dest.join(e.file_name()), e.path()));
        }
        match symlink {
            None => out.extend(entries),
            Some(name) => {
                if dest == Path::new("/") || (has_code_mount && dest == Path::new("/root")) {
                    return Err(refused(format!(
                        "the mount at {} has a symlink at its top level ({}); a mount with one is bound \
                         whole at its destination, which would hide {}: put the link in a subdirectory or \
                         use copy=True",
                        dest.display(),
                        name.to_string_lossy(),
                        if dest == Path::new("/") { "the whole root" } else { "the code mount at /root" }
                    )));
                }
                // The link is bound with the directory that holds it (the server's own
                // tree), so it resolves inside the container.
                tracing::debug!(dest = %dest.display(), link = %name.to_string_lossy(), "start-time mount with a top-level symlink: bound whole");
                out.push((dest, dir.clone()));
            }
        }
    }
    Ok(out)
}

/// Creates `rel` (a file or dir mountpoint) inside the code mount dir `mdir`: binds under
/// `/root` go on top of the read-only code mount, so their mountpoints must exist in it.
fn code_mountpoint(mdir: &Path, rel: &Path, dir: bool) -> io::Result<()> {
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    let p = mdir.join(rel);
    // Each existing component must be a real dir (the code mount holds only dirs and files).
    let parent_rel = rel.parent().map(|p| p.display().to_string()).unwrap_or_default();
    if let Ok(meta) = no_symlinks_below(mdir, &parent_rel) {
        if !meta.is_dir() {
            return Err(refused(format!("{} is not a directory in the code mount", parent_rel)));
        }
    }
    if dir {
        std::fs::create_dir_all(&p)
    } else if std::fs::symlink_metadata(&p).is_err() {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, b"")
    } else {
        Ok(())
    }
}

/// The resolved sources of a container's binds: every host path checked (the
/// filesystem side of a container's binds); [`BindSources::plan`] orders them.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct BindSources {
    /// The code mount dir, bound read-only at `/root`.
    pub code: Option<PathBuf>,
    /// Start-time mounts: (container path, source).
    pub start_time: Vec<(PathBuf, PathBuf)>,
    /// cloudpickle (image roots only).
    pub cloudpickle: Option<PathBuf>,
    /// The host's resolv.conf (image roots only).
    pub resolv_conf: Option<PathBuf>,
    /// Python environment dirs: (container path, source).
    pub environment: Vec<(PathBuf, PathBuf)>,
    /// The SDK's `flare` package.
    pub sdk: Option<PathBuf>,
    /// The SDK mount's `modal` compatibility package, when it has one.
    pub modal: Option<PathBuf>,
    /// The container's API socket.
    pub api_socket: PathBuf,
}

impl BindSources {
    /// Every bind, in mount order: the code mount at `/root`, start-time mounts,
    /// cloudpickle and resolv.conf, environment dirs (after the code mount: those under
    /// `/root` go on top of it), the SDK at `/__flare/flare`, `modal` at
    /// `/__flare/modal`, the API socket.
    pub fn plan(&self) -> Vec<Bind> {
        let ro = |src: &PathBuf, dst: PathBuf| Bind { src: src.clone(), dst, readonly: true };
        let mut binds = Vec::new();
        binds.extend(self.code.iter().map(|src| ro(src, "/root".into())));
        binds.extend(self.start_time.iter().map(|(dst, src)| ro(src, dst.clone())));
        binds.extend(self.cloudpickle.iter().map(|src| ro(src, CLOUDPICKLE_IN_CONTAINER.into())));
        binds.extend(self.resolv_conf.iter().map(|src| ro(src, "/etc/resolv.conf".into())));
        binds.extend(self.environment.iter().map(|(dst, src)| ro(src, dst.clone())));
        binds.extend(self.sdk.iter().map(|src| ro(src, SDK_IN_CONTAINER.into())));
        binds.extend(self.modal.iter().map(|src| ro(src, MODAL_IN_CONTAINER.into())));
        binds.push(Bind {
            src: self.api_socket.clone(),
            dst: API_SOCKET_IN_CONTAINER.into(),
            readonly: false,
        });
        binds
    }

    /// The mountpoints binds under `/root` need inside the code mount dir: (path
    /// relative to `/root`, source), for environment dirs and start-time mounts.
    pub fn code_mountpoints(&self) -> Vec<(&Path, &Path)> {
        if self.code.is_none() {
            return Vec::new();
        }
        self.environment
            .iter()
            .chain(&self.start_time)
            .filter_map(|(dst, src)| dst.strip_prefix("/root").ok().map(|rel| (rel, src.as_path())))
            .collect()
    }
}

/// Resolves (and checks on this machine) every bind source of a container of `def`.
pub(crate) fn bind_sources(
    cfg: &WorkerConfig,
    def: &FunctionDef,
    image: &ImageDirs,
    api_socket: &Path,
) -> io::Result<BindSources> {
    let on_image_root = def.image.as_ref().is_some_and(|i| i.host_roots.is_empty());
    let environment = environment(cfg, def, image)?;
    let start_time = start_time_mounts(image, def.mount_id.is_some())?;
    let code = match &def.mount_id {
        Some(m) => Some(mount_dir(cfg, "mount", m, "")?),
        None => None,
    };
    let sdk_mount = &def.python.sdk_mount;
    let (mut cloudpickle, mut resolv_conf) = (None, None);
    if on_image_root {
        cloudpickle = if !sdk_mount.is_empty() {
            mount_dir(cfg, "sdk mount", sdk_mount, "cloudpickle").ok()
        } else if !def.python.cloudpickle_path.is_empty() {
            Some(host_path(cfg, "cloudpickle_path", &def.python.cloudpickle_path)?)
        } else {
            None
        };
        // The operator's own file (often a symlink into /run): resolved as the operator set it.
        resolv_conf = std::fs::canonicalize("/etc/resolv.conf").ok();
    }
    let sdk = if !sdk_mount.is_empty() {
        Some(mount_dir(cfg, "sdk mount", sdk_mount, "flare")?)
    } else if !def.python.sdk_path.is_empty() {
        Some(host_path(cfg, "sdk_path", &def.python.sdk_path)?)
    } else {
        None
    };
    // The opt-in Modal compatibility package travels in the SDK mount, next to `flare/`.
    let modal = if sdk_has_modal(&cfg.home.join("mounts"), sdk_mount) {
        Some(mount_dir(cfg, "sdk mount", sdk_mount, "modal")?)
    } else {
        None
    };
    Ok(BindSources {
        code,
        start_time,
        cloudpickle,
        resolv_conf,
        environment,
        sdk,
        modal,
        api_socket: api_socket.to_path_buf(),
    })
}

/// Whether SDK mount `id` of the mount store `mounts` holds the `modal` compatibility
/// package (a real directory; a symlink there is not followed and not bound).
fn sdk_has_modal(mounts: &Path, id: &str) -> bool {
    !id.is_empty()
        && validate_mount_id("sdk mount", id).is_ok()
        && std::fs::symlink_metadata(mounts.join(id).join("modal")).is_ok_and(|m| m.is_dir())
}

/// Creates the mountpoints that binds under `/root` need in the code mount dir (the
/// filesystem side effect of a bind plan; the code mount is bound read-only).
pub(crate) fn make_code_mountpoints(sources: &BindSources) -> io::Result<()> {
    let Some(mdir) = &sources.code else { return Ok(()) };
    for (rel, src) in sources.code_mountpoints() {
        let is_dir = std::fs::symlink_metadata(src).map(|m| m.is_dir()).unwrap_or(true);
        code_mountpoint(mdir, rel, is_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flare-worker-binds-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn top_level_symlinks_bind_the_tree_not_the_link() {
        let d = tmp("symlinks");
        let plain = d.join("plain");
        std::fs::create_dir_all(plain.join("sub")).unwrap();
        std::fs::write(plain.join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("/", plain.join("sub/deep-link")).unwrap();
        let linked = d.join("linked");
        std::fs::create_dir_all(&linked).unwrap();
        std::fs::write(linked.join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("/", linked.join("hostroot")).unwrap();

        let image = ImageDirs { root: None, mounts: vec![("/app".into(), plain.clone())] };
        let mut got = start_time_mounts(&image, true).unwrap();
        got.sort();
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/app/a.txt"), plain.join("a.txt")),
                (PathBuf::from("/app/sub"), plain.join("sub"))
            ]
        );

        let image = ImageDirs { root: None, mounts: vec![("/app".into(), linked.clone())] };
        assert_eq!(start_time_mounts(&image, true).unwrap(), vec![(PathBuf::from("/app"), linked.clone())]);
        for dest in ["/", "/root"] {
            let image = ImageDirs { root: None, mounts: vec![(dest.into(), linked.clone())] };
            let e = start_time_mounts(&image, true).unwrap_err();
            assert!(e.to_string().contains("symlink at its top level"), "{e}");
        }
        for dest in ["/root/../etc", "relative", "/__flare/flare", "/proc/sys"] {
            let image = ImageDirs { root: None, mounts: vec![(dest.into(), plain.clone())] };
            assert!(start_time_mounts(&image, true).is_err(), "{dest}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn dsts(binds: &[Bind]) -> Vec<(String, bool)> {
        binds.iter().map(|b| (b.dst.display().to_string(), b.readonly)).collect()
    }

    #[test]
    fn bind_plan_order() {
        let p = PathBuf::from;
        let sources = BindSources {
            code: Some(p("/h/mounts/code")),
            start_time: vec![(p("/app/a"), p("/h/trees/1/a")), (p("/root/data"), p("/h/trees/2/data"))],
            cloudpickle: Some(p("/h/mounts/sdk/cloudpickle")),
            resolv_conf: Some(p("/run/resolv.conf")),
            environment: vec![
                (p("/root/.pyenv"), p("/h/mnt/x/root/.pyenv")),
                (p("/opt/env"), p("/h/mnt/x/opt/env")),
            ],
            sdk: Some(p("/h/mounts/sdk/flare")),
            modal: None,
            api_socket: p("/run/s/c.sock"),
        };
        let binds = sources.plan();
        assert_eq!(
            dsts(&binds),
            [
                ("/root", true),
                ("/app/a", true),
                ("/root/data", true),
                ("/__flare/cloudpickle", true),
                ("/etc/resolv.conf", true),
                ("/root/.pyenv", true),
                ("/opt/env", true),
                ("/__flare/flare", true),
                ("/__flare/api.sock", false),
            ]
            .map(|(d, r)| (d.to_owned(), r))
        );
        assert_eq!(binds[0].src, p("/h/mounts/code"));
        assert_eq!(binds[5].src, p("/h/mnt/x/root/.pyenv"));
        // Mountpoints in the code mount: for environment dirs and mounts under /root.
        assert_eq!(
            sources.code_mountpoints(),
            vec![
                (Path::new(".pyenv"), Path::new("/h/mnt/x/root/.pyenv")),
                (Path::new("data"), Path::new("/h/trees/2/data"))
            ]
        );
        let no_code = BindSources { code: None, ..sources.clone() };
        assert!(no_code.code_mountpoints().is_empty());
        assert_eq!(no_code.plan()[0].dst, p("/app/a"));
    }

    #[test]
    fn modal_is_bound_next_to_the_sdk() {
        let p = PathBuf::from;
        let sources = BindSources {
            sdk: Some(p("/h/mounts/sdk/flare")),
            modal: Some(p("/h/mounts/sdk/modal")),
            api_socket: p("/run/s/c.sock"),
            ..Default::default()
        };
        let binds = sources.plan();
        assert_eq!(
            dsts(&binds),
            [("/__flare/flare", true), ("/__flare/modal", true), ("/__flare/api.sock", false)]
                .map(|(d, r)| (d.to_owned(), r))
        );
        assert_eq!(binds[1].src, p("/h/mounts/sdk/modal"));
        // Without a modal dir in the SDK mount, nothing is bound there.
        let without = BindSources { modal: None, ..sources };
        assert!(without.plan().iter().all(|b| b.dst != Path::new(MODAL_IN_CONTAINER)));
    }

    #[test]
    fn modal_is_found_in_the_sdk_mount() {
        let d = tmp("modal");
        std::fs::create_dir_all(d.join("with/flare")).unwrap();
        std::fs::create_dir_all(d.join("with/modal")).unwrap();
        std::fs::create_dir_all(d.join("without/flare")).unwrap();
        std::fs::create_dir_all(d.join("linked/flare")).unwrap();
        std::os::unix::fs::symlink(d.join("with/modal"), d.join("linked/modal")).unwrap();
        std::fs::create_dir_all(d.join("file")).unwrap();
        std::fs::write(d.join("file/modal"), b"").unwrap();
        assert!(sdk_has_modal(&d, "with"));
        for id in ["without", "linked", "file", "", "../with", "missing"] {
            assert!(!sdk_has_modal(&d, id), "{id}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
