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

/// Resource and scaling configuration of a function.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FunctionConfig {
    #[serde(default)]
    pub cpu: Option<f64>,
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
    #[serde(default)]
    pub sdk_path: String,
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
    pub python: PythonEnv,
    #[serde(default)]
    pub config: FunctionConfig,
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

/// Control plane -> worker.
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
