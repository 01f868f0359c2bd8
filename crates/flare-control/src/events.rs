//! Worker events become state transitions.

use crate::*;

/// Containers of a function that may fail to start in a row before its queue fails.
pub(crate) const START_FAILURE_LIMIT: u32 = 3;
/// Inputs a platform fault may re-run before the input fails, beyond the user's retries.
pub(crate) const PLATFORM_RETRIES: u32 = 3;

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
                }
                let fid = c.function_id.clone();
                let wid = c.worker_id.clone();
                if let Some(f) = st.functions.get_mut(&fid) {
                    f.start_failures = 0;
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
        if c.inflight.is_empty() {
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
        let Some(policy) = f.def.config.retries.clone() else { return false };
        if qi.retry_count >= policy.max_retries || !f.active {
            return false;
        }
        if !st.calls.contains_key(&qi.call_id) {
            return false;
        }
        let mut next = qi.clone();
        next.retry_count += 1;
        let delay = Duration::from_secs_f64(policy.delay(next.retry_count));
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
        let fid = c.function_id.clone();
        if let Some(f) = st.functions.get_mut(&fid) {
            f.containers.remove(container_id);
        }
        tracing::debug!(container = %container_id, ?report, "container exited");
        let limit_text = report
            .memory_limit
            .map(|b| format!("{} MiB", b / (1024 * 1024)))
            .unwrap_or_else(|| "the machine's memory".into());
        // A container that dies before it is ready (without reporting an import error,
        // which fails the queue at once) may have hit a passing platform fault: the
        // function gets a few more tries, then its queue fails, so nothing loops.
        let start_failures = if c.state == CState::Starting && !report.requested {
            st.functions.get_mut(&fid).map(|f| {
                f.start_failures += 1;
                f.start_failures
            })
        } else {
            None
        };
        if let Some(n) = start_failures.filter(|n| *n < START_FAILURE_LIMIT && !report.oom_killed) {
            tracing::warn!(container = %container_id, failures = n, error = ?report.start_error, "container failed to start; trying again");
        } else if start_failures.is_some() {
            if let Some(f) = st.functions.get_mut(&fid) {
                f.start_failures = 0;
            }
            let msg = report.start_error.clone().unwrap_or_else(|| {
                if report.oom_killed {
                    format!("container ran out of memory (OOM) while starting: limit {limit_text}")
                } else {
                    format!("container exited before it was ready ({})", describe_exit(&report))
                }
            });
            let exc = ExceptionInfo::new("flare.exception.ExecutionError", msg);
            fail_queue(st, self.persist(), &fid, OutputStatus::InitFailure, &exc);
        }
        for (input_id, qi) in c.inflight {
            if c.cancelled.contains(&input_id) {
                continue;
            }
            let (status, exc) = if report.timed_out_input.as_deref() == Some(input_id.as_str()) {
                let t = st.functions.get(&fid).map(|f| f.def.config.timeout).unwrap_or(0);
                (
                    OutputStatus::Timeout,
                    ExceptionInfo::new(
                        "flare.exception.FunctionTimeoutError",
                        format!("function timed out after {t} s (timeout={t}); its container was stopped"),
                    ),
                )
            } else if report.timed_out_input.is_some() || (report.requested && !report.oom_killed) {
                // Killed along with another input, or by a scale-down race: run again.
                if qi.platform_retries < PLATFORM_RETRIES {
                    let mut again = qi;
                    again.platform_retries += 1;
                    if let Some(f) = st.functions.get_mut(&fid) {
                        f.queue.push_front(again);
                    }
                    continue;
                }
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new("flare.exception.ExecutionError", "the container was stopped"),
                )
            } else if report.oom_killed {
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.OutOfMemoryError",
                        format!(
                            "container was OOM-killed: out of memory (memory limit {limit_text}); raise memory= on the function"
                        ),
                    ),
                )
            } else {
                (
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.ExecutionError",
                        format!("the container running this input died ({})", describe_exit(&report)),
                    ),
                )
            };
            if self.maybe_retry(st, &fid, &qi) {
                continue;
            }
            let out = platform_output(&qi, status, exc);
            finish_input(st, self.persist(), &qi, out);
        }
        schedule(st, &fid);
        // The freed capacity may be what another function's backlog is waiting for.
        st.dirty.extend(st.functions.values().filter(|f| !f.queue.is_empty()).map(|f| f.id.clone()));
        schedule_dirty(st);
    }
}

pub(crate) fn describe_exit(r: &ExitReport) -> String {
    match (r.code, r.signal) {
        (_, Some(sig)) => format!("killed by signal {sig}"),
        (Some(code), None) => format!("exit code {code}"),
        _ => "unknown status".into(),
    }
}
