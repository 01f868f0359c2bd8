//! Schedules (`@app.function(schedule=flare.Period(...) | flare.Cron(...))`): functions
//! that run on their own, with no arguments, while their app is deployed or an ephemeral
//! app lives.
//!
//! Each scheduled function has a state in the store (table `schedules`): its `anchor`
//! (when it was deployed: a `Period`'s slots are `anchor + k * period`, k >= 1, so a
//! redeploy restarts the period; a `Cron`'s slots are its expression's times after the
//! anchor) and `last_fire`, the slot of its last run. A run is one [`Write::ScheduledRun`]:
//! the spawned call, its input and the new `last_fire`, committed together, so after a
//! crash either the run and its slot are both stored (the input runs again at start-up
//! like any spawned call's) or neither is (the slot is still due). A restart neither loses
//! nor doubles a run.
//!
//! Missed slots (the server was down, or the ticker late) fire once: when slots are due,
//! only the latest of them runs and becomes `last_fire` ([`due`]); the next is the first
//! slot after it. The pure decisions are [`Plan::slot_after`], [`next_fire`] and [`due`].
//!
//! One task ([`spawn`]) sleeps until the earliest next fire time of all scheduled
//! functions (no polling); deploying functions or stopping an app wakes it to plan again.
//! A run is a call of kind `spawn` (kept like any spawned call, see `FunctionCall`), and a
//! `system` line `scheduled run of <function> (call <id>, slot <time>)` in the app's logs.
//! The service has no routes: `GET /v1/apps` shows each scheduled function's `next_run`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Months;
use chrono_tz::Tz;
use flare_api::cron::{self, CronExpr};
use flare_api::{CallKind, Schedule};
use flare_proto::{ExceptionInfo, FunctionDef, LogStream, OutputStatus};
use flare_store::{CallRow, PendingInputRow, ScheduleRow, ScheduledRun, Write};

use super::Service;
use crate::calls::{finish_input, platform_output};
use crate::dispatch::schedule;
use crate::http::Route;
use crate::persist::Persist;
use crate::state::{CallRt, QueuedInput, State};
use crate::{new_id, now_ts, retention, ControlError, ControlPlane};

/// The pickled arguments of a scheduled run: `((), {})`, protocol 4.
const NO_ARGS: &[u8] = b"\x80\x04\x95\x06\x00\x00\x00\x00\x00\x00\x00)}\x94\x86\x94.";

/// Longest sleep of the ticker with nothing scheduled (it is woken on changes anyway).
const IDLE_SLEEP: Duration = Duration::from_secs(3600);

/// The schedules service (no routes of its own).
pub struct Schedules;

impl Service for Schedules {
    fn name(&self) -> &'static str {
        "schedules"
    }

    fn routes(&self) -> Vec<Route> {
        Vec::new()
    }
}

/// A schedule, parsed.
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    Period { seconds: f64, months: u32 },
    Cron { expr: CronExpr, tz: Tz },
}

impl Plan {
    /// The plan of a (validated) schedule; `None` if it does not parse.
    pub(crate) fn of(s: &Schedule) -> Option<Plan> {
        match s {
            Schedule::Period { seconds, months } => (*months > 0
                || *seconds >= flare_api::MIN_SCHEDULE_PERIOD)
                .then_some(Plan::Period { seconds: *seconds, months: *months }),
            Schedule::Cron { expr, timezone } => {
                Some(Plan::Cron { expr: CronExpr::parse(expr).ok()?, tz: cron::timezone(timezone).ok()? })
            }
        }
    }

    /// A period's k-th slot (k >= 1): `anchor + k months + k * seconds` (UTC calendar).
    fn period_slot(anchor: f64, seconds: f64, months: u32, k: u64) -> Option<f64> {
        let base = if months == 0 {
            anchor
        } else {
            let m = u32::try_from(k.checked_mul(u64::from(months))?).ok()?;
            cron::ts(cron::utc(anchor)?.checked_add_months(Months::new(m))?)
        };
        Some(base + k as f64 * seconds)
    }

