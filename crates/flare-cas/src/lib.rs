//! Flare's content-addressed store: BLAKE3 digests, a [`BlobStore`] trait with a local
//! directory implementation, files as whole blobs or content-defined chunks,
//! manifests (file trees) with OCI layering, snapshot/materialize of directories, and
//! garbage collection that is safe while a build runs.

mod chunk;
mod digest;
mod error;
pub mod gc;
mod manifest;
mod materialize;
mod snapshot;
mod store;

pub use chunk::{
    cut_point, read_file_range, store_file, store_reader, write_file_to, Chunk, Chunker, FileContent,
    AVG_CHUNK, MAX_CHUNK, MIN_CHUNK, WHOLE_FILE_MAX,
};
pub use digest::{Digest, Hasher, ALGORITHM};
pub use error::{CasError, Result};
pub use gc::{gc, GcReport};
pub use manifest::{
    get_manifest, normalize_path, put_manifest, shared_bytes, Entry, EntryKind, Manifest, ManifestStats,
    MANIFEST_VERSION, OPAQUE_MARKER, WHITEOUT_PREFIX,
};
pub use materialize::materialize;
pub use snapshot::{entry_from, snapshot_dir, snapshot_dir_with_stats, SnapshotStats};
pub use store::{BlobInfo, BlobStore, Durability, LocalStore};
