//! Public HTTP API types of the control plane, validated on receipt.
//!
//! The wire contract is described in `docs/PROTOCOL.md`; the OpenAPI document
//! (`openapi.json`, served at `/openapi.json`) is its machine-readable form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod cron;
pub mod hostpaths;
pub use hostpaths::{host_bind_policy, python_roots, set_host_bind_policy, HostBindPolicy, HostPathError};

pub use flare_proto::{
    ExceptionInfo, FunctionConfig, FunctionDef, GenMark, OutputStatus, PythonEnv, Schedule, B64,
};

/// The OpenAPI document of this API.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Largest pickled argument payload of one input (`POST /v1/functions/{id}/calls`,
/// `POST /v1/calls/{id}/inputs`); over it: 413 `payload_too_large`.
pub const MAX_ARGS_BYTES: usize = 64 << 20;
/// Largest pickled result (or yielded item) of one input; a bigger one becomes a
/// `failure` output (`flare.exception.PayloadTooLargeError`) instead of a result.
pub const MAX_RESULT_BYTES: usize = 64 << 20;
/// Body limit of the call routes: one input at [`MAX_ARGS_BYTES`] in base64, plus a batch.
pub const MAX_CALL_BODY: usize = 96 << 20;
/// Body limit of `POST /v1/apps/{id}/functions` (serialized functions are pickled).
pub const MAX_FUNCTIONS_BODY: usize = 32 << 20;
/// Body limit of `POST /v1/mounts` (inline files or file lists) and `POST /v1/images/build`.
pub const MAX_MOUNT_BODY: usize = 64 << 20;
/// Body limit of every other JSON route.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Body limit of the binary upload routes (`PUT /v1/blobs/{digest}`, `POST /v1/blobs/batch`).
pub const MAX_UPLOAD_BODY: usize = 8 << 30;
/// Body limit of `PUT /v1/snapshots/blobs/{digest}`: one blob of a snapshot's manifest
/// (chunks are at most 4 MiB).
pub const MAX_SNAPSHOT_BLOB_BODY: usize = 8 << 20;
/// Body limit of `POST /v1/dicts/{id}/put`: items in base64 (one value is at most 16 MiB
/// pickled; an update of many items shares this budget).
pub const MAX_DICT_PUT_BODY: usize = 64 << 20;
/// Body limit of `POST /v1/queues/{id}/put`: values in base64 (one is at most 1 MiB
/// pickled; a put of many values shares this budget).
pub const MAX_QUEUE_PUT_BODY: usize = 64 << 20;
/// Body limit of `POST /v1/volumes/{id}/commit`: a batch of file changes (10,000 files
/// are about 2 MiB of JSON).
pub const MAX_VOLUME_COMMIT_BODY: usize = 64 << 20;
/// Body limit of `POST /v1/volumes/{id}/blobs`: one piece of a file uploaded from a
/// container (the SDK sends files in 4 MiB pieces).
pub const MAX_VOLUME_BLOB_BODY: usize = 16 << 20;
/// Most output payload bytes one outputs page carries (a page has at least one output).
pub const MAX_PAGE_BYTES: usize = 64 << 20;

/// The header a worker sets on every request that comes through a container's API socket:
/// the id of the container it was made from (any value the container sent is replaced).
pub const CALLER_CONTAINER_HEADER: &str = "x-flare-container";

/// The content type a state-changing request must carry, by method and path: `None` for
/// requests that change nothing (GET, HEAD, OPTIONS).
pub fn required_content_type(method: &str, path: &str) -> Option<&'static str> {
    if matches!(method, "GET" | "HEAD" | "OPTIONS") {
        return None;
    }
    let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, p.as_slice()) {
        ("PUT", ["v1", "blobs", d]) if *d != "missing" && *d != "batch" => Some("application/octet-stream"),
        ("POST", ["v1", "blobs", "batch"]) => Some("application/octet-stream"),
        ("PUT", ["v1", "snapshots", "blobs", d]) if *d != "missing" => Some("application/octet-stream"),
        ("POST", ["v1", "volumes", _, "blobs"]) => Some("application/octet-stream"),
        _ => Some("application/json"),
    }
}

/// Body limit of a route (see the `MAX_*` constants and `docs/PROTOCOL.md`).
pub fn body_limit(method: &str, path: &str) -> usize {
    let p: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, p.as_slice()) {
        ("POST", ["v1", "functions", _, "calls"]) | ("POST", ["v1", "calls", _, "inputs"]) => MAX_CALL_BODY,
        ("POST", ["v1", "apps", _, "functions"]) => MAX_FUNCTIONS_BODY,
        // Code mounts and image builds carry file lists (a captured Python environment:
        // tens of thousands of entries, ~10 MiB of JSON).
        ("POST", ["v1", "mounts"]) | ("POST", ["v1", "images", "build"]) => MAX_MOUNT_BODY,
        ("PUT", ["v1", "snapshots", "blobs", _]) => MAX_SNAPSHOT_BLOB_BODY,
        ("POST", ["v1", "dicts", _, "put"]) => MAX_DICT_PUT_BODY,
        ("POST", ["v1", "queues", _, "put"]) => MAX_QUEUE_PUT_BODY,
        ("POST", ["v1", "volumes", _, "commit"]) => MAX_VOLUME_COMMIT_BODY,
        ("POST", ["v1", "volumes", _, "blobs"]) => MAX_VOLUME_BLOB_BODY,
        _ if required_content_type(method, path) == Some("application/octet-stream") => MAX_UPLOAD_BODY,
        _ => MAX_JSON_BODY,
    }
}