    /// A period's first slot index whose slot is strictly after `t`.
    fn period_index_after(anchor: f64, seconds: f64, months: u32, t: f64) -> Option<u64> {
        let step = f64::from(months) * 2_629_746.0 + seconds;
        let mut k = (((t - anchor) / step).floor().max(0.0) as u64).saturating_add(1);
        while k > 1 && Self::period_slot(anchor, seconds, months, k - 1)? > t {
            k -= 1;
        }
        while Self::period_slot(anchor, seconds, months, k)? <= t {
            k += 1;
        }
        Some(k)
    }

    /// The first slot strictly after `t` (`None`: there is none).
    pub(crate) fn slot_after(&self, anchor: f64, t: f64) -> Option<f64> {
        match self {
            Plan::Period { seconds, months } => {
                let k = Self::period_index_after(anchor, *seconds, *months, t.max(anchor))?;
                Self::period_slot(anchor, *seconds, *months, k)
            }
            Plan::Cron { expr, tz } => expr.next_after(*tz, cron::utc(t.max(anchor))?).map(cron::ts),
        }
    }

    /// The latest slot in `(after, now]`, if any.
    fn latest_slot(&self, anchor: f64, after: f64, now: f64) -> Option<f64> {
        let first = self.slot_after(anchor, after)?;
        if first > now {
            return None;
        }
        match self {
            Plan::Period { seconds, months } => {
                let k = Self::period_index_after(anchor, *seconds, *months, now)?;
                Self::period_slot(anchor, *seconds, *months, k - 1)
            }
            Plan::Cron { .. } => {
                // Look back over growing windows so that a long downtime does not walk
                // every slot it missed.
                for window in [3600.0, 86_400.0, 32.0 * 86_400.0, 400.0 * 86_400.0, f64::INFINITY] {
                    let Some(mut slot) = self.slot_after(anchor, (now - window).max(after)) else { continue };
                    if slot > now {
                        continue;
                    }
                    while let Some(n) = self.slot_after(anchor, slot).filter(|n| *n <= now) {
                        slot = n;
                    }
                    return Some(slot);
                }
                Some(first)
            }
        }
    }
}

/// When a schedule's next run happens: its first slot after `last_fire` (or after the
/// anchor if it never ran), or `now` if that slot has passed (a missed run fires at once).
pub(crate) fn next_fire(plan: &Plan, anchor: f64, last_fire: Option<f64>, now: f64) -> Option<f64> {
    let next = plan.slot_after(anchor, last_fire.unwrap_or(anchor))?;
    Some(if next <= now { now } else { next })
}

/// The slot to run now, if any is due: of the slots after `last_fire` (or the anchor) up to
/// `now`, the latest; the others are skipped (at most one missed run fires).
pub(crate) fn due(plan: &Plan, anchor: f64, last_fire: Option<f64>, now: f64) -> Option<f64> {
    plan.latest_slot(anchor, last_fire.unwrap_or(anchor), now)
}

/// A scheduled function in memory (mirrors its store row).
#[derive(Clone, Debug)]
pub(crate) struct Scheduled {
    pub(crate) app_id: String,
    pub(crate) plan: Plan,
    pub(crate) anchor: f64,
    pub(crate) last_fire: Option<f64>,
    /// The app version that registered it; it runs only while the app is at that version.
    pub(crate) app_version: i64,
}

impl Scheduled {
    fn row(&self, fid: &str) -> ScheduleRow {
        ScheduleRow {
            function_id: fid.to_string(),
            app_id: self.app_id.clone(),
            anchor: self.anchor,
            last_fire: self.last_fire,
            app_version: self.app_version,
        }
    }
}

/// The scheduled functions, by function id.
pub(crate) type Table = HashMap<String, Scheduled>;

