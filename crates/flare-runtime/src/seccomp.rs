//! Seccomp policy: kept as data in `seccomp.json` (a deny list over a default allow, one
//! reason per rule) and compiled here to a classic BPF program.
//!
//! Program layout:
//! 1. load `seccomp_data.arch`; anything but the native audit arch is killed (no i386 or
//!    other-ABI syscalls sneaking past a table built for x86_64);
//! 2. load `seccomp_data.nr`; on x86_64, x32 syscalls (`nr >= 0x40000000`) get EPERM;
//! 3. per denied syscall: `if nr == N -> action` (optionally only if `args[0] & mask != 0`,
//!    if `args[0]` is one of a list, or if it is none of a list);
//! 4. default: allow.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::RuntimeError;

/// The policy text, compiled into the binary.
pub const POLICY_JSON: &str = include_str!("../seccomp.json");

/// One rule of the policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Syscall names (as in `libc::SYS_*`).
    pub syscalls: Vec<String>,
    /// `"errno"` (default EPERM, or the `errno` field) or `"kill"` (kill the process).
    pub action: String,
    /// Errno name for `"errno"` rules: `EPERM` (default) or `ENOSYS`.
    #[serde(default)]
    pub errno: Option<String>,
    /// Only apply when `args[0] & mask != 0` (low 32 bits), e.g. clone's `CLONE_NEW*` flags.
    #[serde(default)]
    pub arg0_mask_any: Option<u32>,
    /// Only apply when `args[0]` (low 32 bits) is one of these, e.g. socket families.
    #[serde(default)]
    pub arg0_in: Option<Vec<u32>>,
    /// Only apply when `args[0]` (low 32 bits) is none of these, e.g. the personalities
    /// that stay allowed.
    #[serde(default)]
    pub arg0_not_in: Option<Vec<u32>>,
    /// Why this is denied. Required.
    pub reason: String,
}

/// Parse the policy file.
pub fn parse_policy(text: &str) -> Result<Vec<Rule>, RuntimeError> {
    let rules: Vec<Rule> = serde_json::from_str(text).map_err(|e| RuntimeError::Seccomp(e.to_string()))?;
    for r in &rules {
        if r.reason.trim().is_empty() {
            return Err(RuntimeError::Seccomp(format!("rule for {:?} has no reason", r.syscalls)));
        }
        if r.syscalls.is_empty() {
            return Err(RuntimeError::Seccomp("rule with no syscalls".into()));
        }
        action_value(r)?;
        let conds = [r.arg0_mask_any.is_some(), r.arg0_in.is_some(), r.arg0_not_in.is_some()];
        if conds.iter().filter(|c| **c).count() > 1 {
            return Err(RuntimeError::Seccomp(format!(
                "rule for {:?} has more than one condition",
                r.syscalls
            )));
        }
        for list in [&r.arg0_in, &r.arg0_not_in].into_iter().flatten() {
            if list.is_empty() || list.len() > 32 {
                return Err(RuntimeError::Seccomp(format!("rule for {:?}: 1 to 32 values", r.syscalls)));
            }
        }
    }
    Ok(rules)
}

const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

fn action_value(r: &Rule) -> Result<u32, RuntimeError> {
    match r.action.as_str() {
        "kill" => Ok(SECCOMP_RET_KILL_PROCESS),
        "errno" => {
            let e = match r.errno.as_deref() {
                None | Some("EPERM") => libc::EPERM,
                Some("ENOSYS") => libc::ENOSYS,
                Some(other) => return Err(RuntimeError::Seccomp(format!("unknown errno {other:?}"))),
            };
            Ok(SECCOMP_RET_ERRNO | (e as u32 & 0xffff))
        }
        other => Err(RuntimeError::Seccomp(format!("unknown action {other:?}"))),
    }
}

macro_rules! sys_table {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name as i64)),*]
    };
}

