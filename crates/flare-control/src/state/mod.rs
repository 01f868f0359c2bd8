//! The live state of the control plane: typed records of apps, functions, calls,
//! containers and workers, and the [`ledger::Ledger`] of the resources containers hold.
//! Everything here sits behind the control plane's one mutex.

mod app;
pub(crate) mod ledger;
mod lifecycle;

pub(crate) use app::AppRecord;
pub use app::AppState;
pub(crate) use ledger::{Capacity, Ledger, Reservation};
pub use lifecycle::ContainerEvent;
pub(crate) use lifecycle::Lifecycle;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use flare_api::{CallKind, LogRecord};
use flare_proto::FunctionDef;
use tokio::sync::watch;

use crate::logs::LogBucket;
use crate::{retention, scheduler, ControlConfig, WorkerLink};

/// A worker with a current session (its resources are in [`State::ledger`]).
pub(crate) struct WorkerRt {
    pub(crate) link: WorkerLink,
    pub(crate) accepting: bool,
    pub(crate) draining: bool,
    pub(crate) last_seen: Instant,
    pub(crate) joined_at: f64,
    /// Images (manifest digests) a container has started on here: their files are in
    /// this worker's chunk cache, so the scheduler prefers it for them.
    pub(crate) images: scheduler::ImageSet,
}

/// An input waiting in a function's queue or running in a container.
#[derive(Clone)]
pub(crate) struct QueuedInput {
    pub(crate) input_id: String,
    pub(crate) call_id: String,
    pub(crate) idx: u64,
    pub(crate) args: Bytes,
    /// User retries used so far.
    pub(crate) retry_count: u32,
    /// Platform re-runs used so far (worker or container died under it).
    pub(crate) platform_retries: u32,
}

/// An app in memory, with its functions by name and its log ring.
pub(crate) struct AppRt {
    pub(crate) app: AppRecord,
    pub(crate) functions: BTreeMap<String, String>,
    pub(crate) last_heartbeat: Instant,
    /// A detached app's client said it left (it stops once no work is left).
    pub(crate) client_left: bool,
    pub(crate) logs: VecDeque<LogRecord>,
    pub(crate) next_log_seq: u64,
    pub(crate) log_notify: watch::Sender<u64>,
    /// Bytes of the records in `logs`.
    pub(crate) log_bytes: usize,
    /// When the app was stopped with no container left (its in-memory logs go later).
    pub(crate) stopped_idle_since: Option<Instant>,
}

/// A function: its definition, queue, delayed retries and containers.
pub(crate) struct FnRt {
    pub(crate) id: String,
    pub(crate) app_id: String,
    pub(crate) name: String,
    pub(crate) def: FunctionDef,
    pub(crate) version: u64,
    pub(crate) queue: VecDeque<QueuedInput>,
    pub(crate) delayed: Vec<(Instant, QueuedInput)>,
    pub(crate) containers: HashSet<String>,
    pub(crate) active: bool,
    /// Why the function's next container cannot be placed, while it cannot.
    pub(crate) waiting: Option<String>,
    /// Containers that died before becoming ready, in a row.
    pub(crate) start_failures: u32,
    /// Web requests waiting for a container slot (a backlog for the autoscaler).
    pub(crate) web_waiting: u32,
    /// Bumped when a slot may have freed up or the function changed (wakes waiting
    /// web requests).
    pub(crate) web_wake: watch::Sender<u64>,
    /// Why the last container failed to start (answered to waiting web requests).
    pub(crate) init_error: Option<String>,
}

impl FnRt {
    /// A function's first version: active, nothing queued, no containers.
    pub(crate) fn new(id: String, app_id: String, name: String, def: FunctionDef) -> Self {
        FnRt {
            id,
            app_id,
            name,
            def,
            version: 1,
            queue: VecDeque::new(),
            delayed: Vec::new(),
            containers: HashSet::new(),
            active: true,
            waiting: None,
            start_failures: 0,
            web_waiting: 0,
            web_wake: watch::channel(0).0,
            init_error: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CState {
    Starting,
    Ready,
    Stopping,
}

impl CState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CState::Starting => "starting",
            CState::Ready => "ready",
            CState::Stopping => "stopping",
        }
    }
}

