//! Which host directories a container may see. The server decides, never the client: a
//! function definition can only name host paths that the operator allowed
//! (`flared server|control|worker --host-bind-allow DIR`), and even those never when they
//! hold the server's own data or a kernel file system. Everything else a container sees
//! of the host comes from directories the server created (code mounts, materialized
//! trees, lazy image mounts).
//!
//! Two levels of checks:
//! - [`HostBindPolicy::allows`]: lexical only (absolute, no `.`/`..`/empty parts, under an
//!   allowed dir, clear of the denied ones). The control plane uses it when a function is
//!   registered (it may not share the worker's file system).
//! - [`HostBindPolicy::check_on_host`]: the same, then every component of the path on
//!   this machine is `lstat`-ed: none may be a symlink, so the host never resolves a path
//!   a client chose. The worker uses it right before it hands a bind to the runtime.

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// Host paths never bound into a container, even when inside an allowed dir (nor any dir
/// that contains one of them).
const ALWAYS_DENIED: &[&str] = &["/proc", "/sys", "/dev", "/run", "/boot"];

/// Host dirs the host-environment root of a container already exposes (read-only, from
/// the worker's own system): never captured or bound as part of a Python environment.
pub const HOST_SYSTEM_PREFIXES: &[&str] =
    &["/usr/", "/lib/", "/lib64/", "/lib32/", "/bin/", "/sbin/", "/etc/", "/opt/"];

/// Why a host path may not be bound.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct HostPathError {
    pub path: String,
    pub reason: String,
}

impl HostPathError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> HostPathError {
        HostPathError { path: path.into(), reason: reason.into() }
    }
}

/// The operator's rule for host directories bound into containers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostBindPolicy {
    allow: Vec<PathBuf>,
    deny: Vec<PathBuf>,
}

impl HostBindPolicy {
    /// Nothing of the host may be bound (the default of an explicitly started server);
    /// `data_dir` (FLARE_HOME) is remembered as denied for [`HostBindPolicy::with_allowed`].
    pub fn none(data_dir: Option<&Path>) -> HostBindPolicy {
        let mut deny: Vec<PathBuf> = ALWAYS_DENIED.iter().map(PathBuf::from).collect();
        if let Some(d) = data_dir {
            deny.push(d.to_path_buf());
        }
        HostBindPolicy { allow: Vec::new(), deny }
    }

    /// The operator's allow-list. Each entry is the operator's own path: it is made
    /// absolute and its symlinks resolved here, once; it must exist, must not be `/` and
    /// must not be (or contain) a denied dir. `data_dir`: the server's FLARE_HOME, which
    /// is never bound.
    pub fn with_allowed(allow: &[PathBuf], data_dir: Option<&Path>) -> Result<HostBindPolicy, HostPathError> {
        let mut p = HostBindPolicy::none(data_dir);
        for a in allow {
            let shown = a.display().to_string();
            let real = a
                .canonicalize()
                .map_err(|e| HostPathError::new(&shown, format!("cannot be resolved: {e}")))?;
            if real == Path::new("/") {
                return Err(HostPathError::new(shown, "allowing / would expose the whole host"));
            }
            if let Some(d) = p.denied_overlap(&real) {
                return Err(HostPathError::new(
                    shown,
                    format!("overlaps {}, which is never bound into containers", d.display()),
                ));
            }
            if !p.allow.contains(&real) {
                p.allow.push(real);
            }
        }
        Ok(p)
    }

