//! Calls and their output logs: inputs in, outputs out, cancellation, access checks.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use flare_api::{ApiError, CallKind, Output};
use flare_proto::{ExceptionInfo, OutputStatus, B64};
use flare_store::{CallRow, OutputRow, PendingInputRow, Write};
use tokio::sync::watch;

use crate::apps::check_function_access;
use crate::dispatch::schedule;
use crate::persist::{Persist, Ticket};
use crate::state::{CallRt, QueuedInput, State};
use crate::workers::stop_container;
use crate::{new_id, now_ts, retention, store_err, Admitted, ApiResult, Caller, ControlPlane, NoRoom};

/// A call just created: its id and a receiver of its output count.
pub(crate) type NewCall = (String, watch::Receiver<u64>);

impl ControlPlane {
    /// Creates a call with its first inputs; returns the call id and a receiver of output counts.
    pub fn create_call(
        &self,
        fid: &str,
        kind: CallKind,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(String, watch::Receiver<u64>)> {
        self.create_call_by(&Caller::Client, fid, kind, inputs, more)
    }

    /// [`Self::create_call`] on behalf of `caller`: a container may call functions of its
    /// own app and of deployed apps; the call remembers the caller's app. A spawned call is
    /// in the store when this returns.
    pub fn create_call_by(
        &self,
        caller: &Caller,
        fid: &str,
        kind: CallKind,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(String, watch::Receiver<u64>)> {
        let ((call_id, rx), ticket) = self.create_call_queued(caller, fid, kind, inputs, more)?;
        if let Some(t) = ticket {
            t.wait_blocking()?;
        }
        Ok((call_id, rx))
    }

    /// [`Self::create_call_by`] without waiting: a spawned call comes with the ticket of
    /// its commit.
    pub(crate) fn create_call_queued(
        &self,
        caller: &Caller,
        fid: &str,
        kind: CallKind,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(NewCall, Option<Ticket>)> {
        let mut st = self.lock();
        let st = &mut *st;
        check_function_access(st, caller, fid)?;
        let caller_app = match caller {
            Caller::Client => None,
            Caller::Container { app_id, .. } => Some(app_id.clone()),
        };
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let app_id = f.app_id.clone();
        let fname = f.name.clone();
        let is_gen = f.def.is_generator;
        let is_class = f.def.is_class;
        let app = st.apps.get(&app_id).ok_or_else(|| ApiError::not_found("app not found"))?;
        if app.app.stopped() || !f.active {
            return Err(ApiError::precondition(format!(
                "app {:?} is stopped; function {fname:?} cannot take inputs",
                app.app.name
            )));
        }
        match (kind, is_gen) {
            _ if is_class => {}
            (CallKind::Gen, false) => {
                return Err(ApiError::invalid(format!("{fname} is not a generator function; use .remote()")))
            }
            (CallKind::Call | CallKind::Spawn | CallKind::Map, true) => {
                return Err(ApiError::invalid(format!("{fname} is a generator function; use .remote_gen()")))
            }
            _ => {}
        }
        let call_id = new_id("fc");
        let persisted = kind == CallKind::Spawn;
        let created_at = now_ts();
        if persisted {
            self.persist().write(Write::Call(CallRow {
                call_id: call_id.clone(),
                function_id: fid.to_string(),
                kind: kind.as_str().into(),
                num_inputs: inputs.len() as u64,
                created_at,
                caller_app_id: caller_app.clone(),
            }));
        }
        let (tx, rx) = watch::channel(0);
        st.calls.insert(
            call_id.clone(),
            CallRt {
                id: call_id.clone(),
                function_id: fid.to_string(),
                kind,
                num_inputs: 0,
                more,
                outputs: retention::OutputLog::default(),
                final_count: 0,
                notify: tx,
                created_at,
                persisted,
                finished: retention::FinishedSet::default(),
                last_access: Instant::now(),
                caller_app: caller_app.clone(),
                delivered_at: None,
                read_by_caller: false,
                room: watch::channel(0).0,
            },
        );
        self.add_inputs_locked(st, &call_id, inputs, more)?;
        let ticket = persisted.then(|| self.persist().ticket());
        Ok(((call_id, rx), ticket))
    }

    /// Adds inputs to a call; a spawned call's are in the store when this returns.
    pub fn add_inputs(&self, call_id: &str, inputs: Vec<Bytes>, more: bool) -> ApiResult<(u64, u64)> {
        let (added, ticket) = {
            let mut st = self.lock();
            let added = self.add_inputs_locked(&mut st, call_id, inputs, more)?;
            (added, self.ticket_if_persisted(&st, call_id))
        };
        if let Some(t) = ticket {
            t.wait_blocking()?;
        }
        Ok(added)
    }

    /// A ticket for the writes queued so far if `call_id` is persisted (spawned).
    fn ticket_if_persisted(&self, st: &State, call_id: &str) -> Option<Ticket> {
        st.calls.get(call_id).is_some_and(|c| c.persisted).then(|| self.persist().ticket())
    }

    /// [`Self::add_inputs`] with back-pressure: a call whose caller reads its outputs takes
    /// inputs only while fewer than [`ControlConfig::call_window`] are unconsumed. Without
    /// room the inputs come back with a receiver that changes when there may be some.
    pub fn try_add_inputs(&self, call_id: &str, inputs: Vec<Bytes>, more: bool) -> ApiResult<Admitted> {
        let (admitted, ticket) = self.try_add_inputs_queued(call_id, inputs, more)?;
        if let Some(t) = ticket {
            t.wait_blocking()?;
        }
        Ok(admitted)
    }

    /// [`Self::try_add_inputs`] without waiting for the commit of a spawned call's inputs.
    pub(crate) fn try_add_inputs_queued(
        &self,
        call_id: &str,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(Admitted, Option<Ticket>)> {
        let mut st = self.lock();
        let window = st.config.call_window;
        let call =
            st.calls.get(call_id).ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        let unconsumed = call.unconsumed();
        let accepting = call.more || call.num_inputs == 0;
        if accepting && !retention::has_room(call.read_by_caller, unconsumed, inputs.len() as u64, window) {
            let room = call.room.subscribe();
            return Ok((Err((inputs, NoRoom { room, unconsumed, window })), None));
        }
        let added = self.add_inputs_locked(&mut st, call_id, inputs, more)?;
        Ok((Ok(added), self.ticket_if_persisted(&st, call_id)))
    }

    pub(crate) fn add_inputs_locked(
        &self,
        st: &mut State,
        call_id: &str,
        inputs: Vec<Bytes>,
        more: bool,
    ) -> ApiResult<(u64, u64)> {
        let call = st
            .calls
            .get_mut(call_id)
            .ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        if !call.more && call.num_inputs > 0 {
            return Err(ApiError::precondition(format!("call {call_id} takes no more inputs")));
        }
        let first = call.num_inputs;
        let fid = call.function_id.clone();
        if st.functions.get(&fid).is_none_or(|f| !f.active) {
            return Err(ApiError::precondition(format!(
                "the app of call {call_id} is stopped; it takes no more inputs"
            )));
        }
        let call = st.calls.get_mut(call_id).expect("looked up");
        let persisted = call.persisted;
        call.num_inputs += inputs.len() as u64;
        call.more = more;
        call.last_access = Instant::now();
        let n = inputs.len() as u64;
        let mut qis = Vec::with_capacity(inputs.len());
        for (i, args) in inputs.into_iter().enumerate() {
            qis.push(QueuedInput {
                input_id: new_id("in"),
                call_id: call_id.to_string(),
                idx: first + i as u64,
                args,
                retry_count: 0,
                platform_retries: 0,
            });
        }
        if persisted {
            for qi in &qis {
                self.persist().write(Write::Input(PendingInputRow {
                    call_id: qi.call_id.clone(),
                    function_id: fid.clone(),
                    idx: qi.idx,
                    input_id: qi.input_id.clone(),
                    args: qi.args.to_vec(),
                    retry_count: 0,
                }));
            }
        }
        let notify_done = call.done();
        if notify_done {
            call.notify.send_modify(|v| *v += 1);
        }
        let f = st.functions.get_mut(&fid).ok_or_else(|| ApiError::not_found("function not found"))?;
        f.queue.extend(qis);
        schedule(st, &fid);
        Ok((first, n))
    }

    /// Loads a persisted call from the store into memory if it is not there.
    pub(crate) fn ensure_call_locked(&self, st: &mut State, call_id: &str) -> ApiResult<()> {
        if st.calls.contains_key(call_id) {
            return Ok(());
        }
        let row = self.store().get_call(call_id).map_err(store_err)?;
        let Some(row) = row else {
            return Err(ApiError::not_found(format!("function call {call_id} not found (or expired)")));
        };
        let outs = self
            .store()
            .outputs_after(call_id, -1, usize::MAX >> 1)
            .map_err(store_err)?
            .into_iter()
            .map(output_from_row)
            .collect();
        let final_count = self.store().count_final_outputs(call_id).map_err(store_err)?;
        st.calls.insert(call_id.to_string(), call_from_row(&row, outs, final_count));
        Ok(())
    }

    /// Outputs of a call after `after`, and whether the call is done; loads persisted calls.
    ///
    /// This is the caller's read: it has every output up to `after`, so those leave memory
    /// (a spawned call's stay in the store). Reading before outputs that were dropped so
    /// fails, except for spawned calls (read from the store).
    pub fn outputs(
        &self,
        call_id: &str,
        after: i64,
        limit: usize,
    ) -> ApiResult<(Vec<Output>, bool, watch::Receiver<u64>)> {
        let mut st = self.lock();
        let st = &mut *st;
        self.ensure_call_locked(st, call_id)?;
        let call = st.calls.get_mut(call_id).expect("loaded");
        call.last_access = Instant::now();
        // Someone reads this call's outputs as they come: back-pressure applies from now on.
        call.read_by_caller = true;
        if after >= 0 {
            let n = call.outputs.ack(after);
            if n > 0 {
                st.freed_outputs += n as u64;
                call.room.send_modify(|v| *v += 1);
            }
        }
        let (outs, reaches_end) = match call.outputs.page(after, limit, flare_api::MAX_PAGE_BYTES) {
            Ok(page) => page,
            Err(gone) if call.persisted => {
                let rows = self.store().outputs_after(call_id, after, limit).map_err(store_err)?;
                let outs: Vec<Output> = rows.into_iter().map(output_from_row).collect();
                let _ = gone;
                let end = (after + 1).max(0) as u64 + outs.len() as u64 >= call.outputs.total();
                (outs, end)
            }
            Err(gone) => {
                return Err(ApiError::precondition(format!(
                    "outputs of call {call_id} up to seq {} were already read (after={} acknowledged them) and are no longer kept",
                    gone.first_kept as i64 - 1,
                    gone.first_kept as i64 - 1,
                )))
            }
        };
        // Done only once the caller has everything: a cut page is followed by another.
        let done = call.done() && reaches_end;
        if done && limit > 0 {
            call.delivered_at.get_or_insert_with(Instant::now);
        }
        Ok((outs, done, call.notify.subscribe()))
    }

    /// The caller behind a container's API socket (None: no such container).
    pub fn caller_of_container(&self, container_id: &str) -> Option<Caller> {
        let st = self.lock();
        st.containers
            .get(container_id)
            .map(|c| Caller::Container { container_id: c.id.clone(), app_id: c.app_id.clone() })
    }

    /// Whether `caller` may see a call: clients may; a container may see the calls its
    /// app made and the calls made to its app's functions. Others look missing (404).
    pub fn check_call_access(&self, caller: &Caller, call_id: &str) -> ApiResult<()> {
        let Caller::Container { app_id, .. } = caller else { return Ok(()) };
        let mut st = self.lock();
        self.ensure_call_locked(&mut st, call_id)?;
        let ok = st.calls.get(call_id).is_some_and(|c| {
            c.caller_app.as_deref() == Some(app_id.as_str())
                || st.functions.get(&c.function_id).is_some_and(|f| f.app_id == *app_id)
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("function call {call_id} not found (or expired)")))
        }
    }

    /// Seq of the last log record of the app a call belongs to (-1 if none yet).
    pub fn log_position(&self, call_id: &str) -> i64 {
        let st = self.lock();
        st.calls
            .get(call_id)
            .and_then(|c| st.functions.get(&c.function_id))
            .and_then(|f| st.apps.get(&f.app_id))
            .map(|a| a.next_log_seq as i64 - 1)
            .unwrap_or(-1)
    }

    pub fn call_info(&self, call_id: &str) -> ApiResult<flare_api::CallInfo> {
        let mut st = self.lock();
        self.ensure_call_locked(&mut st, call_id)?;
        let c =
            st.calls.get(call_id).ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        Ok(flare_api::CallInfo {
            call_id: c.id.clone(),
            function_id: c.function_id.clone(),
            kind: c.kind,
            num_inputs: c.num_inputs,
            num_outputs: c.outputs.total(),
            done: c.done(),
            created_at: c.created_at,
        })
    }

    pub fn cancel_call(&self, call_id: &str, _terminate_containers: bool) -> ApiResult<()> {
        let mut st = self.lock();
        let st = &mut *st;
        self.ensure_call_locked(st, call_id)?;
        let call = st
            .calls
            .get_mut(call_id)
            .ok_or_else(|| ApiError::not_found(format!("call {call_id} not found")))?;
        call.more = false;
        let fid = call.function_id.clone();
        let exc = ExceptionInfo::new("flare.exception.InputCancellation", "the function call was cancelled");
        // Queued inputs of the call.
        let mut cancelled = Vec::new();
        if let Some(f) = st.functions.get_mut(&fid) {
            let (mine, rest): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut f.queue).into_iter().partition(|q| q.call_id == call_id);
            f.queue = rest;
            cancelled.extend(mine);
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut f.delayed).into_iter().partition(|(_, q)| q.call_id == call_id);
            f.delayed = rest;
            cancelled.extend(mine.into_iter().map(|(_, q)| q));
        }
        // Running inputs: their containers are stopped.
        let mut kill = Vec::new();
        for c in st.containers.values_mut() {
            let ids: Vec<String> =
                c.inflight.values().filter(|q| q.call_id == call_id).map(|q| q.input_id.clone()).collect();
            for id in ids {
                if let Some(q) = c.inflight.remove(&id) {
                    c.cancelled.insert(id);
                    cancelled.push(q);
                    kill.push(c.id.clone());
                }
            }
        }
        for qi in cancelled {
            let out = platform_output(&qi, OutputStatus::Terminated, exc.clone());
            finish_input(st, self.persist(), &qi, out);
        }
        kill.dedup();
        for cid in kill {
            stop_container(st, &cid, false);
        }
        if let Some(c) = st.calls.get(call_id) {
            c.notify.send_modify(|v| *v += 1);
            c.room.send_modify(|v| *v += 1);
        }
        Ok(())
    }
}

pub(crate) fn platform_output(qi: &QueuedInput, status: OutputStatus, exc: ExceptionInfo) -> Output {
    Output {
        idx: qi.idx,
        seq: 0,
        input_id: qi.input_id.clone(),
        status,
        data: None,
        gen: None,
        exception: Some(exc),
        retry_count: qi.retry_count,
    }
}

pub(crate) fn output_from_row(r: OutputRow) -> Output {
    Output {
        idx: r.idx,
        seq: r.seq,
        input_id: r.input_id,
        status: r.status,
        data: if r.data.is_empty() { None } else { Some(B64(Bytes::from(r.data))) },
        gen: r.gen,
        exception: r.exception,
        retry_count: r.retry_count,
    }
}

pub(crate) fn call_from_row(row: &CallRow, outputs: Vec<Output>, final_count: u64) -> CallRt {
    CallRt {
        id: row.call_id.clone(),
        function_id: row.function_id.clone(),
        kind: CallKind::parse(&row.kind).unwrap_or(CallKind::Spawn),
        num_inputs: row.num_inputs,
        more: false,
        finished: retention::FinishedSet::default(),
        outputs: retention::OutputLog::from_outputs(outputs),
        final_count,
        notify: watch::channel(0).0,
        created_at: row.created_at,
        persisted: true,
        last_access: Instant::now(),
        caller_app: row.caller_app_id.clone(),
        delivered_at: None,
        read_by_caller: false,
        room: watch::channel(0).0,
    }
}

/// Appends an output to its call's log (and to the store for persisted calls).
pub(crate) fn append_output(
    st: &mut State,
    persist: &Persist,
    call_id: &str,
    mut out: Output,
    final_output: bool,
) {
    let Some(call) = st.calls.get_mut(call_id) else { return };
    if final_output && !call.finished.insert(out.idx) {
        return; // idempotent: one final output per input
    }
    out.seq = call.outputs.total();
    if call.persisted {
        let row = OutputRow {
            seq: out.seq,
            idx: out.idx,
            input_id: out.input_id.clone(),
            status: out.status,
            data: out.data.as_ref().map(|d| d.0.to_vec()).unwrap_or_default(),
            gen: out.gen,
            exception: out.exception.clone(),
            retry_count: out.retry_count,
        };
        persist.write(Write::Output { call_id: call_id.to_string(), row, final_output });
    }
    call.outputs.push(out);
    if final_output {
        call.final_count += 1;
        if call.persisted && call.done() {
            // The retention period of its results starts now.
            persist.write(Write::CallDone { call_id: call_id.to_string(), done_at: now_ts() });
        }
    }
    let n = call.outputs.total();
    call.notify.send_replace(n);
}

pub(crate) fn finish_input(st: &mut State, persist: &Persist, qi: &QueuedInput, out: Output) {
    append_output(st, persist, &qi.call_id, out, true);
}

/// Fails every queued input of a function (init failures, app stop).
pub(crate) fn fail_queue(
    st: &mut State,
    persist: &Persist,
    fid: &str,
    status: OutputStatus,
    exc: &ExceptionInfo,
) {
    let Some(f) = st.functions.get_mut(fid) else { return };
    let mut all: Vec<QueuedInput> = f.queue.drain(..).collect();
    all.extend(f.delayed.drain(..).map(|(_, q)| q));
    for qi in all {
        let out = platform_output(&qi, status, exc.clone());
        finish_input(st, persist, &qi, out);
    }
}
