//! What to run in a container, apart from its stdio: the value spec builders make
//! (function containers, image build steps, sandboxes), and the one path that runs a
//! plain command in a container and streams its output.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use crate::{Bind, ContainerSpec, ExitInfo, Limits, Network, Rootfs, RuntimeError, UserNamespace};

/// The base environment of every container (the lowest precedence: images, functions,
/// build steps and the platform set theirs over it).
pub const BASE_ENV: [(&str, &str); 3] = [
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

/// [`BASE_ENV`] as an environment to add to.
pub fn base_env() -> Vec<(String, String)> {
    BASE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

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
    /// Keep the root overlay's upper layer in `<dir>/upper` (work dir `<dir>/work`) on
    /// this host directory instead of a per-container tmpfs, so that what the container
    /// wrote survives it (image builds snapshot it as a layer). `dir` must exist.
    pub upper_dir: Option<PathBuf>,
    /// Run the program itself as the container's pid 1, without the runtime's init, so
    /// that CRIU can checkpoint the tree: the runtime's init is a fork of the spawning
    /// process that never execs (not dumpable, and it maps the spawner's binary). The
    /// program then reaps its own children and gets only the signals it handles. Needs
    /// [`Network::Isolated`] (a pooled NAT namespace belongs to the host's user namespace
    /// and cannot be restored into a new one).
    pub checkpointable: bool,
}

impl CommandSpec {
    /// The spec to spawn, with the container's stdout, stderr and extra fds.
    pub fn with_stdio(
        self,
        stdout: OwnedFd,
        stderr: OwnedFd,
        extra_fds: Vec<(OwnedFd, RawFd)>,
    ) -> ContainerSpec {
        ContainerSpec { command: self, stdout, stderr, extra_fds }
    }
}

/// Sets `key` to `value` in `env`, replacing an earlier value (the later source wins and
/// the variable moves to the end, as if exported again).
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: String) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value));
}

/// How a plain command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandExit {
    pub exit: ExitInfo,
    /// Whether it ran in a user namespace (`None`: unknown, it was gone too soon).
    pub in_userns: Option<bool>,
}

/// Runs plain commands in containers: image build steps today, sandboxes later. A spec
/// (argv, env, root, binds in order, limits, network) in; its output and how it ended
/// out. Implemented by the worker's container path (`flare_worker::sandbox`), so build
/// steps and function containers start the same way.
pub trait CommandRunner: Send + Sync {
    /// The user namespace commands run in, if any (their root's host ids).
    fn userns(&self) -> Option<UserNamespace>;
    /// Why commands get no outbound network; `None`: NAT works.
    fn nat_available(&self) -> Option<String>;
    /// Runs `spec` to its end (blocking). `output` gets its stdout and stderr as one
    /// stream, in order, in whole UTF-8 characters.
    fn run(&self, spec: CommandSpec, output: &mut dyn FnMut(&str)) -> Result<CommandExit, RuntimeError>;
}