/// Sizes for messages: `12.0 MiB`.
pub fn mib(n: usize) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}

/// Error codes of the public API and their HTTP statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    Conflict,
    FailedPrecondition,
    Internal,
    Unavailable,
    /// A request (or a value in it) is over a documented size limit.
    PayloadTooLarge,
    /// A state-changing request without the content type its route takes.
    UnsupportedMediaType,
    /// A request refused for where it comes from (a foreign `Origin` or `Host`).
    PermissionDenied,
    /// Back-pressure: the request may be sent again once the caller has consumed some of
    /// what it asked for before (a map's outputs).
    ResourceExhausted,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Conflict => 409,
            ErrorCode::FailedPrecondition => 412,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::ResourceExhausted => 429,
        }
    }
}

/// An API error: a code and a message meant for a person.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn not_found(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::NotFound, message: m.into() }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::InvalidArgument, message: m.into() }
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::FailedPrecondition, message: m.into() }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::Internal, message: m.into() }
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::Unavailable, message: m.into() }
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::PayloadTooLarge, message: m.into() }
    }
    pub fn unsupported_media_type(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::UnsupportedMediaType, message: m.into() }
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::PermissionDenied, message: m.into() }
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        ApiError { code: ErrorCode::ResourceExhausted, message: m.into() }
    }
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code, message: self.message.clone() } }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub server_id: String,
    pub started_at: f64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppMode {
    Ephemeral,
    Deployed,
}

impl AppMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AppMode::Ephemeral => "ephemeral",
            AppMode::Deployed => "deployed",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateApp {
    pub name: String,
    pub mode: AppMode,
    #[serde(default)]
    pub description: Option<String>,
}

impl CreateApp {
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_name("app name", &self.name)
    }
}

/// Names of apps and functions: 1..=128 characters of letters, digits and `-_.`.
pub fn validate_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid {what} {name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppCreated {
    pub app_id: String,
    pub name: String,
    pub mode: AppMode,
    pub version: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionSummary {
    pub name: String,
    pub function_id: String,
    pub containers: u32,
    pub backlog: u64,
    /// A scheduled function's next run (seconds since the epoch, UTC); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppInfo {
    pub app_id: String,
    pub name: String,
    pub mode: AppMode,
    pub state: String,
    pub version: i64,
    pub created_at: f64,
    pub functions: Vec<FunctionSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppList {
    pub apps: Vec<AppInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountFile {
    pub path: String,
    pub data: B64,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateMount {
    #[serde(default)]
    pub files: Vec<MountFile>,
    /// A content-addressed file list (`docs/IMAGES.md`) instead of inline `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<serde_json::Value>,
}

impl CreateMount {
    /// Checks the whole mount on receipt (inline `files` and the `entries` file list
    /// together, see [`validate_file_list`]); a bad entry is a 400 naming it.
    pub fn validate(&self) -> Result<(), ApiError> {
        let shapes: Vec<EntryShape> = match &self.entries {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| ApiError::invalid(format!("invalid entries: {e}")))?,
            None => Vec::new(),
        };
        let inline = self.files.iter().map(|f| ListEntry { path: &f.path, kind: ListEntryKind::File });
        validate_file_list(inline.chain(shapes.iter().map(EntryShape::as_list_entry)))
    }
}

/// The part of a file-list entry (`docs/IMAGES.md`) that [`validate_file_list`] looks at;
/// the other fields (digest, size, mode, mtime) are read by whoever stores the list.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum EntryShape {
    File { path: String },
    Dir { path: String },
    Symlink { path: String, target: String },
}

impl EntryShape {
    fn as_list_entry(&self) -> ListEntry<'_> {
        match self {
            EntryShape::File { path } => ListEntry { path, kind: ListEntryKind::File },
            EntryShape::Dir { path } => ListEntry { path, kind: ListEntryKind::Dir },
            EntryShape::Symlink { path, target } => {
                ListEntry { path, kind: ListEntryKind::Symlink { target } }
            }
        }
    }
}

/// One entry of a file list (a code mount, an image's `copy` step or start-time mount),
/// as [`validate_file_list`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListEntry<'a> {
    pub path: &'a str,
    pub kind: ListEntryKind<'a>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListEntryKind<'a> {
    File,
    Dir,
    /// A symlink's target is kept as given: it resolves inside the container, so it may
    /// be absolute or contain `..`.
    Symlink {
        target: &'a str,
    },
}

/// Checks a whole file list before anything of it is stored: every path is relative and
/// `/`-separated with no empty, `.` or `..` part (so no absolute or empty path), no path
/// appears twice, and nothing lies below a symlink or a regular file of the list (at any
/// depth, whatever the order of the entries). Symlink targets are not interpreted
/// (only an empty one or one with a NUL byte, which no file system can hold, is refused).
/// The error is a 400 naming the entry.
pub fn validate_file_list<'a>(entries: impl IntoIterator<Item = ListEntry<'a>>) -> Result<(), ApiError> {
    use std::collections::hash_map::{Entry, HashMap};
    let mut kinds: HashMap<&'a str, ListEntryKind<'a>> = HashMap::new();
    let mut order = Vec::new();
    for e in entries {
        validate_relative_path(e.path)?;
        if let ListEntryKind::Symlink { target } = e.kind {
            if target.is_empty() || target.contains('\0') {
                return Err(ApiError::invalid(format!(
                    "invalid file list entry {:?}: a symlink target must be non-empty, without NUL bytes",
                    e.path
                )));
            }
        }
        match kinds.entry(e.path) {
            Entry::Occupied(_) => {
                return Err(ApiError::invalid(format!("invalid file list: {:?} appears twice", e.path)));
            }
            Entry::Vacant(v) => {
                v.insert(e.kind);
                order.push(e.path);
            }
        }
    }
    // In the list's order, shortest ancestor first: the message names the first bad
    // entry and the outermost symlink or file above it.
    for path in order {
        for (i, _) in path.match_indices('/') {
            let above = &path[..i];
            let what = match kinds.get(above) {
                Some(ListEntryKind::Symlink { .. }) => "the symlink",
                Some(ListEntryKind::File) => "the regular file",
                Some(ListEntryKind::Dir) | None => continue,
            };
            return Err(ApiError::invalid(format!(
                "invalid file list entry {path:?}: it is below {what} {above:?} of the same list"
            )));
        }
    }
    Ok(())
}

/// A relative, `/`-separated path with no empty, `.` or `..` parts.
pub fn validate_relative_path(p: &str) -> Result<(), ApiError> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        Err(ApiError::invalid(format!(
            "invalid path {p:?}: must be relative and '/'-separated, without empty, '.' or '..' parts"
        )))
    } else {
        Ok(())
    }
}

