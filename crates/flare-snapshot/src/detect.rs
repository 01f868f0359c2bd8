//! Finding criu and what it can do on this kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest CRIU major version Flare uses (3.x cannot parse recent kernels' vDSO).
pub const MIN_MAJOR: u32 = 4;

/// A CRIU version, e.g. 4.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        Ok(())
    }
}

impl CriuVersion {
    /// Parse `criu --version` output (`Version: 4.1.1`, maybe followed by `GitID: ...`).
    pub fn parse_output(text: &str) -> Option<CriuVersion> {
        let v = text.lines().find_map(|l| l.trim().strip_prefix("Version:"))?.trim();
        let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let sublevel = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(CriuVersion { major, minor, sublevel })
    }
}

/// Optional kernel features (`criu check --feature NAME`) that decide what Flare can do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `uffd`: userfaultfd, needed for lazy (on-demand) page restore.
    pub uffd: bool,
    /// `uffd-noncoop`: userfaultfd events for fork/mremap/exit, needed for lazy restore
    /// of trees that fork or remap after restore.
    pub uffd_noncoop: bool,
    /// `userns`: dump and restore of user namespaces.
    pub userns: bool,
    /// `seccomp_suspend`, `seccomp_filters`: dump of tasks with seccomp filters.
    pub seccomp: bool,
    /// `clone3_set_tid`: restore pids with clone3 (no ns_last_pid races).
    pub clone3_set_tid: bool,
    /// `pidfd_store`: pid reuse detection across pre-dumps.
    pub pidfd_store: bool,
    /// `mem_dirty_track`: soft-dirty bits, needed for incremental pre-dumps only.
    pub mem_dirty_track: bool,
}

impl Features {
    /// Lazy-pages restore is possible (userfaultfd with non-cooperative events).
    pub fn lazy_pages(&self) -> bool {
        self.uffd && self.uffd_noncoop
    }
}

/// criu on this host, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuInfo {
    /// The binary (`None`: none was found).
    pub path: Option<PathBuf>,
    pub version: Option<CriuVersion>,
    /// `uname -r`.
    pub kernel_release: String,
    /// `criu check` passed.
    pub check_ok: bool,
    pub features: Features,
    /// Why criu cannot be used here (`None`: it can).
    pub unusable: Option<String>,
}

impl CriuInfo {
    /// `Ok` when usable, else [`SnapshotError::Unusable`](crate::SnapshotError::Unusable)
    /// with the reason.
    pub fn usable(&self) -> Result<(&Path, CriuVersion), crate::SnapshotError> {
        match (&self.unusable, &self.path, self.version) {
            (None, Some(p), Some(v)) => Ok((p, v)),
            (Some(r), _, _) => Err(crate::SnapshotError::Unusable(r.clone())),
            _ => Err(crate::SnapshotError::Unusable("criu was not detected".into())),
        }
    }
}

/// `path` if given, else the first `criu` in `PATH` (then /usr/local/sbin, /usr/sbin,
/// /sbin, which a root shell's PATH may lack).
pub fn find_criu(path: Option<&Path>, path_env: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = path {
        return p.is_file().then(|| p.to_path_buf());
    }
    let from_env = path_env.into_iter().flat_map(|v| v.split(':')).filter(|d| !d.is_empty());
    from_env
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("criu"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The last `n` meaningful lines of criu's stderr, joined by " | " (cache warnings left out).
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains("kdat cache")).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn run(bin: &Path, args: &[&str]) -> Result<(bool, String), String> {
    match Command::new(bin).args(args).output() {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            Ok((o.status.success(), text))
        }
        Err(e) => Err(format!("cannot run {}: {e}", bin.display())),
    }
}

