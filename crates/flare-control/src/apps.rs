//! App lifecycle: create, deploy, heartbeat, stop, register functions, and what the API shows of apps and functions.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use flare_api::{ApiError, AppMode};
use flare_proto::{ExceptionInfo, FunctionDef, OutputStatus};
use flare_store::{AppRow, FunctionRow, Write};
use tokio::sync::watch;

use crate::calls::{call_from_row, fail_queue, finish_input, output_from_row, platform_output};
use crate::dispatch::schedule;
use crate::persist::Ticket;
use crate::state::{AppRecord, AppRt, AppState, FnRt, QueuedInput, State};
use crate::workers::stop_container;
use crate::{new_id, now_ts, store_err, ApiResult, AppRef, Caller, ControlError, ControlPlane};

impl ControlPlane {
    pub(crate) fn load(&self) -> Result<(), ControlError> {
        let store = self.store();
        let mut st = self.lock();
        // Every app that was not stopped comes back, ephemeral ones included: a client
        // that is still there (a `flare run` in the middle of a `.map`) heartbeats again
        // and carries on; one that is gone lets the app time out like any lost client.
        for row in store.list_apps()? {
            let app = AppRecord::from_row(&row);
            if app.stopped() {
                continue;
            }
            let mut functions = BTreeMap::new();
            for f in store.functions_of_app(&app.app_id)? {
                functions.insert(f.name.clone(), f.function_id.clone());
                // Scheduled once a worker is there (warm floors, re-queued inputs).
                st.mark_dirty(&f.function_id);
                st.functions.insert(
                    f.function_id.clone(),
                    FnRt::new(f.function_id, app.app_id.clone(), f.name, f.def),
                );
            }
            let next_log_seq = store.max_log_seq(&app.app_id)?.map(|s| s + 1).unwrap_or(0);
            st.apps.insert(
                app.app_id.clone(),
                AppRt {
                    app,
                    functions,
                    last_heartbeat: Instant::now(),
                    client_left: false,
                    logs: VecDeque::new(),
                    next_log_seq,
                    log_notify: watch::channel(0).0,
                    log_bytes: 0,
                    stopped_idle_since: None,
                },
            );
        }
        self.load_schedules(&mut st)?;
        // Accepted inputs with no final output yet run again (durability of spawned calls).
        let pending = store.pending_inputs()?;
        let mut requeued = 0;
        for p in pending {
            let call = store.get_call(&p.call_id)?;
            let Some(call) = call else { continue };
            if !st.calls.contains_key(&p.call_id) {
                let outputs = store
                    .outputs_after(&p.call_id, -1, usize::MAX >> 1)?
                    .into_iter()
                    .map(output_from_row)
                    .collect::<Vec<_>>();
                let final_count = store.count_final_outputs(&p.call_id)?;
                st.calls.insert(p.call_id.clone(), call_from_row(&call, outputs, final_count));
            }
            let qi = QueuedInput {
                input_id: p.input_id.clone(),
                call_id: p.call_id.clone(),
                idx: p.idx,
                args: Bytes::from(p.args),
                retry_count: p.retry_count,
                platform_retries: 0,
            };
            if let Some(f) = st.functions.get_mut(&p.function_id) {
                f.queue.push_back(qi);
                requeued += 1;
            } else {
                let out = platform_output(
                    &qi,
                    OutputStatus::Terminated,
                    ExceptionInfo::new(
                        "flare.exception.ExecutionError",
                        "the app of this call was stopped while the server was down",
                    ),
                );
                finish_input(&mut st, self.persist(), &qi, out);
            }
        }
        if requeued > 0 {
            tracing::info!(requeued, "persisted inputs re-queued");
        }
        Ok(())
    }

    /// Creates an app, or deploys a new version of the deployed app of that name (false:
    /// it existed). The app is in the store when this returns.
    pub fn create_app(&self, name: &str, mode: AppMode) -> ApiResult<(AppRow, bool)> {
        let (created, ticket) = self.create_app_queued(name, mode)?;
        ticket.wait_blocking()?;
        Ok(created)
    }

