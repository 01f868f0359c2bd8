//! What the SDK sends: an image spec (a base and layers), as in `docs/IMAGES.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// An image: a base, then layers applied in order, then mounts added at container start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSpec {
    pub base: Base,
    #[serde(default)]
    pub layers: Vec<Layer>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub force_build: bool,
    /// The SDK mount (`FLARE_HOME/mounts/<id>`, a mount id, never a path; the SDK sends
    /// its `flare/` and `cloudpickle/` through the store as for functions): `run_function`
    /// steps import cloudpickle from its `cloudpickle/`.
    #[serde(default)]
    pub sdk_mount: Option<String>,
    /// Legacy: a host path to the client's cloudpickle. Bound into `run_function` steps
    /// only when no `sdk_mount` is sent and the operator allows the path
    /// (`--host-bind-allow`); refused otherwise (see `Builder::check_spec`).
    #[serde(default)]
    pub cloudpickle_path: Option<String>,
}

/// Where an image starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Base {
    DebianSlim {
        #[serde(default)]
        python_version: Option<String>,
    },
    Registry {
        #[serde(rename = "ref")]
        reference: String,
        #[serde(default)]
        insecure: bool,
    },
    /// The caller's Python environment: its directories (`roots`, absolute) on the
    /// host's system dirs. Sent in full (`roots`) or, once the server has it, by `key`.
    LocalPython {
        #[serde(default)]
        python: Option<String>,
        #[serde(default)]
        key: Option<String>,
        #[serde(default)]
        roots: Option<Vec<EnvRoot>>,
    },
}

/// One directory of a captured Python environment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvRoot {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

/// Options shared by the pip steps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PipOptions {
    #[serde(default)]
    pub extra_options: String,
    #[serde(default)]
    pub index_url: Option<String>,
    #[serde(default)]
    pub extra_index_url: Option<String>,
    #[serde(default)]
    pub find_links: Option<String>,
    #[serde(default)]
    pub pre: bool,
}

/// One build step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    AptInstall {
        packages: Vec<String>,
    },
    PipInstall {
        packages: Vec<String>,
        #[serde(flatten)]
        options: PipOptions,
    },
    PipInstallFromRequirements {
        requirements: String,
        #[serde(flatten)]
        options: PipOptions,
    },
    RunCommands {
        commands: Vec<String>,
    },
    Env {
        vars: BTreeMap<String, String>,
    },
    Workdir {
        path: String,
    },
    Copy {
        dest: String,
        entries: Vec<FileEntry>,
    },
    RunFunction {
        name: String,
        pickled: String,
    },
}

/// Local files mounted read-only at `dest` when a container starts (not baked).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MountSpec {
    pub dest: String,
    pub entries: Vec<FileEntry>,
}

/// One entry of an uploaded file list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileEntry {
    File {
        path: String,
        #[serde(default = "default_file_mode")]
        mode: u32,
        digest: String,
        size: u64,
        /// Modification time (seconds); kept so timestamp-checked `.pyc` files stay valid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtime: Option<i64>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Dir {
        path: String,
        #[serde(default = "default_dir_mode")]
        mode: u32,
    },
}

fn default_file_mode() -> u32 {
    0o644
}

fn default_dir_mode() -> u32 {
    0o755
}

impl FileEntry {
    pub fn path(&self) -> &str {
        match self {
            FileEntry::File { path, .. } | FileEntry::Symlink { path, .. } | FileEntry::Dir { path, .. } => {
                path
            }
        }
    }
}

/// `/a/b` (absolute, no `..`, no empty or `.` parts) as `a/b`; `/` as the empty string.
pub fn abs_dest(dest: &str) -> Result<String, ImageError> {
    if !dest.starts_with('/') {
        return Err(ImageError::Invalid(format!("destination {dest:?} must be an absolute path")));
    }
    let parts: Vec<&str> = dest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(ImageError::Invalid(format!("destination {dest:?} must not contain '.' or '..'")));
    }
    Ok(parts.join("/"))
}