/// Writes a mount's files into `dir` atomically: into the sibling temporary dir `tmp`
/// first, then renamed, so a half-written mount is never seen. Another writer finishing
/// the same (content-addressed) mount first is fine. Files become read-only.
pub fn write_mount_dir<'a>(
    dir: &std::path::Path,
    tmp: &std::path::Path,
    files: impl IntoIterator<Item = &'a MountFile>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp)?;
    for f in files {
        validate_relative_path(&f.path)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.message))?;
        let p = tmp.join(&f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, &f.data.0)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode & 0o755 | 0o444))?;
    }
    match std::fs::rename(tmp, dir) {
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(())
        }
        r => r,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountCreated {
    pub mount_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterFunctions {
    pub functions: Vec<FunctionDef>,
}

impl RegisterFunctions {
    pub fn validate(&self) -> Result<(), ApiError> {
        let mut seen = std::collections::HashSet::new();
        for f in &self.functions {
            validate_function(f)?;
            if !seen.insert(f.name.as_str()) {
                return Err(ApiError::invalid(format!("function {:?} registered twice", f.name)));
            }
        }
        Ok(())
    }
}

/// Checks a function definition for values the platform cannot honour.
pub fn validate_function(f: &FunctionDef) -> Result<(), ApiError> {
    validate_name("function name", &f.name)?;
    if f.serialized {
        if f.pickled.is_none() {
            return Err(ApiError::invalid(format!(
                "function {:?}: serialized without a pickled body",
                f.name
            )));
        }
    } else if f.module.is_none() || f.qualname.is_none() {
        return Err(ApiError::invalid(format!("function {:?}: needs module and qualname", f.name)));
    }
    if f.python.executable.is_empty() || !f.python.executable.starts_with('/') {
        return Err(ApiError::invalid(format!("function {:?}: python.executable must be absolute", f.name)));
    }
    validate_host_paths(f, host_bind_policy())?;
    let c = &f.config;
    if let Some(cpu) = c.cpu {
        if !(0.0625..=64.0).contains(&cpu) {
            return Err(ApiError::invalid(format!("cpu={cpu} out of range (0.0625 to 64 cores)")));
        }
    }
    if let Some(limit) = c.cpu_limit {
        if limit < c.cpu.unwrap_or(0.0625) || limit > 1024.0 {
            return Err(ApiError::invalid(format!(
                "cpu limit {limit} must be >= the cpu request and <= 1024"
            )));
        }
    }
    if let Some(m) = c.memory {
        if !(16..=1024 * 1024).contains(&m) {
            return Err(ApiError::invalid(format!("memory={m} MiB out of range (16 MiB to 1 TiB)")));
        }
    }
    if c.timeout == 0 || c.timeout > 24 * 3600 {
        return Err(ApiError::invalid(format!("timeout={} out of range (1 s to 24 h)", c.timeout)));
    }
    if c.max_inputs == 0 || c.max_inputs > 1000 {
        return Err(ApiError::invalid(format!("max_inputs={} out of range (1 to 1000)", c.max_inputs)));
    }
    if let Some(max) = c.max_containers {
        if max == 0 || max < c.min_containers {
            return Err(ApiError::invalid(format!(
                "max_containers={max} must be >= 1 and >= min_containers={}",
                c.min_containers
            )));
        }
    }
    validate_web(f)?;
    validate_schedule(f)?;
    if let Some(r) = &c.retries {
        if r.max_retries > 10 || r.initial_delay < 0.0 || r.max_delay < 0.0 || r.backoff_coefficient < 1.0 {
            return Err(ApiError::invalid(
                "retries: max_retries must be <= 10, delays >= 0, backoff_coefficient >= 1",
            ));
        }
    }
    Ok(())
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `label` can be a host name's first label: 1 to 63 of `a-z`, `0-9` and `-`, not
/// starting or ending with `-`.
pub fn valid_web_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Shortest period of a `Period` schedule, in seconds.
pub const MIN_SCHEDULE_PERIOD: f64 = 1.0;

/// A schedule the platform can run: a period of at least [`MIN_SCHEDULE_PERIOD`], or a cron
/// expression that parses, in a known IANA zone, that fires at all; on a plain function
/// (not a class, a generator or a web endpoint).
fn validate_schedule(f: &FunctionDef) -> Result<(), ApiError> {
    let Some(s) = &f.schedule else { return Ok(()) };
    let bad = |why: String| Err(ApiError::invalid(format!("function {:?}: schedule: {why}", f.name)));
    if f.is_class {
        return bad("schedules are for functions, not classes".into());
    }
    if f.is_generator {
        return bad("a generator function cannot be scheduled".into());
    }
    if !f.web.is_empty() {
        return bad("a web endpoint cannot be scheduled".into());
    }
    match s {
        Schedule::Period { seconds, months } => {
            if !seconds.is_finite() || *seconds < 0.0 || *months > 12 * 1000 {
                return bad(format!("bad period (seconds={seconds}, months={months})"));
            }
            if *months == 0 && *seconds < MIN_SCHEDULE_PERIOD {
                return bad(format!("period of {seconds} s is too short (at least {MIN_SCHEDULE_PERIOD} s)"));
            }
            if *seconds > 1e11 {
                return bad(format!("period of {seconds} s is too long"));
            }
        }
        Schedule::Cron { expr, timezone } => {
            let e = match cron::CronExpr::parse(expr) {
                Ok(e) => e,
                Err(why) => return bad(why),
            };
            let tz = match cron::timezone(timezone) {
                Ok(tz) => tz,
                Err(why) => return bad(why),
            };
            let now = cron::utc(now_secs()).unwrap_or_default();
            if e.next_after(tz, now).is_none() {
                return bad(format!("cron expression {expr:?} never fires"));
            }
        }
    }
    Ok(())
}

fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn validate_web(f: &FunctionDef) -> Result<(), ApiError> {
    use flare_proto::WebKind;
    if f.web.len() > 1 && !f.is_class {
        return Err(ApiError::invalid(format!("function {:?}: a function serves one web endpoint", f.name)));
    }
    let mut methods = std::collections::HashSet::new();
    for w in &f.web {
        if !methods.insert(w.method_name.as_deref()) {
            return Err(ApiError::invalid(format!("function {:?}: two web endpoints on one method", f.name)));
        }
        if let Some(label) = &w.label {
            if !valid_web_label(label) {
                return Err(ApiError::invalid(format!(
                    "function {:?}: web label {label:?} must be 1 to 63 of a-z, 0-9 and '-', not starting \
                     or ending with '-'",
                    f.name
                )));
            }
        }
        match (w.kind, w.port) {
            (WebKind::Server, None | Some(0)) => {
                return Err(ApiError::invalid(format!("function {:?}: web_server needs a port", f.name)))
            }
            (WebKind::Server, _) | (_, None) => {}
            (_, Some(_)) => {
                return Err(ApiError::invalid(format!("function {:?}: only web_server takes a port", f.name)))
            }
        }
        if let Some(t) = w.startup_timeout {
            if !(t > 0.0 && t <= 3600.0) {
                return Err(ApiError::invalid(format!(
                    "function {:?}: startup_timeout={t} out of range (0 to 3600 s)",
                    f.name
                )));
            }
        }
        if let Some(m) = &w.http_method {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ApiError::invalid(format!("function {:?}: bad HTTP method {m:?}", f.name)));
            }
        }
    }
    Ok(())
}