    /// [`Self::create_app`] with the ticket of its commit, not waited for.
    pub(crate) fn create_app_queued(&self, name: &str, mode: AppMode) -> ApiResult<((AppRow, bool), Ticket)> {
        let mut st = self.lock();
        if mode == AppMode::Deployed {
            let existing =
                st.apps.values().find(|a| a.app.is_live_deployed(name)).map(|a| a.app.app_id.clone());
            if let Some(id) = existing {
                let app = st.apps.get_mut(&id).expect("found");
                app.app.version += 1;
                app.app.state = AppState::Deployed;
                let row = app.app.to_row();
                self.persist().write(Write::App(row.clone()));
                return Ok(((row, false), self.persist().ticket()));
            }
        }
        let app = AppRecord {
            app_id: new_id("ap"),
            name: name.to_string(),
            mode,
            state: AppState::initial(mode),
            version: 1,
            created_at: now_ts(),
        };
        let row = app.to_row();
        self.persist().write(Write::App(row.clone()));
        st.apps.insert(
            app.app_id.clone(),
            AppRt {
                app,
                functions: BTreeMap::new(),
                last_heartbeat: Instant::now(),
                client_left: false,
                logs: VecDeque::new(),
                next_log_seq: 0,
                log_notify: watch::channel(0).0,
                log_bytes: 0,
                stopped_idle_since: None,
            },
        );
        Ok(((row, true), self.persist().ticket()))
    }

    pub fn heartbeat(&self, app_id: &str) -> ApiResult<()> {
        let mut st = self.lock();
        let app =
            st.apps.get_mut(app_id).ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
        if app.app.stopped() {
            return Err(ApiError::precondition(format!("app {} ({app_id}) is stopped", app.app.name)));
        }
        app.last_heartbeat = Instant::now();
        Ok(())
    }

    /// `flare run --detach`: the ephemeral app keeps running without its client. With
    /// `client_left` the client says it is going now (else its heartbeats ending tell).
    pub(crate) fn detach(&self, app_id: &str, client_left: bool) -> ApiResult<Ticket> {
        let mut st = self.lock();
        let app = Self::running_app(&mut st, app_id)?;
        if app.app.mode != AppMode::Ephemeral {
            return Err(ApiError::precondition(format!(
                "app {} ({app_id}) is deployed; only an ephemeral app can be detached",
                app.app.name
            )));
        }
        if app.app.state != AppState::Detached {
            app.app.state = AppState::Detached;
            self.persist().write(Write::AppState {
                app_id: app_id.to_string(),
                state: AppState::Detached.as_str().into(),
            });
            tracing::info!(app = %app_id, "app detached from its client");
        }
        app.last_heartbeat = Instant::now();
        app.client_left |= client_left;
        Ok(self.persist().ticket())
    }

