//! Flare's lazy image file system: a read-only FUSE mount of a [`flare_cas::Manifest`]
//! whose metadata lives in memory and whose file contents are fetched chunk by chunk,
//! on first read, from a [`flare_cas::BlobStore`] into a worker-local [`ChunkCache`]
//! shared by every image.
//!
//! - [`ImageFs::new`] builds the inode table; [`ImageFs::mount`] mounts it (direct
//!   `mount(2)` of `/dev/fuse` as root; no libfuse needed) and returns a
//!   [`MountHandle`] that unmounts on [`MountHandle::unmount`] or drop.
//! - A store failure during a read is EIO for that reader only; it is logged and
//!   counted in [`ImageFs::stats`].
//! - [`ImageFs::access_log`] lists the chunks read since creation in first-read order;
//!   [`ImageFs::prefetch`] warms the cache with such a list on the next start.
//! - Directory-locality prefetch: the first open of a file in a directory fetches the
//!   directory's other small files in the background (bounded; see
//!   [`ImageFsOptions::dir_prefetch_file_max`]); large files stay lazy.
//! - FUSE passthrough (Linux >= 6.9): a file whose content is one cached, verified
//!   chunk, or a big file with an assembled one-file copy in the cache (built in the
//!   background once all its chunks are cached), is handed to the kernel, so its reads
//!   bypass this process ([`ImageFsOptions::passthrough`]).
//! - A full cache disk is not an error for readers: the cache evicts to make room, or
//!   serves the chunk uncached; both are logged and counted in [`ChunkCache::stats`].
//!
//! - Owner shift for containers in a user namespace ([`ImageFsOptions::ids`]): a
//!   manifest owner `n` is reported as host id `host_base + n`, the id root (or user
//!   `n`) inside the container has on the host.
//!
//! The kernel page cache is kept across opens (`FOPEN_KEEP_CACHE`) and attributes,
//! entries and symlinks are cached for [`ImageFsOptions::ttl`]: the tree is immutable.

mod cache;
mod error;
mod fs;
mod ids;
mod mount;
mod readahead;

pub use cache::{CacheStats, ChunkCache, Source, OPEN_FILES};
pub use error::{ImageFsError, Result};
pub use fs::{ImageFs, ImageFsOptions, ImageFsStats, PrefetchReport, DIR_PREFETCH_MIN_FILES};
pub use ids::{IdShift, OVERFLOW_ID};
pub use mount::{force_unmount, MountHandle};
