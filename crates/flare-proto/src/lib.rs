//! Messages between the control plane and workers.
//!
//! The embedded server passes these over in-process channels; a remote worker
//! carries the same messages over the network. This crate holds no logic beyond
//! (de)serialization helpers.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes that travel as standard base64 in JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct B64(pub Bytes);

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(|v| B64(Bytes::from(v)))
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// A Python exception as text: its qualified type name, message and traceback.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExceptionInfo {
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    #[serde(default)]
    pub traceback: String,
}

impl ExceptionInfo {
    pub fn new(type_name: &str, message: impl Into<String>) -> Self {
        ExceptionInfo { type_name: type_name.to_string(), message: message.into(), traceback: String::new() }
    }
}

/// Retry policy of a function.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    #[serde(default = "default_backoff")]
    pub backoff_coefficient: f64,
    #[serde(default = "default_initial_delay")]
    pub initial_delay: f64,
    #[serde(default = "default_max_delay")]
    pub max_delay: f64,
}

fn default_backoff() -> f64 {
    2.0
}
fn default_initial_delay() -> f64 {
    1.0
}
fn default_max_delay() -> f64 {
    60.0
}

impl RetryPolicy {
    /// Delay before retry number `attempt` (1-based), in seconds.
    pub fn delay(&self, attempt: u32) -> f64 {
        let exp = self.backoff_coefficient.powi(attempt.saturating_sub(1) as i32);
        (self.initial_delay * exp).min(self.max_delay).max(0.0)
    }
}

/// Cores a container may use above its `cpu=` request when no limit is given.
pub const CPU_BURST_CORES: f64 = 16.0;

/// Resource and scaling configuration of a function.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FunctionConfig {
    /// Cores reserved for each container (placement); containers may use more.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Hard cap on cores (`cpu=(request, limit)`); without it the cap is the request plus
    /// [`CPU_BURST_CORES`], as on Modal.
    #[serde(default)]
    pub cpu_limit: Option<f64>,
    /// MiB.
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default)]
    pub retries: Option<RetryPolicy>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub min_containers: u32,
    #[serde(default)]
    pub max_containers: Option<u32>,
    #[serde(default)]
    pub buffer_containers: u32,
    #[serde(default = "default_scaledown")]
    pub scaledown_window: u64,
    #[serde(default = "default_one")]
    pub max_inputs: u32,
    #[serde(default)]
    pub target_inputs: Option<u32>,
    #[serde(default)]
    pub block_network: bool,
    /// GPUs the container needs: alternatives in order of preference (Modal's
    /// `gpu="H100:2"` or `gpu=["H100", "A100-80GB"]`); empty = no GPU.
    #[serde(default)]
    pub gpu: Vec<GpuRequest>,
    /// Checkpoint the first container after its imports and `@enter(snap=True)` hooks and
    /// restore later cold starts from it (docs/SNAPSHOTS.md).
    #[serde(default)]
    pub enable_memory_snapshot: bool,
}

/// A GPU type and how many of it one container needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct GpuRequest {
    /// Upper-case type name as workers declare it (e.g. "H100", "A100-80GB"); "ANY" matches any type.
    #[serde(rename = "type")]
    pub kind: String,
    pub count: u32,
}

fn default_timeout() -> u64 {
    300
}
fn default_scaledown() -> u64 {
    60
}
fn default_one() -> u32 {
    1
}

impl Default for FunctionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

/// The Python environment a function runs in (for now: the caller's own).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PythonEnv {
    pub executable: String,
    #[serde(default)]
    pub paths: Vec<String>,
    /// The environment's prefixes (`sys.prefix`, `sys.exec_prefix`, `sys.base_prefix`,
    /// `sys.base_exec_prefix`, the real interpreter's prefix), resolved by the client: with
    /// `paths`, the dirs a container on the host's dirs needs (`flare_api::python_roots`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// A host dir of the SDK to bind (legacy; only inside the server's host-bind allow-list).
    #[serde(default)]
    pub sdk_path: String,
    /// The caller's cloudpickle package dir on the host (legacy; only inside the server's
    /// host-bind allow-list).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cloudpickle_path: String,
    /// A code mount (`POST /v1/mounts`) holding the SDK as `flare/` and cloudpickle as
    /// `cloudpickle/`: bound at `/__flare/flare` (and, on image roots, `/__flare/cloudpickle`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sdk_mount: String,
}

