//! The worker's one container path: a [`CommandSpec`] with its stdio becomes a running
//! container through [`spawn`], whether it runs the Python runner (a function container,
//! `run_container_in`) or a plain command ([`Sandboxes`]: image build steps today,
//! sandboxes later).

use std::io::Read;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use flare_runtime::{
    pipe_cloexec, CommandExit, CommandRunner, CommandSpec, Container, LogDecoder, Runtime, RuntimeError,
    UserNamespace,
};

/// Starts `spec` with its stdout, stderr and extra fds (blocking: call it off the async
/// threads).
pub(crate) fn spawn(
    runtime: &Runtime,
    spec: CommandSpec,
    stdout: OwnedFd,
    stderr: OwnedFd,
    extra_fds: Vec<(OwnedFd, RawFd)>,
) -> Result<Container, RuntimeError> {
    runtime.spawn(spec.with_stdio(stdout, stderr, extra_fds))
}

/// Whether the uid map at `uid_map` (a process's `/proc/<pid>/uid_map`) is a user
/// namespace's other than the host's (not the identity of all ids); `None` if it cannot
/// be read (the process is gone).
fn in_user_namespace(uid_map: &Path) -> Option<bool> {
    let map = std::fs::read_to_string(uid_map).ok()?;
    let identity = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    Some(!identity)
}

/// Runs plain commands in containers on this machine's runtime.
pub struct Sandboxes {
    runtime: Arc<Runtime>,
}

impl Sandboxes {
    pub fn new(runtime: Arc<Runtime>) -> Sandboxes {
        Sandboxes { runtime }
    }
}

impl CommandRunner for Sandboxes {
    fn userns(&self) -> Option<UserNamespace> {
        self.runtime.userns()
    }

    fn nat_available(&self) -> Option<String> {
        self.runtime.nat_available()
    }

    fn run(&self, spec: CommandSpec, output: &mut dyn FnMut(&str)) -> Result<CommandExit, RuntimeError> {
        let pipe_err = |e| RuntimeError::Io { context: "pipe".into(), source: e };
        let (out_r, out_w) = pipe_cloexec().map_err(pipe_err)?;
        let err_w = out_w.try_clone().map_err(pipe_err)?;
        let id = spec.id.clone();
        let mut container = spawn(&self.runtime, spec, out_w, err_w, vec![])?;
        // Read now: the process stays (at least a zombie) until `wait` reaps it.
        let in_userns = in_user_namespace(Path::new(&format!("/proc/{}/uid_map", container.pid())));
        if in_userns == Some(false) && self.runtime.userns().is_some() {
            tracing::debug!(container = %id, "command runs without a user namespace although one is configured");
        }
        let mut reader = std::fs::File::from(out_r);
        let mut buf = [0u8; 16 * 1024];
        let mut decoder = LogDecoder::new(0);
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => output(&decoder.push(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let exit = container.wait()?;
        if let Err(e) = container.cleanup() {
            tracing::warn!(container = %id, error = %e, "container cleanup incomplete");
        }
        Ok(CommandExit { exit, in_userns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_namespace_from_uid_map() {
        let d = std::env::temp_dir().join(format!("flare-worker-uidmap-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let host = d.join("host");
        std::fs::write(&host, "         0          0 4294967295\n").unwrap();
        let ns = d.join("ns");
        std::fs::write(&ns, "         0 1000000000      65536\n").unwrap();
        assert_eq!(in_user_namespace(&host), Some(false));
        assert_eq!(in_user_namespace(&ns), Some(true));
        assert_eq!(in_user_namespace(&d.join("gone")), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