/// A function (re-)registered: a `Period` starts over from now; a `Cron` keeps its last
/// run, so a redeploy does not run a slot twice; a function that lost its schedule drops it.
pub(crate) fn registered(st: &mut State, persist: &Persist, app_id: &str, fid: &str, def: &FunctionDef) {
    let plan = def.schedule.as_ref().and_then(Plan::of);
    let Some(plan) = plan else {
        if st.schedules.remove(fid).is_some() {
            persist.write(Write::ScheduleDelete { function_id: fid.to_string() });
        }
        return;
    };
    let last_fire = match (&plan, st.schedules.get(fid)) {
        (Plan::Cron { .. }, Some(old)) => old.last_fire,
        _ => None,
    };
    let app_version = st.apps.get(app_id).map_or(0, |a| a.app.version);
    let s = Scheduled { app_id: app_id.to_string(), plan, anchor: now_ts(), last_fire, app_version };
    persist.write(Write::Schedule(s.row(fid)));
    st.schedules.insert(fid.to_string(), s);
}

/// An app stopped: its functions' schedules end.
pub(crate) fn app_stopped(st: &mut State, persist: &Persist, app_id: &str) {
    let fids: Vec<String> =
        st.schedules.iter().filter(|(_, s)| s.app_id == app_id).map(|(f, _)| f.clone()).collect();
    for fid in fids {
        st.schedules.remove(&fid);
        persist.write(Write::ScheduleDelete { function_id: fid });
    }
}

/// Whether a schedule runs: its app is live and still at the version that registered it
/// (a redeploy without the function leaves its schedule behind).
fn current(st: &State, s: &Scheduled) -> bool {
    st.apps.get(&s.app_id).is_some_and(|a| !a.app.stopped() && a.app.version == s.app_version)
}

/// A function's next run, for `GET /v1/apps`.
pub(crate) fn next_run(st: &State, fid: &str, now: f64) -> Option<f64> {
    let s = st.schedules.get(fid).filter(|s| current(st, s))?;
    next_fire(&s.plan, s.anchor, s.last_fire, now)
}

impl ControlPlane {
    /// Loads the schedule states of the functions loaded at start-up.
    pub(crate) fn load_schedules(&self, st: &mut State) -> Result<(), ControlError> {
        let mut rows: HashMap<String, ScheduleRow> =
            self.store().schedules()?.into_iter().map(|r| (r.function_id.clone(), r)).collect();
        for (fid, f) in &st.functions {
            let Some(plan) = f.def.schedule.as_ref().and_then(Plan::of) else { continue };
            let version = st.apps.get(&f.app_id).map_or(0, |a| a.app.version);
            let (anchor, last_fire, app_version) = match rows.remove(fid) {
                Some(r) => (r.anchor, r.last_fire, r.app_version),
                None => (now_ts(), None, version),
            };
            if app_version != version {
                // Left behind by a later deploy.
                self.persist().write(Write::ScheduleDelete { function_id: fid.clone() });
                continue;
            }
            let s = Scheduled { app_id: f.app_id.clone(), plan, anchor, last_fire, app_version };
            st.schedules.insert(fid.clone(), s);
        }
        // Rows of functions not loaded (their apps are stopped).
        for function_id in rows.into_keys() {
            self.persist().write(Write::ScheduleDelete { function_id });
        }
        Ok(())
    }

    /// Wakes the ticker to plan again (functions deployed, an app stopped).
    pub(crate) fn replan_schedules(&self) {
        self.inner.schedule_wake.notify_one();
    }

