//! Pre-started runners: containers started before anyone asked for them, with the
//! interpreter up and the runner, cloudpickle and the SDK imported, owned by no app until
//! one is assigned, then that app's only (a runner never returns to the pool).
//!
//! What a start fixes and no app owns is the *template*: the container's spec with the
//! code mount and the API socket left out (image root, interpreter, network mode, the
//! image's mounts and environment dirs, the SDK mount, the base environment). A function
//! whose spec has the template of an idle runner gets that runner; at assignment the worker
//! attaches its code mount (and re-attaches binds that live under it), writes its cgroup
//! limits and sends its whole environment and working dir in INIT (docs/PROTOCOL.md §2).
//! Functions whose environment differs from the template in variables read only when a
//! process starts (`PYTHON*`, `LD_*`, locale, ...) never use one.
//!
//! The policy (which templates get runners, how many, which to stop) is pure:
//! [`plan`]. [`Pool`] holds the runners and carries the plan out.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flare_runtime::{set_env, Bind, CommandSpec, Container, Limits};

use crate::binds::BindSources;
use crate::{sandbox, WorkerConfig};

/// How many runners a worker keeps started, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrestartConfig {
    /// Idle pre-started runners on this worker at most, all templates together (0: off).
    pub runners: usize,
    /// At most this many of one template.
    pub per_template: usize,
    /// A template not used for this long gets no runners (its idle ones are stopped).
    pub idle_ttl: Duration,
    /// The memory limit of an idle runner (MiB); the worker offers the control plane
    /// `runners` times this less than it has.
    pub memory_mb: u64,
}

impl Default for PrestartConfig {
    /// Sized for a laptop: two idle runners (about 10 MB each in use), one per template,
    /// kept for templates used in the last 10 minutes.
    fn default() -> Self {
        PrestartConfig { runners: 2, per_template: 1, idle_ttl: Duration::from_secs(600), memory_mb: 256 }
    }
}

impl PrestartConfig {
    /// Memory (MiB) the idle runners may hold together: not offered to the control plane.
    pub fn reserved_mb(&self) -> u64 {
        self.runners as u64 * self.memory_mb
    }
}

/// How long after a start the pool starts runners to replace what it used.
pub(crate) const REFILL_DELAY: Duration = Duration::from_millis(100);

/// Stands for the code mount's source in a template.
const CODE_MARKER: &str = "<code mount>";
/// Stands for the API socket's source in a template.
const API_MARKER: &str = "<api socket>";
/// Where the code mount goes in a function container.
const CODE_DST: &str = "/root";

/// Whether `key` is an environment variable that takes effect only when a process (the
/// interpreter, the C library, the dynamic loader) starts, so setting it later, as an
/// assignment does, would not be the same as starting with it.
pub(crate) fn startup_sensitive(key: &str) -> bool {
    key.starts_with("PYTHON")
        || key.starts_with("LD_")
        || key.starts_with("LC_")
        || key.starts_with("MALLOC_")
        || matches!(key, "LANG" | "LANGUAGE" | "HOME" | "TZ" | "GLIBC_TUNABLES" | "TMPDIR" | "PATH")
}

/// The template of a function container's `spec`, or why it cannot use a pre-started
/// runner. `pool_env` is the environment the runner starts with (the function's without
/// its own variables and the per-container ones); `code` and `api_socket` are the sources
/// of the code mount and the API socket in `spec`.
pub(crate) fn template(
    spec: &CommandSpec,
    pool_env: &[(String, String)],
    code: Option<&Path>,
    api_socket: &Path,
) -> Result<CommandSpec, String> {
    if spec.upper_dir.is_some() {
        return Err("the upper layer is a host dir".into());
    }
    if spec.checkpointable {
        // A memory snapshot's container: its program is pid 1, made for a checkpoint.
        return Err("it is checkpointable (memory snapshot)".into());
    }
    let get = |env: &[(String, String)], k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
    for (k, v) in &spec.env {
        if get(pool_env, k).as_ref() != Some(v) && startup_sensitive(k) {
            return Err(format!("its environment sets {k}, which takes effect only at start"));
        }
    }
    for (k, _) in pool_env {
        if get(&spec.env, k).is_none() && startup_sensitive(k) {
            return Err(format!("its environment unsets {k}, which takes effect only at start"));
        }
    }
    let binds = spec
        .binds
        .iter()
        .map(|b| {
            let mut b = b.clone();
            if Some(b.src.as_path()) == code && b.dst == Path::new(CODE_DST) {
                b.src = CODE_MARKER.into();
            } else if b.src == api_socket {
                b.src = API_MARKER.into();
            }
            b
        })
        .collect();
    Ok(CommandSpec {
        id: String::new(),
        env: pool_env.to_vec(),
        binds,
        limits: Limits { disk_bytes: spec.limits.disk_bytes, ..Limits::default() },
        ..spec.clone()
    })
}

