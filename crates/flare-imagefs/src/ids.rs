//! [`IdShift`]: the owner shift of an image mount whose files must look owned by the
//! image's users inside a container's user namespace.

/// The id that unmapped ids show as (the kernel's default overflow uid/gid).
pub const OVERFLOW_ID: u32 = 65_534;

/// Container uid/gid `n` (for `n < size`) is host uid/gid `host_base + n`: the range a
/// container's user namespace maps (the same for every container of a worker). An image
/// mount with a shift reports a manifest owner `n` as `host_base + n`, so that root
/// inside the container owns the files the image gives to root.
///
/// The same numbers as `flare_runtime::UserNamespace`, kept as plain fields so this
/// crate need not depend on the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    pub host_base: u32,
    pub size: u32,
}

impl IdShift {
    /// The host id of container id `id`. Ids past the range (which no process in the
    /// container can have) become [`OVERFLOW_ID`] on the host, which the container
    /// sees as its own overflow id: an owner it cannot act as.
    pub fn to_host(&self, id: u32) -> u32 {
        if id < self.size {
            self.host_base.saturating_add(id)
        } else {
            OVERFLOW_ID
        }
    }

    /// The container id of host id `id`, if it is in the range.
    pub fn to_container(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.host_base).filter(|n| *n < self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: IdShift = IdShift { host_base: 1_000_000_000, size: 65_536 };

    #[test]
    fn shift_and_unshift_are_inverse_inside_the_range() {
        for id in [0, 1, 1000, 65_533, 65_534, 65_535] {
            let host = NS.to_host(id);
            assert_eq!(host, 1_000_000_000 + id);
            assert_eq!(NS.to_container(host), Some(id));
        }
    }

    #[test]
    fn ids_past_the_range_become_the_overflow_id() {
        assert_eq!(NS.to_host(65_536), OVERFLOW_ID);
        assert_eq!(NS.to_host(u32::MAX), OVERFLOW_ID);
    }

    #[test]
    fn host_ids_outside_the_range_have_no_container_id() {
        for host in [0, 1000, OVERFLOW_ID, 999_999_999, 1_000_065_536, u32::MAX] {
            assert_eq!(NS.to_container(host), None, "{host}");
        }
    }
}