/// A function as registered by a client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub qualname: Option<String>,
    #[serde(default)]
    pub serialized: bool,
    #[serde(default)]
    pub pickled: Option<B64>,
    #[serde(default)]
    pub mount_id: Option<String>,
    #[serde(default)]
    pub is_generator: bool,
    #[serde(default)]
    pub is_async: bool,
    /// A class (`@app.cls`): each input names one of its methods, some of which may be
    /// generators, so both `call`/`spawn`/`map` and `gen` calls are taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_class: bool,
    pub python: PythonEnv,
    #[serde(default)]
    pub config: FunctionConfig,
    /// The image the client asked for (`im-…`, from a build); resolved by the control
    /// plane into `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The image the function runs on; `None`: the caller's own Python environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageUse>,
    /// Web endpoints the function serves (`@flare.asgi_app()` & co.); a class may have one
    /// per method. Their containers take HTTP requests from the ingress (docs/WEB.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub web: Vec<WebEndpoint>,
    /// When the function runs on its own, with no arguments (`schedule=`; docs/SCHEDULES.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// A function's schedule, externally tagged on the wire: `{"period": {"seconds": 5.0}}` or
/// `{"cron": {"expr": "*/5 * * * *", "timezone": "Europe/Paris"}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Every `months` calendar months plus `seconds` (`Period(...)`), counted from the
    /// deploy: the k-th run is at `deploy + k*months + k*seconds` (UTC calendar).
    Period {
        #[serde(default)]
        seconds: f64,
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        months: u32,
    },
    /// A 5-field cron expression (minute hour day-of-month month day-of-week) read in an
    /// IANA time zone (`Cron(...)`).
    Cron {
        expr: String,
        #[serde(default = "utc")]
        timezone: String,
    },
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn utc() -> String {
    "UTC".into()
}

/// What kind of web endpoint a function is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebKind {
    /// `@flare.fastapi_endpoint` (and the deprecated `web_endpoint`): the function is one
    /// route of a FastAPI app the runner makes.
    Fastapi,
    /// `@flare.asgi_app()`: the function returns an ASGI app.
    Asgi,
    /// `@flare.wsgi_app()`: the function returns a WSGI app.
    Wsgi,
    /// `@flare.web_server(port)`: the function starts a server on `port` in the container.
    Server,
}

/// One web endpoint of a function.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WebEndpoint {
    pub kind: WebKind,
    /// The class method that makes the app (`None`: the function itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_name: Option<String>,
    /// The host label (`<label>.<web domain>`); `None`: `<app>-<function>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `fastapi` endpoints: the HTTP method of the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_method: Option<String>,
    /// `fastapi` endpoints: serve the interactive docs at `/docs`.
    #[serde(default)]
    pub docs: bool,
    /// `server` endpoints: the port the server listens on inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Seconds a request waits for a container to start (and a `web_server` for its
    /// port); `None`: the function's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<f64>,
    /// Requests need a proxy auth token (`Flare-Key` / `Flare-Secret` headers).
    #[serde(default)]
    pub requires_proxy_auth: bool,
    /// Accepted and kept; this server serves only its own web domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_domains: Vec<String>,
}

impl WebEndpoint {
    /// The abstract unix socket name the runner serves endpoint `index` on, inside the
    /// container's network namespace (`web_server` endpoints: their TCP port instead).
    pub fn socket_name(index: usize) -> String {
        format!("@flare-web-{index}")
    }
}

/// A built image as a worker needs it to start a container on it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageUse {
    pub image_id: String,
    /// Digest (`blake3:…`) of the image's merged file tree manifest in the blob store.
    pub manifest: String,
    /// The Python interpreter inside the image (absolute path).
    pub python: String,
    /// Environment set by the image (`.env`, registry config), applied before the function's.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (`.workdir`); `None`: `/root`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Local files mounted (not baked) at container start: (absolute destination, manifest digest).
    #[serde(default)]
    pub mounts: Vec<ImageMount>,
    /// A captured local environment: the host's own root, with these absolute dirs bound
    /// from the image (instead of the image as the root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_roots: Vec<String>,
}

/// A file tree mounted read-only into containers of an image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageMount {
    pub dest: String,
    pub manifest: String,
}

/// Final and intermediate statuses of an input's output.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutputStatus {
    Success,
    Failure,
    Timeout,
    Terminated,
    InitFailure,
    InternalFailure,
}

