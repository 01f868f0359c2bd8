//! The snapshot key: which memory snapshot a cold start may restore from.
//!
//! A snapshot is only valid for the code and image it was taken from, and only on a host
//! where the restored process can keep running the instructions it already chose: a
//! library that picked AVX-512 code paths at import must not wake up on a CPU without
//! them (CRIU itself only checks the FPU/xsave layout by default), the kernel must accept
//! the images (CRIU's image format and the kernel's restore paths change between
//! releases), and the CRIU that restores must read what the dumping one wrote.

use std::collections::BTreeSet;

/// Version tag of the key's own layout: bump it when [`snapshot_key`] changes meaning.
pub const KEY_LAYOUT: &str = "flare-snapshot-key-v1";

/// Everything a snapshot depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInputs<'a> {
    /// The function's version (its code and configuration, as the control plane names it).
    pub function_version: &'a str,
    /// The container image's id (digest).
    pub image_id: &'a str,
    /// CPU feature flags (`flags` in /proc/cpuinfo); order and duplicates do not matter.
    pub cpu_flags: &'a [String],
    /// `uname -r`.
    pub kernel_release: &'a str,
    /// CRIU's version, e.g. `4.1.1`.
    pub criu_version: &'a str,
}

/// The snapshot key: a hex BLAKE3 hash over the inputs, each length-prefixed (so no two
/// different inputs share an encoding), CPU flags sorted and deduplicated.
pub fn snapshot_key(k: &KeyInputs<'_>) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |name: &str, value: &str| {
        for part in [name, value] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    };
    field("layout", KEY_LAYOUT);
    field("function_version", k.function_version);
    field("image_id", k.image_id);
    let flags: BTreeSet<&str> = k.cpu_flags.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    field("cpu_flags", &flags.into_iter().collect::<Vec<_>>().join(" "));
    field("kernel_release", k.kernel_release);
    field("criu_version", k.criu_version);
    hex::encode(h.finalize().as_bytes())
}

/// The CPU feature flags of /proc/cpuinfo's text: the intersection over all processors'
/// `flags` lines (x86), or `Features` (arm64), sorted. A host whose cores differ
/// (hybrid CPUs) is keyed by what every core has.
pub fn cpu_flags_from_cpuinfo(text: &str) -> Vec<String> {
    let mut common: Option<BTreeSet<&str>> = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name != "flags" && name != "Features" {
            continue;
        }
        let these: BTreeSet<&str> = value.split_whitespace().collect();
        common = Some(match common {
            None => these,
            Some(c) => c.intersection(&these).copied().collect(),
        });
    }
    common.unwrap_or_default().into_iter().map(str::to_string).collect()
}

/// [`cpu_flags_from_cpuinfo`] of this host's /proc/cpuinfo.
pub fn host_cpu_flags() -> std::io::Result<Vec<String>> {
    Ok(cpu_flags_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn key(fv: &str, img: &str, f: &[String], kr: &str, cv: &str) -> String {
        snapshot_key(&KeyInputs {
            function_version: fv,
            image_id: img,
            cpu_flags: f,
            kernel_release: kr,
            criu_version: cv,
        })
    }

    #[test]
    fn key_is_stable_and_hex() {
        let f = flags("fpu sse2 avx2");
        let a = key("fn-v1", "sha256:abc", &f, "6.18.4", "4.1.1");
        assert_eq!(a, key("fn-v1", "sha256:abc", &f, "6.18.4", "4.1.1"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn flag_order_and_duplicates_do_not_matter() {
        let a = key("f", "i", &flags("avx2 fpu sse2"), "k", "c");
        let b = key("f", "i", &flags("sse2 avx2 fpu fpu"), "k", "c");
        assert_eq!(a, b);
    }

    #[test]
    fn every_input_changes_the_key() {
        let f = flags("fpu sse2 avx2");
        let base = key("fn-v1", "img", &f, "6.18.4", "4.1.1");
        assert_ne!(base, key("fn-v2", "img", &f, "6.18.4", "4.1.1"));
        assert_ne!(base, key("fn-v1", "img2", &f, "6.18.4", "4.1.1"));
        assert_ne!(base, key("fn-v1", "img", &flags("fpu sse2"), "6.18.4", "4.1.1"));
        assert_ne!(base, key("fn-v1", "img", &flags("fpu sse2 avx2 avx512f"), "6.18.4", "4.1.1"));
        assert_ne!(base, key("fn-v1", "img", &f, "6.18.5", "4.1.1"));
        assert_ne!(base, key("fn-v1", "img", &f, "6.18.4", "4.2"));
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        // Without length prefixes "ab"+"c" and "a"+"bc" would hash alike.
        let f = flags("fpu");
        assert_ne!(key("ab", "c", &f, "k", "v"), key("a", "bc", &f, "k", "v"));
    }

    #[test]
    fn cpuinfo_flags_are_the_intersection_of_all_cores() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f\n\n\
                    processor\t: 1\nflags\t\t: fpu avx2 sse2\nbugs\t\t: spectre_v1\n";
        assert_eq!(cpu_flags_from_cpuinfo(text), flags("avx2 fpu sse2"));
        let arm = "processor\t: 0\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\n";
        assert_eq!(cpu_flags_from_cpuinfo(arm), flags("aes asimd fp"));
        assert!(cpu_flags_from_cpuinfo("").is_empty());
    }

    #[test]
    fn host_flags_are_readable() {
        // Any Linux host has a cpuinfo; x86 and arm64 ones list flags.
        let f = host_cpu_flags().unwrap();
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert!(!f.is_empty());
        }
    }
}
