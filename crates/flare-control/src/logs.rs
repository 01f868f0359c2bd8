//! App logs: the in-memory ring, per-container rate limits, and the store writer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_api::{ApiError, LogRecord};
use flare_proto::LogStream;
use flare_store::{LogRow, Store};
use tokio::sync::{mpsc, watch};

use crate::state::{AppRecord, AppState, State};
use crate::{now_ts, store_err, ApiResult, ControlConfig, ControlPlane};

/// Log records kept in memory per app (older ones are read from the store).
pub(crate) const LOG_RING: usize = 20_000;
/// Log bytes kept in memory per app (besides the [`LOG_RING`] record count).
pub(crate) const LOG_RING_BYTES: usize = 4 << 20;
/// Per-container token bucket for log output, and what it dropped.
pub(crate) struct LogBucket {
    pub(crate) tokens: f64,
    pub(crate) last: Instant,
    pub(crate) dropped_lines: u64,
    pub(crate) dropped_bytes: u64,
    pub(crate) last_drop: Instant,
}

impl LogBucket {
    pub(crate) fn new(burst: u64) -> Self {
        let now = Instant::now();
        LogBucket { tokens: burst as f64, last: now, dropped_lines: 0, dropped_bytes: 0, last_drop: now }
    }

    /// Takes `n` bytes' worth of tokens if there are enough.
    pub(crate) fn take(&mut self, n: usize, cfg: &ControlConfig) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * cfg.log_rate_bytes as f64;
        self.tokens = (self.tokens + refill).min(cfg.log_burst_bytes as f64);
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// The note about dropped output, once (then the counts start again).
    pub(crate) fn take_note(&mut self, cfg: &ControlConfig) -> Option<String> {
        if self.dropped_lines == 0 {
            return None;
        }
        let note = format!(
            "[flare] {} lines ({}) of this container's output were dropped: it wrote faster than the log rate limit ({}/s, bursts of {})",
            self.dropped_lines,
            flare_api::mib(self.dropped_bytes as usize),
            flare_api::mib(cfg.log_rate_bytes as usize),
            flare_api::mib(cfg.log_burst_bytes as usize),
        );
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
        Some(note)
    }
}

impl ControlPlane {
    pub fn logs(
        &self,
        app_id: &str,
        after: i64,
        limit: usize,
    ) -> ApiResult<(Vec<LogRecord>, AppState, watch::Receiver<u64>)> {
        let st = self.lock();
        let app = st.apps.get(app_id);
        let (state, rx, ring_start) = match app {
            Some(a) => (
                a.app.state,
                a.log_notify.subscribe(),
                a.logs.front().map(|l| l.seq as i64).unwrap_or(a.next_log_seq as i64),
            ),
            None => {
                drop(st);
                let row = self.store().get_app(app_id).map_err(store_err)?;
                let row = row.ok_or_else(|| ApiError::not_found(format!("app {app_id} not found")))?;
                let logs = self.store().logs_after(app_id, after, limit).map_err(store_err)?;
                let state = AppRecord::from_row(&row).state;
                return Ok((logs.into_iter().map(log_from_row).collect(), state, watch::channel(0).1));
            }
        };
        if after + 1 >= ring_start {
            let a = app.expect("some");
            let skip = (after + 1 - ring_start).max(0) as usize;
            let logs = a.logs.iter().skip(skip).take(limit).cloned().collect();
            return Ok((logs, state, rx));
        }
        drop(st);
        let logs = self.store().logs_after(app_id, after, limit).map_err(store_err)?;
        Ok((logs.into_iter().map(log_from_row).collect(), state, rx))
    }
}

pub(crate) fn log_from_row(l: LogRow) -> LogRecord {
    LogRecord {
        seq: l.seq,
        ts: l.ts,
        container_id: l.container_id,
        function: l.function,
        stream: match l.stream.as_str() {
            "stderr" => LogStream::Stderr,
            "system" => LogStream::System,
            _ => LogStream::Stdout,
        },
        data: l.data,
    }
}

pub(crate) fn push_log(
    st: &mut State,
    log_tx: &mpsc::UnboundedSender<LogRow>,
    app_id: &str,
    container_id: &str,
    stream: LogStream,
    data: &str,
) {
    let fname = st
        .containers
        .get(container_id)
        .and_then(|c| st.functions.get(&c.function_id))
        .map(|f| f.name.clone())
        .unwrap_or_default();
    push_log_as(st, log_tx, app_id, container_id, &fname, stream, data);
}

