//! Image references (`[registry[:port]/]name[:tag][@sha256:hex]`) with Docker's
//! defaults, and platforms.

use std::fmt;

use crate::error::{OciError, Result};

/// The registry an unqualified name lives in.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host, with `:port` if one was given (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/debian`, `team/app`).
    pub repository: String,
    /// Tag, if given or defaulted (a digest-only reference has none).
    pub tag: Option<String>,
    /// Manifest digest (`sha256:<64 hex>`), if given; it wins over the tag.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parse a reference the way `docker pull` does: the first path component is a
    /// registry if it contains `.` or `:` or is `localhost`, otherwise the registry is
    /// `docker.io`, where a one-component name gets `library/`; no tag and no digest
    /// means `:latest`.
    pub fn parse(reference: &str) -> Result<ImageRef> {
        let bad = |reason: String| OciError::InvalidReference { reference: reference.to_owned(), reason };
        if reference.is_empty() {
            return Err(bad("empty reference".into()));
        }
        if reference.len() > 4096 || reference.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("whitespace or control characters, or too long".into()));
        }
        let (rest, digest) = match reference.rsplit_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(bad)?;
                (rest, Some(digest.to_owned()))
            }
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                validate_tag(tag).map_err(bad)?;
                (&rest[..last_slash + i], Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("missing repository name".into()));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                validate_registry(first).map_err(bad)?;
                let registry = if first == "index.docker.io" || first == "registry-1.docker.io" {
                    DEFAULT_REGISTRY
                } else {
                    first
                };
                (registry.to_owned(), path.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(bad)?;
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            _ => tag,
        };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// What to ask the manifests endpoint for: the digest if there is one, else the tag.
    pub fn reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or(DEFAULT_TAG)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = OciError;
    fn from_str(s: &str) -> Result<ImageRef> {
        ImageRef::parse(s)
    }
}

/// Check `sha256:<64 lowercase hex>` (the only algorithm this client verifies).
pub(crate) fn validate_digest(digest: &str) -> Result<(), String> {
    let Some((algo, hex)) = digest.split_once(':') else {
        return Err(format!("digest {digest:?} is not of the form sha256:<hex>"));
    };
    if algo != "sha256" {
        return Err(format!("unsupported digest algorithm {algo:?} (only sha256 is supported)"));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("digest {digest:?} must be sha256: followed by 64 lowercase hex digits"));
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?} (at most 128 of [A-Za-z0-9_.-], not starting with . or -)"))
    }
}

fn validate_registry(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !host.starts_with('[') || name.ends_with(']') => (name, Some(port)),
        _ => (host, None),
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("invalid registry port in {host:?}"));
        }
    }
    let name_ok = if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && !name.starts_with(['.', '-'])
            && !name.ends_with(['.', '-'])
    };
    if name_ok {
        Ok(())
    } else {
        Err(format!("invalid registry host {host:?}"))
    }
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters".into());
    }
    for component in repo.split('/') {
        if component.is_empty() {
            return Err(format!("empty path component in repository {repo:?}"));
        }
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("repository name {repo:?} must be lowercase"));
        }
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bytes = component.as_bytes();
        let ends_ok = alnum(bytes[0]) && alnum(bytes[bytes.len() - 1]);
        let chars_ok = bytes.iter().all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-'));
        // Separators: one `.`, one or two `_`, or any run of `-`.
        let seps_ok = component
            .split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .all(|s| s == "." || s == "_" || s == "__" || s.bytes().all(|b| b == b'-'));
        if !(ends_ok && chars_ok && seps_ok) {
            return Err(format!(
                "invalid repository path component {component:?} (lowercase letters and digits, \
                 separated by `.`, `_`, `__` or dashes)"
            ));
        }
    }
    Ok(())
}

/// An OS/architecture pair (with an optional variant) to pick from an image index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`, what Flare's workers run.
    pub fn linux_amd64() -> Platform {
        Platform { os: "linux".into(), architecture: "amd64".into(), variant: None }
    }

    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: (*os).into(), architecture: (*arch).into(), variant: None })
            }
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: (*os).into(),
                    architecture: (*arch).into(),
                    variant: Some((*variant).into()),
                })
            }
            _ => Err(OciError::Usage(format!("invalid platform {s:?} (expected os/arch[/variant])"))),
        }
    }
}

impl Default for Platform {
    fn default() -> Platform {
        Platform::linux_amd64()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_defaults() {
        let r = p("debian:bookworm-slim");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("docker.io", "library/debian"));
        assert_eq!(r.tag.as_deref(), Some("bookworm-slim"));
        let r = p("python");
        assert_eq!(r.to_string(), "docker.io/library/python:latest");
        let r = p("someone/app");
        assert_eq!(r.to_string(), "docker.io/someone/app:latest");
        let r = p("index.docker.io/library/alpine:3");
        assert_eq!(r.to_string(), "docker.io/library/alpine:3");
    }

    #[test]
    fn registries_ports_digests() {
        let r = p("localhost:5000/team/app:v1.2");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.reference(), "v1.2");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("ghcr.io/o/n@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), d);
        let r = p(&format!("127.0.0.1:1234/n:t@{d}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.reference(), d);
        let r = p("localhost/app");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "app"));
        let r = p("[::1]:5000/app:x");
        assert_eq!(r.registry, "[::1]:5000");
    }

    #[test]
    fn bad_references() {
        for (s, needle) in [
            ("", "empty"),
            ("Debian", "lowercase"),
            ("debian:", "invalid tag"),
            ("debian:-x", "invalid tag"),
            ("debian@sha256:abc", "64 lowercase hex"),
            ("debian@md5:abc", "unsupported digest algorithm"),
            ("localhost:0/x", "port"),
            ("a//b", "empty path component"),
            ("a/b-/c", "invalid repository path component"),
            ("deb ian", "whitespace"),
            ("localhost:5000/", "empty path component"),
        ] {
            let err = ImageRef::parse(s).expect_err(s).to_string();
            assert!(err.contains(needle), "{s:?}: {err}");
        }
    }

    #[test]
    fn platforms() {
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        assert_eq!(Platform::parse("linux/arm64/v8").unwrap().variant.as_deref(), Some("v8"));
        assert!(Platform::parse("linux").is_err());
    }
}
