//! The minimal `/etc` of containers that run on the host's system directories
//! (`Rootfs::Host`): what Python and common tools need, never the host's private files
//! (keys under `ssl/private`, `shadow`, credentials in `pip.conf`, service configs).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use crate::error::{IoContext, RuntimeError};

/// Entries of the host's `/etc` copied into the containers' `/etc`, with why each is
/// needed. A name ending in `*` is a prefix (e.g. Debian's `python3.11/`).
pub(crate) const MINIMAL_ETC: &[(&str, &str)] = &[
    ("passwd", "user and group names for getpwuid (no password hashes live here)"),
    ("group", "group names"),
    ("hosts", "localhost resolution"),
    ("resolv.conf", "DNS for outbound requests"),
    ("nsswitch.conf", "how glibc resolves names"),
    ("host.conf", "resolver options"),
    ("gai.conf", "getaddrinfo address ordering"),
    ("ld.so.cache", "the dynamic linker's library cache"),
    ("ld.so.conf", "dynamic linker search paths"),
    ("ld.so.conf.d", "dynamic linker search paths"),
    ("localtime", "the time zone"),
    ("timezone", "the time zone name"),
    ("ssl/certs", "CA certificates for TLS"),
    ("ssl/openssl.cnf", "OpenSSL's default configuration"),
    ("ca-certificates.conf", "which CA certificates are enabled"),
    ("alternatives", "Debian's command alternatives (symlinks)"),
    ("os-release", "distribution identification"),
    ("debian_version", "distribution identification"),
    ("lsb-release", "distribution identification"),
    ("mime.types", "Python's mimetypes"),
    ("protocols", "getprotobyname"),
    ("services", "getservbyname"),
    ("networks", "getnetbyname"),
    ("python3*", "Debian's sitecustomize for the system Python"),
];

fn copy_entry(src: &Path, dst: &Path) -> Result<(), RuntimeError> {
    let meta = fs::symlink_metadata(src).ctx(|| format!("stat {}", src.display()))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).ctx(|| format!("readlink {}", src.display()))?;
        symlink(&target, dst).ctx(|| format!("symlink {}", dst.display()))?;
    } else if ft.is_dir() {
        fs::create_dir_all(dst).ctx(|| format!("create {}", dst.display()))?;
        for e in fs::read_dir(src).ctx(|| format!("read {}", src.display()))? {
            let e = e.ctx(|| format!("read {}", src.display()))?;
            copy_entry(&e.path(), &dst.join(e.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode() & 0o7777))
            .ctx(|| format!("chmod {}", dst.display()))?;
    } else if ft.is_file() {
        // Only what everybody may read on the host: a root-only file stays out.
        if meta.permissions().mode() & 0o004 == 0 {
            return Ok(());
        }
        fs::copy(src, dst).ctx(|| format!("copy {}", src.display()))?;
    }
    Ok(())
}

/// (Re)build `dest` from the allow-listed entries of `host_etc`.
pub(crate) fn build_minimal_etc(host_etc: &Path, dest: &Path) -> Result<(), RuntimeError> {
    let fresh = dest.with_extension("new");
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh).ctx(|| format!("create {}", fresh.display()))?;
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", fresh.display()))?;
    let names: Vec<String> = fs::read_dir(host_etc)
        .ctx(|| format!("read {}", host_etc.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for (entry, _why) in MINIMAL_ETC {
        let matches: Vec<String> = match entry.strip_suffix('*') {
            Some(prefix) => names.iter().filter(|n| n.starts_with(prefix)).cloned().collect(),
            None => vec![entry.to_string()],
        };
        for m in matches {
            let src = host_etc.join(&m);
            if fs::symlink_metadata(&src).is_err() {
                continue;
            }
            let dst = fresh.join(&m);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
            }
            copy_entry(&src, &dst)?;
        }
    }
    let _ = fs::remove_dir_all(dest);
    fs::rename(&fresh, dest).ctx(|| format!("rename {} to {}", fresh.display(), dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_the_allow_list() {
        let tmp = std::env::temp_dir().join(format!("flare-etc-{}", std::process::id()));
        let host = tmp.join("etc");
        fs::create_dir_all(host.join("ssl/private")).unwrap();
        fs::create_dir_all(host.join("ssl/certs")).unwrap();
        fs::create_dir_all(host.join("python3.11")).unwrap();
        fs::write(host.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(host.join("shadow"), "root:$6$hash:::\n").unwrap();
        fs::write(host.join("ssl/private/key.pem"), "KEY").unwrap();
        fs::write(host.join("ssl/certs/ca.pem"), "CA").unwrap();
        fs::write(host.join("python3.11/sitecustomize.py"), "").unwrap();
        fs::write(host.join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
        fs::set_permissions(host.join("resolv.conf"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("/usr/share/zoneinfo/UTC", host.join("localtime")).unwrap();
        let dest = tmp.join("out");
        build_minimal_etc(&host, &dest).unwrap();
        assert!(dest.join("passwd").is_file());
        assert!(dest.join("ssl/certs/ca.pem").is_file());
        assert!(dest.join("python3.11/sitecustomize.py").is_file());
        assert_eq!(fs::read_link(dest.join("localtime")).unwrap(), Path::new("/usr/share/zoneinfo/UTC"));
        assert!(!dest.join("shadow").exists());
        assert!(!dest.join("ssl/private").exists());
        assert!(!dest.join("resolv.conf").exists(), "a root-only file is not copied");
        // Rebuilding replaces the old copy.
        fs::remove_file(host.join("passwd")).unwrap();
        build_minimal_etc(&host, &dest).unwrap();
        assert!(!dest.join("passwd").exists());
        fs::remove_dir_all(&tmp).unwrap();
    }
}