/// The binds to attach to a pre-started runner for `binds` (a function container's, in
/// mount order): the code mount at `/root`, then every later bind under `/root` (an
/// environment dir or a start-time mount that the code mount would otherwise cover).
pub(crate) fn attach_list(binds: &[Bind]) -> Vec<Bind> {
    let Some(at) = binds.iter().position(|b| b.dst == Path::new(CODE_DST)) else { return Vec::new() };
    let mut out = vec![binds[at].clone()];
    out.extend(
        binds[at + 1..]
            .iter()
            .filter(|b| b.dst.starts_with(CODE_DST) && b.dst != Path::new(CODE_DST))
            .cloned(),
    );
    out
}

/// What [`plan`] sees of one template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TemplateState {
    pub key: u64,
    pub last_used: Instant,
    pub idle: usize,
    pub starting: usize,
}

/// What to do now: start one runner per entry of `start`, stop one idle runner per entry
/// of `stop` (template keys, repeated for several).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub start: Vec<u64>,
    pub stop: Vec<u64>,
}

/// The pool's policy. Templates used within `idle_ttl`, most recently used first, are
/// each given up to `per_template` runners while the total stays within `runners`; every
/// other template gets none. Runners being started count as there; only idle ones are
/// stopped (a template over its share, or expired).
pub(crate) fn plan(cfg: &PrestartConfig, templates: &[TemplateState], now: Instant) -> Plan {
    let mut order: Vec<&TemplateState> = templates.iter().collect();
    order.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
    let mut budget = cfg.runners;
    let mut out = Plan::default();
    for t in order {
        let fresh = now.saturating_duration_since(t.last_used) < cfg.idle_ttl;
        let want = if fresh { cfg.per_template.min(budget) } else { 0 };
        budget -= want;
        let have = t.idle + t.starting;
        out.start.extend(std::iter::repeat_n(t.key, want.saturating_sub(have)));
        out.stop.extend(std::iter::repeat_n(t.key, t.idle.min(have.saturating_sub(want))));
    }
    out
}

/// A started runner waiting for an assignment: the container and the worker's ends of
/// its frame pipes (fd 3 and fd 4), output pipes and API socket.
pub(crate) struct Runner {
    pub container: Container,
    /// The read end of the pipe the runner writes its frames on (its fd 3).
    pub frames_out: OwnedFd,
    /// The write end of the pipe the runner reads frames from (its fd 4).
    pub frames_in: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub listener: std::os::unix::net::UnixListener,
    /// The API socket's path and the runner's dir (its `/root` placeholder), removed
    /// when the runner (or the container it became) is done.
    pub paths: RunnerPaths,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("container", &self.container.id()).finish()
    }
}