    /// The allowed dirs (resolved).
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allow
    }

    fn denied_overlap(&self, p: &Path) -> Option<&Path> {
        self.deny.iter().map(PathBuf::as_path).find(|d| p.starts_with(d) || d.starts_with(p))
    }

    /// Lexical check for a path a container only names (a `sys.path` entry on an image,
    /// never bound from the host): clean, and not inside the server's data dir or a
    /// kernel file system.
    pub fn may_name(&self, path: &str) -> Result<(), HostPathError> {
        let p = clean_absolute(path)?;
        if let Some(d) = self.deny.iter().find(|d| p.starts_with(d)) {
            return Err(HostPathError::new(
                path,
                format!(
                    "inside {}, which containers never see (server data or a kernel file system)",
                    d.display()
                ),
            ));
        }
        Ok(())
    }

    /// Lexical check: `path` is a clean absolute path inside an allowed dir and clear of
    /// the denied ones. Nothing on disk is looked at.
    pub fn allows(&self, path: &str) -> Result<(), HostPathError> {
        let p = clean_absolute(path)?;
        if p == Path::new("/") {
            return Err(HostPathError::new(path, "the host's root is never bound into containers"));
        }
        if let Some(d) = self.denied_overlap(&p) {
            return Err(HostPathError::new(
                path,
                format!(
                    "{} is never bound into containers (server data or a kernel file system)",
                    d.display()
                ),
            ));
        }
        if !self.allow.iter().any(|a| p.starts_with(a)) {
            let why = if self.allow.is_empty() {
                "this server binds no host directories into containers (an operator can allow some with \
                 `flared ... --host-bind-allow DIR`); send the environment through the store instead \
                 (the SDK's default local environment capture)"
                    .to_owned()
            } else {
                format!(
                    "not inside a directory the server allows to bind (--host-bind-allow: {})",
                    self.allow.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            };
            return Err(HostPathError::new(path, why));
        }
        Ok(())
    }

    /// [`HostBindPolicy::allows`], then on this machine: the path exists and none of its
    /// components is a symlink (see [`no_symlinks`]).
    pub fn check_on_host(&self, path: &str) -> Result<PathBuf, HostPathError> {
        self.allows(path)?;
        no_symlinks(Path::new(path))?;
        Ok(PathBuf::from(path))
    }
}

/// `path` as a clean absolute path: starts with `/`, no `.`, `..` or empty parts, no NUL.
pub fn clean_absolute(path: &str) -> Result<PathBuf, HostPathError> {
    if !path.starts_with('/') {
        return Err(HostPathError::new(path, "must be an absolute path"));
    }
    if path.contains('\0') {
        return Err(HostPathError::new(path, "contains a NUL byte"));
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if !rest.is_empty() && rest.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(HostPathError::new(path, "must not contain '.', '..' or empty parts"));
    }
    Ok(PathBuf::from(path))
}

/// Every component of absolute `path` exists on this machine and none is a symlink (each
/// prefix is `lstat`-ed; nothing is followed). Returns the last component's metadata.
pub fn no_symlinks(path: &Path) -> Result<std::fs::Metadata, HostPathError> {
    let shown = || path.display().to_string();
    let mut cur = PathBuf::from("/");
    let mut last = std::fs::symlink_metadata(&cur).map_err(|e| HostPathError::new(shown(), e.to_string()))?;
    for c in path.components() {
        match c {
            Component::RootDir => continue,
            Component::Normal(part) => cur.push(part),
            _ => return Err(HostPathError::new(shown(), "must not contain '.' or '..'")),
        }
        last = std::fs::symlink_metadata(&cur).map_err(|e| {
            HostPathError::new(shown(), format!("{} cannot be found on this machine: {e}", cur.display()))
        })?;
        if last.file_type().is_symlink() {
            return Err(HostPathError::new(
                shown(),
                format!("{} is a symlink; the host never follows symlinks for containers", cur.display()),
            ));
        }
    }
    Ok(last)
}

