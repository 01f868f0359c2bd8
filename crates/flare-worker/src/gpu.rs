//! GPU discovery through NVIDIA's management library (NVML), loaded at run time with
//! `dlopen`, so that machines without NVIDIA drivers need nothing and build nothing.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

type NvmlReturn = c_int;
type InitFn = unsafe extern "C" fn() -> NvmlReturn;
type CountFn = unsafe extern "C" fn(*mut c_uint) -> NvmlReturn;
type HandleFn = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> NvmlReturn;
type NameFn = unsafe extern "C" fn(*mut c_void, *mut c_char, c_uint) -> NvmlReturn;

/// Maps an NVML device name to the GPU type names functions ask for (Modal's names).
pub fn gpu_type(device_name: &str) -> String {
    let n = device_name.to_ascii_uppercase();
    let known = [
        ("B200", "B200"),
        ("H200", "H200"),
        ("H100", "H100"),
        ("A100", if n.contains("80GB") { "A100-80GB" } else { "A100" }),
        ("L40S", "L40S"),
        ("A10G", "A10G"),
        ("L4", "L4"),
        ("T4", "T4"),
    ];
    for (needle, ty) in known {
        if n.contains(needle) {
            return ty.to_string();
        }
    }
    // Unknown models keep their own name, minus the vendor prefix, with spaces as dashes.
    n.trim_start_matches("NVIDIA ").trim_start_matches("TESLA ").trim().replace(' ', "-")
}

/// GPUs of this machine by type and count; `Err` says why none could be discovered
/// (no library, no driver, an NVML error).
pub fn discover() -> Result<BTreeMap<String, u32>, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is cast to the
    // signature NVML documents for it, and only called after being found.
    unsafe {
        let mut lib = std::ptr::null_mut();
        for name in [c"libnvidia-ml.so.1", c"libnvidia-ml.so"] {
            lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if !lib.is_null() {
                break;
            }
        }
        if lib.is_null() {
            return Err("NVIDIA management library (libnvidia-ml.so.1) not found".into());
        }
        let sym = |name: &CStr| {
            let p = libc::dlsym(lib, name.as_ptr());
            if p.is_null() {
                Err(format!("NVML has no symbol {}", name.to_string_lossy()))
            } else {
                Ok(p)
            }
        };
        let init: InitFn = std::mem::transmute(sym(c"nvmlInit_v2")?);
        let count: CountFn = std::mem::transmute(sym(c"nvmlDeviceGetCount_v2")?);
        let handle: HandleFn = std::mem::transmute(sym(c"nvmlDeviceGetHandleByIndex_v2")?);
        let name: NameFn = std::mem::transmute(sym(c"nvmlDeviceGetName")?);
        let shutdown: InitFn = std::mem::transmute(sym(c"nvmlShutdown")?);
        let r = init();
        if r != 0 {
            return Err(format!("nvmlInit failed (NVML error {r}): is the NVIDIA driver loaded?"));
        }
        let mut n: c_uint = 0;
        let r = count(&mut n);
        let mut gpus = BTreeMap::new();
        let mut err = None;
        if r != 0 {
            err = Some(format!("nvmlDeviceGetCount failed (NVML error {r})"));
        }
        for i in 0..n {
            let mut h = std::ptr::null_mut();
            let mut buf = [0 as c_char; 96];
            if handle(i, &mut h) != 0 || name(h, buf.as_mut_ptr(), buf.len() as c_uint) != 0 {
                err = Some(format!("could not read the name of GPU {i}"));
                continue;
            }
            let device = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            *gpus.entry(gpu_type(&device)).or_insert(0) += 1;
        }
        shutdown();
        match err {
            Some(e) if gpus.is_empty() => Err(e),
            _ => Ok(gpus),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_modal_types() {
        assert_eq!(gpu_type("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(gpu_type("NVIDIA A100-SXM4-80GB"), "A100-80GB");
        assert_eq!(gpu_type("NVIDIA A100-SXM4-40GB"), "A100");
        assert_eq!(gpu_type("NVIDIA L4"), "L4");
        assert_eq!(gpu_type("NVIDIA L40S"), "L40S");
        assert_eq!(gpu_type("Tesla T4"), "T4");
        assert_eq!(gpu_type("NVIDIA H200"), "H200");
        assert_eq!(gpu_type("NVIDIA RTX 6000 Ada Generation"), "RTX-6000-ADA-GENERATION");
    }

    #[test]
    fn discovery_without_nvidia_says_why() {
        // On machines with NVIDIA GPUs this finds them; elsewhere it must explain.
        match discover() {
            Ok(g) => assert!(g.values().all(|n| *n > 0)),
            Err(e) => assert!(!e.is_empty()),
        }
    }
}