pub(crate) struct RunnerPaths {
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for RunnerPaths {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Entry {
    key: u64,
    template: CommandSpec,
    /// The bind sources of the function the template was recorded from: started
    /// runners get these with the code mount replaced by an empty placeholder.
    sources: BindSources,
    last_used: Instant,
    idle: Vec<Runner>,
    starting: usize,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    next_key: u64,
    next_id: u64,
    shut: bool,
}

/// The worker's pre-started runners.
pub(crate) struct Pool {
    cfg: PrestartConfig,
    state: Mutex<State>,
}

impl Pool {
    pub fn new(cfg: PrestartConfig) -> Arc<Pool> {
        Arc::new(Pool { cfg, state: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.cfg.runners > 0 && self.cfg.per_template > 0
    }

    /// An idle runner of `template`, if one is alive; the template counts as used now.
    pub fn take(&self, template: &CommandSpec) -> Option<Runner> {
        let mut st = self.lock();
        let e = st.entries.iter_mut().find(|e| &e.template == template)?;
        e.last_used = Instant::now();
        while let Some(mut r) = e.idle.pop() {
            if matches!(r.container.try_wait(), Ok(None)) {
                return Some(r);
            }
            tracing::debug!(runner = %r.container.id(), "pre-started runner had exited; dropped");
        }
        None
    }

    /// Note that a container of `template` (bound from `sources`) started now.
    pub fn used(&self, template: CommandSpec, sources: &BindSources) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(e) = st.entries.iter_mut().find(|e| e.template == template) {
            e.last_used = now;
            return;
        }
        let key = st.next_key;
        st.next_key += 1;
        st.entries.push(Entry {
            key,
            template,
            sources: sources.clone(),
            last_used: now,
            idle: Vec::new(),
            starting: 0,
        });
    }

    /// [`Pool::reconcile`] after [`REFILL_DELAY`], so that starting a runner does not take
    /// the CPU from the start that used one (its first input is still on its way).
    pub fn reconcile_soon(self: &Arc<Self>, cfg: &Arc<WorkerConfig>) {
        if !self.enabled() {
            return;
        }
        let (pool, cfg) = (self.clone(), cfg.clone());
        tokio::spawn(async move {
            tokio::time::sleep(REFILL_DELAY).await;
            pool.reconcile(&cfg);
        });
    }

    /// Carries out [`plan`]: starts runners (on blocking threads, one after another) and
    /// stops idle ones; forgets expired templates that have none left.
    pub fn reconcile(self: &Arc<Self>, cfg: &Arc<WorkerConfig>) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let (starts, stopped) = {
            let mut st = self.lock();
            if st.shut {
                return;
            }
            let states: Vec<TemplateState> = st
                .entries
                .iter()
                .map(|e| TemplateState {
                    key: e.key,
                    last_used: e.last_used,
                    idle: e.idle.len(),
                    starting: e.starting,
                })
                .collect();
            let p = plan(&self.cfg, &states, now);
            let mut stopped = Vec::new();
            for key in p.stop {
                if let Some(r) = st.entries.iter_mut().find(|e| e.key == key).and_then(|e| e.idle.pop()) {
                    stopped.push(r);
                }
            }
            let mut starts = Vec::new();
            for key in p.start {
                let id = format!("pre-{}-{}", cfg.id, st.next_id);
                st.next_id += 1;
                if let Some(e) = st.entries.iter_mut().find(|e| e.key == key) {
                    e.starting += 1;
                    starts.push((key, id, e.template.clone(), e.sources.clone()));
                }
            }
            let ttl = self.cfg.idle_ttl;
            st.entries.retain(|e| {
                now.saturating_duration_since(e.last_used) < ttl || !e.idle.is_empty() || e.starting > 0
            });
            (starts, stopped)
        };
        if !stopped.is_empty() {
            tokio::task::spawn_blocking(move || drop(stopped));
        }
        if starts.is_empty() {
            return;
        }
        let pool = self.clone();
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            for (key, id, template, sources) in starts {
                {
                    let mut st = pool.lock();
                    if st.shut {
                        if let Some(e) = st.entries.iter_mut().find(|e| e.key == key) {
                            e.starting -= 1;
                        }
                        continue;
                    }
                }
                let started = start_runner(&cfg, &pool.cfg, &id, &template, &sources);
                let mut st = pool.lock();
                let shut = st.shut;
                let entry = st.entries.iter_mut().find(|e| e.key == key);
                match (started, entry) {
                    (Ok(r), Some(e)) if !shut => {
                        e.starting -= 1;
                        tracing::debug!(runner = %id, "pre-started runner idle");
                        e.idle.push(r);
                    }
                    (started, _) => {
                        if let Err(err) = &started {
                            tracing::warn!(runner = %id, error = %err, "pre-starting a runner failed");
                        }
                        // Stopped before `starting` drops, so that shutdown waits for it.
                        drop(st);
                        drop(started);
                        if let Some(e) = pool.lock().entries.iter_mut().find(|e| e.key == key) {
                            e.starting -= 1;
                        }
                    }
                }
            }
        });
    }