/// The host paths and mount ids of a function definition: mount ids are names, never
/// paths, and every host directory it would have bound is inside `policy`'s allow-list
/// (lexically; the worker checks again on its own file system).
pub fn validate_host_paths(f: &FunctionDef, policy: &HostBindPolicy) -> Result<(), ApiError> {
    for (what, id) in
        [("mount_id", f.mount_id.as_deref().unwrap_or("-")), ("python.sdk_mount", &f.python.sdk_mount)]
    {
        if id != "-" && !id.is_empty() {
            hostpaths::validate_mount_id(what, id)
                .map_err(|e| ApiError::invalid(format!("function {:?}: {e}", f.name)))?;
        }
    }
    if f.image_id.is_some() || f.image.is_some() {
        // On an image these are the container's sys.path, never host binds; still never
        // the server's own dirs.
        for p in f.python.paths.iter().chain(&f.python.prefixes).filter(|p| p.starts_with('/')) {
            policy.may_name(p).map_err(|e| {
                ApiError::invalid(format!("function {:?}: python path {}: {}", f.name, e.path, e.reason))
            })?;
        }
    }
    for (what, path) in hostpaths::requested_host_binds(f) {
        policy.allows(&path).map_err(|e| {
            ApiError::invalid(format!(
                "function {:?}: {what} {}: {}; the server decides which host paths containers see",
                f.name, e.path, e.reason
            ))
        })?;
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionRef {
    pub name: String,
    pub function_id: String,
    /// The URL of the function's web endpoint (a class's: `web_urls`, by method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub web_urls: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionsRegistered {
    pub functions: Vec<FunctionRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionInfo {
    pub function_id: String,
    pub name: String,
    pub app_id: String,
    pub is_generator: bool,
    pub is_async: bool,
    /// The URL of the function's web endpoint (a class's: `web_urls`, by method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub web_urls: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionStats {
    pub backlog: u64,
    pub num_total_runners: u32,
    pub num_running_inputs: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    Call,
    Spawn,
    Map,
    Gen,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Call => "call",
            CallKind::Spawn => "spawn",
            CallKind::Map => "map",
            CallKind::Gen => "gen",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "call" => CallKind::Call,
            "spawn" => CallKind::Spawn,
            "map" => CallKind::Map,
            "gen" => CallKind::Gen,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputItem {
    pub args: B64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateCall {
    pub kind: CallKind,
    #[serde(default)]
    pub inputs: Vec<InputItem>,
    #[serde(default)]
    pub more: bool,
    #[serde(default)]
    pub wait_ms: u64,
}

impl CreateCall {
    pub fn validate(&self) -> Result<(), ApiError> {
        match self.kind {
            CallKind::Call | CallKind::Spawn | CallKind::Gen => {
                if self.inputs.len() != 1 || self.more {
                    return Err(ApiError::invalid(format!(
                        "a {} call takes exactly one input",
                        self.kind.as_str()
                    )));
                }
            }
            CallKind::Map => {}
        }
        validate_inputs(&self.inputs)
    }
}

/// Every input's arguments must be at most [`MAX_ARGS_BYTES`].
pub fn validate_inputs(inputs: &[InputItem]) -> Result<(), ApiError> {
    for (i, item) in inputs.iter().enumerate() {
        if item.args.0.len() > MAX_ARGS_BYTES {
            return Err(ApiError::too_large(format!(
                "the arguments of input {i} are {}, over the limit of {} per input",
                mib(item.args.0.len()),
                mib(MAX_ARGS_BYTES)
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddInputs {
    #[serde(default)]
    pub inputs: Vec<InputItem>,
    #[serde(default)]
    pub more: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputsAdded {
    pub first_idx: u64,
    pub count: u64,
}

/// One output of a call, as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Output {
    pub idx: u64,
    pub seq: u64,
    pub input_id: String,
    pub status: OutputStatus,
    pub data: Option<B64>,
    pub gen: Option<GenMark>,
    pub exception: Option<ExceptionInfo>,
    pub retry_count: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallCreated {
    pub call_id: String,
    pub outputs: Vec<Output>,
    pub done: bool,
    /// Seq of the last log record of the function's app when this response was made
    /// (-1: none): a client that streams logs can wait until it has printed that far, so
    /// prints made before a result appear before it.
    #[serde(default = "minus_one")]
    pub log_seq: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputsPage {
    pub outputs: Vec<Output>,
    pub next: i64,
    pub done: bool,
    /// As in [`CallCreated::log_seq`].
    #[serde(default = "minus_one")]
    pub log_seq: i64,
}

/// `POST /v1/apps/{app_id}/detach`: the ephemeral app keeps running without its client.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DetachApp {
    /// The client is leaving now: the app stops once no work is left (without this,
    /// when its heartbeats stop).
    #[serde(default)]
    pub client_left: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CancelCall {
    #[serde(default)]
    pub terminate_containers: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallInfo {
    pub call_id: String,
    pub function_id: String,
    pub kind: CallKind,
    pub num_inputs: u64,
    pub num_outputs: u64,
    pub done: bool,
    pub created_at: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    pub ts: f64,
    pub container_id: String,
    pub function: String,
    pub stream: flare_proto::LogStream,
    pub data: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogsPage {
    pub logs: Vec<LogRecord>,
    pub next: i64,
    pub app_state: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub container_id: String,
    pub app_id: String,
    pub function: String,
    /// The worker running it ("" while waiting for one).
    #[serde(default)]
    pub worker_id: String,
    pub state: String,
    pub age_s: f64,
    pub inputs_in_flight: u32,
    /// The container's memory limit in MiB (`memory=`, else the server's default; None: none).
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// The container's cap on cores (`cpu=(request, limit)`, else request + 16).
    #[serde(default)]
    pub cpu_limit: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerList {
    pub containers: Vec<ContainerInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub address: String,
    pub state: String,
    pub cpu_millis: u64,
    pub cpu_millis_used: u64,
    pub memory_mb: u64,
    pub memory_mb_used: u64,
    pub gpus: BTreeMap<String, u32>,
    pub gpus_used: BTreeMap<String, u32>,
    pub containers: u32,
    pub joined_at: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<WorkerInfo>,
}

/// Run-time changes to a function's autoscaler (`Function.update_autoscaler`); absent
/// fields keep their values.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateAutoscaler {
    #[serde(default)]
    pub min_containers: Option<u32>,
    #[serde(default)]
    pub max_containers: Option<u32>,
    #[serde(default)]
    pub buffer_containers: Option<u32>,
    #[serde(default)]
    pub scaledown_window: Option<u64>,
}

/// The API calls code inside a container may make (through its worker's socket): looking
/// functions up, calling them, reading outputs, cancelling calls. Method and path template
/// as in the OpenAPI document. The control plane's route table marks the same routes
/// `container`; a test there checks that the two agree route by route.
pub const CONTAINER_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/apps/by-name/{app_name}/functions/{name}"),
    ("GET", "/v1/apps/{app_id}/functions/{name}"),
    ("GET", "/v1/functions/{function_id}/stats"),
    ("POST", "/v1/functions/{function_id}/calls"),
    ("GET", "/v1/calls/{call_id}"),
    ("POST", "/v1/calls/{call_id}/inputs"),
    ("GET", "/v1/calls/{call_id}/outputs"),
    ("POST", "/v1/calls/{call_id}/cancel"),
    ("POST", "/v1/dicts"),
    ("GET", "/v1/dicts"),
    ("DELETE", "/v1/dicts/{dict_id}"),
    ("POST", "/v1/dicts/{dict_id}/get"),
    ("POST", "/v1/dicts/{dict_id}/contains"),
    ("POST", "/v1/dicts/{dict_id}/put"),
    ("POST", "/v1/dicts/{dict_id}/pop"),
    ("GET", "/v1/dicts/{dict_id}/len"),
    ("GET", "/v1/dicts/{dict_id}/items"),
    ("POST", "/v1/dicts/{dict_id}/clear"),
    ("POST", "/v1/dicts/{dict_id}/heartbeat"),
    ("POST", "/v1/queues"),
    ("GET", "/v1/queues"),
    ("DELETE", "/v1/queues/{queue_id}"),
    ("POST", "/v1/queues/{queue_id}/put"),
    ("POST", "/v1/queues/{queue_id}/get"),
    ("GET", "/v1/queues/{queue_id}/len"),
    ("POST", "/v1/queues/{queue_id}/peek"),
    ("POST", "/v1/queues/{queue_id}/clear"),
    ("POST", "/v1/queues/{queue_id}/heartbeat"),
    ("POST", "/v1/volumes"),
    ("GET", "/v1/volumes"),
    ("GET", "/v1/volumes/{volume_id}"),
    ("DELETE", "/v1/volumes/{volume_id}"),
    ("GET", "/v1/volumes/{volume_id}/entries"),
    ("GET", "/v1/volumes/{volume_id}/file"),
    ("POST", "/v1/volumes/{volume_id}/commit"),
    ("POST", "/v1/volumes/{volume_id}/blobs/missing"),
    ("POST", "/v1/volumes/{volume_id}/blobs"),
    ("POST", "/v1/volumes/{volume_id}/heartbeat"),
];

/// Whether a concrete path (a query is ignored) matches a path template with `{name}`
/// segments.
pub fn path_matches(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or("");
    let mut t = template.trim_start_matches('/').split('/');
    let mut p = path.trim_start_matches('/').split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') && ts.ends_with('}') || ts == ps => {}
            _ => return false,
        }
    }
}

/// Whether code inside a container may make this API request: one of [`CONTAINER_ROUTES`].
pub fn container_may_call(method: &str, path: &str) -> bool {
    CONTAINER_ROUTES.iter().any(|(m, t)| *m == method && path_matches(t, path))
}

/// Empty JSON object response.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

/// Query of the long-poll endpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PollQuery {
    #[serde(default = "minus_one")]
    pub after: i64,
    #[serde(default)]
    pub wait_ms: u64,
    #[serde(default)]
    pub limit: Option<usize>,
}

fn minus_one() -> i64 {
    -1
}

/// Environment a container of the function gets, for display.
pub type EnvMap = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ListEntry<'_> {
        ListEntry { path, kind: ListEntryKind::File }
    }
    fn dir(path: &str) -> ListEntry<'_> {
        ListEntry { path, kind: ListEntryKind::Dir }
    }
    fn link<'a>(path: &'a str, target: &'a str) -> ListEntry<'a> {
        ListEntry { path, kind: ListEntryKind::Symlink { target } }
    }
    fn refused(entries: Vec<ListEntry<'_>>, naming: &str) -> String {
        let e = validate_file_list(entries).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains(&format!("{naming:?}")), "{naming:?} not named: {}", e.message);
        e.message
    }

    #[test]
    fn file_lists_are_validated_whole() {
        // Fine: nested dirs, files, dirs implied, symlink targets as given (absolute or
        // with `..`: they resolve inside the container), a symlink next to a dir.
        validate_file_list(vec![
            dir("pkg"),
            file("pkg/mod.py"),
            dir("pkg/__pycache__"),
            file("pkg/__pycache__/mod.cpython-311.pyc"),
            file("a/b/c.txt"),
            link("pkg/abs", "/etc/passwd"),
            link("pkg/up", "../../../host"),
            link("main", "pkg/mod.py"),
        ])
        .unwrap();
        validate_file_list(vec![]).unwrap();

        // Paths: absolute, `..`, `.`, empty (whole or a part), NUL.
        refused(vec![file("/etc/passwd")], "/etc/passwd");
        refused(vec![file("../x")], "../x");
        refused(vec![dir("a/../../x")], "a/../../x");
        refused(vec![file("./x")], "./x");
        refused(vec![file("")], "");
        refused(vec![file("a//b")], "a//b");
        refused(vec![file("a/")], "a/");
        refused(vec![link("a\0b", "t")], "a\0b");
        // Duplicates, of any kinds.
        assert!(refused(vec![file("x"), file("y"), file("x")], "x").contains("twice"));
        refused(vec![dir("d"), dir("d")], "d");
        refused(vec![link("l", "t"), file("l")], "l");
        // Below a symlink of the list: directly, deeper, in either order.
        let m = refused(vec![link("w", "/host/dir"), file("w/pwned")], "w/pwned");
        assert!(m.contains("symlink") && m.contains("\"w\""), "{m}");
        refused(vec![file("w/x/pwned"), link("w", "/host/dir")], "w/x/pwned");
        refused(vec![dir("d"), link("d/l", "."), dir("d/l/sub")], "d/l/sub");
        refused(vec![link("w", "t"), link("w/l", "t")], "w/l");
        // Below a regular file of the list.
        let m = refused(vec![file("f"), file("f/g")], "f/g");
        assert!(m.contains("regular file"), "{m}");
        refused(vec![dir("f/g/h"), file("f")], "f/g/h");
        // Symlink targets that no file system holds.
        refused(vec![link("l", "")], "l");
        refused(vec![link("l", "a\0b")], "l");
    }

    #[test]
    fn create_mount_validates_files_and_entries_together() {
        let parse = |v: serde_json::Value| serde_json::from_value::<CreateMount>(v).unwrap().validate();
        let d = "blake3:00";
        assert!(parse(serde_json::json!({"entries": [
            {"path": "app", "kind": "dir", "mode": 493},
            {"path": "app/main.py", "kind": "file", "mode": 420, "digest": d, "size": 1},
            {"path": "app/l", "kind": "symlink", "target": "/usr/lib"},
        ]}))
        .is_ok());
        let e = parse(serde_json::json!({"entries": [
            {"path": "main.py", "kind": "file", "mode": 420, "digest": d, "size": 1},
            {"path": "w", "kind": "symlink", "target": "/host/dir"},
            {"path": "w/pwned", "kind": "file", "mode": 420, "digest": d, "size": 6},
        ]}))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("\"w/pwned\""), "{e}");
        // Inline files and entries are one mount.
        let e = parse(serde_json::json!({
            "files": [{"path": "x", "data": ""}],
            "entries": [{"path": "x/y", "kind": "file", "digest": d, "size": 0}],
        }))
        .unwrap_err();
        assert!(e.message.contains("\"x/y\""), "{e}");
        let e = parse(serde_json::json!({"files": [{"path": "/abs", "data": ""}]})).unwrap_err();
        assert!(e.message.contains("\"/abs\""), "{e}");
        assert!(parse(serde_json::json!({"entries": [{"path": "x", "kind": "fifo"}]})).is_err());
        assert!(parse(serde_json::json!({"entries": {"path": "x"}})).is_err());
    }

    fn def() -> FunctionDef {
        serde_json::from_value(serde_json::json!({
            "name": "square", "module": "hello", "qualname": "square",
            "python": {"executable": "/usr/bin/python3"}
        }))
        .unwrap()
    }

    #[test]
    fn validates_schedules() {
        let with = |s: serde_json::Value| {
            let mut d = def();
            d.schedule = Some(serde_json::from_value(s).unwrap());
            validate_function(&d).map_err(|e| e.message)
        };
        assert!(with(serde_json::json!({"period": {"seconds": 1.0}})).is_ok());
        assert!(with(serde_json::json!({"period": {"months": 1}})).is_ok());
        assert!(with(serde_json::json!({"cron": {"expr": "*/5 * * * *"}})).is_ok());
        assert!(
            with(serde_json::json!({"cron": {"expr": "0 9 * * 1-5", "timezone": "Europe/Paris"}})).is_ok()
        );
        let e = with(serde_json::json!({"period": {"seconds": 0.5}})).unwrap_err();
        assert!(e.contains("too short"), "{e}");
        let e = with(serde_json::json!({"period": {"seconds": -1.0}})).unwrap_err();
        assert!(e.contains("bad period"), "{e}");
        let e = with(serde_json::json!({"cron": {"expr": "61 * * * *"}})).unwrap_err();
        assert!(e.contains("minute field"), "{e}");
        let e = with(serde_json::json!({"cron": {"expr": "* * *"}})).unwrap_err();
        assert!(e.contains("expected 5"), "{e}");
        let e = with(serde_json::json!({"cron": {"expr": "* * * * *", "timezone": "Europe/Pariss"}}))
            .unwrap_err();
        assert!(e.contains("unknown time zone"), "{e}");
        let e = with(serde_json::json!({"cron": {"expr": "0 0 30 2 *"}})).unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        let mut d = def();
        d.is_class = true;
        d.schedule = Some(Schedule::Period { seconds: 5.0, months: 0 });
        assert!(validate_function(&d).unwrap_err().message.contains("not classes"));
        // The wire form.
        let s: Schedule = serde_json::from_str(r#"{"cron": {"expr": "* * * * *"}}"#).unwrap();
        assert_eq!(s, Schedule::Cron { expr: "* * * * *".into(), timezone: "UTC".into() });
        assert_eq!(
            serde_json::to_value(Schedule::Period { seconds: 2.0, months: 0 }).unwrap(),
            serde_json::json!({"period": {"seconds": 2.0}})
        );
    }

    #[test]
    fn validates_functions() {
        assert!(validate_function(&def()).is_ok());
        let mut d = def();
        d.config.cpu = Some(1000.0);
        assert!(validate_function(&d).unwrap_err().message.contains("cpu"));
        let mut d = def();
        d.module = None;
        assert!(validate_function(&d).is_err());
        let mut d = def();
        d.name = "a b".into();
        assert!(validate_function(&d).is_err());
    }

    #[test]
    fn host_paths_need_the_servers_allow_list() {
        let none = HostBindPolicy::none(Some(std::path::Path::new("/root/.flare")));
        let with = |f: &dyn Fn(&mut FunctionDef)| {
            let mut d = def();
            f(&mut d);
            validate_host_paths(&d, &none)
        };
        assert!(with(&|_| {}).is_ok(), "a system python binds nothing");
        // "/" and the system dirs are never bound at all (the host root has them).
        assert!(with(&|d| d.python.paths = vec!["/".into(), "/usr/lib/python3".into()]).is_ok());
        for attack in ["/root/.flare", "/proc", "/usr/../root/.flare", "/root/.flare/../.flare"] {
            let e = with(&|d| d.python.paths = vec![attack.into()]).unwrap_err();
            assert_eq!(e.code.http_status(), 400, "{attack}");
            assert!(e.message.contains("host"), "{}", e.message);
            assert!(with(&|d| d.python.sdk_path = attack.into()).is_err(), "sdk_path {attack}");
            assert!(
                with(&|d| d.python.cloudpickle_path = attack.into()).is_err(),
                "cloudpickle_path {attack}"
            );
            assert!(with(&|d| d.python.executable = format!("{attack}/bin/python")).is_err());
        }
        // On an image, python.paths are paths inside it, not host binds; never the
        // server's data dir or a kernel file system.
        assert!(with(&|d| {
            d.python.paths = vec!["/tmp/v/lib/python3.11/site-packages".into(), "/root".into()];
            d.image_id = Some("im-1".into());
        })
        .is_ok());
        for bad in ["/proc/1/root", "/root/.flare", "/tmp/../root/.flare"] {
            assert!(with(&|d| {
                d.python.paths = vec![bad.into()];
                d.image_id = Some("im-1".into());
            })
            .is_err());
        }
        for bad in ["..", "../../..", "a/b"] {
            assert!(with(&|d| d.mount_id = Some(bad.into())).is_err(), "{bad}");
            assert!(with(&|d| d.python.sdk_mount = bad.into()).is_err(), "{bad}");
        }
        let tmp = std::env::temp_dir().join(format!("flare-api-allow-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("venv/lib")).unwrap();
        let allow = HostBindPolicy::with_allowed(&[tmp.join("venv")], None).unwrap();
        let venv = tmp.join("venv").canonicalize().unwrap().display().to_string();
        let mut d = def();
        d.python.paths = vec![format!("{venv}/lib")];
        assert!(validate_host_paths(&d, &allow).is_ok());
        d.python.paths.push("/proc".into());
        assert!(validate_host_paths(&d, &allow).unwrap_err().message.contains("/proc"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn validates_paths() {
        assert!(validate_relative_path("a/b.py").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a"] {
            assert!(validate_relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn openapi_is_json_and_lists_paths() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let paths = v["paths"].as_object().unwrap();
        for p in
            ["/v1/health", "/v1/apps", "/v1/functions/{function_id}/calls", "/v1/calls/{call_id}/outputs"]
        {
            assert!(paths.contains_key(p), "{p}");
        }
    }

    #[test]
    fn container_paths() {
        assert!(container_may_call("POST", "/v1/functions/fu-1/calls"));
        assert!(container_may_call("GET", "/v1/calls/fc-1/outputs?after=3&wait_ms=10"));
        assert!(!container_may_call("POST", "/v1/apps"));
        assert!(!container_may_call("POST", "/v1/apps/ap-1/stop"));
        assert!(!container_may_call("GET", "/v1/mounts/mo-1"));
        assert!(!container_may_call("DELETE", "/v1/calls/fc-1"));
    }

    #[test]
    fn content_types_and_limits() {
        assert_eq!(required_content_type("GET", "/v1/apps"), None);
        assert_eq!(required_content_type("POST", "/v1/apps"), Some("application/json"));
        assert_eq!(required_content_type("POST", "/v1/apps/ap-1/stop"), Some("application/json"));
        assert_eq!(required_content_type("DELETE", "/v1/calls/fc-1"), Some("application/json"));
        assert_eq!(required_content_type("PUT", "/v1/blobs/blake3:ab"), Some("application/octet-stream"));
        assert_eq!(required_content_type("POST", "/v1/blobs/batch"), Some("application/octet-stream"));
        assert_eq!(required_content_type("POST", "/v1/blobs/missing"), Some("application/json"));
        assert_eq!(body_limit("POST", "/v1/apps"), MAX_JSON_BODY);
        assert_eq!(body_limit("POST", "/v1/images/build"), MAX_MOUNT_BODY);
        assert_eq!(body_limit("POST", "/v1/functions/fu-1/calls"), MAX_CALL_BODY);
        assert_eq!(body_limit("POST", "/v1/dicts/di-1/put"), MAX_DICT_PUT_BODY);
        assert_eq!(body_limit("POST", "/v1/dicts/di-1/get"), MAX_JSON_BODY);
        assert_eq!(body_limit("POST", "/v1/queues/qu-1/put"), MAX_QUEUE_PUT_BODY);
        assert_eq!(body_limit("PUT", "/v1/blobs/blake3:ab"), MAX_UPLOAD_BODY);
        let big = InputItem { args: B64(vec![0u8; MAX_ARGS_BYTES + 1].into()) };
        let e = validate_inputs(&[big]).unwrap_err();
        assert_eq!(e.code.http_status(), 413);
        assert!(e.message.contains("over the limit of 64.0 MiB"), "{}", e.message);
    }

    #[test]
    fn call_validation() {
        let c = CreateCall { kind: CallKind::Call, inputs: vec![], more: false, wait_ms: 0 };
        assert!(c.validate().is_err());
    }
}