impl OutputStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStatus::Success => "success",
            OutputStatus::Failure => "failure",
            OutputStatus::Timeout => "timeout",
            OutputStatus::Terminated => "terminated",
            OutputStatus::InitFailure => "init_failure",
            OutputStatus::InternalFailure => "internal_failure",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "success" => OutputStatus::Success,
            "failure" => OutputStatus::Failure,
            "timeout" => OutputStatus::Timeout,
            "terminated" => OutputStatus::Terminated,
            "init_failure" => OutputStatus::InitFailure,
            "internal_failure" => OutputStatus::InternalFailure,
            _ => return None,
        })
    }
}

/// Generator markers on outputs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GenMark {
    Item,
    Done,
}

/// One input handed to a container.
#[derive(Clone, Debug)]
pub struct InputMsg {
    pub input_id: String,
    pub call_id: String,
    pub idx: u64,
    pub args: Bytes,
    pub timeout_ms: u64,
}

/// One output produced by a container.
#[derive(Clone, Debug)]
pub struct OutputMsg {
    pub input_id: String,
    pub status: OutputStatus,
    pub gen: Option<GenMark>,
    pub data: Bytes,
    pub exception: Option<ExceptionInfo>,
}

/// What a container needs to start.
#[derive(Clone, Debug)]
pub struct ContainerAssignment {
    pub container_id: String,
    pub app_id: String,
    pub app_name: String,
    pub function_id: String,
    pub def: FunctionDef,
}

/// How a process ended, in words: the one text for exit statuses, used by the worker,
/// the image builder and the control plane ("exit code 3", "killed by signal 9",
/// "killed: out of memory", "unknown status").
pub fn exit_status_text(code: Option<i32>, signal: Option<i32>, oom_killed: bool) -> String {
    match (code, signal, oom_killed) {
        (_, _, true) => "killed: out of memory".to_owned(),
        (_, Some(s), _) => format!("killed by signal {s}"),
        (Some(c), _, _) => format!("exit code {c}"),
        _ => "unknown status".to_owned(),
    }
}

/// Why a container ended.
#[derive(Clone, Debug, Default)]
pub struct ExitReport {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub memory_limit: Option<u64>,
    /// Set when the worker killed the container because this input ran past its timeout.
    pub timed_out_input: Option<String>,
    /// Set when the container failed before becoming ready (the reason, with a stderr tail).
    pub start_error: Option<String>,
    /// True when the stop was asked for (scale-down, app stop, cancel).
    pub requested: bool,
}

impl ExitReport {
    /// [`exit_status_text`] of this report.
    pub fn status_text(&self) -> String {
        exit_status_text(self.code, self.signal, self.oom_killed)
    }
}

/// Control plane -> worker.
// `Start` is much larger than the other variants, but it is sent once per container
// start; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ToWorker {
    Start(ContainerAssignment),
    Inputs {
        container_id: String,
        inputs: Vec<InputMsg>,
    },
    /// Stop a container: `graceful` asks the runner to exit after its current inputs.
    Stop {
        container_id: String,
        graceful: bool,
    },
}

/// Log stream names.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    System,
}

/// Worker -> control plane.
#[derive(Debug)]
pub enum FromWorker {
    Ready { container_id: String },
    InitFailed { container_id: String, exception: ExceptionInfo },
    Outputs { container_id: String, outputs: Vec<OutputMsg> },
    Log { container_id: String, stream: LogStream, data: String },
    Exited { container_id: String, report: ExitReport },
}

#[cfg(test)]
mod tests {
    #[test]
    fn exit_status_texts() {
        let e = exit_status_text;
        assert_eq!(e(Some(0), None, false), "exit code 0");
        assert_eq!(e(Some(3), None, false), "exit code 3");
        assert_eq!(e(None, Some(9), false), "killed by signal 9");
        assert_eq!(e(None, Some(9), true), "killed: out of memory");
        assert_eq!(e(None, None, false), "unknown status");
    }

    use super::*;

    #[test]
    fn b64_roundtrip() {
        let v = B64(Bytes::from_static(b"\x00\x01hello"));
        let s = serde_json::to_string(&v).unwrap();
        assert_eq!(s, "\"AAFoZWxsbw==\"");
        let back: B64 = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
        assert!(serde_json::from_str::<B64>("\"***\"").is_err());
    }

    #[test]
    fn config_defaults() {
        let c = FunctionConfig::default();
        assert_eq!(c.timeout, 300);
        assert_eq!(c.scaledown_window, 60);
        assert_eq!(c.max_inputs, 1);
        assert!(!c.block_network);
    }

    #[test]
    fn retry_delay_backoff() {
        let r = RetryPolicy { max_retries: 3, backoff_coefficient: 2.0, initial_delay: 1.0, max_delay: 3.0 };
        assert_eq!(r.delay(1), 1.0);
        assert_eq!(r.delay(2), 2.0);
        assert_eq!(r.delay(3), 3.0);
    }
}

