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

/// Every bind of a container of `def`, in mount order.
pub(crate) fn container_binds(
    cfg: &WorkerConfig,
    def: &FunctionDef,
    image: &ImageDirs,
    api_socket: &Path,
) -> io::Result<Vec<Bind>> {
    let on_image_root = def.image.as_ref().is_some_and(|i| i.host_roots.is_empty());
    let env = environment(cfg, def, image)?;
    let mounts = start_time_mounts(image, def.mount_id.is_some())?;
    let mut binds = Vec::new();
    if let Some(m) = &def.mount_id {
        let mdir = mount_dir(cfg, "mount", m, "")?;
        // Environment dirs under /root (e.g. pyenv's) and start-time mounts under /root
        // are bound on top of the read-only code mount: their mountpoints must exist in it.
        for (dst, src) in env.iter().chain(&mounts) {
            if let Ok(rel) = dst.strip_prefix("/root") {
                let is_dir = std::fs::symlink_metadata(src).map(|m| m.is_dir()).unwrap_or(true);
                code_mountpoint(&mdir, rel, is_dir)?;
            }
        }
        binds.push(Bind { src: mdir, dst: "/root".into(), readonly: true });
    }
    for (dst, src) in mounts {
        binds.push(Bind { src, dst, readonly: true });
    }
    if on_image_root {
        let cloudpickle = if !def.python.sdk_mount.is_empty() {
            mount_dir(cfg, "sdk mount", &def.python.sdk_mount, "cloudpickle").ok()
        } else if !def.python.cloudpickle_path.is_empty() {
            Some(host_path(cfg, "cloudpickle_path", &def.python.cloudpickle_path)?)
        } else {
            None
        };
        if let Some(src) = cloudpickle {
            binds.push(Bind { src, dst: CLOUDPICKLE_IN_CONTAINER.into(), readonly: true });
        }
        // The operator's own file (often a symlink into /run): resolved as the operator set it.
        if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") {
            binds.push(Bind { src: resolv, dst: "/etc/resolv.conf".into(), readonly: true });
        }
    }
    for (dst, src) in env {
        binds.push(Bind { src, dst, readonly: true });
    }
    let sdk = if !def.python.sdk_mount.is_empty() {
        Some(mount_dir(cfg, "sdk mount", &def.python.sdk_mount, "flare")?)
    } else if !def.python.sdk_path.is_empty() {
        Some(host_path(cfg, "sdk_path", &def.python.sdk_path)?)
    } else {
        None
    };
    if let Some(src) = sdk {
        binds.push(Bind { src, dst: SDK_IN_CONTAINER.into(), readonly: true });
    }
    binds.push(Bind { src: api_socket.to_path_buf(), dst: API_SOCKET_IN_CONTAINER.into(), readonly: false });
    Ok(binds)
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
}
