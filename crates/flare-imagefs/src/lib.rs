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
//!
//! The kernel page cache is kept across opens (`FOPEN_KEEP_CACHE`) and attributes,
//! entries and symlinks are cached for [`ImageFsOptions::ttl`]: the tree is immutable.

mod cache;
mod error;
mod fs;
mod mount;
mod readahead;

pub use cache::{CacheStats, ChunkCache, Source, OPEN_FILES};
pub use error::{ImageFsError, Result};
pub use fs::{ImageFs, ImageFsOptions, ImageFsStats, PrefetchReport};
pub use mount::{force_unmount, MountHandle};