/// Shell-quote one word for `/bin/sh -c`.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=./:@+,%^".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Layer {
    /// A one-line description for progress output and `flare image inspect`.
    pub fn describe(&self) -> String {
        fn short(s: String) -> String {
            if s.chars().count() > 120 {
                format!("{}…", s.chars().take(119).collect::<String>())
            } else {
                s
            }
        }
        short(match self {
            Layer::AptInstall { packages } => format!("apt install {}", packages.join(" ")),
            Layer::PipInstall { packages, .. } => format!("pip install {}", packages.join(" ")),
            Layer::PipInstallFromRequirements { requirements, .. } => {
                format!("pip install -r requirements.txt ({} lines)", requirements.lines().count())
            }
            Layer::RunCommands { commands } => format!("run {}", commands.join(" && ")),
            Layer::Env { vars } => {
                format!("env {}", vars.keys().map(|k| format!("{k}=…")).collect::<Vec<_>>().join(" "))
            }
            Layer::Workdir { path } => format!("workdir {path}"),
            Layer::Copy { dest, entries } => format!("copy {} entries to {dest}", entries.len()),
            Layer::RunFunction { name, .. } => format!("run function {name}"),
        })
    }

    /// The shell commands a step runs in a build container (`python` is the image's).
    pub fn commands(&self, python: Option<&str>) -> Result<Vec<String>, ImageError> {
        let need_python = || {
            python.map(str::to_owned).ok_or_else(|| {
                ImageError::Invalid(format!(
                    "{}: the image has no Python (add one, e.g. .apt_install(\"python3\", \"python3-pip\"))",
                    self.describe()
                ))
            })
        };
        Ok(match self {
            Layer::AptInstall { packages } => {
                if packages.is_empty() {
                    return Ok(vec![]);
                }
                let pkgs: Vec<String> = packages.iter().map(|p| sh_quote(p)).collect();
                vec![format!(
                    "apt-get update -q && apt-get install -y -q --no-install-recommends {} && apt-get clean && rm -rf /var/lib/apt/lists/*",
                    pkgs.join(" ")
                )]
            }
            Layer::PipInstall { packages, options } => {
                if packages.is_empty() {
                    return Ok(vec![]);
                }
                let pkgs: Vec<String> = packages.iter().map(|p| sh_quote(p)).collect();
                vec![format!("{} {}", pip_prefix(&need_python()?, options), pkgs.join(" "))]
            }
            Layer::PipInstallFromRequirements { options, .. } => {
                vec![format!("{} -r {REQUIREMENTS_IN_BUILD}", pip_prefix(&need_python()?, options))]
            }
            Layer::RunCommands { commands } => commands.clone(),
            Layer::RunFunction { .. } => {
                vec![format!("{} -c {}", sh_quote(&need_python()?), sh_quote(RUN_FUNCTION_SNIPPET))]
            }
            Layer::Env { .. } | Layer::Workdir { .. } | Layer::Copy { .. } => vec![],
        })
    }
}

/// Where a requirements file is placed for the step that installs it (not kept).
pub const REQUIREMENTS_IN_BUILD: &str = "/run/flare-build/requirements.txt";
/// Where a pickled `run_function` callable is placed for its step.
pub const FUNCTION_IN_BUILD: &str = "/run/flare-build/function.pkl";

const RUN_FUNCTION_SNIPPET: &str = "import sys; sys.path.insert(0, '/__flare'); import cloudpickle; \
f = cloudpickle.loads(open('/run/flare-build/function.pkl', 'rb').read()); f()";

fn pip_prefix(python: &str, o: &PipOptions) -> String {
    let mut s = format!(
        "{} -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore",
        sh_quote(python)
    );
    if let Some(u) = &o.index_url {
        s.push_str(&format!(" --index-url {}", sh_quote(u)));
    }
    if let Some(u) = &o.extra_index_url {
        s.push_str(&format!(" --extra-index-url {}", sh_quote(u)));
    }
    if let Some(u) = &o.find_links {
        s.push_str(&format!(" --find-links {}", sh_quote(u)));
    }
    if o.pre {
        s.push_str(" --pre");
    }
    if !o.extra_options.trim().is_empty() {
        // Options the user wrote for a shell, as Modal passes them.
        s.push(' ');
        s.push_str(o.extra_options.trim());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_describes() {
        let j = serde_json::json!({
            "base": {"type": "debian_slim", "python_version": "3.11"},
            "layers": [
                {"type": "apt_install", "packages": ["curl"]},
                {"type": "pip_install", "packages": ["requests==2.32.3"], "pre": true, "index_url": "http://x/simple"},
                {"type": "env", "vars": {"MODE": "prod"}},
                {"type": "copy", "dest": "/app", "entries": [
                    {"kind": "file", "path": "a.py", "mode": 420, "digest": "blake3:00", "size": 1},
                    {"kind": "symlink", "path": "l", "target": "../x"},
                    {"kind": "dir", "path": "d"}
                ]}
            ],
            "mounts": [{"dest": "/root/mylib", "entries": []}]
        });
        let spec: ImageSpec = serde_json::from_value(j).unwrap();
        assert_eq!(spec.layers.len(), 4);
        assert_eq!(spec.layers[0].describe(), "apt install curl");
        let cmds = spec.layers[1].commands(Some("/usr/bin/python3")).unwrap();
        assert!(cmds[0].contains("--index-url http://x/simple --pre requests==2.32.3"), "{cmds:?}");
        assert!(spec.layers[1].commands(None).is_err());
        assert_eq!(sh_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(abs_dest("/root//mylib/").unwrap(), "root/mylib");
        assert!(abs_dest("root").is_err());
        assert!(abs_dest("/a/../b").is_err());
    }
}