pub(crate) struct ContainerRt {
    pub(crate) id: String,
    pub(crate) function_id: String,
    pub(crate) app_id: String,
    pub(crate) worker_id: String,
    pub(crate) fn_version: u64,
    pub(crate) state: CState,
    pub(crate) inflight: HashMap<String, QueuedInput>,
    pub(crate) started_at: Instant,
    pub(crate) idle_since: Instant,
    /// What it holds on its worker (booked in [`State::ledger`]).
    pub(crate) reservation: Reservation,
    /// Inputs killed with this container because the user asked (cancel): no output for them.
    pub(crate) cancelled: HashSet<String>,
    /// Memory limit (MiB) and core cap the worker was told to apply.
    pub(crate) memory_limit_mb: Option<u64>,
    pub(crate) cpu_limit: Option<f64>,
    pub(crate) logs: LogBucket,
    /// Web requests (and WebSockets) it is serving now.
    pub(crate) web_inflight: u32,
    /// An old version's container serving web requests: it stops once they finish.
    pub(crate) retire: bool,
}

impl ContainerRt {
    /// Inputs and web requests it is serving.
    pub(crate) fn load(&self) -> usize {
        self.inflight.len() + self.web_inflight as usize
    }

    /// Serving nothing.
    pub(crate) fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.web_inflight == 0
    }
}

pub(crate) struct CallRt {
    pub(crate) id: String,
    pub(crate) function_id: String,
    pub(crate) kind: CallKind,
    pub(crate) num_inputs: u64,
    pub(crate) more: bool,
    /// Outputs the caller has not read yet (see [`retention::OutputLog`]).
    pub(crate) outputs: retention::OutputLog,
    pub(crate) final_count: u64,
    pub(crate) notify: watch::Sender<u64>,
    pub(crate) created_at: f64,
    pub(crate) persisted: bool,
    pub(crate) finished: retention::FinishedSet,
    pub(crate) last_access: Instant,
    /// The app whose container made the call (None: a client outside containers).
    pub(crate) caller_app: Option<String>,
    /// When a page reaching the end of the done call was served.
    pub(crate) delivered_at: Option<Instant>,
    /// Someone reads the outputs as they come (`.map`), so back-pressure applies.
    pub(crate) read_by_caller: bool,
    /// Bumped when outputs are acknowledged or the call stops taking inputs (wakes a
    /// submitter waiting for room).
    pub(crate) room: watch::Sender<u64>,
}

impl CallRt {
    pub(crate) fn done(&self) -> bool {
        !self.more && self.final_count >= self.num_inputs
    }

    /// Inputs accepted whose final output the caller has not acknowledged.
    pub(crate) fn unconsumed(&self) -> u64 {
        self.num_inputs.saturating_sub(self.outputs.delivered_finals())
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) apps: HashMap<String, AppRt>,
    pub(crate) functions: HashMap<String, FnRt>,
    pub(crate) calls: HashMap<String, CallRt>,
    pub(crate) containers: HashMap<String, ContainerRt>,
    pub(crate) workers: Vec<WorkerRt>,
    /// Cpu, memory and GPUs of every worker and what its containers hold.
    pub(crate) ledger: Ledger,
    pub(crate) config: ControlConfig,
    /// Outputs dropped (read by their caller, or their call left memory) since the heap
    /// was last trimmed.
    pub(crate) freed_outputs: u64,
    /// Container lifecycle events for subscribers.
    pub(crate) lifecycle: Lifecycle,
    /// Functions to schedule at the next [`crate::dispatch::schedule_dirty`].
    pub(crate) dirty: BTreeSet<String>,
    /// Scheduled functions (`services::schedules`).
    pub(crate) schedules: crate::services::schedules::Table,
}

impl State {
    /// Marks a function for scheduling once the current change is done.
    pub(crate) fn mark_dirty(&mut self, fid: &str) {
        self.dirty.insert(fid.to_string());
    }
}