/// Syscalls that exist on every supported architecture.
const COMMON: &[(&str, i64)] = sys_table!(
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_mount_setattr,
    SYS_fsopen,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fspick,
    SYS_move_mount,
    SYS_open_tree,
    SYS_unshare,
    SYS_setns,
    SYS_clone,
    SYS_clone3,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_reboot,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_lookup_dcookie,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kcmp,
    SYS_pidfd_getfd,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_swapon,
    SYS_swapoff,
    SYS_acct,
    SYS_quotactl,
    SYS_quotactl_fd,
    SYS_nfsservctl,
    SYS_vhangup,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_userfaultfd,
    SYS_syslog,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_memfd_secret,
    SYS_move_pages,
    SYS_migrate_pages,
    SYS_personality,
    SYS_socket,
    SYS_socketpair,
);

/// Legacy syscalls only x86_64 has.
#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[(&str, i64)] =
    sys_table!(SYS_iopl, SYS_ioperm, SYS_uselib, SYS_ustat, SYS_sysfs, SYS__sysctl,);
#[cfg(not(target_arch = "x86_64"))]
const ARCH_ONLY: &[(&str, i64)] = &[];

/// Names that exist only on other architectures: skipped silently where absent.
#[cfg(not(target_arch = "x86_64"))]
const KNOWN_ABSENT: &[&str] = &["iopl", "ioperm", "uselib", "ustat", "sysfs", "_sysctl"];
#[cfg(target_arch = "x86_64")]
const KNOWN_ABSENT: &[&str] = &[];

/// The syscall number for a name on this architecture.
pub fn syscall_number(name: &str) -> Option<i64> {
    COMMON
        .iter()
        .chain(ARCH_ONLY.iter())
        .find(|(n, _)| n.strip_prefix("SYS_") == Some(name))
        .map(|(_, nr)| *nr)
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const OFF_ARG0_LO: u32 = 16;
#[cfg(target_endian = "big")]
const OFF_ARG0_LO: u32 = 20;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Compile rules to a classic BPF program for `SECCOMP_SET_MODE_FILTER`.
pub fn compile(rules: &[Rule]) -> Result<Vec<libc::sock_filter>, RuntimeError> {
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    if cfg!(target_arch = "x86_64") {
        // x32 ABI syscalls have bit 30 set.
        prog.push(jump(BPF_JGE_K, 0x4000_0000, 0, 1));
        prog.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32));
    }
    let mut seen = BTreeSet::new();
    for rule in rules {
        let action = action_value(rule)?;
        for name in &rule.syscalls {
            let Some(nr) = syscall_number(name) else {
                if KNOWN_ABSENT.contains(&name.as_str()) {
                    continue;
                }
                return Err(RuntimeError::Seccomp(format!("unknown syscall {name:?}")));
            };
            let key = format!("{:?}{:?}{:?}", rule.arg0_mask_any, rule.arg0_in, rule.arg0_not_in);
            if !seen.insert((nr, key)) {
                return Err(RuntimeError::Seccomp(format!("duplicate rule for {name}")));
            }
            if let Some(values) = &rule.arg0_in {
                let n = values.len() as u8;
                prog.push(jump(BPF_JEQ_K, nr as u32, 0, 2 * n + 2));
                prog.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LO));
                for v in values {
                    prog.push(jump(BPF_JEQ_K, *v, 0, 1));
                    prog.push(stmt(BPF_RET_K, action));
                }
                prog.push(stmt(BPF_LD_W_ABS, OFF_NR));
                continue;
            }
            if let Some(values) = &rule.arg0_not_in {
                let n = values.len() as u8;
                prog.push(jump(BPF_JEQ_K, nr as u32, 0, n + 3));
                prog.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LO));
                for (j, v) in values.iter().enumerate() {
                    // Allowed value: skip the remaining checks and the action.
                    prog.push(jump(BPF_JEQ_K, *v, n - j as u8, 0));
                }
                prog.push(stmt(BPF_RET_K, action));
                prog.push(stmt(BPF_LD_W_ABS, OFF_NR));
                continue;
            }
            match rule.arg0_mask_any {
                None => {
                    prog.push(jump(BPF_JEQ_K, nr as u32, 0, 1));
                    prog.push(stmt(BPF_RET_K, action));
                }
                Some(mask) => {
                    prog.push(jump(BPF_JEQ_K, nr as u32, 0, 4));
                    prog.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LO));
                    prog.push(jump(BPF_JSET_K, mask, 0, 1));
                    prog.push(stmt(BPF_RET_K, action));
                    prog.push(stmt(BPF_LD_W_ABS, OFF_NR));
                }
            }
        }
    }
    prog.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
    if prog.len() > 4096 {
        return Err(RuntimeError::Seccomp("program too long".into()));
    }
    Ok(prog)
}