/// [`no_symlinks`] for `rel` below a directory the server controls (`base` itself is
/// trusted and may be anything): no component of `rel` may be a symlink.
pub fn no_symlinks_below(base: &Path, rel: &str) -> Result<std::fs::Metadata, HostPathError> {
    let shown = || format!("{}/{rel}", base.display());
    let mut cur = base.to_path_buf();
    let mut last = std::fs::symlink_metadata(&cur).map_err(|e| HostPathError::new(shown(), e.to_string()))?;
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(HostPathError::new(shown(), "must not contain '.' or '..'"));
        }
        cur.push(part);
        last = std::fs::symlink_metadata(&cur)
            .map_err(|e| HostPathError::new(shown(), format!("{} cannot be found: {e}", cur.display())))?;
        if last.file_type().is_symlink() {
            return Err(HostPathError::new(
                shown(),
                format!("{} is a symlink, which is never followed on the host", cur.display()),
            ));
        }
    }
    Ok(last)
}

/// The smallest set of host directories that expose a Python environment: the
/// interpreter's prefix (two levels above the executable), the environment's prefixes
/// (`sys.prefix`, `sys.base_prefix`, ... as the client sent them) and every absolute
/// `paths` entry, minus `/`, the system dirs the host root already has, and nested
/// duplicates. Purely lexical (the client sends resolved paths; the host never resolves
/// them). Mirrors `python_roots` in `python/flare/_localenv.py`.
pub fn python_roots(executable: &str, prefixes: &[String], paths: &[String]) -> Vec<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(prefix) = Path::new(executable).parent().and_then(|p| p.parent()) {
        if prefix.is_absolute() {
            cands.push(prefix.to_path_buf());
        }
    }
    for p in prefixes.iter().chain(paths) {
        let p = Path::new(p);
        if p.is_absolute() {
            cands.push(p.to_path_buf());
        }
    }
    cands.retain(|p| {
        let s = format!("{}/", p.display());
        p != Path::new("/") && !HOST_SYSTEM_PREFIXES.iter().any(|pre| s.starts_with(pre))
    });
    cands.sort();
    cands.dedup();
    let mut out: Vec<PathBuf> = Vec::new();
    for c in cands {
        if !out.iter().any(|o| c.starts_with(o)) {
            out.push(c);
        }
    }
    out
}

/// The host paths a function definition would have bound into its containers, with what
/// each is: the Python environment's dirs when it runs on the host's dirs (no image),
/// and a legacy `sdk_path` / `cloudpickle_path`.
pub fn requested_host_binds(f: &crate::FunctionDef) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if f.image_id.is_none() && f.image.is_none() {
        // A path that is not clean (`..`, `.`) is refused as it is, not after the system
        // dirs were filtered out of it lexically.
        for p in f.python.prefixes.iter().chain(&f.python.paths).chain(Some(&f.python.executable)) {
            if p.starts_with('/') && clean_absolute(p).is_err() {
                out.push(("python path", p.clone()));
            }
        }
        for r in python_roots(&f.python.executable, &f.python.prefixes, &f.python.paths) {
            out.push(("python path", r.display().to_string()));
        }
    }
    if !f.python.sdk_path.is_empty() {
        out.push(("sdk_path", f.python.sdk_path.clone()));
    }
    if !f.python.cloudpickle_path.is_empty() {
        out.push(("cloudpickle_path", f.python.cloudpickle_path.clone()));
    }
    out
}

/// A mount id as the server makes them (`mo-` and hex, or any `[A-Za-z0-9_-]` name): never
/// a path.
pub fn validate_mount_id(what: &str, id: &str) -> Result<(), HostPathError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(HostPathError::new(id, format!("invalid {what}: use letters, digits, '-' and '_'")))
    }
}

static POLICY: OnceLock<HostBindPolicy> = OnceLock::new();

/// Install the process's policy (once, at start; `flared` does it from its flags). Later
/// calls are ignored and return `false`.
pub fn set_host_bind_policy(p: HostBindPolicy) -> bool {
    POLICY.set(p).is_ok()
}