    pub(crate) fn running_app<'a>(st: &'a mut State, app_id: &str) -> ApiResult<&'a mut AppRt> {
        let app =
            st.apps.get_mut(app_id).ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
        if app.app.stopped() {
            return Err(ApiError::precondition(format!("app {} ({app_id}) is stopped", app.app.name)));
        }
        Ok(app)
    }

    /// Registers (or re-registers, bumping their versions) an app's functions; they are in
    /// the store when this returns. Answers each function's name and id.
    pub fn register_functions(
        &self,
        app_id: &str,
        defs: Vec<FunctionDef>,
    ) -> ApiResult<Vec<(String, String)>> {
        let (out, ticket) = self.register_functions_queued(app_id, defs)?;
        ticket.wait_blocking()?;
        Ok(out)
    }

    /// [`Self::register_functions`] with the ticket of its commit, not waited for.
    pub(crate) fn register_functions_queued(
        &self,
        app_id: &str,
        mut defs: Vec<FunctionDef>,
    ) -> ApiResult<(Vec<(String, String)>, Ticket)> {
        for d in &mut defs {
            d.image = match &d.image_id {
                None => None,
                Some(id) => match self.inner.images.get() {
                    Some(images) => Some(images.resolve(id).map_err(|e| ApiError {
                        message: format!("function {:?}: {}", d.name, e.message),
                        ..e
                    })?),
                    None => return Err(ApiError::invalid("this server has no image support")),
                },
            };
            if let Some(m) = &d.mount_id {
                if !self.mounts_dir().join(m).is_dir() {
                    return Err(ApiError::invalid(format!("function {:?}: unknown mount {m}", d.name)));
                }
            }
        }
        let mut st = self.lock();
        let st = &mut *st;
        Self::running_app(st, app_id)?;
        crate::services::ingress::check_labels(st, app_id, &defs)?;
        let mut out = Vec::new();
        for def in defs {
            let existing = st.apps.get(app_id).and_then(|a| a.functions.get(&def.name)).cloned();
            let fid = existing.unwrap_or_else(|| new_id("fu"));
            let row = FunctionRow {
                function_id: fid.clone(),
                app_id: app_id.to_string(),
                name: def.name.clone(),
                def: def.clone(),
                created_at: now_ts(),
            };
            self.persist().write(Write::Function(Box::new(row)));
            match st.functions.get_mut(&fid) {
                Some(f) => {
                    f.def = def.clone();
                    f.version += 1;
                    f.active = true;
                    // Old-version containers drain: they take no new inputs and stop when
                    // idle; one serving web requests stops once they finish (a reload of
                    // `flare serve` lets in-flight requests end on the old version).
                    let old: Vec<String> = f.containers.iter().cloned().collect();
                    for cid in old {
                        match st.containers.get_mut(&cid) {
                            Some(c) if c.web_inflight > 0 => c.retire = true,
                            _ => stop_container(st, &cid, true),
                        }
                    }
                }
                None => {
                    st.functions.insert(
                        fid.clone(),
                        FnRt::new(fid.clone(), app_id.to_string(), def.name.clone(), def.clone()),
                    );
                }
            }
            st.apps.get_mut(app_id).expect("checked").functions.insert(def.name.clone(), fid.clone());
            crate::services::schedules::registered(st, self.persist(), app_id, &fid, &def);
            schedule(st, &fid);
            out.push((def.name, fid));
        }
        self.replan_schedules();
        Ok((out, self.persist().ticket()))
    }

    /// Stops an app (stored as stopped when this returns); the receiver changes as
    /// containers exit.
    pub fn stop_app(&self, app_id: &str) -> ApiResult<watch::Receiver<u64>> {
        let (rx, ticket) = self.stop_app_queued(app_id)?;
        ticket.wait_blocking()?;
        Ok(rx)
    }

    /// [`Self::stop_app`] with the ticket of its commit, not waited for.
    pub(crate) fn stop_app_queued(&self, app_id: &str) -> ApiResult<(watch::Receiver<u64>, Ticket)> {
        let mut st = self.lock();
        let st = &mut *st;
        if !st.apps.contains_key(app_id) {
            return Err(ApiError::not_found(format!("app {app_id} not found")));
        }
        let rx = self.inner.containers_changed.subscribe();
        self.stop_app_locked(st, app_id);
        Ok((rx, self.persist().ticket()))
    }

    /// Containers of an app that have not exited yet.
    pub fn app_containers(&self, app_id: &str) -> usize {
        self.lock().containers.values().filter(|c| c.app_id == app_id).count()
    }

    pub(crate) fn stop_app_locked(&self, st: &mut State, app_id: &str) {
        let Some(app) = st.apps.get_mut(app_id) else { return };
        app.app.state = AppState::Stopped;
        self.persist()
            .write(Write::AppState { app_id: app_id.to_string(), state: AppState::Stopped.as_str().into() });
        let fids: Vec<String> = app.functions.values().cloned().collect();
        crate::services::schedules::app_stopped(st, self.persist(), app_id);
        self.replan_schedules();
        let exc = ExceptionInfo::new("flare.exception.ExecutionError", "the app was stopped");
        for fid in &fids {
            if let Some(f) = st.functions.get_mut(fid) {
                f.active = false;
            }
            // A submitter waiting for room learns that the app stopped.
            for c in st.calls.values().filter(|c| c.function_id == *fid) {
                c.room.send_modify(|v| *v += 1);
            }
            fail_queue(st, self.persist(), fid, OutputStatus::Terminated, &exc);
            let cids: Vec<String> =
                st.functions.get(fid).map(|f| f.containers.iter().cloned().collect()).unwrap_or_default();
            for cid in cids {
                // Inputs still running fail now and their container is killed; an idle
                // one is stopped gracefully (SHUTDOWN, then the worker's grace), so that
                // a class's exit hooks run and their prints reach the app's logs.
                let mut idle = true;
                if let Some(c) = st.containers.get_mut(&cid) {
                    let inflight: Vec<QueuedInput> = c.inflight.values().cloned().collect();
                    idle = inflight.is_empty() && c.web_inflight == 0;
                    c.cancelled.extend(inflight.iter().map(|q| q.input_id.clone()));
                    for qi in inflight {
                        let out = platform_output(&qi, OutputStatus::Terminated, exc.clone());
                        finish_input(st, self.persist(), &qi, out);
                    }
                }
                stop_container(st, &cid, idle);
            }
        }
    }

    pub fn list_apps(&self) -> ApiResult<Vec<flare_api::AppInfo>> {
        let rows = self.store().list_apps().map_err(store_err)?;
        let st = self.lock();
        Ok(rows
            .into_iter()
            .map(|row| {
                let app = st.apps.get(&row.app_id).map(|a| a.app.clone());
                app_info(&st, app.unwrap_or_else(|| AppRecord::from_row(&row)))
            })
            .collect())
    }

    pub fn app_by_name(&self, name: &str) -> ApiResult<flare_api::AppInfo> {
        let st = self.lock();
        let found = st.apps.values().find(|a| a.app.is_live_deployed(name)).map(|a| a.app.clone());
        match found {
            Some(row) => Ok(app_info(&st, row)),
            None => Err(ApiError::not_found(format!("no deployed app named {name:?}"))),
        }
    }

    /// Looks up a function of an app by id or by deployed-app name.
    pub fn function_info(&self, app: AppRef<'_>, name: &str) -> ApiResult<flare_api::FunctionInfo> {
        let st = self.lock();
        let app_rt = match app {
            AppRef::Id(id) => {
                st.apps.get(id).ok_or_else(|| ApiError::not_found(format!("app {id} not found")))?
            }
            AppRef::DeployedName(n) => st
                .apps
                .values()
                .find(|a| a.app.is_live_deployed(n))
                .ok_or_else(|| ApiError::not_found(format!("no deployed app named {n:?}")))?,
        };
        let fid = app_rt.functions.get(name).ok_or_else(|| {
            ApiError::not_found(format!("app {:?} has no function named {name:?}", app_rt.app.name))
        })?;
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let (web_url, web_urls) = crate::services::ingress::urls_of(&st, fid);
        Ok(flare_api::FunctionInfo {
            function_id: f.id.clone(),
            name: f.name.clone(),
            app_id: f.app_id.clone(),
            is_generator: f.def.is_generator,
            is_async: f.def.is_async,
            web_url,
            web_urls,
        })
    }

    pub fn function_stats(&self, fid: &str) -> ApiResult<flare_api::FunctionStats> {
        let st = self.lock();
        let f =
            st.functions.get(fid).ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let running: usize =
            f.containers.iter().filter_map(|c| st.containers.get(c)).map(|c| c.inflight.len()).sum();
        Ok(flare_api::FunctionStats {
            backlog: (f.queue.len() + f.delayed.len()) as u64,
            num_total_runners: f.containers.len() as u32,
            num_running_inputs: running as u64,
        })
    }

    pub fn list_containers(&self) -> Vec<flare_api::ContainerInfo> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .containers
            .values()
            .map(|c| flare_api::ContainerInfo {
                container_id: c.id.clone(),
                app_id: c.app_id.clone(),
                function: st.functions.get(&c.function_id).map(|f| f.name.clone()).unwrap_or_default(),
                worker_id: c.worker_id.clone(),
                state: c.state.as_str().into(),
                age_s: c.started_at.elapsed().as_secs_f64(),
                inputs_in_flight: c.inflight.len() as u32,
                memory_limit_mb: c.memory_limit_mb,
                cpu_limit: c.cpu_limit,
            })
            .collect();
        // Containers a function needs but no worker can take yet, with the reason.
        for f in st.functions.values() {
            if let (Some(reason), true) = (&f.waiting, !f.queue.is_empty()) {
                v.push(flare_api::ContainerInfo {
                    container_id: "-".into(),
                    app_id: f.app_id.clone(),
                    function: f.name.clone(),
                    worker_id: String::new(),
                    state: format!("waiting: {reason}"),
                    age_s: 0.0,
                    inputs_in_flight: 0,
                    memory_limit_mb: None,
                    cpu_limit: None,
                });
            }
        }
        v.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        v
    }

    /// Changes a function's autoscaler settings at run time (stored when this returns).
    pub fn update_autoscaler(&self, fid: &str, u: flare_api::UpdateAutoscaler) -> ApiResult<()> {
        self.update_autoscaler_queued(fid, u)?.wait_blocking()
    }

    /// [`Self::update_autoscaler`] with the ticket of its commit, not waited for.
    pub(crate) fn update_autoscaler_queued(
        &self,
        fid: &str,
        u: flare_api::UpdateAutoscaler,
    ) -> ApiResult<Ticket> {
        let mut st = self.lock();
        let st = &mut *st;
        let f = st
            .functions
            .get_mut(fid)
            .ok_or_else(|| ApiError::not_found(format!("function {fid} not found")))?;
        let mut cfg = f.def.config.clone();
        if let Some(v) = u.min_containers {
            cfg.min_containers = v;
        }
        if let Some(v) = u.max_containers {
            cfg.max_containers = Some(v);
        }
        if let Some(v) = u.buffer_containers {
            cfg.buffer_containers = v;
        }
        if let Some(v) = u.scaledown_window {
            cfg.scaledown_window = v;
        }
        if let Some(max) = cfg.max_containers {
            if max == 0 || max < cfg.min_containers {
                return Err(ApiError::invalid(format!(
                    "max_containers={max} must be >= 1 and >= min_containers={}",
                    cfg.min_containers
                )));
            }
        }
        f.def.config = cfg;
        let row = FunctionRow {
            function_id: f.id.clone(),
            app_id: f.app_id.clone(),
            name: f.name.clone(),
            def: f.def.clone(),
            created_at: now_ts(),
        };
        self.persist().write(Write::Function(Box::new(row)));
        schedule(st, fid);
        Ok(self.persist().ticket())
    }

    /// Whether `caller` may look up, inspect or call a function (see [`check_function_access`]).
    pub fn check_function_access(&self, caller: &Caller, fid: &str) -> ApiResult<()> {
        check_function_access(&self.lock(), caller, fid)
    }

    /// Whether `caller` may look up functions of an app by its id: a container only its own.
    pub fn check_app_access(&self, caller: &Caller, app_id: &str) -> ApiResult<()> {
        match caller {
            Caller::Container { app_id: own, .. } if own != app_id => {
                Err(ApiError::not_found(format!("app {app_id} not found")))
            }
            _ => Ok(()),
        }
    }

    pub fn app_id_by_name(&self, name: &str) -> ApiResult<String> {
        let st = self.lock();
        let mut apps: Vec<&AppRt> = st.apps.values().filter(|a| a.app.name == name).collect();
        apps.sort_by(|a, b| a.app.created_at.total_cmp(&b.app.created_at));
        apps.last()
            .map(|a| a.app.app_id.clone())
            .ok_or_else(|| ApiError::not_found(format!("no app named {name:?}")))
    }
}