    /// Runs every due schedule; answers when the next one is due.
    async fn fire_due(&self) -> Option<f64> {
        let now = now_ts();
        let mut started = Vec::new();
        let ticket = {
            let mut st = self.lock();
            let st = &mut *st;
            let due_now: Vec<(String, f64)> = st
                .schedules
                .iter()
                .filter(|(_, s)| current(st, s))
                .filter_map(|(fid, s)| {
                    due(&s.plan, s.anchor, s.last_fire, now).map(|slot| (fid.clone(), slot))
                })
                .collect();
            for (fid, slot) in due_now {
                if let Some(qi) = self.start_run(st, &fid, slot) {
                    started.push((fid, qi));
                }
            }
            (!started.is_empty()).then(|| self.persist().ticket())
        };
        // The run's input is queued once its call, input and slot are committed together,
        // so that no run happens that a restart would not know of.
        if let Some(t) = ticket {
            if let Err(e) = t.wait().await {
                tracing::error!(error = %e.message, "a scheduled run could not be stored");
            }
            let mut st = self.lock();
            let st = &mut *st;
            for (fid, qi) in started {
                match st.functions.get_mut(&fid) {
                    Some(f) if f.active => {
                        f.queue.push_back(qi);
                        schedule(st, &fid);
                    }
                    _ => {
                        let exc = ExceptionInfo::new("flare.exception.ExecutionError", "the app was stopped");
                        let out = platform_output(&qi, OutputStatus::Terminated, exc);
                        finish_input(st, self.persist(), &qi, out);
                    }
                }
            }
        }
        let st = self.lock();
        let now = now_ts();
        st.schedules
            .values()
            .filter(|s| current(&st, s))
            .filter_map(|s| next_fire(&s.plan, s.anchor, s.last_fire, now))
            .reduce(f64::min)
    }

    /// Creates the call of a scheduled run of `fid` for `slot` (its writes queued, its input
    /// not yet queued for a container) and notes it in the app's logs.
    fn start_run(&self, st: &mut State, fid: &str, slot: f64) -> Option<QueuedInput> {
        let sched = st.schedules.get_mut(fid)?;
        sched.last_fire = Some(slot);
        let state = sched.row(fid);
        let f = st.functions.get(fid);
        let app_live = st.apps.get(&state.app_id).is_some_and(|a| !a.app.stopped());
        let Some(f) = f.filter(|f| f.active && app_live) else {
            // Not runnable (its app is stopping): the slot passes.
            self.persist().write(Write::Schedule(state));
            return None;
        };
        let fname = f.name.clone();
        let call_id = new_id("fc");
        let created_at = now_ts();
        let qi = QueuedInput {
            input_id: new_id("in"),
            call_id: call_id.clone(),
            idx: 0,
            args: Bytes::from_static(NO_ARGS),
            retry_count: 0,
            platform_retries: 0,
        };
        self.persist().write(Write::ScheduledRun(Box::new(ScheduledRun {
            call: CallRow {
                call_id: call_id.clone(),
                function_id: fid.to_string(),
                kind: CallKind::Spawn.as_str().into(),
                num_inputs: 1,
                created_at,
                caller_app_id: None,
            },
            input: PendingInputRow {
                call_id: call_id.clone(),
                function_id: fid.to_string(),
                idx: 0,
                input_id: qi.input_id.clone(),
                args: NO_ARGS.to_vec(),
                retry_count: 0,
            },
            state: state.clone(),
        })));
        st.calls.insert(
            call_id.clone(),
            CallRt {
                id: call_id.clone(),
                function_id: fid.to_string(),
                kind: CallKind::Spawn,
                num_inputs: 1,
                more: false,
                outputs: retention::OutputLog::default(),
                final_count: 0,
                notify: tokio::sync::watch::channel(0).0,
                created_at,
                persisted: true,
                finished: retention::FinishedSet::default(),
                last_access: Instant::now(),
                caller_app: None,
                delivered_at: None,
                read_by_caller: false,
                room: tokio::sync::watch::channel(0).0,
            },
        );
        let when = cron::utc(slot)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| slot.to_string());
        let line = format!("scheduled run of {fname} (call {call_id}, slot {when})\n");
        crate::logs::push_log_as(st, &self.inner.log_tx, &state.app_id, "", &fname, LogStream::System, &line);
        tracing::info!(function = %fname, call = %call_id, slot = %when, "scheduled run");
        Some(qi)
    }
}

