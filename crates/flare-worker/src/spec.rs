//! The spec of a function container, built without side effects: inputs (the
//! assignment, the planned binds, where its image is mounted, whether NAT is available)
//! → a [`CommandSpec`] (argv, env, binds in mount order, limits, network). The side
//! effects (mountpoints in the code mount, the stdio and frame pipes) happen elsewhere.
//!
//! Environment precedence, lowest first (a later source replaces a variable):
//! 1. the base: [`flare_runtime::BASE_ENV`] (`PATH`, `HOME=/root`, `LANG=C.UTF-8`),
//!    `PYTHONUNBUFFERED=1`,
//!    `PYTHONDONTWRITEBYTECODE=1`;
//! 2. the image's env (`.env`, a registry image's config);
//! 3. the function's env (`env=`);
//! 4. the platform's variables: `PYTHONPATH` (`/__flare`, with the function's own
//!    `PYTHONPATH` after it), `FLARE_*`.

use std::path::PathBuf;

use flare_proto::{ContainerAssignment, FunctionConfig};
use flare_runtime::{base_env, set_env, Bind, CommandSpec, Limits, Network, Rootfs};

use crate::{WorkerError, API_SOCKET_IN_CONTAINER};

/// A function's own environment variables (`env=`).
type FnEnv = std::collections::BTreeMap<String, String>;

/// What the container's `python -c` runs: the in-container runner's `__main__`, imported
/// rather than run with `python -m flare._runtime`, whose `runpy` imports cost ~3.7 ms of every cold start
/// (`python/flare/_runtime/__main__.py`).
pub(crate) const RUNNER_CODE: &str = "import flare._runtime.__main__";

/// The platform's own dir in containers: on PYTHONPATH (the SDK, cloudpickle, modal).
const PLATFORM_PYTHONPATH: &str = "/__flare";

/// What a function container's spec is made of.
pub(crate) struct SpecInputs<'a> {
    pub assignment: &'a ContainerAssignment,
    /// In mount order ([`crate::binds::BindSources::plan`]).
    pub binds: Vec<Bind>,
    /// The image's lazily mounted root on this worker (`None`: no image, or a captured
    /// environment bound from the host).
    pub image_root: Option<PathBuf>,
    /// Whether outbound networking (NAT) is available on this worker.
    pub nat_available: bool,
}

/// The container's environment, in the precedence documented above.
pub(crate) fn function_env(a: &ContainerAssignment) -> Vec<(String, String)> {
    env_with(a, &a.def.config.env)
}

/// [`function_env`] with `fn_env` as the function's own variables.
fn env_with(a: &ContainerAssignment, fn_env: &FnEnv) -> Vec<(String, String)> {
    let def = &a.def;
    let on_image_root = def.image.as_ref().is_some_and(|i| i.host_roots.is_empty());
    let mut env = base_env();
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
    if let Some(img) = &def.image {
        for (k, v) in &img.env {
            set_env(&mut env, k, v.clone());
        }
    }
    for (k, v) in fn_env {
        set_env(&mut env, k, v.clone());
    }
    // Platform variables win over user ones.
    let pythonpath = match fn_env.get("PYTHONPATH") {
        Some(user) => format!("{PLATFORM_PYTHONPATH}:{user}"),
        None => PLATFORM_PYTHONPATH.into(),
    };
    for (k, v) in [
        ("PYTHONPATH", pythonpath),
        ("FLARE_CONTAINER_ID", a.container_id.clone()),
        ("FLARE_APP_ID", a.app_id.clone()),
        ("FLARE_APP_NAME", a.app_name.clone()),
        ("FLARE_FUNCTION_NAME", def.name.clone()),
        ("FLARE_SERVER_URL", format!("unix://{API_SOCKET_IN_CONTAINER}")),
        ("FLARE_IS_REMOTE", "1".into()),
        // What the runtime sizes the writable layer and /tmp to (named in ENOSPC errors).
        ("FLARE_DISK_QUOTA_BYTES", flare_runtime::DEFAULT_DISK_BYTES.to_string()),
        // The caller's import paths (bound read-only); the runner adds those the
        // container's interpreter does not already have.
        ("FLARE_SYS_PATH", if on_image_root { String::new() } else { def.python.paths.join(":") }),
    ] {
        set_env(&mut env, k, v);
    }
    env
}

/// The environment a pre-started runner for `a`'s template starts with: the function's
/// without its own variables (`env=`) and without the per-container ones, which INIT
/// brings at assignment ([`crate::prestart`]).
pub(crate) fn prestart_env(a: &ContainerAssignment) -> Vec<(String, String)> {
    let per_container =
        ["FLARE_CONTAINER_ID", "FLARE_APP_ID", "FLARE_APP_NAME", "FLARE_FUNCTION_NAME", "FLARE_SYS_PATH"];
    let mut env = env_with(a, &FnEnv::default());
    env.retain(|(k, _)| !per_container.contains(&k.as_str()));
    env
}