/// [`push_log`] with the function named by the caller (a line not from a container).
pub(crate) fn push_log_as(
    st: &mut State,
    log_tx: &mpsc::UnboundedSender<LogRow>,
    app_id: &str,
    container_id: &str,
    fname: &str,
    stream: LogStream,
    data: &str,
) {
    let fname = fname.to_string();
    let log_retention = st.config.log_retention_bytes;
    let Some(app) = st.apps.get_mut(app_id) else { return };
    let rec = LogRecord {
        seq: app.next_log_seq,
        ts: now_ts(),
        container_id: container_id.to_string(),
        function: fname,
        stream,
        data: data.to_string(),
    };
    app.next_log_seq += 1;
    let _ = log_tx.send(LogRow {
        app_id: app_id.to_string(),
        seq: rec.seq,
        ts: rec.ts,
        container_id: rec.container_id.clone(),
        function: rec.function.clone(),
        stream: match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
        .into(),
        data: rec.data.clone(),
    });
    app.log_bytes += rec.data.len();
    app.logs.push_back(rec);
    // Never more in memory than half of what the store keeps, so both show the same tail.
    let ring_bytes = LOG_RING_BYTES.min(log_retention as usize / 2);
    while app.logs.len() > LOG_RING || app.log_bytes > ring_bytes && app.logs.len() > 1 {
        if let Some(old) = app.logs.pop_front() {
            app.log_bytes -= old.data.len();
        }
    }
    app.log_notify.send_replace(app.next_log_seq);
}

/// Persists log records in batches and keeps each app's stored logs within
/// [`ControlConfig::log_retention_bytes`] (oldest first, with a note).
pub(crate) async fn log_writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<LogRow>,
    cfg: ControlConfig,
) {
    let mut buf = Vec::new();
    // Stored log bytes per app, as far as this process knows (read once per app).
    let mut usage: HashMap<String, u64> = HashMap::new();
    while let Some(first) = rx.recv().await {
        buf.push(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(more) = rx.try_recv() {
            buf.push(more);
        }
        let batch = std::mem::take(&mut buf);
        let store = store.clone();
        let cfg = cfg.clone();
        let mut known = std::mem::take(&mut usage);
        let res = tokio::task::spawn_blocking(move || {
            store.append_logs(&batch)?;
            enforce_log_size(&*store, &batch, &mut known, &cfg)?;
            Ok::<_, flare_store::StoreError>(known)
        })
        .await;
        match res {
            Ok(Ok(known)) => usage = known,
            Ok(Err(e)) => tracing::error!(error = %e, "could not persist logs"),
            Err(e) => tracing::error!(error = %e, "log writer task failed"),
        }
    }
}

pub(crate) fn retention_note(cfg: &ControlConfig) -> impl Fn(u64, u64) -> String + '_ {
    move |records, bytes| {
        format!(
            "[flare] {records} older log records ({}) of this app were deleted: the server keeps {} of logs per app, for {} days",
            flare_api::mib(bytes as usize),
            flare_api::mib(cfg.log_retention_bytes as usize),
            cfg.log_retention_age.as_secs_f64() / 86400.0,
        )
    }
}

pub(crate) fn enforce_log_size(
    store: &dyn Store,
    batch: &[LogRow],
    usage: &mut HashMap<String, u64>,
    cfg: &ControlConfig,
) -> Result<(), flare_store::StoreError> {
    let mut added: HashMap<&str, u64> = HashMap::new();
    for l in batch {
        *added.entry(l.app_id.as_str()).or_default() += l.data.len() as u64;
    }
    for (app, n) in added {
        let total = match usage.get_mut(app) {
            Some(t) => {
                *t += n;
                *t
            }
            None => {
                let t = store.log_bytes(app)?;
                usage.insert(app.to_string(), t);
                t
            }
        };
        if total > cfg.log_retention_bytes {
            // Down to 90%, so that trimming happens once per tenth of the budget.
            let left = store.trim_logs(app, cfg.log_retention_bytes / 10 * 9, &retention_note(cfg))?;
            usage.insert(app.to_string(), left);
        }
    }
    Ok(())
}
