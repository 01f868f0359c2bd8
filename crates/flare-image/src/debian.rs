//! `Image.debian_slim()`: a Debian root file system made with debootstrap from the
//! host's apt mirror, with Python and pip, built once and cached as a layer.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::ImageError;

/// Python versions debian_slim can provide: (version, Debian suite).
pub const SUITES: [(&str, &str); 2] = [("3.11", "bookworm"), ("3.13", "trixie")];

/// Bumped when what the base contains changes (part of its cache key).
pub const BASE_REVISION: &str = "1";

/// The Debian suite providing `python_version` (`major.minor`), or a clear error
/// listing the versions that can be provided.
pub fn suite_for(python_version: &str, scripts_dir: &Path) -> Result<&'static str, ImageError> {
    let available: Vec<(&str, &str)> =
        SUITES.iter().copied().filter(|(_, suite)| scripts_dir.join(suite).exists()).collect();
    let wanted = python_version.trim();
    let mm: Vec<&str> = wanted.split('.').collect();
    let key = if mm.len() >= 2 { format!("{}.{}", mm[0], mm[1]) } else { wanted.to_owned() };
    if let Some((_, suite)) = available.iter().find(|(v, _)| *v == key) {
        return Ok(suite);
    }
    let list: Vec<String> = available.iter().map(|(v, s)| format!("{v} (Debian {s})")).collect();
    Err(ImageError::Invalid(format!(
        "Image.debian_slim(python_version={wanted:?}): that Python cannot be provided here; available: {}. \
         For another version use Image.from_registry(\"python:{key}-slim\") or pass one of those.",
        if list.is_empty() { "none (debootstrap is not installed)".to_owned() } else { list.join(", ") }
    )))
}

/// The suite for `debian_slim(python_version)` (default: the first of [`SUITES`]),
/// judged by the debootstrap scripts installed on this host.
pub fn suite_for_spec(python_version: Option<&str>) -> Result<&'static str, ImageError> {
    suite_for(python_version.unwrap_or(SUITES[0].0), Path::new("/usr/share/debootstrap/scripts"))
}

/// The host's Debian mirror: `FLARE_DEBIAN_MIRROR`, else the first Debian `URIs:` /
/// `deb` line of the host's apt sources, else the default mirror.
pub fn mirror() -> String {
    if let Ok(m) = std::env::var("FLARE_DEBIAN_MIRROR") {
        if !m.is_empty() {
            return m;
        }
    }
    let mut texts = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.push(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for t in texts {
        for line in t.lines() {
            let line = line.trim();
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.starts_with("http"))
            } else {
                None
            };
            if let Some(u) = uri {
                if u.starts_with("http") && u.trim_end_matches('/').ends_with("/debian") {
                    return u.to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Run debootstrap into `dest` (which must not exist), streaming its output lines to
/// `log`, then make it a Python image: `python` -> `python3`, pip allowed to install
/// into the system Python (the image is the isolation), apt lists dropped.
pub fn bootstrap(suite: &str, dest: &Path, log: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let mirror = mirror();
    log(&format!("debootstrap {suite} from {mirror}\n"));
    let mut child = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates", suite])
        .arg(dest)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ImageError::Invalid(
                    "debootstrap is not installed on the server (apt-get install debootstrap)".into(),
                )
            } else {
                ImageError::io("starting debootstrap", e)
            }
        })?;
    let stderr = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
        tail
    });
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines().map_while(Result::ok) {
        log(&format!("{line}\n"));
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let status = child.wait().map_err(|e| ImageError::io("waiting for debootstrap", e))?;
    tail.extend(errs.join().unwrap_or_default());
    if !status.success() {
        let log_file = dest.join("debootstrap/debootstrap.log");
        if let Ok(t) = std::fs::read_to_string(&log_file) {
            tail.extend(t.lines().rev().take(20).map(str::to_owned).collect::<Vec<_>>().into_iter().rev());
        }
        return Err(ImageError::StepFailed {
            message: format!("debootstrap {suite} failed ({status})"),
            log_tail: tail.join("\n"),
        });
    }
    finish_python(dest)
}

fn finish_python(root: &Path) -> Result<(), ImageError> {
    let py = root.join("usr/bin/python");
    if !py.exists() {
        std::os::unix::fs::symlink("python3", &py).map_err(|e| ImageError::io("linking python", e))?;
    }
    if let Ok(rd) = std::fs::read_dir(root.join("usr/lib")) {
        for e in rd.flatten() {
            let marker = e.path().join("EXTERNALLY-MANAGED");
            if e.file_name().to_string_lossy().starts_with("python3") && marker.exists() {
                std::fs::remove_file(&marker)
                    .map_err(|e| ImageError::io("removing EXTERNALLY-MANAGED", e))?;
            }
        }
    }
    for d in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        if let Ok(rd) = std::fs::read_dir(root.join(d)) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_map_to_suites_or_list_what_exists() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("bookworm"), "").unwrap();
        assert_eq!(suite_for("3.11", tmp.path()).unwrap(), "bookworm");
        assert_eq!(suite_for("3.11.7", tmp.path()).unwrap(), "bookworm");
        let e = suite_for("3.8", tmp.path()).unwrap_err().to_string();
        assert!(e.contains("available: 3.11 (Debian bookworm)"), "{e}");
        assert!(!e.contains("3.13"), "{e}");
    }
}
