//! The worker's command path (`Sandboxes`, what image build steps run through) against a
//! real runtime. Needs root (namespaces, mounts, cgroups); skipped otherwise.

use std::sync::Arc;

use flare_runtime::{
    CommandRunner, CommandSpec, Limits, Network, Rootfs, Runtime, RuntimeConfig, UserNamespace,
};
use flare_worker::sandbox::Sandboxes;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct TestRuntime {
    runner: Option<Sandboxes>,
    state: std::path::PathBuf,
}

impl Drop for TestRuntime {
    fn drop(&mut self) {
        drop(self.runner.take());
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn runner(name: &str) -> TestRuntime {
    let state = std::env::temp_dir().join(format!("flare-worker-sandbox-{name}-{}", std::process::id()));
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.clone(),
        cgroup_parent: format!("flare-worker-test-{name}-{}", std::process::id()),
        enable_nat: false,
        userns: Some(UserNamespace::DEFAULT),
    })
    .expect("Runtime::new");
    TestRuntime { runner: Some(Sandboxes::new(Arc::new(rt))), state }
}

fn spec(id: &str, script: &str, limits: Limits) -> CommandSpec {
    CommandSpec {
        id: id.into(),
        hostname: "flare-test".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: flare_runtime::base_env(),
        cwd: "/".into(),
        rootfs: Rootfs::Host,
        binds: vec![],
        limits,
        network: Network::Isolated,
        upper_dir: None,
        checkpointable: false,
    }
}

#[test]
fn a_command_streams_its_output_and_exit() {
    if !is_root() {
        eprintln!("skipping: this test needs root");
        return;
    }
    let t = runner("output");
    let r = t.runner.as_ref().unwrap();
    let mut out = String::new();
    let script = "echo out; echo err >&2; printf 'h\\303'; printf '\\251\\n'; echo \"$LANG\"; exit 3";
    let run = r
        .run(spec(&format!("sbx-out-{}", std::process::id()), script, Limits::default()), &mut |s| {
            out.push_str(s)
        })
        .unwrap();
    assert_eq!(run.exit.code, Some(3), "{out}");
    assert_eq!(
        flare_proto::exit_status_text(run.exit.code, run.exit.signal, run.exit.oom_killed),
        "exit code 3"
    );
    assert_eq!(run.in_userns, Some(true));
    assert_eq!(out, "out\nerr\nhé\nC.UTF-8\n");
}

#[test]
fn a_command_is_held_to_its_pids_limit() {
    if !is_root() {
        eprintln!("skipping: this test needs root");
        return;
    }
    let t = runner("pids");
    let r = t.runner.as_ref().unwrap();
    let mut out = String::new();
    let script = "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo spawned";
    let limits = Limits { pids_max: Some(16), ..Limits::default() };
    let run = r
        .run(spec(&format!("sbx-pids-{}", std::process::id()), script, limits), &mut |s| out.push_str(s))
        .unwrap();
    assert!(out.to_lowercase().contains("fork"), "exit {:?}, output {out:?}", run.exit);
}
