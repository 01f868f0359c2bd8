//! What to run in a container, apart from its stdio: the value spec builders make
//! (function containers, image build steps, sandboxes), and the one path that runs a
//! plain command in a container and streams its output.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use crate::{Bind, ContainerSpec, Limits, Network, Rootfs};

/// A [`ContainerSpec`] without its file descriptors: a plain value that pure code builds
/// and tests compare; [`CommandSpec::with_stdio`] makes the spec once the pipes exist.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    /// `[a-zA-Z0-9_-]+`, unique among live containers.
    pub id: String,
    pub hostname: String,
    /// `argv[0]` is an absolute path inside the container.
    pub argv: Vec<String>,
    /// The full environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub rootfs: Rootfs,
    /// Applied in order after the base file system.
    pub binds: Vec<Bind>,
    pub limits: Limits,
    pub network: Network,
    /// See [`ContainerSpec::upper_dir`].
    pub upper_dir: Option<PathBuf>,
}

impl CommandSpec {
    /// The spec to spawn, with the container's stdout, stderr and extra fds.
    pub fn with_stdio(
        self,
        stdout: OwnedFd,
        stderr: OwnedFd,
        extra_fds: Vec<(OwnedFd, RawFd)>,
    ) -> ContainerSpec {
        ContainerSpec {
            id: self.id,
            hostname: self.hostname,
            argv: self.argv,
            env: self.env,
            cwd: self.cwd,
            rootfs: self.rootfs,
            binds: self.binds,
            limits: self.limits,
            network: self.network,
            stdout,
            stderr,
            extra_fds,
            upper_dir: self.upper_dir,
        }
    }
}

/// Sets `key` to `value` in `env`, replacing an earlier value (the later source wins and
/// the variable moves to the end, as if exported again).
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: String) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value));
}
