//! Worker events become state transitions (the decisions on faults are `faults.rs`'s).

use crate::faults::{self, InputFate, StartFault};
use std::time::Instant;

use bytes::Bytes;
use flare_api::Output;
use flare_proto::{ExceptionInfo, ExitReport, FromWorker, GenMark, LogStream, OutputMsg, OutputStatus, B64};
use tokio::sync::mpsc;

use crate::calls::{append_output, fail_queue, finish_input, platform_output};
use crate::dispatch::{schedule, schedule_dirty};
use crate::logs::push_log;
use crate::state::{CState, ContainerEvent, QueuedInput, State};
use crate::{now_ts, ControlPlane};

impl ControlPlane {
    /// Feeds worker events into the state; run this on the worker's event stream.
    pub async fn run_worker_events(self, mut rx: mpsc::UnboundedReceiver<FromWorker>) {
        while let Some(ev) = rx.recv().await {
            self.on_worker_event(ev);
        }
    }

    pub(crate) fn on_worker_event(&self, ev: FromWorker) {
        let mut st = self.lock();
        let st = &mut *st;
        match ev {
            FromWorker::Ready { container_id } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                if c.state == CState::Starting {
                    c.state = CState::Ready;
                    c.idle_since = Instant::now();
                    st.lifecycle
                        .emit(ContainerEvent::Ready { container_id: container_id.clone(), at: now_ts() });
                }
                let fid = c.function_id.clone();
                let wid = c.worker_id.clone();
                if let Some(f) = st.functions.get_mut(&fid) {
                    f.start_failures = 0;
                    f.init_error = None;
                    if let Some(img) = &f.def.image {
                        if let Some(w) = st.workers.iter_mut().find(|w| w.link.id == wid) {
                            w.images.insert(&img.manifest);
                        }
                    }
                }
                tracing::debug!(container = %container_id, ms = c.started_at.elapsed().as_millis() as u64, "container ready");
                schedule(st, &fid);
            }
            FromWorker::InitFailed { container_id, exception } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                c.state = CState::Stopping;
                st.lifecycle
                    .emit(ContainerEvent::Stopping { container_id: container_id.clone(), at: now_ts() });
                let fid = c.function_id.clone();
                let app_id = c.app_id.clone();
                push_log(
                    st,
                    &self.inner.log_tx,
                    &app_id,
                    &container_id,
                    LogStream::System,
                    &format!(
                        "container failed to start: {}: {}\n{}",
                        exception.type_name, exception.message, exception.traceback
                    ),
                );
                if let Some(f) = st.functions.get_mut(&fid) {
                    f.init_error = Some(format!("{}: {}", exception.type_name, exception.message));
                    f.web_wake.send_modify(|v| *v += 1);
                }
                fail_queue(st, self.persist(), &fid, OutputStatus::InitFailure, &exception);
            }
            FromWorker::Outputs { container_id, outputs } => {
                self.on_outputs(st, &container_id, outputs);
            }
            FromWorker::Log { container_id, stream, data } => {
                let Some(c) = st.containers.get_mut(&container_id) else { return };
                let app_id = c.app_id.clone();
                if stream != LogStream::System && !c.logs.take(data.len(), &st.config) {
                    // A flood: dropped here, with a note once the container is within its rate.
                    c.logs.dropped_lines += data.lines().count().max(1) as u64;
                    c.logs.dropped_bytes += data.len() as u64;
                    c.logs.last_drop = Instant::now();
                    return;
                }
                if let Some(note) = c.logs.take_note(&st.config) {
                    push_log(st, &self.inner.log_tx, &app_id, &container_id, LogStream::System, &note);
                }
                push_log(st, &self.inner.log_tx, &app_id, &container_id, stream, &data);
            }
            FromWorker::Exited { container_id, report } => {
                self.on_exit(st, &container_id, report);
                self.inner.containers_changed.send_modify(|v| *v += 1);
            }
        }
    }

    pub(crate) fn on_outputs(&self, st: &mut State, container_id: &str, outputs: Vec<OutputMsg>) {
        let Some(c) = st.containers.get_mut(container_id) else { return };
        let fid = c.function_id.clone();
        let mut finals = Vec::new();
        let mut items = Vec::new();
        for mut o in outputs {
            if o.data.len() > flare_api::MAX_RESULT_BYTES {
                // The runner refuses such results itself; this holds for any container.
                let what = if o.status == OutputStatus::Success { "result" } else { "exception" };
                o.exception = Some(ExceptionInfo::new(
                    "flare.exception.PayloadTooLargeError",
                    format!(
                        "the function's {what} is {}, over the limit of {} per output",
                        flare_api::mib(o.data.len()),
                        flare_api::mib(flare_api::MAX_RESULT_BYTES)
                    ),
                ));
                o.status = OutputStatus::Failure;
                o.data = Bytes::new();
                if o.gen == Some(GenMark::Item) {
                    o.gen = Some(GenMark::Done);
                }
            }
            if o.gen == Some(GenMark::Item) {
                if let Some(qi) = c.inflight.get(&o.input_id) {
                    items.push((qi.clone(), o));
                }
            } else if let Some(qi) = c.inflight.remove(&o.input_id) {
                finals.push((qi, o));
            }
        }
        if c.is_idle() {
            c.idle_since = Instant::now();
        }
        for (qi, o) in items {
            let out = Output {
                idx: qi.idx,
                seq: 0,
                input_id: qi.input_id.clone(),
                status: o.status,
                data: Some(B64(o.data)),
                gen: o.gen,
                exception: o.exception,
                retry_count: qi.retry_count,
            };
            append_output(st, self.persist(), &qi.call_id, out, false);
        }
        for (qi, o) in finals {
            let too_large =
                o.exception.as_ref().is_some_and(|e| e.type_name == "flare.exception.PayloadTooLargeError");
            if o.status == OutputStatus::Failure && !too_large && self.maybe_retry(st, &fid, &qi) {
                continue;
            }
            let out = Output {
                idx: qi.idx,
                seq: 0,
                input_id: qi.input_id.clone(),
                status: o.status,
                data: if o.data.is_empty() { None } else { Some(B64(o.data)) },
                gen: o.gen,
                exception: o.exception,
                retry_count: qi.retry_count,
            };
            finish_input(st, self.persist(), &qi, out);
        }
        schedule(st, &fid);
    }

    /// Re-queues a failed input if the function's retry policy allows; true if it did.
    pub(crate) fn maybe_retry(&self, st: &mut State, fid: &str, qi: &QueuedInput) -> bool {
        let Some(f) = st.functions.get_mut(fid) else { return false };
        if !st.calls.contains_key(&qi.call_id) {
            return false;
        }
        let Some(delay) = faults::retry_delay(f.def.config.retries.as_ref(), qi.retry_count, f.active) else {
            return false;
        };
        let mut next = qi.clone();
        next.retry_count += 1;
        tracing::info!(input = %qi.input_id, retry = next.retry_count, delay_ms = delay.as_millis() as u64, "retrying input");
        f.delayed.push((Instant::now() + delay, next));
        true
    }

    pub(crate) fn on_exit(&self, st: &mut State, container_id: &str, report: ExitReport) {
        let Some(mut c) = st.containers.remove(container_id) else { return };
        if let Some(note) = c.logs.take_note(&st.config) {
            push_log(st, &self.inner.log_tx, &c.app_id, container_id, LogStream::System, &note);
        }
        st.ledger.release(&c.worker_id, &c.reservation);
        st.lifecycle.emit(ContainerEvent::Exited { container_id: container_id.to_string(), at: now_ts() });
        let fid = c.function_id.clone();
        if let Some(f) = st.functions.get_mut(&fid) {
            f.containers.remove(container_id);
        }
        tracing::debug!(container = %container_id, ?report, "container exited");
        let failures = st.functions.get(&fid).map_or(0, |f| f.start_failures);
        let (failures, fault) = faults::start_fault(c.state == CState::Starting, &report, failures);
        if let Some(f) = st.functions.get_mut(&fid) {
            f.start_failures = failures;
        }
        match fault {
            StartFault::None => {}
            StartFault::TryAgain(n) => {
                tracing::warn!(container = %container_id, failures = n, error = ?report.start_error, "container failed to start; trying again");
            }
            StartFault::FailQueue(exc) => {
                fail_queue(st, self.persist(), &fid, OutputStatus::InitFailure, &exc);
            }
        }
        let timeout = st.functions.get(&fid).map_or(0, |f| f.def.config.timeout);
        for (input_id, qi) in c.inflight {
            if c.cancelled.contains(&input_id) {
                continue;
            }
            match faults::exited_input_fate(&input_id, qi.platform_retries, &report, timeout) {
                InputFate::Rerun => requeue_front(st, &fid, qi),
                InputFate::Fail(status, exc) => {
                    if !self.maybe_retry(st, &fid, &qi) {
                        let out = platform_output(&qi, status, exc);
                        finish_input(st, self.persist(), &qi, out);
                    }
                }
            }
        }
        schedule(st, &fid);
        // The freed capacity may be what another function's backlog is waiting for.
        st.dirty.extend(st.functions.values().filter(|f| !f.queue.is_empty()).map(|f| f.id.clone()));
        schedule_dirty(st);
    }
}

/// Puts an input back at the front of its function's queue as a platform re-run.
pub(crate) fn requeue_front(st: &mut State, fid: &str, mut qi: QueuedInput) {
    qi.platform_retries += 1;
    if let Some(f) = st.functions.get_mut(fid) {
        f.queue.push_front(qi);
    }
}