/// Detect criu: `path` (a configured binary) or the one in `PATH`, its version, whether
/// `criu check` passes, and the optional features. Never fails: an unusable criu comes
/// back with [`CriuInfo::unusable`] set. `criu check` needs root; detection as another
/// user reports criu unusable.
pub fn detect(path: Option<&Path>) -> CriuInfo {
    let kernel_release = crate::sys::kernel_release().unwrap_or_else(|_| "unknown".into());
    let mut info = CriuInfo {
        path: find_criu(path, std::env::var("PATH").ok().as_deref()),
        version: None,
        kernel_release,
        check_ok: false,
        features: Features::default(),
        unusable: None,
    };
    let Some(bin) = info.path.clone() else {
        info.unusable = Some(match path {
            Some(p) => format!("{} does not exist", p.display()),
            None => "no criu in PATH (scripts/install-criu.sh installs one)".into(),
        });
        return info;
    };
    let out = match run(&bin, &["--version"]) {
        Ok((_, out)) => out,
        Err(e) => {
            info.unusable = Some(e);
            return info;
        }
    };
    let Some(version) = CriuVersion::parse_output(&out) else {
        info.unusable = Some(format!("{} --version printed no version: {}", bin.display(), tail(&out, 3)));
        return info;
    };
    info.version = Some(version);
    match run(&bin, &["check"]) {
        Ok((true, _)) => info.check_ok = true,
        Ok((false, out)) => {
            info.unusable = Some(format!(
                "criu {version} fails `criu check` on kernel {}: {}",
                info.kernel_release,
                tail(&out, 4)
            ));
        }
        Err(e) => info.unusable = Some(e),
    }
    if info.check_ok {
        let has = |f: &str| matches!(run(&bin, &["check", "--feature", f]), Ok((true, _)));
        info.features = Features {
            uffd: has("uffd"),
            uffd_noncoop: has("uffd-noncoop"),
            userns: has("userns"),
            seccomp: has("seccomp_suspend") && has("seccomp_filters"),
            clone3_set_tid: has("clone3_set_tid"),
            pidfd_store: has("pidfd_store"),
            mem_dirty_track: has("mem_dirty_track"),
        };
    }
    if info.unusable.is_none() && version.major < MIN_MAJOR {
        info.unusable = Some(format!(
            "criu {version} is older than {MIN_MAJOR}.0 (scripts/install-criu.sh installs a newer one)"
        ));
    }
    tracing::debug!(?info, "criu detected");
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = CriuVersion::parse_output("Version: 4.1.1\n").unwrap();
        assert_eq!(v, CriuVersion { major: 4, minor: 1, sublevel: 1 });
        assert_eq!(v.to_string(), "4.1.1");
        let v = CriuVersion::parse_output("Version: 3.17.1\nGitID: v3.17.1-1-gabc\n").unwrap();
        assert_eq!(v.to_string(), "3.17.1");
        assert_eq!(CriuVersion::parse_output("Version: 4.0").unwrap().to_string(), "4.0");
        assert!(CriuVersion::parse_output("criu: command not found").is_none());
        assert!(
            CriuVersion { major: 3, minor: 17, sublevel: 1 }
                < CriuVersion { major: 4, minor: 0, sublevel: 0 }
        );
    }

    #[test]
    fn tail_skips_cache_noise() {
        let err = "Warn  (criu/kerndat.c:1285): Can't keep kdat cache on non-tempfs\n\
                   Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n\
                   Error (criu/crtools.c:260): Could not initialize kernel features detection.\n";
        assert_eq!(
            tail(err, 4),
            "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds | \
             Error (criu/crtools.c:260): Could not initialize kernel features detection."
        );
        assert_eq!(tail("a\nb\nc\n", 2), "b | c");
    }

    #[test]
    fn missing_binary_is_unusable_with_a_reason() {
        let info = detect(Some(Path::new("/nonexistent/criu")));
        assert!(info.path.is_none());
        assert!(info.unusable.as_deref().unwrap().contains("/nonexistent/criu does not exist"));
        assert!(info.usable().is_err());
    }

    #[test]
    fn finds_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("criu");
        std::fs::write(&bin, "#!/bin/sh\necho Version: 9.9\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Not executable: skipped.
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_ne!(find_criu(None, Some(&path)), Some(bin.clone()));
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_criu(None, Some(&path)), Some(bin.clone()));
        // A configured path wins over PATH, and must exist.
        assert_eq!(find_criu(Some(&bin), Some("/usr/sbin")), Some(bin));
        assert_eq!(find_criu(Some(Path::new("/nonexistent/criu")), Some(&path)), None);
    }

    #[test]
    fn a_failing_check_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("criu");
        std::fs::write(
            &bin,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo Version: 3.17.1; exit 0; fi\n\
             echo 'Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds' >&2; exit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let info = detect(Some(&bin));
        assert_eq!(info.version.unwrap().to_string(), "3.17.1");
        assert!(!info.check_ok);
        let why = info.unusable.unwrap();
        assert!(why.starts_with("criu 3.17.1 fails `criu check` on kernel "), "{why}");
        assert!(why.contains("Unexpected rt vDSO area bounds"), "{why}");
    }
}