/// The gRPC form of the worker session (`proto/worker.proto`) and conversions between it
/// and the in-process messages above.
pub mod wire {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flare.worker.v1");
}

/// A message that could not be converted from its wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn exc_to_wire(e: ExceptionInfo) -> wire::ExceptionInfo {
    wire::ExceptionInfo { r#type: e.type_name, message: e.message, traceback: e.traceback }
}

fn exc_from_wire(e: wire::ExceptionInfo) -> ExceptionInfo {
    ExceptionInfo { type_name: e.r#type, message: e.message, traceback: e.traceback }
}

fn stream_str(s: LogStream) -> &'static str {
    match s {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::System => "system",
    }
}

impl ToWorker {
    pub fn into_wire(self) -> wire::ControlMessage {
        use wire::control_message::Msg;
        let msg = match self {
            ToWorker::Start(a) => Msg::Start(wire::Start {
                container_id: a.container_id,
                app_id: a.app_id,
                app_name: a.app_name,
                function_id: a.function_id,
                def_json: serde_json::to_string(&a.def).expect("FunctionDef serializes"),
            }),
            ToWorker::Inputs { container_id, inputs } => Msg::Inputs(wire::Inputs {
                container_id,
                inputs: inputs
                    .into_iter()
                    .map(|i| wire::Input {
                        input_id: i.input_id,
                        call_id: i.call_id,
                        idx: i.idx,
                        args: i.args,
                        timeout_ms: i.timeout_ms,
                    })
                    .collect(),
            }),
            ToWorker::Stop { container_id, graceful } => Msg::Stop(wire::Stop { container_id, graceful }),
        };
        wire::ControlMessage { msg: Some(msg) }
    }

    /// `Ok(None)` for session messages that are not container commands (Registered).
    pub fn from_wire(m: wire::ControlMessage) -> Result<Option<ToWorker>, WireError> {
        use wire::control_message::Msg;
        Ok(Some(match m.msg.ok_or_else(|| WireError("empty control message".into()))? {
            Msg::Registered(_) => return Ok(None),
            Msg::Start(s) => ToWorker::Start(ContainerAssignment {
                container_id: s.container_id,
                app_id: s.app_id,
                app_name: s.app_name,
                function_id: s.function_id,
                def: serde_json::from_str(&s.def_json)
                    .map_err(|e| WireError(format!("bad function definition: {e}")))?,
            }),
            Msg::Inputs(i) => ToWorker::Inputs {
                container_id: i.container_id,
                inputs: i
                    .inputs
                    .into_iter()
                    .map(|i| InputMsg {
                        input_id: i.input_id,
                        call_id: i.call_id,
                        idx: i.idx,
                        args: i.args,
                        timeout_ms: i.timeout_ms,
                    })
                    .collect(),
            },
            Msg::Stop(s) => ToWorker::Stop { container_id: s.container_id, graceful: s.graceful },
        }))
    }
}

impl FromWorker {
    pub fn into_wire(self) -> wire::WorkerMessage {
        use wire::worker_message::Msg;
        let msg = match self {
            FromWorker::Ready { container_id } => Msg::Ready(wire::Ready { container_id }),
            FromWorker::InitFailed { container_id, exception } => {
                Msg::InitFailed(wire::InitFailed { container_id, exception: Some(exc_to_wire(exception)) })
            }
            FromWorker::Outputs { container_id, outputs } => Msg::Outputs(wire::Outputs {
                container_id,
                outputs: outputs
                    .into_iter()
                    .map(|o| wire::Output {
                        input_id: o.input_id,
                        status: o.status.as_str().into(),
                        gen: match o.gen {
                            None => String::new(),
                            Some(GenMark::Item) => "item".into(),
                            Some(GenMark::Done) => "done".into(),
                        },
                        data: o.data,
                        exception: o.exception.map(exc_to_wire),
                    })
                    .collect(),
            }),
            FromWorker::Log { container_id, stream, data } => {
                Msg::Log(wire::Log { container_id, stream: stream_str(stream).into(), data })
            }
            FromWorker::Exited { container_id, report } => Msg::Exited(wire::Exited {
                container_id,
                code: report.code,
                signal: report.signal,
                oom_killed: report.oom_killed,
                memory_limit: report.memory_limit,
                timed_out_input: report.timed_out_input.unwrap_or_default(),
                start_error: report.start_error.unwrap_or_default(),
                requested: report.requested,
            }),
        };
        wire::WorkerMessage { msg: Some(msg) }
    }