/// A container may use functions of its own app and of deployed apps (looked up by
/// name); functions of other apps look missing.
pub(crate) fn check_function_access(st: &State, caller: &Caller, fid: &str) -> ApiResult<()> {
    let Caller::Container { app_id, .. } = caller else { return Ok(()) };
    let ok = st.functions.get(fid).is_some_and(|f| {
        f.app_id == *app_id || st.apps.get(&f.app_id).is_some_and(|a| a.app.mode == AppMode::Deployed)
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("function {fid} not found")))
    }
}

pub(crate) fn app_info(st: &State, row: AppRecord) -> flare_api::AppInfo {
    let now = now_ts();
    let functions = st
        .apps
        .get(&row.app_id)
        .map(|a| {
            a.functions
                .iter()
                .map(|(name, fid)| {
                    let f = st.functions.get(fid);
                    flare_api::FunctionSummary {
                        name: name.clone(),
                        function_id: fid.clone(),
                        containers: f.map(|f| f.containers.len() as u32).unwrap_or(0),
                        backlog: f.map(|f| (f.queue.len() + f.delayed.len()) as u64).unwrap_or(0),
                        next_run: crate::services::schedules::next_run(st, fid, now),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    flare_api::AppInfo {
        app_id: row.app_id,
        name: row.name,
        mode: row.mode,
        state: row.state.as_str().into(),
        version: row.version,
        created_at: row.created_at,
        functions,
    }
}