/// A function container's limits: the cpu cap (`cpu_limit`, else the request plus
/// [`flare_proto::CPU_BURST_CORES`]), the memory limit, the runtime's default pids limit.
pub(crate) fn function_limits(config: &FunctionConfig) -> Limits {
    Limits {
        cpu_millicores: config
            .cpu_limit
            .or(config.cpu.map(|c| c + flare_proto::CPU_BURST_CORES))
            .map(|c| (c * 1000.0).round() as u64),
        memory_bytes: config.memory.map(|m| m * 1024 * 1024),
        pids_max: None,
        ..Limits::default()
    }
}

/// The spec of a function container (pure).
pub(crate) fn function_spec(inputs: SpecInputs<'_>) -> Result<CommandSpec, WorkerError> {
    let a = inputs.assignment;
    let def = &a.def;
    let network =
        if def.config.block_network || !inputs.nat_available { Network::Isolated } else { Network::Nat };
    let (python, rootfs, cwd) = match (&def.image, inputs.image_root) {
        (Some(img), _) if !img.host_roots.is_empty() => (img.python.clone(), Rootfs::Host, "/root".into()),
        (Some(img), Some(root)) => {
            (img.python.clone(), Rootfs::Dir(root), img.workdir.clone().unwrap_or_else(|| "/root".into()))
        }
        (Some(img), None) => return Err(WorkerError::ImageNotMounted(img.image_id.clone())),
        (None, _) => (def.python.executable.clone(), Rootfs::Host, "/root".into()),
    };
    Ok(CommandSpec {
        id: a.container_id.clone(),
        hostname: "flare".into(),
        argv: vec![python, "-c".into(), RUNNER_CODE.into()],
        env: function_env(a),
        cwd,
        rootfs,
        binds: inputs.binds,
        limits: function_limits(&def.config),
        network,
        upper_dir: None,
        checkpointable: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(def: serde_json::Value) -> ContainerAssignment {
        ContainerAssignment {
            container_id: "ct-1".into(),
            app_id: "ap-1".into(),
            app_name: "app".into(),
            function_id: "fu-1".into(),
            def: serde_json::from_value(def).unwrap(),
        }
    }

    fn get<'a>(env: &'a [(String, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str())
    }

    fn image(env: serde_json::Value, host_roots: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "image_id": "im-1", "manifest": "blake3:00", "python": "/usr/local/bin/python3",
            "env": env, "workdir": "/app", "host_roots": host_roots,
        })
    }

    #[test]
    fn prestart_env_has_neither_the_functions_variables_nor_the_containers() {
        let a = assignment(serde_json::json!({
            "name": "f",
            "python": {"executable": "/usr/bin/python3", "paths": ["/a"]},
            "config": {"env": {"MY": "1", "PYTHONPATH": "/u"}},
        }));
        let env = prestart_env(&a);
        assert_eq!(get(&env, "PYTHONPATH"), Some("/__flare"));
        for k in [
            "MY",
            "FLARE_CONTAINER_ID",
            "FLARE_APP_ID",
            "FLARE_APP_NAME",
            "FLARE_FUNCTION_NAME",
            "FLARE_SYS_PATH",
        ] {
            assert_eq!(get(&env, k), None, "{k}");
        }
        assert_eq!(get(&env, "FLARE_SERVER_URL"), Some("unix:///__flare/api.sock"));
        // The function's own env (what INIT brings) has them all.
        let full = function_env(&a);
        assert_eq!(get(&full, "MY"), Some("1"));
        assert_eq!(get(&full, "PYTHONPATH"), Some("/__flare:/u"));
    }

    #[test]
    fn env_precedence_image_then_function_then_platform() {
        let a = assignment(serde_json::json!({
            "name": "f",
            "python": {"executable": "/usr/bin/python3", "paths": ["/a", "/b"]},
            "config": {"env": {"A": "function", "B": "function", "FLARE_APP_ID": "mine", "PYTHONPATH": "/mine"}},
            "image": image(serde_json::json!([["A", "image"], ["C", "image"], ["HOME", "/home/x"], ["PYTHONPATH", "/img"]]), serde_json::json!([])),
        }));
        let env = function_env(&a);
        assert_eq!(get(&env, "A"), Some("function"), "function env over image env");
        assert_eq!(get(&env, "B"), Some("function"));
        assert_eq!(get(&env, "C"), Some("image"));
        assert_eq!(get(&env, "HOME"), Some("/home/x"), "image env over the base");
        assert_eq!(get(&env, "LANG"), Some("C.UTF-8"));
        assert_eq!(get(&env, "FLARE_APP_ID"), Some("ap-1"), "platform vars over function env");
        assert_eq!(get(&env, "FLARE_CONTAINER_ID"), Some("ct-1"));
        assert_eq!(get(&env, "FLARE_FUNCTION_NAME"), Some("f"));
        assert_eq!(get(&env, "FLARE_SERVER_URL"), Some("unix:///__flare/api.sock"));
        // The function's PYTHONPATH comes after the platform's dir; the image's is replaced.
        assert_eq!(get(&env, "PYTHONPATH"), Some("/__flare:/mine"));
        // On an image root the caller's import paths are not used.
        assert_eq!(get(&env, "FLARE_SYS_PATH"), Some(""));
        // Each variable once.
        let mut keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[test]
    fn pythonpath_without_user_value_and_sys_path_on_host_root() {
        let a = assignment(serde_json::json!({
            "name": "f", "python": {"executable": "/usr/bin/python3", "paths": ["/a", "/b"]},
        }));
        let env = function_env(&a);
        assert_eq!(get(&env, "PYTHONPATH"), Some("/__flare"));
        assert_eq!(get(&env, "FLARE_SYS_PATH"), Some("/a:/b"));
        assert_eq!(get(&env, "PATH"), Some(flare_runtime::BASE_ENV[0].1));
    }

    #[test]
    fn spec_argv_root_cwd_limits_network() {
        let binds = vec![Bind { src: "/h/code".into(), dst: "/root".into(), readonly: true }];
        // The host's environment.
        let a = assignment(serde_json::json!({
            "name": "f", "python": {"executable": "/usr/bin/python3"},
            "config": {"cpu": 0.5, "memory": 256, "block_network": true},
        }));
        let s = function_spec(SpecInputs {
            assignment: &a,
            binds: binds.clone(),
            image_root: None,
            nat_available: true,
        })
        .unwrap();
        assert_eq!(s.argv, ["/usr/bin/python3", "-c", RUNNER_CODE]);
        assert_eq!(RUNNER_CODE, "import flare._runtime.__main__");
        assert_eq!((s.rootfs.clone(), s.cwd.as_str()), (Rootfs::Host, "/root"));
        assert_eq!(s.binds, binds);
        assert_eq!(s.network, Network::Isolated);
        let burst = ((0.5 + flare_proto::CPU_BURST_CORES) * 1000.0).round() as u64;
        assert_eq!(s.limits.cpu_millicores, Some(burst));
        assert_eq!(s.limits.memory_bytes, Some(256 << 20));
        assert_eq!(s.limits.pids_max, None);
        assert_eq!(s.id, "ct-1");

        // An image root: its python and workdir; NAT when available.
        let a = assignment(serde_json::json!({
            "name": "f", "python": {"executable": "/usr/bin/python3"},
            "config": {"cpu": 1.0, "cpu_limit": 2.0},
            "image": image(serde_json::json!([]), serde_json::json!([])),
        }));
        let inputs = |root: Option<PathBuf>, nat| SpecInputs {
            assignment: &a,
            binds: vec![],
            image_root: root,
            nat_available: nat,
        };
        let s = function_spec(inputs(Some("/h/imagefs/mnt/x".into()), true)).unwrap();
        assert_eq!(s.argv[0], "/usr/local/bin/python3");
        assert_eq!(s.rootfs, Rootfs::Dir("/h/imagefs/mnt/x".into()));
        assert_eq!(s.cwd, "/app");
        assert_eq!(s.network, Network::Nat);
        assert_eq!(s.limits.cpu_millicores, Some(2000));
        assert_eq!(function_spec(inputs(Some("/x".into()), false)).unwrap().network, Network::Isolated);
        // Not mounted: an error naming the image.
        let e = function_spec(inputs(None, true)).unwrap_err();
        assert_eq!(e.to_string(), "image im-1 is not mounted on this worker");

        // A captured environment: the host's root with the image's python, cwd /root.
        let a = assignment(serde_json::json!({
            "name": "f", "python": {"executable": "/usr/bin/python3"},
            "image": image(serde_json::json!([]), serde_json::json!(["/opt/venv"])),
        }));
        let s = function_spec(SpecInputs {
            assignment: &a,
            binds: vec![],
            image_root: None,
            nat_available: true,
        })
        .unwrap();
        assert_eq!(
            (s.rootfs, s.cwd.as_str(), s.argv[0].as_str()),
            (Rootfs::Host, "/root", "/usr/local/bin/python3")
        );
    }
}