    /// Converts a container event; session messages (Register, Heartbeat) are not events.
    pub fn from_wire(m: wire::worker_message::Msg) -> Result<FromWorker, WireError> {
        use wire::worker_message::Msg;
        let none_if_empty = |s: String| if s.is_empty() { None } else { Some(s) };
        Ok(match m {
            Msg::Register(_) | Msg::Heartbeat(_) => return Err(WireError("not a container event".into())),
            Msg::Ready(r) => FromWorker::Ready { container_id: r.container_id },
            Msg::InitFailed(f) => FromWorker::InitFailed {
                container_id: f.container_id,
                exception: f.exception.map(exc_from_wire).unwrap_or_default(),
            },
            Msg::Outputs(o) => FromWorker::Outputs {
                container_id: o.container_id,
                outputs: o
                    .outputs
                    .into_iter()
                    .map(|o| {
                        Ok(OutputMsg {
                            input_id: o.input_id,
                            status: OutputStatus::parse(&o.status)
                                .ok_or_else(|| WireError(format!("unknown output status {:?}", o.status)))?,
                            gen: match o.gen.as_str() {
                                "" => None,
                                "item" => Some(GenMark::Item),
                                "done" => Some(GenMark::Done),
                                other => return Err(WireError(format!("unknown generator mark {other:?}"))),
                            },
                            data: o.data,
                            exception: o.exception.map(exc_from_wire),
                        })
                    })
                    .collect::<Result<_, WireError>>()?,
            },
            Msg::Log(l) => FromWorker::Log {
                container_id: l.container_id,
                stream: match l.stream.as_str() {
                    "stderr" => LogStream::Stderr,
                    "system" => LogStream::System,
                    _ => LogStream::Stdout,
                },
                data: l.data,
            },
            Msg::Exited(e) => FromWorker::Exited {
                container_id: e.container_id,
                report: ExitReport {
                    code: e.code,
                    signal: e.signal,
                    oom_killed: e.oom_killed,
                    memory_limit: e.memory_limit,
                    timed_out_input: none_if_empty(e.timed_out_input),
                    start_error: none_if_empty(e.start_error),
                    requested: e.requested,
                },
            },
        })
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn events_roundtrip_through_the_wire_form() {
        let ev = FromWorker::Outputs {
            container_id: "ct-1".into(),
            outputs: vec![OutputMsg {
                input_id: "in-1".into(),
                status: OutputStatus::Failure,
                gen: Some(GenMark::Item),
                data: Bytes::from_static(b"x"),
                exception: Some(ExceptionInfo::new("builtins.ValueError", "bad")),
            }],
        };
        let back = FromWorker::from_wire(ev.into_wire().msg.unwrap()).unwrap();
        let FromWorker::Outputs { container_id, outputs } = back else { panic!() };
        assert_eq!(container_id, "ct-1");
        assert_eq!(outputs[0].status, OutputStatus::Failure);
        assert_eq!(outputs[0].gen, Some(GenMark::Item));
        assert_eq!(outputs[0].exception.as_ref().unwrap().message, "bad");
        let ex = FromWorker::Exited {
            container_id: "c".into(),
            report: ExitReport { code: Some(1), timed_out_input: Some("in".into()), ..Default::default() },
        };
        let FromWorker::Exited { report, .. } = FromWorker::from_wire(ex.into_wire().msg.unwrap()).unwrap()
        else {
            panic!()
        };
        assert_eq!(report.code, Some(1));
        assert_eq!(report.signal, None);
        assert_eq!(report.timed_out_input.as_deref(), Some("in"));
        assert_eq!(report.start_error, None);
    }

    #[test]
    fn commands_roundtrip_through_the_wire_form() {
        let def: FunctionDef = serde_json::from_value(serde_json::json!({
            "name": "f", "module": "m", "qualname": "f", "python": {"executable": "/usr/bin/python3"}
        }))
        .unwrap();
        let start = ToWorker::Start(ContainerAssignment {
            container_id: "c".into(),
            app_id: "a".into(),
            app_name: "n".into(),
            function_id: "f".into(),
            def: def.clone(),
        });
        let Some(ToWorker::Start(a)) = ToWorker::from_wire(start.into_wire()).unwrap() else { panic!() };
        assert_eq!(a.def, def);
        let reg = wire::ControlMessage {
            msg: Some(wire::control_message::Msg::Registered(wire::Registered::default())),
        };
        assert!(ToWorker::from_wire(reg).unwrap().is_none());
    }
}
