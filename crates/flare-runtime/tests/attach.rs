//! Changing a running container (`Container::attach_binds`, `Container::apply_limits`):
//! what a pre-started runner gets at assignment. Real containers; needs root.

mod common;

use std::path::Path;

use common::*;
use flare_runtime::*;

fn tempdir(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("flare-rt-attach-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn attached_binds_appear_in_the_running_container_in_order() {
    require_root!();
    let rt = runtime("attach", false);
    // The placeholder bound at spawn, then the code (with a mountpoint for a nested
    // bind) and the nested dir attached while the container runs.
    let placeholder = tempdir("placeholder");
    let code = tempdir("code");
    std::fs::write(code.join("marker"), "from the code mount").unwrap();
    std::fs::create_dir(code.join("env")).unwrap();
    let env = tempdir("env");
    std::fs::write(env.join("inner"), "nested").unwrap();
    let (mut s, readers) = spec(&[
        "/bin/sh",
        "-c",
        "while [ ! -e /work/env/inner ]; do sleep 0.01; done; cat /work/marker; echo; cat /work/env/inner; \
         echo; touch /work/x 2>/dev/null && echo writable || echo read-only",
    ]);
    s.command.binds.push(Bind { src: placeholder.clone(), dst: "/work".into(), readonly: true });
    let mut c = rt.spawn(s).unwrap();
    let ns = |p: &str| std::fs::read_link(p).unwrap();
    let (mnt, root) = (ns("/proc/thread-self/ns/mnt"), std::fs::metadata("/").unwrap());
    c.attach_binds(&[
        Bind { src: code.clone(), dst: "/work".into(), readonly: true },
        Bind { src: env.clone(), dst: "/work/env".into(), readonly: true },
    ])
    .expect("attach");
    // The helper shared our memory, not our namespaces or root.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(ns("/proc/thread-self/ns/mnt"), mnt);
    assert_eq!(std::fs::metadata("/").unwrap().ino(), root.ino());
    assert!(!Path::new("/work/marker").exists());
    let exit = c.wait().unwrap();
    c.cleanup().unwrap();
    let (out, err) = readers.finish();
    assert_eq!(exit.code, Some(0), "{err}");
    assert_eq!(out, "from the code mount\nnested\nread-only\n");
    // Nothing was mounted on the host.
    assert!(!placeholder.join("marker").exists());
    for d in [placeholder, code, env] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn attach_refuses_a_symlink_source_and_a_relative_destination() {
    require_root!();
    let rt = runtime("attachbad", false);
    let dir = tempdir("bad");
    let link = dir.join("link");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let (s, readers) = spec(&["/bin/sleep", "10"]);
    let c = rt.spawn(s).unwrap();
    let e = c.attach_binds(&[Bind { src: link, dst: "/mnt".into(), readonly: true }]).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    let e = c.attach_binds(&[Bind { src: dir.clone(), dst: "mnt".into(), readonly: true }]).unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    // A destination missing in the container is that bind's error.
    let e =
        c.attach_binds(&[Bind { src: dir.clone(), dst: "/no/such/dir".into(), readonly: true }]).unwrap_err();
    assert!(e.to_string().contains("/no/such/dir"), "{e}");
    c.cleanup().unwrap();
    readers.finish();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn attach_to_an_exited_container_fails() {
    require_root!();
    let rt = runtime("attachexit", false);
    let dir = tempdir("exited");
    let (s, readers) = spec(&["/bin/true"]);
    let mut c = rt.spawn(s).unwrap();
    c.wait().unwrap();
    assert!(c.attach_binds(&[Bind { src: dir.clone(), dst: "/mnt".into(), readonly: true }]).is_err());
    c.cleanup().unwrap();
    readers.finish();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn limits_are_replaced_on_a_running_container() {
    require_root!();
    let rt = runtime("relimit", false);
    let (mut s, readers) = spec(&["/bin/sleep", "10"]);
    s.command.limits =
        Limits { cpu_millicores: Some(1000), memory_bytes: Some(256 << 20), ..Limits::default() };
    let id = s.command.id.clone();
    let mut c = rt.spawn(s).unwrap();
    let read = |ctl: &str, file: &str| {
        let p = match rt.cgroup_mode() {
            CgroupMode::V1 => format!("/sys/fs/cgroup/{ctl}/{}/{id}/{file}", rt.parent),
            CgroupMode::V2 => format!("/sys/fs/cgroup/{}/{id}/{file}", rt.parent),
        };
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}")).trim().to_owned()
    };
    let v1 = rt.cgroup_mode() == CgroupMode::V1;
    let (mem_file, cpu_file) =
        if v1 { ("memory.limit_in_bytes", "cpu.cfs_quota_us") } else { ("memory.max", "cpu.max") };
    // Down, then up (v1 keeps memory+swap >= memory at every step), then lifted.
    for (limits, mem, cpu) in [
        (
            Limits { cpu_millicores: Some(500), memory_bytes: Some(64 << 20), ..Limits::default() },
            64u64 << 20,
            50_000,
        ),
        (
            Limits {
                cpu_millicores: Some(2000),
                memory_bytes: Some(1 << 30),
                pids_max: Some(64),
                ..Limits::default()
            },
            1 << 30,
            200_000,
        ),
    ] {
        c.apply_limits(&limits).unwrap();
        assert_eq!(c.memory_limit(), Some(mem));
        assert_eq!(read("memory", mem_file), mem.to_string());
        let want_cpu = if v1 { cpu.to_string() } else { format!("{cpu} 100000") };
        assert_eq!(read("cpu", cpu_file), want_cpu);
    }
    assert_eq!(read("pids", "pids.max"), "64");
    c.apply_limits(&Limits::default()).unwrap();
    assert_eq!(c.memory_limit(), None);
    assert_eq!(read("pids", "pids.max"), DEFAULT_PIDS_MAX.to_string());
    if !v1 {
        assert_eq!(read("memory", mem_file), "max");
    }
    c.kill().unwrap();
    c.wait().unwrap();
    c.cleanup().unwrap();
    readers.finish();
}