/// The process's policy: what [`set_host_bind_policy`] installed, else nothing allowed.
pub fn host_bind_policy() -> &'static HostBindPolicy {
    POLICY.get_or_init(|| HostBindPolicy::none(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "flare-api-hostpaths-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let p = HostBindPolicy::none(Some(Path::new("/root/.flare")));
        for path in ["/root/venv", "/tmp/x", "/home/u/.venv"] {
            let e = p.allows(path).unwrap_err();
            assert!(e.reason.contains("--host-bind-allow"), "{e}");
        }
    }

    #[test]
    fn allowed_dirs_and_what_is_never_bound() {
        let d = tmp();
        let home = d.join("flare-home");
        std::fs::create_dir_all(d.join("env/lib")).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let p = HostBindPolicy::with_allowed(&[d.join("env")], Some(&home)).unwrap();
        let env = d.join("env");
        assert!(p.allows(&env.display().to_string()).is_ok());
        assert!(p.allows(&format!("{}/lib", env.display())).is_ok());
        assert!(p.check_on_host(&format!("{}/lib", env.display())).is_ok());
        for bad in [
            "/".to_string(),
            "/proc".into(),
            "/proc/1/root".into(),
            "/sys/fs/cgroup".into(),
            home.display().to_string(),
            format!("{}/state.db", home.display()),
            format!("{}/../flare-home", env.display()),
            format!("{}/./lib", env.display()),
            "relative/path".into(),
            d.display().to_string(),
        ] {
            assert!(p.allows(&bad).is_err(), "{bad} must be refused");
        }
        // The allow-list itself can hold neither /, nor the data dir, nor a kernel fs.
        assert!(HostBindPolicy::with_allowed(&[PathBuf::from("/")], Some(&home)).is_err());
        assert!(
            HostBindPolicy::with_allowed(std::slice::from_ref(&d), Some(&home)).is_err(),
            "contains FLARE_HOME"
        );
        assert!(HostBindPolicy::with_allowed(&[PathBuf::from("/proc/self")], None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlinks_are_never_followed_on_the_host() {
        let d = tmp();
        std::fs::create_dir_all(d.join("env/real")).unwrap();
        std::os::unix::fs::symlink("/", d.join("env/hostroot")).unwrap();
        std::os::unix::fs::symlink(d.join("env/real"), d.join("env/link")).unwrap();
        let p = HostBindPolicy::with_allowed(&[d.join("env")], None).unwrap();
        let e = p.check_on_host(&format!("{}/env/hostroot", d.display())).unwrap_err();
        assert!(e.reason.contains("symlink"), "{e}");
        let e = p.check_on_host(&format!("{}/env/link", d.display())).unwrap_err();
        assert!(e.reason.contains("symlink"), "{e}");
        assert!(no_symlinks_below(&d, "env/link").is_err());
        assert!(no_symlinks_below(&d, "env/real").is_ok());
        assert!(no_symlinks_below(&d, "env/../env").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn python_roots_collapse_and_skip_system_dirs() {
        let roots = python_roots(
            "/tmp/v/bin/python3",
            &["/tmp/v".into(), "/root/.pyenv/versions/3.11.7".into()],
            &[
                "/tmp/v/lib/python3.11/site-packages".into(),
                "/root/.pyenv/versions/3.11.7/lib/python3.11".into(),
                "/usr/lib/python3.11".into(),
                "relative".into(),
            ],
        );
        assert_eq!(roots, vec![PathBuf::from("/root/.pyenv/versions/3.11.7"), PathBuf::from("/tmp/v")]);
        assert!(python_roots("/usr/bin/python3", &[], &["/usr/lib/python3/dist-packages".into()]).is_empty());
    }

    #[test]
    fn mount_ids_are_names() {
        assert!(validate_mount_id("mount id", "mo-0123abcd").is_ok());
        for bad in ["", "..", "../..", "a/b", ".hidden", "mo-1/../../x"] {
            assert!(validate_mount_id("mount id", bad).is_err(), "{bad}");
        }
    }
}
