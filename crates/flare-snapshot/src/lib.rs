//! CRIU as a library, the foundation of Flare's memory snapshots: checkpoint a
//! container's process tree once its imports and model loading are done, and restore
//! later cold starts from the images instead of starting Python again.
//!
//! - [`detect`] / [`Criu::detect`]: the criu binary (configured or in `PATH`), its
//!   version, `criu check` and the optional features ([`Features`]), or why it is not
//!   usable ([`CriuInfo::unusable`]).
//! - [`Criu::dump`] / [`Criu::restore`]: `criu dump` / `criu restore -d` with typed
//!   options ([`DumpOpts`], [`RestoreOpts`]), optionally with lazy pages.
//! - [`snapshot_key`]: which snapshot a cold start may use (function version, image,
//!   CPU flags, kernel release, CRIU version).
//!
//! See `README.md` in this crate for what works with Flare's containers and what not.

mod criu;
mod detect;
mod error;
mod key;
pub mod sys;

pub use criu::{
    log_errors, CgroupMode, Criu, DumpOpts, DumpReport, ExternalMount, NetworkLock, RestoreOpts, Restored,
};
pub use detect::{detect, find_criu, CriuInfo, CriuVersion, Features, MIN_MAJOR};
pub use error::SnapshotError;
pub use key::{cpu_flags_from_cpuinfo, host_cpu_flags, snapshot_key, KeyInputs, KEY_LAYOUT};