/// Starts the ticker: it runs what is due, then sleeps until the next fire time or until
/// woken by a change ([`ControlPlane::replan_schedules`]).
pub(crate) fn spawn(cp: &ControlPlane) {
    let cp = cp.clone();
    tokio::spawn(async move {
        loop {
            let wake = cp.inner.schedule_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let next = cp.fire_due().await;
            let sleep =
                next.map_or(IDLE_SLEEP, |t| Duration::from_secs_f64((t - now_ts()).clamp(0.0, 3600.0)));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = &mut wake => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use flare_api::AppMode;
    use flare_store::{SqliteStore, Store};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn runs(cp: &ControlPlane, fid: &str) -> usize {
        cp.lock().calls.values().filter(|c| c.function_id == fid).count()
    }

    /// A deployed `Period(seconds=1)` runs once a second as a spawned call; after a stop of
    /// the control plane (its tasks gone) and a downtime of a few slots, a restart loads
    /// the state: the stored run comes back once, and one missed run fires, not three.
    #[test]
    fn runs_survive_a_restart_without_doubling() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let fid = {
            let rt = runtime();
            rt.block_on(async {
                let store = Arc::new(SqliteStore::open(&path).unwrap());
                let cp = ControlPlane::new(store, dir.path()).unwrap();
                let (app, _) = cp.create_app("tick", AppMode::Deployed).unwrap();
                let mut d = crate::tests::def("f");
                d.schedule = Some(Schedule::Period { seconds: 1.0, months: 0 });
                let before = now_ts();
                let fid = cp.register_functions(&app.app_id, vec![d]).unwrap()[0].1.clone();
                let next = cp.list_apps().unwrap()[0].functions[0].next_run.unwrap();
                assert!(next >= before + 1.0 && next <= now_ts() + 1.0, "{next}");
                tokio::time::sleep(Duration::from_millis(1400)).await;
                assert_eq!(runs(&cp, &fid), 1);
                assert_eq!(cp.lock().functions[&fid].queue.len(), 1, "queued once committed");
                cp.flush().await;
                fid
            })
        };
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let row = store.schedules().unwrap().pop().unwrap();
        assert!((row.last_fire.unwrap() - (row.anchor + 1.0)).abs() < 1e-6);
        assert_eq!(store.pending_inputs().unwrap().len(), 1);
        // Down for three slots.
        std::thread::sleep(Duration::from_millis(3000));
        let rt = runtime();
        rt.block_on(async {
            let cp = ControlPlane::new(store.clone(), dir.path()).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(runs(&cp, &fid), 2, "the stored run and one missed run");
            let last = cp.lock().schedules[&fid].last_fire.unwrap();
            assert!(last > row.anchor + 3.5, "the latest missed slot: {last}");
            cp.flush().await;
            assert_eq!(store.schedules().unwrap()[0].last_fire, Some(last));
            // Stopping the app ends the schedule.
            let app_id = cp.lock().functions[&fid].app_id.clone();
            let noted = |cp: &ControlPlane| {
                cp.lock().apps[&app_id]
                    .logs
                    .iter()
                    .filter(|l| l.data.starts_with("scheduled run of f"))
                    .count()
            };
            assert_eq!(noted(&cp), 1, "the missed run is in the app's logs");
            cp.stop_app(&app_id).unwrap();
            assert!(cp.list_apps().unwrap()[0].functions.iter().all(|f| f.next_run.is_none()));
            tokio::time::sleep(Duration::from_millis(1200)).await;
            assert_eq!(noted(&cp), 1, "no run after the stop");
            cp.flush().await;
            assert!(store.schedules().unwrap().is_empty());
        });
    }

    fn period(seconds: f64) -> Plan {
        Plan::Period { seconds, months: 0 }
    }

    fn cron(expr: &str, tz: &str) -> Plan {
        Plan::Cron { expr: CronExpr::parse(expr).unwrap(), tz: cron::timezone(tz).unwrap() }
    }

    fn at(s: &str) -> f64 {
        cron::ts(chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc))
    }

    /// A redeploy starts a `Period` over and keeps a `Cron`'s last run; a function
    /// redeployed without a schedule loses it.
    #[tokio::test]
    async fn redeploys() {
        let h = crate::tests::harness().await;
        let (app, _) = h.cp.create_app("re", AppMode::Deployed).unwrap();
        let mut p = crate::tests::def("p");
        p.schedule = Some(Schedule::Period { seconds: 60.0, months: 0 });
        let mut c = crate::tests::def("c");
        c.schedule = Some(Schedule::Cron { expr: "0 0 * * *".into(), timezone: "UTC".into() });
        let ids = h.cp.register_functions(&app.app_id, vec![p.clone(), c.clone()]).unwrap();
        let (pid, cid) = (ids[0].1.clone(), ids[1].1.clone());
        for fid in [&pid, &cid] {
            h.cp.lock().schedules.get_mut(fid).unwrap().last_fire = Some(5.0);
        }
        let (app, _) = h.cp.create_app("re", AppMode::Deployed).unwrap();
        h.cp.register_functions(&app.app_id, vec![p.clone(), c.clone()]).unwrap();
        {
            let st = h.cp.lock();
            assert_eq!(st.schedules[&pid].last_fire, None, "a period starts over");
            assert!(st.schedules[&pid].anchor > 5.0);
            assert_eq!(st.schedules[&cid].last_fire, Some(5.0), "a cron keeps its last run");
        }
        p.schedule = None;
        h.cp.register_functions(&app.app_id, vec![p]).unwrap();
        assert!(!h.cp.lock().schedules.contains_key(&pid));
        // A deploy without the cron function leaves its schedule behind: it stops.
        let next = |cp: &ControlPlane| cp.list_apps().unwrap()[0].functions.iter().find_map(|f| f.next_run);
        assert!(next(&h.cp).is_some());
        let (app, _) = h.cp.create_app("re", AppMode::Deployed).unwrap();
        h.cp.register_functions(&app.app_id, vec![crate::tests::def("p")]).unwrap();
        assert!(next(&h.cp).is_none());
        assert!(due(&Plan::Period { seconds: 1.0, months: 0 }, 0.0, None, 10.0).is_some());
        h.cp.flush().await;
        let rows = h.cp.store().schedules().unwrap();
        assert_eq!(rows.iter().map(|r| r.function_id.as_str()).collect::<Vec<_>>(), vec![cid.as_str()]);
    }

    #[test]
    fn periods_count_from_the_anchor() {
        let p = period(10.0);
        assert_eq!(p.slot_after(100.0, 100.0), Some(110.0));
        assert_eq!(p.slot_after(100.0, 109.9), Some(110.0));
        assert_eq!(p.slot_after(100.0, 110.0), Some(120.0));
        assert_eq!(p.slot_after(100.0, 50.0), Some(110.0));
        // Never ran: the first slot is one period after the deploy.
        assert_eq!(next_fire(&p, 100.0, None, 101.0), Some(110.0));
        assert_eq!(due(&p, 100.0, None, 109.0), None);
        assert_eq!(due(&p, 100.0, None, 110.0), Some(110.0));
        // After a run, the next slot.
        assert_eq!(next_fire(&p, 100.0, Some(110.0), 110.5), Some(120.0));
        assert_eq!(due(&p, 100.0, Some(110.0), 119.0), None);
        // Fractional periods do not drift.
        let p = period(0.1 * 3.0);
        let mut last = None;
        for k in 1..=1000u32 {
            let s = p.slot_after(0.0, last.unwrap_or(0.0)).unwrap();
            assert!((s - f64::from(k) * 0.3).abs() < 1e-9);
            last = Some(s);
        }
    }

    #[test]
    fn calendar_months() {
        // Jan 31 + 1 month is the last day of February; slots count from the anchor.
        let p = Plan::Period { seconds: 0.0, months: 1 };
        let anchor = at("2026-01-31T12:00:00Z");
        assert_eq!(p.slot_after(anchor, anchor), Some(at("2026-02-28T12:00:00Z")));
        assert_eq!(p.slot_after(anchor, at("2026-02-28T12:00:00Z")), Some(at("2026-03-31T12:00:00Z")));
        assert_eq!(p.slot_after(anchor, at("2027-01-01T00:00:00Z")), Some(at("2027-01-31T12:00:00Z")));
    }

    #[test]
    fn downtime_fires_one_missed_run() {
        // Every 10 s from 100; down from 115 to 200: slots 120..=200 were missed.
        let p = period(10.0);
        assert_eq!(next_fire(&p, 100.0, Some(110.0), 200.5), Some(200.5), "due at once");
        let slot = due(&p, 100.0, Some(110.0), 200.5).unwrap();
        assert_eq!(slot, 200.0, "only the latest missed slot runs");
        assert_eq!(due(&p, 100.0, Some(slot), 200.6), None, "and only once");
        assert_eq!(next_fire(&p, 100.0, Some(slot), 200.6), Some(210.0));
        // Cron, every 5 minutes, down for a week: one run, for the latest slot.
        let c = cron("*/5 * * * *", "UTC");
        let last = at("2026-03-01T10:00:00Z");
        let now = at("2026-03-08T10:07:00Z");
        assert_eq!(due(&c, last - 60.0, Some(last), now), Some(at("2026-03-08T10:05:00Z")));
        assert_eq!(due(&c, last - 60.0, Some(at("2026-03-08T10:05:00Z")), now), None);
        assert_eq!(
            next_fire(&c, last, Some(at("2026-03-08T10:05:00Z")), now),
            Some(at("2026-03-08T10:10:00Z"))
        );
        // Sparse slots (yearly) missed long ago.
        let y = cron("0 0 1 1 *", "UTC");
        let now = at("2029-06-01T00:00:00Z");
        assert_eq!(due(&y, at("2026-02-01T00:00:00Z"), None, now), Some(at("2029-01-01T00:00:00Z")));
    }

    #[test]
    fn cron_counts_from_the_deploy_and_across_dst() {
        // Deployed at 10:02:30: the first run is 10:05, not a slot before the deploy.
        let c = cron("*/5 * * * *", "UTC");
        let anchor = at("2026-03-01T10:02:30Z");
        assert_eq!(next_fire(&c, anchor, None, anchor), Some(at("2026-03-01T10:05:00Z")));
        assert_eq!(due(&c, anchor, None, anchor + 1.0), None);
        // Paris, spring forward (2026-03-29, 02:00 CET -> 03:00 CEST): a 02:30 job runs at
        // 03:00 CEST that day, once; then 02:30 CEST the next day.
        let c = cron("30 2 * * *", "Europe/Paris");
        let last = at("2026-03-28T01:30:00Z");
        let first = next_fire(&c, last - 10.0, Some(last), last + 1.0).unwrap();
        assert_eq!(first, at("2026-03-29T01:00:00Z"));
        assert_eq!(due(&c, last - 10.0, Some(last), first + 5.0), Some(first));
        assert_eq!(next_fire(&c, last - 10.0, Some(first), first + 5.0), Some(at("2026-03-30T00:30:00Z")));
        // Fall back (2026-10-25, 03:00 CEST -> 02:00 CET): 02:30 runs at its first
        // occurrence only, not again an hour later.
        let last = at("2026-10-24T00:30:00Z");
        let first = next_fire(&c, last - 10.0, Some(last), last + 1.0).unwrap();
        assert_eq!(first, at("2026-10-25T00:30:00Z"));
        assert_eq!(due(&c, last - 10.0, Some(first), at("2026-10-25T01:31:00Z")), None);
        assert_eq!(next_fire(&c, last - 10.0, Some(first), first + 1.0), Some(at("2026-10-26T01:30:00Z")));
    }
}