    /// Stops every idle runner and starts no more (worker shutdown). Blocks until they
    /// are gone, and until runners being started have been started and dropped (at most
    /// 10 s: a start that hangs is ended by the runtime's own set-up timeout).
    pub fn shutdown(&self) {
        self.lock().shut = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.lock().entries.iter().any(|e| e.starting > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let runners: Vec<Runner> = {
            let mut st = self.lock();
            st.entries.iter_mut().flat_map(|e| e.idle.drain(..)).collect()
        };
        for r in runners {
            let id = r.container.id().to_owned();
            if let Err(e) = r.container.cleanup() {
                tracing::warn!(runner = %id, error = %e, "pre-started runner cleanup incomplete");
            }
        }
    }

    /// Ids of the idle runners' containers.
    pub fn idle_ids(&self) -> Vec<String> {
        self.lock().entries.iter().flat_map(|e| e.idle.iter().map(|r| r.container.id().to_owned())).collect()
    }
}

/// Removes the runner dirs (`home/prestart`) and runner sockets (`pre-*.sock`) an earlier
/// run of this worker left behind (call at start, before any runner exists).
pub(crate) fn remove_leftovers(home: &Path, socket_dir: &Path) {
    let _ = std::fs::remove_dir_all(home.join("prestart"));
    if let Ok(rd) = std::fs::read_dir(socket_dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("pre-") && name.ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Starts one runner of `template`: its own dir with an empty `/root` placeholder (with
/// the mountpoints of binds under it), its API socket, the template's env plus
/// `FLARE_PRESTART=1`, the pool's limits.
fn start_runner(
    cfg: &WorkerConfig,
    pool: &PrestartConfig,
    id: &str,
    template: &CommandSpec,
    sources: &BindSources,
) -> Result<Runner, crate::WorkerError> {
    use crate::WorkerError;
    let io = |what: &str, e: std::io::Error| WorkerError::io(format!("pre-start {id}: {what}"), e);
    let dir = cfg.home.join("prestart").join(id);
    let socket = cfg.socket_dir.join(format!("{id}.sock"));
    let paths = RunnerPaths { socket: socket.clone(), dir: dir.clone() };
    let placeholder = dir.join("root");
    std::fs::create_dir_all(&placeholder).map_err(|e| io("placeholder dir", e))?;
    std::fs::create_dir_all(&cfg.socket_dir).map_err(|e| io("api socket dir", e))?;
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(|e| io("api socket", e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&cfg.socket_dir, std::fs::Permissions::from_mode(0o700));
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| io("api socket", e))?;
    }
    let mut srcs = sources.clone();
    if srcs.code.is_some() {
        srcs.code = Some(placeholder);
    }
    srcs.api_socket = socket;
    crate::binds::make_code_mountpoints(&srcs).map_err(|e| io("mountpoints", e))?;
    let mut spec = template.clone();
    spec.id = id.to_owned();
    spec.binds = srcs.plan();
    set_env(&mut spec.env, "FLARE_PRESTART", "1".into());
    spec.limits = Limits {
        cpu_millicores: Some(1000),
        memory_bytes: Some(pool.memory_mb << 20),
        disk_bytes: template.limits.disk_bytes,
        ..Limits::default()
    };
    // The container protocol's two frame pipes (docs/PROTOCOL.md §2), as for any container.
    let (frames_r, frames_w) = crate::frame_pipe()?;
    let (to_r, to_w) = crate::frame_pipe()?;
    let (out_r, out_w) = crate::pipe().map_err(|e| io("pipe", e))?;
    let (err_r, err_w) = crate::pipe().map_err(|e| io("pipe", e))?;
    let container = sandbox::spawn(&cfg.runtime, spec, out_w, err_w, vec![(frames_w, 3), (to_r, 4)])
        .map_err(WorkerError::Spawn)?;
    Ok(Runner {
        container,
        frames_out: frames_r,
        frames_in: to_w,
        stdout: out_r,
        stderr: err_r,
        listener,
        paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_runtime::{Network, Rootfs};

    fn env(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn spec(env_kv: &[(&str, &str)], code: &str, sock: &str) -> CommandSpec {
        CommandSpec {
            id: "ct-1".into(),
            hostname: "flare".into(),
            argv: vec!["/usr/bin/python3".into(), "-m".into(), "flare._runtime".into()],
            env: env(env_kv),
            cwd: "/root".into(),
            rootfs: Rootfs::Host,
            binds: vec![
                Bind { src: code.into(), dst: "/root".into(), readonly: true },
                Bind { src: "/opt/env".into(), dst: "/root/.pyenv".into(), readonly: true },
                Bind { src: "/m/sdk/flare".into(), dst: "/__flare/flare".into(), readonly: true },
                Bind { src: sock.into(), dst: "/__flare/api.sock".into(), readonly: false },
            ],
            limits: Limits { memory_bytes: Some(1 << 30), cpu_millicores: Some(250), ..Limits::default() },
            network: Network::Nat,
            upper_dir: None,
            checkpointable: false,
        }
    }

    const POOL_ENV: &[(&str, &str)] = &[("PATH", "/usr/bin"), ("PYTHONPATH", "/__flare")];

    #[test]
    fn two_apps_with_the_same_image_share_a_template() {
        let a = spec(
            &[("PATH", "/usr/bin"), ("PYTHONPATH", "/__flare"), ("FLARE_APP_ID", "ap-1")],
            "/m/code-a",
            "/s/ct-1.sock",
        );
        let b = spec(
            &[("PATH", "/usr/bin"), ("PYTHONPATH", "/__flare"), ("FLARE_APP_ID", "ap-2"), ("X", "1")],
            "/m/code-b",
            "/s/ct-2.sock",
        );
        let ta =
            template(&a, &env(POOL_ENV), Some(Path::new("/m/code-a")), Path::new("/s/ct-1.sock")).unwrap();
        let tb =
            template(&b, &env(POOL_ENV), Some(Path::new("/m/code-b")), Path::new("/s/ct-2.sock")).unwrap();
        assert_eq!(ta, tb);
        // No app's code, socket, limits or variables are in it.
        assert_eq!(ta.binds[0].src, Path::new(CODE_MARKER));
        assert_eq!(ta.binds[3].src, Path::new(API_MARKER));
        assert_eq!(ta.env, env(POOL_ENV));
        assert_eq!(ta.limits, Limits::default());
        assert!(ta.id.is_empty());
    }

    #[test]
    fn a_different_image_network_or_interpreter_is_another_template() {
        let base = spec(POOL_ENV, "/m/c", "/s/a.sock");
        let t = |s: &CommandSpec| {
            template(s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).unwrap()
        };
        let mut other = base.clone();
        other.network = Network::Isolated;
        assert_ne!(t(&base), t(&other));
        let mut other = base.clone();
        other.rootfs = Rootfs::Dir("/imagefs/mnt/ab".into());
        assert_ne!(t(&base), t(&other));
        let mut other = base.clone();
        other.argv[0] = "/usr/local/bin/python3".into();
        assert_ne!(t(&base), t(&other));
        let mut other = base.clone();
        other.binds[2].src = "/m/sdk2/flare".into();
        assert_ne!(t(&base), t(&other));
    }

    #[test]
    fn variables_read_at_start_keep_a_function_off_the_pool() {
        for k in [
            "PYTHONPATH",
            "PYTHONHASHSEED",
            "LD_PRELOAD",
            "LANG",
            "LC_ALL",
            "HOME",
            "TZ",
            "MALLOC_ARENA_MAX",
            "PATH",
        ] {
            let mut kv = POOL_ENV.to_vec();
            kv.retain(|(ek, _)| *ek != k);
            kv.push((k, "changed"));
            let s = spec(&kv, "/m/c", "/s/a.sock");
            let e =
                template(&s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).unwrap_err();
            assert!(e.contains(k), "{k}: {e}");
        }
        // Unsetting one too.
        let s = spec(&[("PATH", "/usr/bin")], "/m/c", "/s/a.sock");
        assert!(template(&s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).is_err());
        // Others are applied at assignment.
        let s = spec(
            &[
                ("PATH", "/usr/bin"),
                ("PYTHONPATH", "/__flare"),
                ("OMP_NUM_THREADS", "1"),
                ("FLARE_CLS_PARAMS", "x"),
            ],
            "/m/c",
            "/s/a.sock",
        );
        assert!(template(&s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).is_ok());
    }

    #[test]
    fn a_build_step_never_uses_the_pool() {
        let mut s = spec(POOL_ENV, "/m/c", "/s/a.sock");
        s.upper_dir = Some("/build/x".into());
        assert!(template(&s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).is_err());
    }

    #[test]
    fn a_memory_snapshot_container_never_uses_the_pool() {
        let mut s = spec(POOL_ENV, "/m/c", "/s/a.sock");
        s.checkpointable = true;
        let why = template(&s, &env(POOL_ENV), Some(Path::new("/m/c")), Path::new("/s/a.sock")).unwrap_err();
        assert!(why.contains("checkpointable"), "{why}");
    }

    #[test]
    fn attach_list_is_the_code_mount_then_what_lives_under_it() {
        let s = spec(POOL_ENV, "/m/c", "/s/a.sock");
        let l = attach_list(&s.binds);
        let dsts: Vec<&Path> = l.iter().map(|b| b.dst.as_path()).collect();
        assert_eq!(dsts, [Path::new("/root"), Path::new("/root/.pyenv")]);
        assert_eq!(l[0].src, Path::new("/m/c"));
        let mut no_code = s.binds.clone();
        no_code.remove(0);
        assert!(attach_list(&no_code).is_empty());
    }

    fn st(key: u64, ago_s: u64, idle: usize, starting: usize, now: Instant) -> TemplateState {
        TemplateState { key, last_used: now - Duration::from_secs(ago_s), idle, starting }
    }

    #[test]
    fn plan_fills_recent_templates_within_the_budget() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let cfg = PrestartConfig { runners: 2, per_template: 1, ..PrestartConfig::default() };
        // Three recent templates, budget two: the two most recent get one each.
        let p = plan(&cfg, &[st(1, 30, 0, 0, now), st(2, 10, 0, 0, now), st(3, 20, 0, 0, now)], now);
        assert_eq!(p, Plan { start: vec![2, 3], stop: vec![] });
        // Already there (idle or starting): nothing to do.
        let p = plan(&cfg, &[st(2, 10, 1, 0, now), st(3, 20, 0, 1, now)], now);
        assert_eq!(p, Plan::default());
        // per_template 2: the most recent takes the whole budget.
        let cfg2 = PrestartConfig { runners: 2, per_template: 2, ..PrestartConfig::default() };
        let p = plan(&cfg2, &[st(1, 30, 0, 0, now), st(2, 10, 0, 0, now)], now);
        assert_eq!(p, Plan { start: vec![2, 2], stop: vec![] });
    }

    #[test]
    fn plan_stops_expired_and_displaced_idle_runners_only() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let cfg =
            PrestartConfig { runners: 1, per_template: 1, idle_ttl: Duration::from_secs(60), memory_mb: 256 };
        // Expired: its idle runner goes.
        let p = plan(&cfg, &[st(1, 61, 1, 0, now)], now);
        assert_eq!(p, Plan { start: vec![], stop: vec![1] });
        // A more recent template displaces an older one's idle runner.
        let p = plan(&cfg, &[st(1, 30, 1, 0, now), st(2, 5, 0, 0, now)], now);
        assert_eq!(p, Plan { start: vec![2], stop: vec![1] });
        // A runner still starting is never "stopped" (it is dropped when it arrives).
        let p = plan(&cfg, &[st(1, 61, 0, 1, now)], now);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn plan_with_the_pool_off_stops_everything() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let cfg = PrestartConfig { runners: 0, ..PrestartConfig::default() };
        let p = plan(&cfg, &[st(1, 1, 2, 0, now)], now);
        assert_eq!(p, Plan { start: vec![], stop: vec![1, 1] });
    }

    #[test]
    fn leftovers_of_an_earlier_run_are_removed() {
        let base = std::env::temp_dir().join(format!("flare-prestart-left-{}", std::process::id()));
        let (home, socks) = (base.join("home"), base.join("socks"));
        std::fs::create_dir_all(home.join("prestart/pre-local-3/root")).unwrap();
        std::fs::create_dir_all(&socks).unwrap();
        for f in ["pre-local-3.sock", "ct-1.sock"] {
            std::fs::write(socks.join(f), b"").unwrap();
        }
        remove_leftovers(&home, &socks);
        assert!(!home.join("prestart").exists());
        assert!(!socks.join("pre-local-3.sock").exists());
        assert!(socks.join("ct-1.sock").exists(), "only the pool's own sockets");
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn the_default_is_laptop_sized() {
        let c = PrestartConfig::default();
        assert_eq!((c.runners, c.per_template), (2, 1));
        assert_eq!(c.reserved_mb(), 512);
    }
}