/// Parse and compile the built-in policy.
pub fn default_program() -> Result<Vec<libc::sock_filter>, RuntimeError> {
    compile(&parse_policy(POLICY_JSON)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses_and_reasons_present() {
        let rules = parse_policy(POLICY_JSON).unwrap();
        assert!(rules.len() > 5);
        for r in &rules {
            assert!(r.reason.len() > 10, "weak reason for {:?}", r.syscalls);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_name_resolves() {
        for r in parse_policy(POLICY_JSON).unwrap() {
            for s in &r.syscalls {
                assert!(syscall_number(s).is_some(), "unresolved syscall {s}");
            }
        }
        assert_eq!(syscall_number("mount"), Some(libc::SYS_mount));
        assert_eq!(syscall_number("chroot"), None, "chroot must stay allowed");
    }

    #[test]
    fn compiles() {
        let p = default_program().unwrap();
        assert!(p.len() > 40);
        let last = p.last().unwrap();
        assert_eq!(last.k, SECCOMP_RET_ALLOW);
    }

    #[test]
    fn rejects_bad_rules() {
        assert!(parse_policy(r#"[{"syscalls":["mount"],"action":"errno","reason":""}]"#).is_err());
        assert!(parse_policy(r#"[{"syscalls":["mount"],"action":"nope","reason":"x"}]"#).is_err());
        let r = parse_policy(r#"[{"syscalls":["nosuch"],"action":"errno","reason":"x"}]"#).unwrap();
        assert!(compile(&r).is_err());
        let two =
            r#"[{"syscalls":["socket"],"action":"errno","arg0_in":[1],"arg0_mask_any":1,"reason":"x"}]"#;
        assert!(parse_policy(two).is_err());
    }

    /// Run a compiled program on (nr, arg0) the way the kernel would (the subset of
    /// classic BPF the compiler emits).
    fn eval(prog: &[libc::sock_filter], nr: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => AUDIT_ARCH,
                        OFF_ARG0_LO => arg0,
                        k => panic!("load of {k}"),
                    };
                    pc += 1;
                }
                BPF_JEQ_K => pc += 1 + if acc == i.k { i.jt } else { i.jf } as usize,
                BPF_JGE_K => pc += 1 + if acc >= i.k { i.jt } else { i.jf } as usize,
                BPF_JSET_K => pc += 1 + if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                BPF_RET_K => return i.k,
                c => panic!("opcode {c}"),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn argument_rules_decide_as_documented() {
        let p = default_program().unwrap();
        let eperm = SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let sock = libc::SYS_socket as u32;
        assert_eq!(eval(&p, sock, libc::AF_VSOCK as u32), eperm);
        assert_eq!(eval(&p, sock, libc::AF_INET as u32), SECCOMP_RET_ALLOW);
        assert_eq!(eval(&p, sock, libc::AF_UNIX as u32), SECCOMP_RET_ALLOW);
        assert_eq!(eval(&p, libc::SYS_socketpair as u32, libc::AF_VSOCK as u32), eperm);
        let pers = libc::SYS_personality as u32;
        assert_eq!(eval(&p, pers, 0xffff_ffff), SECCOMP_RET_ALLOW, "query");
        assert_eq!(eval(&p, pers, 0), SECCOMP_RET_ALLOW);
        assert_eq!(eval(&p, pers, 0x0040000), eperm, "ADDR_NO_RANDOMIZE");
        assert_eq!(eval(&p, libc::SYS_io_uring_setup as u32, 8), eperm);
        assert_eq!(eval(&p, libc::SYS_clone as u32, libc::CLONE_NEWUSER as u32), eperm);
        assert_eq!(eval(&p, libc::SYS_clone as u32, libc::SIGCHLD as u32), SECCOMP_RET_ALLOW);
        assert_eq!(eval(&p, libc::SYS_read as u32, 0), SECCOMP_RET_ALLOW);
    }
}
