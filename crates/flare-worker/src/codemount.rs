//! Code mounts as containers see them. A mount (`FLARE_HOME/mounts/<id>`: the app's code,
//! the SDK) is written by the control plane or fetched by a remote worker, owned by host
//! root. In a user namespace host root is nobody (the overflow id), so a private file of
//! the mount (a 0600 module of a user whose umask is 077) would be unreadable for the
//! container's root, and the files would look owned by 65534. Containers with a user
//! namespace therefore get a copy whose owners are the namespace's root
//! (`mounts-shifted/<id>-u<host_base>`, made once per mount and range), as image
//! start-time mounts are (`ImageHost::tree`). It is still bound read-only.

use std::io;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flare_runtime::UserNamespace;

/// `src` (a mount dir of this server, `mounts/<id>`) copied with every entry owned by the
/// root of `ns` (modes kept; symlinks copied as links, never followed), under
/// `home/mounts-shifted`. Made once: a later call returns the same dir. Blocking.
pub(crate) fn shifted_mount(home: &Path, id: &str, src: &Path, ns: UserNamespace) -> io::Result<PathBuf> {
    let root = home.join("mounts-shifted");
    let dir = root.join(format!("{id}-u{}", ns.host_base));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let tmp = root.join(format!(".tmp-{id}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let copied = copy_owned(src, &tmp, ns.host_base);
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io::Error::new(e.kind(), format!("copying mount {id} for the user namespace: {e}")));
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Copy tree `src` to `dst` (which must not exist), every entry owned by `owner:owner`.
fn copy_owned(src: &Path, dst: &Path, owner: u32) -> io::Result<()> {
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&s)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&d)?;
            for entry in std::fs::read_dir(&s)? {
                let entry = entry?;
                stack.push((entry.path(), d.join(entry.file_name())));
            }
        } else if ft.is_file() {
            std::fs::copy(&s, &d)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&s)?, &d)?;
        } else {
            // A mount holds files, dirs and links only; anything else is left out.
            tracing::warn!(path = %s.display(), "mount entry that is not a file, dir or symlink: left out");
            continue;
        }
        lchown(&d, Some(owner), Some(owner))?;
        if !ft.is_symlink() {
            // After the chown, which may clear set-id bits; the source's mode as it was.
            std::fs::set_permissions(
                &d,
                std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_files_are_owned_by_the_namespace_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: chown needs root");
            return;
        }
        let home = std::env::temp_dir().join(format!("flare-worker-codemount-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        let src = home.as_path().join("mounts/mo-test");
        std::fs::create_dir_all(src.join("pkg")).unwrap();
        std::fs::write(src.join("pkg/private.py"), b"X = 1\n").unwrap();
        std::fs::set_permissions(src.join("pkg/private.py"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(src.join("pkg"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("pkg/private.py", src.join("link")).unwrap();
        let ns = UserNamespace { host_base: 1_000_000_000, size: 65_536 };
        let out = shifted_mount(home.as_path(), "mo-test", &src, ns).unwrap();
        assert_eq!(out, home.as_path().join("mounts-shifted/mo-test-u1000000000"));
        for (rel, mode) in [("", None), ("pkg", Some(0o700)), ("pkg/private.py", Some(0o600)), ("link", None)]
        {
            let m = std::fs::symlink_metadata(out.join(rel)).unwrap();
            assert_eq!((m.uid(), m.gid()), (ns.host_base, ns.host_base), "{rel}");
            if let Some(mode) = mode {
                assert_eq!(m.mode() & 0o7777, mode, "{rel}");
            }
        }
        assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("pkg/private.py"));
        assert_eq!(std::fs::read(out.join("pkg/private.py")).unwrap(), b"X = 1\n");
        // The source keeps its owner; a second call reuses the copy.
        assert_eq!(std::fs::metadata(src.join("pkg/private.py")).unwrap().uid(), 0);
        std::fs::write(out.join("marker"), b"").unwrap();
        assert!(shifted_mount(home.as_path(), "mo-test", &src, ns).unwrap().join("marker").exists());
        assert!(!std::fs::read_dir(home.as_path().join("mounts-shifted")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp")));
        std::fs::remove_dir_all(&home).unwrap();
    }
}
