//! Durable state of the control plane.
//!
//! One [`Store`] trait; [`SqliteStore`] implements it for the embedded server.
//! Migrations run when a store is opened. Worker and container state is not
//! stored: it is rebuilt when workers register.

use std::path::Path;
use std::sync::Mutex;

use flare_proto::{ExceptionInfo, FunctionDef, GenMark, OutputStatus};
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq)]
pub struct AppRow {
    pub app_id: String,
    pub name: String,
    pub mode: String,
    pub state: String,
    pub version: i64,
    pub created_at: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FunctionRow {
    pub function_id: String,
    pub app_id: String,
    pub name: String,
    pub def: FunctionDef,
    pub created_at: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CallRow {
    pub call_id: String,
    pub function_id: String,
    pub kind: String,
    pub num_inputs: u64,
    pub created_at: f64,
    /// The app whose container made the call (None: a client outside containers).
    pub caller_app_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PendingInputRow {
    pub call_id: String,
    pub function_id: String,
    pub idx: u64,
    pub input_id: String,
    pub args: Vec<u8>,
    pub retry_count: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutputRow {
    pub seq: u64,
    pub idx: u64,
    pub input_id: String,
    pub status: OutputStatus,
    pub data: Vec<u8>,
    pub gen: Option<GenMark>,
    pub exception: Option<ExceptionInfo>,
    pub retry_count: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogRow {
    pub app_id: String,
    pub seq: u64,
    pub ts: f64,
    pub container_id: String,
    pub function: String,
    pub stream: String,
    pub data: String,
}

/// A dict (`flare.Dict`): named ones are unique by name; ephemeral ones have no name.
#[derive(Clone, Debug, PartialEq)]
pub struct DictRow {
    pub dict_id: String,
    pub name: String,
    pub ephemeral: bool,
    pub created_at: f64,
}

/// An entry of a dict: pickled key and value, and its place in iteration order (`seq`:
/// an entry keeps it when its value is replaced; new entries come after every other).
#[derive(Clone, Debug, PartialEq)]
pub struct DictEntry {
    pub seq: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

// ---- queues (`flare.Queue`) ----

/// A queue (`flare.Queue`): named ones are unique by name; ephemeral ones have no name.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueRow {
    pub queue_id: String,
    pub name: String,
    pub ephemeral: bool,
    pub created_at: f64,
}

/// An item of a queue: its pickled value, its partition (`""`: the default one) and its
/// place in FIFO order (`seq`, increasing over the whole store).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueItem {
    pub seq: i64,
    pub partition: String,
    pub value: Vec<u8>,
}

// ---- Schedules (`schedule=`) ------------------------------------------------------------

/// A scheduled function's state: what its slots count from and the last slot that fired.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRow {
    pub function_id: String,
    pub app_id: String,
    /// When the schedule was deployed (a `Period`'s slots count from it).
    pub anchor: f64,
    /// The slot of the last scheduled run (None: none yet).
    pub last_fire: Option<f64>,
    /// The app version (deployment) that registered the schedule: a redeploy that no
    /// longer has the function leaves it behind, and it stops.
    pub app_version: i64,
}

/// A scheduled run, stored as one unit: its spawned call, its one input and the schedule's
/// new `last_fire` (a crash leaves all of them or none).
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledRun {
    pub call: CallRow,
    pub input: PendingInputRow,
    pub state: ScheduleRow,
}

// ---- end of schedules ---------------------------------------------------------------------

/// A volume (`flare.Volume`): a versioned file tree whose current version is the
/// manifest `manifest` (a CAS digest, `""` while the volume is empty). Named ones are
/// unique by name; ephemeral ones have no name.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeRow {
    pub volume_id: String,
    pub name: String,
    pub ephemeral: bool,
    pub created_at: f64,
    /// 0 for a new volume; each commit adds one.
    pub version: i64,
    pub manifest: String,
}

/// One write of a [`Store::write_batch`]: the same as the `put_*`/`set_*` method of its name.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    App(AppRow),
    AppState {
        app_id: String,
        state: String,
    },
    Function(Box<FunctionRow>),
    Call(CallRow),
    Input(PendingInputRow),
    Output {
        call_id: String,
        row: OutputRow,
        final_output: bool,
    },
    CallDone {
        call_id: String,
        done_at: f64,
    },
    /// A new dict.
    Dict(DictRow),
    /// A dict and its entries deleted.
    DictDelete {
        dict_id: String,
    },
    /// Entries set (inserted, or their values replaced), in order.
    DictPut {
        dict_id: String,
        items: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Entries removed (absent keys are ignored).
    DictRemove {
        dict_id: String,
        keys: Vec<Vec<u8>>,
    },
    /// Every entry of a dict removed.
    DictClear {
        dict_id: String,
    },
    // ---- queues ----
    /// A new queue.
    Queue(QueueRow),
    /// A queue and its items deleted.
    QueueDelete {
        queue_id: String,
    },
    /// Items appended to a partition, in order; every item of that partition (old and
    /// new) then expires at `expires_at` (a partition lives `partition_ttl` after its last put).
    QueuePut {
        queue_id: String,
        partition: String,
        values: Vec<Vec<u8>>,
        expires_at: Option<f64>,
    },
    /// Items of one partition removed by `seq` (absent ones are ignored).
    QueueRemove {
        queue_id: String,
        partition: String,
        seqs: Vec<i64>,
    },
    /// The items of one partition removed, or of every partition (`partition: None`).
    QueueClear {
        queue_id: String,
        partition: Option<String>,
    },
    /// Every item that expired before `before` removed, from every queue.
    QueueExpire {
        before: f64,
    },
    // ---- Schedules ----
    /// A function's schedule state set (inserted or replaced).
    Schedule(ScheduleRow),
    /// A function's schedule state deleted (unscheduled, or its app stopped).
    ScheduleDelete {
        function_id: String,
    },
    /// A scheduled run: its call, its one input and the schedule's new `last_fire`, applied
    /// together (a crash leaves all of them or none).
    ScheduledRun(Box<ScheduledRun>),
    // ---- end of schedules ----
    /// A new volume.
    Volume(VolumeRow),
    /// A volume deleted (its blobs go with the next `flared gc`).
    VolumeDelete {
        volume_id: String,
    },
    /// A volume's new current version.
    VolumeVersion {
        volume_id: String,
        version: i64,
        manifest: String,
    },
}

/// Everything the control plane persists.
pub trait Store: Send + Sync {
    /// Applies the writes in order, in one transaction: all of them or none.
    fn write_batch(&self, writes: &[Write]) -> Result<()>;

    fn put_app(&self, app: &AppRow) -> Result<()>;
    fn set_app_state(&self, app_id: &str, state: &str) -> Result<()>;
    fn get_app(&self, app_id: &str) -> Result<Option<AppRow>>;
    fn deployed_app_by_name(&self, name: &str) -> Result<Option<AppRow>>;
    fn list_apps(&self) -> Result<Vec<AppRow>>;

    fn put_function(&self, f: &FunctionRow) -> Result<()>;
    fn functions_of_app(&self, app_id: &str) -> Result<Vec<FunctionRow>>;

    fn put_mount(&self, mount_id: &str, created_at: f64) -> Result<bool>;

    fn put_call(&self, call: &CallRow) -> Result<()>;
    fn get_call(&self, call_id: &str) -> Result<Option<CallRow>>;
    /// Persists an accepted input (before the call returns to the client).
    fn put_input(&self, input: &PendingInputRow) -> Result<()>;
    /// Records a final (or generator) output; a final one also retires its input.
    fn put_output(&self, call_id: &str, out: &OutputRow, final_output: bool) -> Result<()>;
    fn outputs_after(&self, call_id: &str, after: i64, limit: usize) -> Result<Vec<OutputRow>>;
    fn count_final_outputs(&self, call_id: &str) -> Result<u64>;
    /// Inputs accepted but without a final output (re-queued at start-up).
    fn pending_inputs(&self) -> Result<Vec<PendingInputRow>>;
    /// Records when a call got its last final output (its retention period starts then).
    fn set_call_done(&self, call_id: &str, done_at: f64) -> Result<()>;
    /// Deletes calls that finished before `before_ts`, with their inputs and outputs
    /// (calls from before finish times were recorded count from their creation, if no
    /// input of theirs is pending). Returns how many calls were deleted.
    fn expire_calls(&self, before_ts: f64) -> Result<u64>;

    fn append_logs(&self, logs: &[LogRow]) -> Result<()>;
    fn logs_after(&self, app_id: &str, after: i64, limit: usize) -> Result<Vec<LogRow>>;
    fn max_log_seq(&self, app_id: &str) -> Result<Option<u64>>;
    /// Bytes of log text stored for an app.
    fn log_bytes(&self, app_id: &str) -> Result<u64>;
    /// Deletes an app's oldest log records until at most `keep_bytes` remain. One note
    /// record (stream `system`, text from `note(records, bytes)` with the totals deleted
    /// so far for the app) takes the seq of the newest deleted record, so readers see
    /// what is missing where it was. Returns the bytes left.
    fn trim_logs(&self, app_id: &str, keep_bytes: u64, note: &dyn Fn(u64, u64) -> String) -> Result<u64>;
    /// Deletes log records older than `before_ts`, with a note per app as in
    /// [`Store::trim_logs`]. Returns the apps whose logs were deleted.
    fn expire_logs(&self, before_ts: f64, note: &dyn Fn(u64, u64) -> String) -> Result<Vec<String>>;

    /// A dict by id.
    fn get_dict(&self, dict_id: &str) -> Result<Option<DictRow>>;
    /// A named dict by name.
    fn dict_by_name(&self, name: &str) -> Result<Option<DictRow>>;
    /// Every dict, oldest first, with its number of entries.
    fn list_dicts(&self) -> Result<Vec<(DictRow, u64)>>;
    /// An entry's value.
    fn dict_get(&self, dict_id: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Whether a dict has an entry.
    fn dict_contains(&self, dict_id: &str, key: &[u8]) -> Result<bool>;
    /// A dict's number of entries.
    fn dict_len(&self, dict_id: &str) -> Result<u64>;
    /// A page of entries with `seq > after`, in `seq` order: at most `limit`, and no more
    /// than `max_bytes` of keys and values (at least one entry, if there is one). With
    /// `keys_only` the values are left empty.
    fn dict_entries(
        &self,
        dict_id: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<Vec<DictEntry>>;

    // ---- queues ----
    /// A queue by id.
    fn get_queue(&self, queue_id: &str) -> Result<Option<QueueRow>>;
    /// A named queue by name.
    fn queue_by_name(&self, name: &str) -> Result<Option<QueueRow>>;
    /// Every queue, oldest first, with its number of unexpired items (all partitions).
    fn list_queues(&self, now: f64) -> Result<Vec<(QueueRow, u64)>>;
    /// Unexpired items (`expires_at` absent or not before `now`) of a partition with
    /// `seq > after`, oldest first: at most `limit`, and no more than `max_bytes` of values
    /// (at least one item, if there is one).
    fn queue_items(
        &self,
        queue_id: &str,
        partition: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
        now: f64,
    ) -> Result<Vec<QueueItem>>;
    /// Number of unexpired items of a partition, or of the whole queue (`partition: None`).
    fn queue_len(&self, queue_id: &str, partition: Option<&str>, now: f64) -> Result<u64>;
    /// Number of partitions of a queue that have unexpired items.
    fn queue_partitions(&self, queue_id: &str, now: f64) -> Result<u64>;
    // ---- Schedules ----
    /// Every function's schedule state.
    fn schedules(&self) -> Result<Vec<ScheduleRow>>;
    // ---- end of schedules ----
    // ---- volumes ----
    /// A volume by id.
    fn get_volume(&self, volume_id: &str) -> Result<Option<VolumeRow>>;
    /// A named volume by name.
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRow>>;
    /// Every volume, oldest first.
    fn list_volumes(&self) -> Result<Vec<VolumeRow>>;
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE apps (
    app_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX apps_name ON apps(name, mode);
CREATE TABLE functions (
    function_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    name TEXT NOT NULL,
    def_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX functions_app ON functions(app_id, name);
CREATE TABLE mounts (mount_id TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE calls (
    call_id TEXT PRIMARY KEY,
    function_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    num_inputs INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE inputs (
    call_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    input_id TEXT NOT NULL,
    function_id TEXT NOT NULL,
    args BLOB NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (call_id, idx)
);
CREATE INDEX inputs_pending ON inputs(done);
CREATE TABLE outputs (
    call_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    input_id TEXT NOT NULL,
    status TEXT NOT NULL,
    data BLOB NOT NULL,
    gen TEXT,
    exception_json TEXT,
    retry_count INTEGER NOT NULL,
    final INTEGER NOT NULL,
    PRIMARY KEY (call_id, seq)
);
CREATE TABLE logs (
    app_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    container_id TEXT NOT NULL,
    function TEXT NOT NULL,
    stream TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (app_id, seq)
);
"#,
    r#"
ALTER TABLE calls ADD COLUMN caller_app_id TEXT;
CREATE INDEX logs_ts ON logs(ts);
CREATE TABLE logs_deleted (
    app_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE calls ADD COLUMN done_at REAL;
CREATE INDEX calls_done_at ON calls(done_at);
CREATE INDEX calls_created_at ON calls(created_at);
"#,
    r#"
CREATE TABLE dicts (
    dict_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    ephemeral INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX dicts_name ON dicts(name) WHERE ephemeral = 0;
CREATE TABLE dict_entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dict_id TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    UNIQUE (dict_id, key)
);
CREATE INDEX dict_entries_seq ON dict_entries(dict_id, seq);
"#,
    r#"
CREATE TABLE queues (
    queue_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    ephemeral INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX queues_name ON queues(name) WHERE ephemeral = 0;
CREATE TABLE queue_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id TEXT NOT NULL,
    partition TEXT NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX queue_items_order ON queue_items(queue_id, partition, seq);
CREATE TABLE queue_partitions (
    queue_id TEXT NOT NULL,
    partition TEXT NOT NULL,
    expires_at REAL,
    len INTEGER NOT NULL,
    PRIMARY KEY (queue_id, partition)
);
CREATE INDEX queue_partitions_expiry ON queue_partitions(expires_at) WHERE expires_at IS NOT NULL;
"#,
    // Schedules.
    r#"
CREATE TABLE schedules (
    function_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    anchor REAL NOT NULL,
    last_fire REAL,
    app_version INTEGER NOT NULL
);
"#,
    // Volumes.
    r#"
CREATE TABLE volumes (
    volume_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    ephemeral INTEGER NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL,
    manifest TEXT NOT NULL
);
CREATE UNIQUE INDEX volumes_name ON volumes(name) WHERE ephemeral = 0;
"#,
];

/// The embedded store: one SQLite file in WAL mode.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(migration = i + 1, "applied store migration");
        }
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        app_id: r.get(0)?,
        name: r.get(1)?,
        mode: r.get(2)?,
        state: r.get(3)?,
        version: r.get(4)?,
        created_at: r.get(5)?,
    })
}

const APP_COLS: &str = "app_id, name, mode, state, version, created_at";

fn gen_str(g: Option<GenMark>) -> Option<&'static str> {
    g.map(|g| match g {
        GenMark::Item => "item",
        GenMark::Done => "done",
    })
}

fn gen_parse(s: Option<String>) -> Option<GenMark> {
    match s.as_deref() {
        Some("item") => Some(GenMark::Item),
        Some("done") => Some(GenMark::Done),
        _ => None,
    }
}

fn put_app(c: &Connection, a: &AppRow) -> Result<()> {
    c.execute(
        "INSERT INTO apps (app_id, name, mode, state, version, created_at) VALUES (?1,?2,?3,?4,?5,?6)
         ON CONFLICT(app_id) DO UPDATE SET state=excluded.state, version=excluded.version",
        params![a.app_id, a.name, a.mode, a.state, a.version, a.created_at],
    )?;
    Ok(())
}

fn set_app_state(c: &Connection, app_id: &str, state: &str) -> Result<()> {
    c.execute("UPDATE apps SET state=?2 WHERE app_id=?1", params![app_id, state])?;
    Ok(())
}

fn put_function(c: &Connection, f: &FunctionRow) -> Result<()> {
    let json = serde_json::to_string(&f.def).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    c.execute(
        "INSERT OR REPLACE INTO functions (function_id, app_id, name, def_json, created_at) VALUES (?1,?2,?3,?4,?5)",
        params![f.function_id, f.app_id, f.name, json, f.created_at],
    )?;
    Ok(())
}

fn put_call(c: &Connection, call: &CallRow) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO calls (call_id, function_id, kind, num_inputs, created_at, caller_app_id) VALUES (?1,?2,?3,?4,?5,?6)",
        params![
            call.call_id,
            call.function_id,
            call.kind,
            call.num_inputs as i64,
            call.created_at,
            call.caller_app_id
        ],
    )?;
    Ok(())
}

fn put_input(c: &Connection, i: &PendingInputRow) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO inputs (call_id, idx, input_id, function_id, args, retry_count, done)
         VALUES (?1,?2,?3,?4,?5,?6,0)",
        params![i.call_id, i.idx as i64, i.input_id, i.function_id, i.args, i.retry_count],
    )?;
    Ok(())
}

/// An output, and for a final one its input marked done; inside the caller's transaction.
fn put_output(c: &Connection, call_id: &str, o: &OutputRow, final_output: bool) -> Result<()> {
    let exc = match &o.exception {
        Some(e) => Some(serde_json::to_string(e).map_err(|e| StoreError::Corrupt(e.to_string()))?),
        None => None,
    };
    c.execute(
        "INSERT OR REPLACE INTO outputs (call_id, seq, idx, input_id, status, data, gen, exception_json, retry_count, final)
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
        params![
            call_id,
            o.seq as i64,
            o.idx as i64,
            o.input_id,
            o.status.as_str(),
            o.data,
            gen_str(o.gen),
            exc,
            o.retry_count,
            final_output as i64
        ],
    )?;
    if final_output {
        c.execute(
            "UPDATE inputs SET done=1, args=x'' WHERE call_id=?1 AND idx=?2",
            params![call_id, o.idx as i64],
        )?;
    }
    Ok(())
}

fn set_call_done(c: &Connection, call_id: &str, done_at: f64) -> Result<()> {
    c.execute("UPDATE calls SET done_at=?2 WHERE call_id=?1", params![call_id, done_at])?;
    Ok(())
}

fn apply(c: &Connection, w: &Write) -> Result<()> {
    match w {
        Write::App(a) => put_app(c, a),
        Write::AppState { app_id, state } => set_app_state(c, app_id, state),
        Write::Function(f) => put_function(c, f),
        Write::Call(call) => put_call(c, call),
        Write::Input(i) => put_input(c, i),
        Write::Output { call_id, row, final_output } => put_output(c, call_id, row, *final_output),
        Write::CallDone { call_id, done_at } => set_call_done(c, call_id, *done_at),
        Write::Dict(d) => {
            c.execute(
                "INSERT INTO dicts (dict_id, name, ephemeral, created_at) VALUES (?1,?2,?3,?4)",
                params![d.dict_id, d.name, d.ephemeral as i64, d.created_at],
            )?;
            Ok(())
        }
        Write::DictDelete { dict_id } => {
            c.execute("DELETE FROM dict_entries WHERE dict_id=?1", [dict_id])?;
            c.execute("DELETE FROM dicts WHERE dict_id=?1", [dict_id])?;
            Ok(())
        }
        Write::DictPut { dict_id, items } => {
            let mut st = c.prepare_cached(
                "INSERT INTO dict_entries (dict_id, key, value) VALUES (?1,?2,?3)
                 ON CONFLICT(dict_id, key) DO UPDATE SET value=excluded.value",
            )?;
            for (k, v) in items {
                st.execute(params![dict_id, k, v])?;
            }
            Ok(())
        }
        Write::DictRemove { dict_id, keys } => {
            let mut st = c.prepare_cached("DELETE FROM dict_entries WHERE dict_id=?1 AND key=?2")?;
            for k in keys {
                st.execute(params![dict_id, k])?;
            }
            Ok(())
        }
        Write::DictClear { dict_id } => {
            c.execute("DELETE FROM dict_entries WHERE dict_id=?1", [dict_id])?;
            Ok(())
        }
        Write::Queue(_)
        | Write::QueueDelete { .. }
        | Write::QueuePut { .. }
        | Write::QueueRemove { .. }
        | Write::QueueClear { .. }
        | Write::QueueExpire { .. } => apply_queue(c, w),
        Write::Schedule(row) => put_schedule(c, row),
        Write::ScheduleDelete { function_id } => {
            c.execute("DELETE FROM schedules WHERE function_id=?1", [function_id])?;
            Ok(())
        }
        Write::ScheduledRun(run) => {
            put_call(c, &run.call)?;
            put_input(c, &run.input)?;
            put_schedule(c, &run.state)
        }
        Write::Volume(v) => {
            c.execute(
                "INSERT INTO volumes (volume_id, name, ephemeral, created_at, version, manifest)
                 VALUES (?1,?2,?3,?4,?5,?6)",
                params![v.volume_id, v.name, v.ephemeral as i64, v.created_at, v.version, v.manifest],
            )?;
            Ok(())
        }
        Write::VolumeDelete { volume_id } => {
            c.execute("DELETE FROM volumes WHERE volume_id=?1", [volume_id])?;
            Ok(())
        }
        Write::VolumeVersion { volume_id, version, manifest } => {
            c.execute(
                "UPDATE volumes SET version=?2, manifest=?3 WHERE volume_id=?1",
                params![volume_id, version, manifest],
            )?;
            Ok(())
        }
    }
}

// ---- queues ----

fn apply_queue(c: &Connection, w: &Write) -> Result<()> {
    match w {
        Write::Queue(q) => {
            c.execute(
                "INSERT INTO queues (queue_id, name, ephemeral, created_at) VALUES (?1,?2,?3,?4)",
                params![q.queue_id, q.name, q.ephemeral as i64, q.created_at],
            )?;
        }
        Write::QueueDelete { queue_id } => {
            c.execute("DELETE FROM queue_items WHERE queue_id=?1", [queue_id])?;
            c.execute("DELETE FROM queue_partitions WHERE queue_id=?1", [queue_id])?;
            c.execute("DELETE FROM queues WHERE queue_id=?1", [queue_id])?;
        }
        Write::QueuePut { queue_id, partition, values, expires_at } => {
            let mut st =
                c.prepare_cached("INSERT INTO queue_items (queue_id, partition, value) VALUES (?1,?2,?3)")?;
            for v in values {
                st.execute(params![queue_id, partition, v])?;
            }
            // The partition's expiry and length: one row whatever its number of items.
            c.prepare_cached(
                "INSERT INTO queue_partitions (queue_id, partition, expires_at, len) VALUES (?1,?2,?3,?4)
                 ON CONFLICT(queue_id, partition) DO UPDATE SET expires_at=excluded.expires_at,
                     len=len+excluded.len",
            )?
            .execute(params![queue_id, partition, expires_at, values.len() as i64])?;
        }
        Write::QueueRemove { queue_id, partition, seqs } => {
            let mut st =
                c.prepare_cached("DELETE FROM queue_items WHERE seq=?1 AND queue_id=?2 AND partition=?3")?;
            let mut removed = 0i64;
            for s in seqs {
                removed += st.execute(params![s, queue_id, partition])? as i64;
            }
            c.prepare_cached("UPDATE queue_partitions SET len=len-?3 WHERE queue_id=?1 AND partition=?2")?
                .execute(params![queue_id, partition, removed])?;
        }
        Write::QueueClear { queue_id, partition: Some(p) } => {
            c.execute("DELETE FROM queue_items WHERE queue_id=?1 AND partition=?2", params![queue_id, p])?;
            c.execute(
                "DELETE FROM queue_partitions WHERE queue_id=?1 AND partition=?2",
                params![queue_id, p],
            )?;
        }
        Write::QueueClear { queue_id, partition: None } => {
            c.execute("DELETE FROM queue_items WHERE queue_id=?1", [queue_id])?;
            c.execute("DELETE FROM queue_partitions WHERE queue_id=?1", [queue_id])?;
        }
        Write::QueueExpire { before } => {
            c.execute(
                "DELETE FROM queue_items WHERE seq IN (SELECT i.seq FROM queue_items i JOIN queue_partitions p
                     ON p.queue_id=i.queue_id AND p.partition=i.partition
                 WHERE p.expires_at IS NOT NULL AND p.expires_at<?1)",
                [before],
            )?;
            c.execute(
                "DELETE FROM queue_partitions WHERE expires_at IS NOT NULL AND expires_at<?1",
                [before],
            )?;
            // Partitions emptied by gets.
            c.execute("DELETE FROM queue_partitions WHERE len=0", [])?;
        }
        _ => unreachable!("not a queue write"),
    }
    Ok(())
}

/// Whether a queue's partition has not expired at `now` (one that has no row has no items).
fn partition_live(c: &Connection, queue_id: &str, partition: &str, now: f64) -> Result<bool> {
    let exp: Option<Option<f64>> = c
        .prepare_cached("SELECT expires_at FROM queue_partitions WHERE queue_id=?1 AND partition=?2")?
        .query_row(params![queue_id, partition], |r| r.get(0))
        .optional()?;
    Ok(match exp {
        None => true,
        Some(None) => true,
        Some(Some(t)) => t >= now,
    })
}

fn queue_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueueRow> {
    Ok(QueueRow {
        queue_id: r.get(0)?,
        name: r.get(1)?,
        ephemeral: r.get::<_, i64>(2)? != 0,
        created_at: r.get(3)?,
    })
}

fn put_schedule(c: &Connection, row: &ScheduleRow) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO schedules (function_id, app_id, anchor, last_fire, app_version) VALUES (?1,?2,?3,?4,?5)",
        params![row.function_id, row.app_id, row.anchor, row.last_fire, row.app_version],
    )?;
    Ok(())
}

fn dict_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DictRow> {
    Ok(DictRow {
        dict_id: r.get(0)?,
        name: r.get(1)?,
        ephemeral: r.get::<_, i64>(2)? != 0,
        created_at: r.get(3)?,
    })
}

fn volume_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        volume_id: r.get(0)?,
        name: r.get(1)?,
        ephemeral: r.get::<_, i64>(2)? != 0,
        created_at: r.get(3)?,
        version: r.get(4)?,
        manifest: r.get(5)?,
    })
}

const VOLUME_COLUMNS: &str = "volume_id, name, ephemeral, created_at, version, manifest";

impl Store for SqliteStore {
    fn write_batch(&self, writes: &[Write]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        for w in writes {
            apply(&tx, w)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn put_app(&self, a: &AppRow) -> Result<()> {
        put_app(&self.conn(), a)
    }

    fn set_app_state(&self, app_id: &str, state: &str) -> Result<()> {
        set_app_state(&self.conn(), app_id, state)
    }

    fn get_app(&self, app_id: &str) -> Result<Option<AppRow>> {
        let c = self.conn();
        Ok(c.query_row(&format!("SELECT {APP_COLS} FROM apps WHERE app_id=?1"), [app_id], app_from_row)
            .optional()?)
    }

    fn deployed_app_by_name(&self, name: &str) -> Result<Option<AppRow>> {
        let c = self.conn();
        Ok(c.query_row(
            &format!("SELECT {APP_COLS} FROM apps WHERE name=?1 AND mode='deployed' ORDER BY created_at DESC LIMIT 1"),
            [name],
            app_from_row,
        )
        .optional()?)
    }

    fn list_apps(&self) -> Result<Vec<AppRow>> {
        let c = self.conn();
        let mut st = c.prepare(&format!("SELECT {APP_COLS} FROM apps ORDER BY created_at"))?;
        let rows = st.query_map([], app_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn put_function(&self, f: &FunctionRow) -> Result<()> {
        put_function(&self.conn(), f)
    }

    fn functions_of_app(&self, app_id: &str) -> Result<Vec<FunctionRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT function_id, app_id, name, def_json, created_at FROM functions WHERE app_id=?1 ORDER BY created_at",
        )?;
        let rows = st
            .query_map([app_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(function_id, app_id, name, json, created_at)| {
                let def = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(FunctionRow { function_id, app_id, name, def, created_at })
            })
            .collect()
    }

    fn put_mount(&self, mount_id: &str, created_at: f64) -> Result<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO mounts (mount_id, created_at) VALUES (?1, ?2)",
            params![mount_id, created_at],
        )?;
        Ok(n > 0)
    }

    fn put_call(&self, call: &CallRow) -> Result<()> {
        put_call(&self.conn(), call)
    }

    fn get_call(&self, call_id: &str) -> Result<Option<CallRow>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT call_id, function_id, kind, num_inputs, created_at, caller_app_id FROM calls WHERE call_id=?1",
            [call_id],
            |r| {
                Ok(CallRow {
                    call_id: r.get(0)?,
                    function_id: r.get(1)?,
                    kind: r.get(2)?,
                    num_inputs: r.get::<_, i64>(3)? as u64,
                    created_at: r.get(4)?,
                    caller_app_id: r.get(5)?,
                })
            },
        )
        .optional()?)
    }

    fn put_input(&self, i: &PendingInputRow) -> Result<()> {
        put_input(&self.conn(), i)
    }

    fn put_output(&self, call_id: &str, o: &OutputRow, final_output: bool) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        put_output(&tx, call_id, o, final_output)?;
        tx.commit()?;
        Ok(())
    }

    fn outputs_after(&self, call_id: &str, after: i64, limit: usize) -> Result<Vec<OutputRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT seq, idx, input_id, status, data, gen, exception_json, retry_count FROM outputs
             WHERE call_id=?1 AND seq>?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = st
            .query_map(params![call_id, after, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, u32>(7)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(seq, idx, input_id, status, data, gen, exc, retry_count)| {
                let status = OutputStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown status {status}")))?;
                let exception = match exc {
                    Some(j) => {
                        Some(serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))?)
                    }
                    None => None,
                };
                Ok(OutputRow {
                    seq: seq as u64,
                    idx: idx as u64,
                    input_id,
                    status,
                    data,
                    gen: gen_parse(gen),
                    exception,
                    retry_count,
                })
            })
            .collect()
    }

    fn count_final_outputs(&self, call_id: &str) -> Result<u64> {
        let c = self.conn();
        let n: i64 =
            c.query_row("SELECT COUNT(*) FROM outputs WHERE call_id=?1 AND final=1", [call_id], |r| {
                r.get(0)
            })?;
        Ok(n as u64)
    }

    fn pending_inputs(&self) -> Result<Vec<PendingInputRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT call_id, function_id, idx, input_id, args, retry_count FROM inputs WHERE done=0 ORDER BY rowid",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(PendingInputRow {
                    call_id: r.get(0)?,
                    function_id: r.get(1)?,
                    idx: r.get::<_, i64>(2)? as u64,
                    input_id: r.get(3)?,
                    args: r.get(4)?,
                    retry_count: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn set_call_done(&self, call_id: &str, done_at: f64) -> Result<()> {
        set_call_done(&self.conn(), call_id, done_at)
    }

    fn expire_calls(&self, before_ts: f64) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let ids: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT call_id FROM calls WHERE done_at<?1
                 UNION
                 SELECT call_id FROM calls WHERE done_at IS NULL AND created_at<?1
                   AND NOT EXISTS (SELECT 1 FROM inputs WHERE inputs.call_id=calls.call_id AND done=0)",
            )?;
            let rows = st.query_map([before_ts], |r| r.get(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        for id in &ids {
            tx.execute("DELETE FROM outputs WHERE call_id=?1", [id])?;
            tx.execute("DELETE FROM inputs WHERE call_id=?1", [id])?;
            tx.execute("DELETE FROM calls WHERE call_id=?1", [id])?;
        }
        tx.commit()?;
        Ok(ids.len() as u64)
    }

    fn append_logs(&self, logs: &[LogRow]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO logs (app_id, seq, ts, container_id, function, stream, data) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )?;
            for l in logs {
                st.execute(params![
                    l.app_id,
                    l.seq as i64,
                    l.ts,
                    l.container_id,
                    l.function,
                    l.stream,
                    l.data
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn logs_after(&self, app_id: &str, after: i64, limit: usize) -> Result<Vec<LogRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT app_id, seq, ts, container_id, function, stream, data FROM logs
             WHERE app_id=?1 AND seq>?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = st
            .query_map(params![app_id, after, limit as i64], |r| {
                Ok(LogRow {
                    app_id: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    ts: r.get(2)?,
                    container_id: r.get(3)?,
                    function: r.get(4)?,
                    stream: r.get(5)?,
                    data: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn max_log_seq(&self, app_id: &str) -> Result<Option<u64>> {
        let c = self.conn();
        let v: Option<i64> =
            c.query_row("SELECT MAX(seq) FROM logs WHERE app_id=?1", [app_id], |r| r.get(0))?;
        Ok(v.map(|v| v as u64))
    }

    fn log_bytes(&self, app_id: &str) -> Result<u64> {
        let c = self.conn();
        let v: i64 = c.query_row(
            "SELECT COALESCE(SUM(length(CAST(data AS BLOB))), 0) FROM logs WHERE app_id=?1",
            [app_id],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }

    fn trim_logs(&self, app_id: &str, keep_bytes: u64, note: &dyn Fn(u64, u64) -> String) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let total: i64 = tx.query_row(
            "SELECT COALESCE(SUM(length(CAST(data AS BLOB))), 0) FROM logs WHERE app_id=?1",
            [app_id],
            |r| r.get(0),
        )?;
        let total = total as u64;
        if total <= keep_bytes {
            return Ok(total);
        }
        // Oldest first, until enough is gone.
        let excess = total - keep_bytes;
        let (mut gone, mut records, mut cut) = (0u64, 0u64, None);
        {
            let mut st =
                tx.prepare("SELECT seq, length(CAST(data AS BLOB)) FROM logs WHERE app_id=?1 ORDER BY seq")?;
            let mut rows = st.query([app_id])?;
            while let Some(r) = rows.next()? {
                let (seq, len): (i64, i64) = (r.get(0)?, r.get(1)?);
                gone += len as u64;
                records += 1;
                cut = Some(seq);
                if gone >= excess {
                    break;
                }
            }
        }
        let Some(cut) = cut else { return Ok(total) };
        tx.execute("DELETE FROM logs WHERE app_id=?1 AND seq<=?2", params![app_id, cut])?;
        let text = record_deleted(&tx, app_id, records, gone, note)?;
        insert_note(&tx, app_id, cut, &text)?;
        tx.commit()?;
        Ok(total - gone + text.len() as u64)
    }

    fn expire_logs(&self, before_ts: f64, note: &dyn Fn(u64, u64) -> String) -> Result<Vec<String>> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let apps: Vec<(String, i64, i64, i64)> = {
            let mut st = tx.prepare(
                "SELECT app_id, MAX(seq), COUNT(*), COALESCE(SUM(length(CAST(data AS BLOB))), 0)
                 FROM logs WHERE ts<?1 GROUP BY app_id",
            )?;
            let rows = st
                .query_map([before_ts], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        for (app_id, max_seq, records, bytes) in &apps {
            tx.execute("DELETE FROM logs WHERE app_id=?1 AND ts<?2", params![app_id, before_ts])?;
            let text = record_deleted(&tx, app_id, *records as u64, *bytes as u64, note)?;
            insert_note(&tx, app_id, *max_seq, &text)?;
        }
        tx.commit()?;
        Ok(apps.into_iter().map(|a| a.0).collect())
    }

    fn get_dict(&self, dict_id: &str) -> Result<Option<DictRow>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT dict_id, name, ephemeral, created_at FROM dicts WHERE dict_id=?1",
            [dict_id],
            dict_from_row,
        )
        .optional()?)
    }

    fn dict_by_name(&self, name: &str) -> Result<Option<DictRow>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT dict_id, name, ephemeral, created_at FROM dicts WHERE name=?1 AND ephemeral=0",
            [name],
            dict_from_row,
        )
        .optional()?)
    }

    fn list_dicts(&self) -> Result<Vec<(DictRow, u64)>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT d.dict_id, d.name, d.ephemeral, d.created_at,
                    (SELECT COUNT(*) FROM dict_entries e WHERE e.dict_id=d.dict_id)
             FROM dicts d ORDER BY d.created_at, d.dict_id",
        )?;
        let rows = st
            .query_map([], |r| Ok((dict_from_row(r)?, r.get::<_, i64>(4)? as u64)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn dict_get(&self, dict_id: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT value FROM dict_entries WHERE dict_id=?1 AND key=?2",
            params![dict_id, key],
            |r| r.get(0),
        )
        .optional()?)
    }

    fn dict_contains(&self, dict_id: &str, key: &[u8]) -> Result<bool> {
        let c = self.conn();
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM dict_entries WHERE dict_id=?1 AND key=?2",
            params![dict_id, key],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn dict_len(&self, dict_id: &str) -> Result<u64> {
        let c = self.conn();
        let n: i64 =
            c.query_row("SELECT COUNT(*) FROM dict_entries WHERE dict_id=?1", [dict_id], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn dict_entries(
        &self,
        dict_id: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<Vec<DictEntry>> {
        let c = self.conn();
        let sql = if keys_only {
            "SELECT seq, key, x'' FROM dict_entries WHERE dict_id=?1 AND seq>?2 ORDER BY seq LIMIT ?3"
        } else {
            "SELECT seq, key, value FROM dict_entries WHERE dict_id=?1 AND seq>?2 ORDER BY seq LIMIT ?3"
        };
        let mut st = c.prepare(sql)?;
        let mut rows = st.query(params![dict_id, after, limit as i64])?;
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while let Some(r) = rows.next()? {
            let e = DictEntry { seq: r.get(0)?, key: r.get(1)?, value: r.get(2)? };
            let n = e.key.len() + e.value.len();
            if !out.is_empty() && bytes + n > max_bytes {
                break;
            }
            bytes += n;
            out.push(e);
        }
        Ok(out)
    }

    // ---- queues ----

    fn get_queue(&self, queue_id: &str) -> Result<Option<QueueRow>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT queue_id, name, ephemeral, created_at FROM queues WHERE queue_id=?1",
            [queue_id],
            queue_from_row,
        )
        .optional()?)
    }

    fn queue_by_name(&self, name: &str) -> Result<Option<QueueRow>> {
        let c = self.conn();
        Ok(c.query_row(
            "SELECT queue_id, name, ephemeral, created_at FROM queues WHERE name=?1 AND ephemeral=0",
            [name],
            queue_from_row,
        )
        .optional()?)
    }

    fn list_queues(&self, now: f64) -> Result<Vec<(QueueRow, u64)>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT q.queue_id, q.name, q.ephemeral, q.created_at,
                    (SELECT COALESCE(SUM(p.len), 0) FROM queue_partitions p
                     WHERE p.queue_id=q.queue_id AND (p.expires_at IS NULL OR p.expires_at>=?1))
             FROM queues q ORDER BY q.created_at, q.queue_id",
        )?;
        let rows = st
            .query_map([now], |r| Ok((queue_from_row(r)?, r.get::<_, i64>(4)? as u64)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn queue_items(
        &self,
        queue_id: &str,
        partition: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
        now: f64,
    ) -> Result<Vec<QueueItem>> {
        let c = self.conn();
        if !partition_live(&c, queue_id, partition, now)? {
            return Ok(Vec::new());
        }
        let mut st = c.prepare_cached(
            "SELECT seq, partition, value FROM queue_items
             WHERE queue_id=?1 AND partition=?2 AND seq>?3 ORDER BY seq LIMIT ?4",
        )?;
        let mut rows = st.query(params![queue_id, partition, after, limit as i64])?;
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while let Some(r) = rows.next()? {
            let it = QueueItem { seq: r.get(0)?, partition: r.get(1)?, value: r.get(2)? };
            if !out.is_empty() && bytes + it.value.len() > max_bytes {
                break;
            }
            bytes += it.value.len();
            out.push(it);
        }
        Ok(out)
    }

    fn queue_len(&self, queue_id: &str, partition: Option<&str>, now: f64) -> Result<u64> {
        let c = self.conn();
        // Lengths are kept in the partitions' rows (one row read, not a count of items).
        let n: i64 = match partition {
            Some(p) => c
                .prepare_cached(
                    "SELECT len FROM queue_partitions WHERE queue_id=?1 AND partition=?2
                     AND (expires_at IS NULL OR expires_at>=?3)",
                )?
                .query_row(params![queue_id, p, now], |r| r.get(0))
                .optional()?
                .unwrap_or(0),
            None => c.query_row(
                "SELECT COALESCE(SUM(len), 0) FROM queue_partitions
                 WHERE queue_id=?1 AND (expires_at IS NULL OR expires_at>=?2)",
                params![queue_id, now],
                |r| r.get(0),
            )?,
        };
        Ok(n as u64)
    }

    fn queue_partitions(&self, queue_id: &str, now: f64) -> Result<u64> {
        let c = self.conn();
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM queue_partitions WHERE queue_id=?1
             AND (expires_at IS NULL OR expires_at>=?2) AND len>0",
            params![queue_id, now],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        let c = self.conn();
        let mut st =
            c.prepare("SELECT function_id, app_id, anchor, last_fire, app_version FROM schedules")?;
        let rows = st.query_map([], |r| {
            Ok(ScheduleRow {
                function_id: r.get(0)?,
                app_id: r.get(1)?,
                anchor: r.get(2)?,
                last_fire: r.get(3)?,
                app_version: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn get_volume(&self, volume_id: &str) -> Result<Option<VolumeRow>> {
        let c = self.conn();
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE volume_id=?1");
        Ok(c.query_row(&sql, [volume_id], volume_from_row).optional()?)
    }

    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRow>> {
        let c = self.conn();
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE name=?1 AND ephemeral=0");
        Ok(c.query_row(&sql, [name], volume_from_row).optional()?)
    }

    fn list_volumes(&self) -> Result<Vec<VolumeRow>> {
        let c = self.conn();
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY created_at, volume_id");
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], volume_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

/// Adds to an app's totals of deleted log records and returns the note about them.
fn record_deleted(
    tx: &rusqlite::Transaction<'_>,
    app_id: &str,
    records: u64,
    bytes: u64,
    note: &dyn Fn(u64, u64) -> String,
) -> Result<String> {
    tx.execute(
        "INSERT INTO logs_deleted (app_id, records, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT(app_id) DO UPDATE SET records=records+excluded.records, bytes=bytes+excluded.bytes",
        params![app_id, records as i64, bytes as i64],
    )?;
    let (r, b): (i64, i64) =
        tx.query_row("SELECT records, bytes FROM logs_deleted WHERE app_id=?1", [app_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok(note(r as u64, b as u64))
}

fn insert_note(tx: &rusqlite::Transaction<'_>, app_id: &str, seq: i64, text: &str) -> Result<()> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    // One note per app: the newest has the totals.
    tx.execute(
        "DELETE FROM logs WHERE app_id=?1 AND seq<?2 AND stream='system' AND container_id='' AND function=''",
        params![app_id, seq],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO logs (app_id, seq, ts, container_id, function, stream, data)
         VALUES (?1, ?2, ?3, '', '', 'system', ?4)",
        params![app_id, seq, ts, text],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> FunctionDef {
        serde_json::from_value(serde_json::json!({
            "name": "f", "module": "m", "qualname": "f", "python": {"executable": "/usr/bin/python3"}
        }))
        .unwrap()
    }

    #[test]
    fn apps_functions_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            for (id, mode) in [("a1", "deployed"), ("a2", "ephemeral")] {
                s.put_app(&AppRow {
                    app_id: id.into(),
                    name: "hello".into(),
                    mode: mode.into(),
                    state: "running".into(),
                    version: 1,
                    created_at: 1.0,
                })
                .unwrap();
            }
            s.put_function(&FunctionRow {
                function_id: "fn1".into(),
                app_id: "a1".into(),
                name: "f".into(),
                def: def(),
                created_at: 2.0,
            })
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.deployed_app_by_name("hello").unwrap().unwrap().app_id, "a1");
        assert_eq!(s.get_app("a2").unwrap().unwrap().state, "running");
        let fns = s.functions_of_app("a1").unwrap();
        assert_eq!(fns.len(), 1);
        assert_eq!(fns[0].def, def());
    }

    #[test]
    fn spawned_inputs_survive_until_output() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.put_call(&CallRow {
            call_id: "c1".into(),
            function_id: "fn1".into(),
            kind: "spawn".into(),
            num_inputs: 1,
            created_at: 1.0,
            caller_app_id: Some("ap-1".into()),
        })
        .unwrap();
        s.put_input(&PendingInputRow {
            call_id: "c1".into(),
            function_id: "fn1".into(),
            idx: 0,
            input_id: "in1".into(),
            args: vec![1, 2, 3],
            retry_count: 0,
        })
        .unwrap();
        assert_eq!(s.pending_inputs().unwrap().len(), 1);
        let out = OutputRow {
            seq: 0,
            idx: 0,
            input_id: "in1".into(),
            status: OutputStatus::Failure,
            data: vec![9],
            gen: None,
            exception: Some(ExceptionInfo::new("builtins.ValueError", "bad")),
            retry_count: 1,
        };
        s.put_output("c1", &out, true).unwrap();
        assert!(s.pending_inputs().unwrap().is_empty());
        assert_eq!(s.outputs_after("c1", -1, 10).unwrap(), vec![out]);
        assert_eq!(s.count_final_outputs("c1").unwrap(), 1);
        let call = s.get_call("c1").unwrap().unwrap();
        assert_eq!((call.kind.as_str(), call.caller_app_id.as_deref()), ("spawn", Some("ap-1")));
    }

    #[test]
    fn spawned_calls_expire_after_they_finish() {
        let s = SqliteStore::open_in_memory().unwrap();
        let call = |id: &str, created_at: f64| CallRow {
            call_id: id.into(),
            function_id: "fn1".into(),
            kind: "spawn".into(),
            num_inputs: 1,
            created_at,
            caller_app_id: None,
        };
        let input = |id: &str| PendingInputRow {
            call_id: id.into(),
            function_id: "fn1".into(),
            idx: 0,
            input_id: format!("in-{id}"),
            args: vec![1],
            retry_count: 0,
        };
        let out = |id: &str| OutputRow {
            seq: 0,
            idx: 0,
            input_id: format!("in-{id}"),
            status: OutputStatus::Success,
            data: vec![7],
            gen: None,
            exception: None,
            retry_count: 0,
        };
        // Old but still running: kept. Finished long ago: deleted. Finished recently: kept.
        for id in ["running", "old", "recent", "legacy"] {
            s.put_call(&call(id, 10.0)).unwrap();
            s.put_input(&input(id)).unwrap();
        }
        for (id, done_at) in [("old", 100.0), ("recent", 1000.0)] {
            s.put_output(id, &out(id), true).unwrap();
            s.set_call_done(id, done_at).unwrap();
        }
        s.put_output("legacy", &out("legacy"), true).unwrap(); // done before done_at existed
        assert_eq!(s.expire_calls(500.0).unwrap(), 2);
        assert!(s.get_call("old").unwrap().is_none());
        assert!(s.get_call("legacy").unwrap().is_none());
        assert!(s.outputs_after("old", -1, 10).unwrap().is_empty());
        assert!(s.get_call("recent").unwrap().is_some());
        assert_eq!(s.outputs_after("recent", -1, 10).unwrap().len(), 1);
        assert!(s.get_call("running").unwrap().is_some());
        assert_eq!(s.pending_inputs().unwrap().len(), 1);
    }

    #[test]
    fn log_retention_by_size_and_age() {
        let s = SqliteStore::open_in_memory().unwrap();
        let row = |seq: u64, ts: f64| LogRow {
            app_id: "a".into(),
            seq,
            ts,
            container_id: "c".into(),
            function: "f".into(),
            stream: "stdout".into(),
            data: "x".repeat(1000),
        };
        s.append_logs(&(0..100).map(|i| row(i, 1000.0 + i as f64)).collect::<Vec<_>>()).unwrap();
        assert_eq!(s.log_bytes("a").unwrap(), 100_000);
        let note = |r: u64, b: u64| format!("{r} older records ({b} bytes) deleted");
        let left = s.trim_logs("a", 50_000, &note).unwrap();
        assert!(left <= 50_100, "{left}");
        let page = s.logs_after("a", -1, 1000).unwrap();
        // Oldest gone first; the note sits where they were, then the newest 50 records.
        assert_eq!(page[0].stream, "system");
        assert_eq!(page[0].data, "50 older records (50000 bytes) deleted");
        assert_eq!(page[0].seq, 49);
        assert_eq!(page[1].seq, 50);
        assert_eq!(page.len(), 51);
        assert_eq!(s.max_log_seq("a").unwrap(), Some(99));
        // Age: everything before ts 1090 goes; the totals accumulate.
        let apps = s.expire_logs(1090.0, &note).unwrap();
        assert_eq!(apps, vec!["a".to_string()]);
        let page = s.logs_after("a", -1, 1000).unwrap();
        assert_eq!(page[0].data, "90 older records (90000 bytes) deleted");
        assert_eq!((page.len(), page[0].seq, page[1].seq), (11, 89, 90));
        assert!(s.expire_logs(1090.0, &note).unwrap().is_empty());
    }

    #[test]
    fn logs_page() {
        let s = SqliteStore::open_in_memory().unwrap();
        let logs: Vec<LogRow> = (0..5)
            .map(|i| LogRow {
                app_id: "a".into(),
                seq: i,
                ts: 0.0,
                container_id: "c".into(),
                function: "f".into(),
                stream: "stdout".into(),
                data: format!("line {i}\n"),
            })
            .collect();
        s.append_logs(&logs).unwrap();
        let page = s.logs_after("a", 1, 2).unwrap();
        assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.max_log_seq("a").unwrap(), Some(4));
    }

    #[test]
    fn a_batch_is_one_transaction() {
        let s = SqliteStore::open_in_memory().unwrap();
        let app = AppRow {
            app_id: "a1".into(),
            name: "a".into(),
            mode: "deployed".into(),
            state: "deployed".into(),
            version: 1,
            created_at: 1.0,
        };
        let call = CallRow {
            call_id: "c1".into(),
            function_id: "fn1".into(),
            kind: "spawn".into(),
            num_inputs: 1,
            created_at: 1.0,
            caller_app_id: None,
        };
        let input = PendingInputRow {
            call_id: "c1".into(),
            function_id: "fn1".into(),
            idx: 0,
            input_id: "in1".into(),
            args: vec![1],
            retry_count: 0,
        };
        let out = OutputRow {
            seq: 0,
            idx: 0,
            input_id: "in1".into(),
            status: OutputStatus::Success,
            data: vec![2],
            gen: None,
            exception: None,
            retry_count: 0,
        };
        s.write_batch(&[
            Write::App(app.clone()),
            Write::Function(Box::new(FunctionRow {
                function_id: "fn1".into(),
                app_id: "a1".into(),
                name: "f".into(),
                def: def(),
                created_at: 1.0,
            })),
            Write::Call(call),
            Write::Input(input),
            Write::Output { call_id: "c1".into(), row: out.clone(), final_output: true },
            Write::CallDone { call_id: "c1".into(), done_at: 2.0 },
            Write::AppState { app_id: "a1".into(), state: "stopped".into() },
        ])
        .unwrap();
        assert_eq!(s.get_app("a1").unwrap().unwrap().state, "stopped");
        assert_eq!(s.functions_of_app("a1").unwrap().len(), 1);
        assert_eq!(s.outputs_after("c1", -1, 10).unwrap(), vec![out]);
        assert!(s.pending_inputs().unwrap().is_empty(), "the final output marked its input done");
        // A failing write (NOT NULL) takes the whole batch with it.
        let bad = AppRow { app_id: "a3".into(), created_at: f64::NAN, ..app.clone() };
        let ok = AppRow { app_id: "a2".into(), ..app };
        assert!(s.write_batch(&[Write::App(ok), Write::App(bad)]).is_err());
        assert!(s.get_app("a2").unwrap().is_none());
    }

    #[test]
    fn dicts_entries_pages_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let d = |id: &str, name: &str, ephemeral: bool| DictRow {
            dict_id: id.into(),
            name: name.into(),
            ephemeral,
            created_at: 1.0,
        };
        {
            let s = SqliteStore::open(&path).unwrap();
            s.write_batch(&[
                Write::Dict(d("di-1", "cache", false)),
                Write::Dict(d("di-2", "", true)),
                Write::Dict(d("di-3", "", true)),
                Write::DictPut {
                    dict_id: "di-1".into(),
                    items: vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())],
                },
                Write::DictPut { dict_id: "di-2".into(), items: vec![(b"a".to_vec(), b"other".to_vec())] },
            ])
            .unwrap();
            // A name is unique among named dicts: the batch fails whole.
            assert!(s.write_batch(&[Write::Dict(d("di-4", "cache", false))]).is_err());
            // Replacing a value keeps the entry's place; a new key comes last.
            s.write_batch(&[Write::DictPut {
                dict_id: "di-1".into(),
                items: vec![(b"a".to_vec(), b"10".to_vec()), (b"c".to_vec(), b"3".to_vec())],
            }])
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.dict_by_name("cache").unwrap().unwrap().dict_id, "di-1");
        assert!(s.dict_by_name("").unwrap().is_none(), "ephemeral dicts have no name");
        assert!(s.get_dict("di-2").unwrap().unwrap().ephemeral);
        assert_eq!(s.dict_get("di-1", b"a").unwrap().as_deref(), Some(&b"10"[..]));
        assert_eq!(s.dict_get("di-2", b"a").unwrap().as_deref(), Some(&b"other"[..]));
        assert!(s.dict_get("di-1", b"z").unwrap().is_none());
        assert!(s.dict_contains("di-1", b"b").unwrap());
        assert!(!s.dict_contains("di-3", b"b").unwrap());
        assert_eq!(s.dict_len("di-1").unwrap(), 3);
        let all = s.dict_entries("di-1", 0, 100, usize::MAX, false).unwrap();
        let keys: Vec<&[u8]> = all.iter().map(|e| e.key.as_slice()).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        let page = s.dict_entries("di-1", 0, 2, usize::MAX, false).unwrap();
        assert_eq!(page.len(), 2);
        let rest = s.dict_entries("di-1", page[1].seq, 2, usize::MAX, false).unwrap();
        assert_eq!((rest.len(), rest[0].key.as_slice()), (1, &b"c"[..]));
        // A byte budget cuts a page, but a page has at least one entry.
        assert_eq!(s.dict_entries("di-1", 0, 100, 1, false).unwrap().len(), 1);
        assert_eq!(s.dict_entries("di-1", 0, 100, 5, false).unwrap().len(), 2);
        let keys_only = s.dict_entries("di-1", 0, 100, usize::MAX, true).unwrap();
        assert!(keys_only.iter().all(|e| e.value.is_empty()));
        let listed = s.list_dicts().unwrap();
        assert_eq!(
            listed.iter().map(|(d, n)| (d.dict_id.as_str(), *n)).collect::<Vec<_>>(),
            [("di-1", 3), ("di-2", 1), ("di-3", 0)]
        );
        s.write_batch(&[
            Write::DictRemove { dict_id: "di-1".into(), keys: vec![b"a".to_vec(), b"zz".to_vec()] },
            Write::DictClear { dict_id: "di-2".into() },
            Write::DictDelete { dict_id: "di-3".into() },
        ])
        .unwrap();
        assert_eq!(s.dict_len("di-1").unwrap(), 2);
        assert_eq!(s.dict_len("di-2").unwrap(), 0);
        assert!(s.get_dict("di-2").unwrap().is_some());
        assert!(s.get_dict("di-3").unwrap().is_none());
        s.write_batch(&[Write::DictDelete { dict_id: "di-1".into() }]).unwrap();
        assert!(s.dict_by_name("cache").unwrap().is_none());
        assert_eq!(s.dict_len("di-1").unwrap(), 0, "its entries went with it");
        // The name is free again.
        s.write_batch(&[Write::Dict(d("di-5", "cache", false))]).unwrap();
    }

    #[test]
    fn queues_fifo_partitions_expiry_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let q = |id: &str, name: &str, ephemeral: bool| QueueRow {
            queue_id: id.into(),
            name: name.into(),
            ephemeral,
            created_at: 1.0,
        };
        let put = |id: &str, p: &str, vs: &[&[u8]], exp: Option<f64>| Write::QueuePut {
            queue_id: id.into(),
            partition: p.into(),
            values: vs.iter().map(|v| v.to_vec()).collect(),
            expires_at: exp,
        };
        {
            let s = SqliteStore::open(&path).unwrap();
            s.write_batch(&[
                Write::Queue(q("qu-1", "jobs", false)),
                Write::Queue(q("qu-2", "", true)),
                put("qu-1", "", &[b"a", b"b"], None),
                put("qu-1", "p", &[b"x"], Some(100.0)),
                put("qu-2", "", &[b"other"], None),
            ])
            .unwrap();
            assert!(s.write_batch(&[Write::Queue(q("qu-3", "jobs", false))]).is_err(), "names are unique");
            s.write_batch(&[put("qu-1", "", &[b"c"], None)]).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.queue_by_name("jobs").unwrap().unwrap().queue_id, "qu-1");
        assert!(s.queue_by_name("").unwrap().is_none());
        assert!(s.get_queue("qu-2").unwrap().unwrap().ephemeral);
        let vals = |items: Vec<QueueItem>| items.into_iter().map(|i| i.value).collect::<Vec<_>>();
        assert_eq!(vals(s.queue_items("qu-1", "", 0, 10, usize::MAX, 50.0).unwrap()), [b"a", b"b", b"c"]);
        let two = s.queue_items("qu-1", "", 0, 2, usize::MAX, 50.0).unwrap();
        assert_eq!(vals(s.queue_items("qu-1", "", two[1].seq, 10, usize::MAX, 50.0).unwrap()), [b"c"]);
        assert_eq!(s.queue_items("qu-1", "", 0, 10, 1, 50.0).unwrap().len(), 1, "at least one item");
        assert_eq!(s.queue_len("qu-1", Some(""), 50.0).unwrap(), 3);
        assert_eq!(s.queue_len("qu-1", None, 50.0).unwrap(), 4);
        assert_eq!(s.queue_partitions("qu-1", 50.0).unwrap(), 2);
        // Past its expiry an item is neither counted nor returned; a put pushes the
        // expiry of its whole partition.
        assert_eq!(s.queue_len("qu-1", Some("p"), 150.0).unwrap(), 0);
        assert!(s.queue_items("qu-1", "p", 0, 10, usize::MAX, 150.0).unwrap().is_empty());
        s.write_batch(&[put("qu-1", "p", &[b"y"], Some(200.0))]).unwrap();
        assert_eq!(vals(s.queue_items("qu-1", "p", 0, 10, usize::MAX, 150.0).unwrap()), [b"x", b"y"]);
        s.write_batch(&[Write::QueueExpire { before: 250.0 }]).unwrap();
        assert_eq!(s.queue_len("qu-1", Some("p"), 0.0).unwrap(), 0, "expired items are deleted");
        assert_eq!(s.queue_len("qu-1", Some(""), 0.0).unwrap(), 3, "items without expiry stay");
        let listed = s.list_queues(50.0).unwrap();
        assert_eq!(
            listed.iter().map(|(q, n)| (q.queue_id.as_str(), *n)).collect::<Vec<_>>(),
            [("qu-1", 3), ("qu-2", 1)]
        );
        let first = s.queue_items("qu-1", "", 0, 1, usize::MAX, 0.0).unwrap()[0].seq;
        s.write_batch(&[
            Write::QueueRemove { queue_id: "qu-1".into(), partition: "".into(), seqs: vec![first, 999_999] },
            Write::QueueClear { queue_id: "qu-2".into(), partition: Some("".into()) },
        ])
        .unwrap();
        assert_eq!(vals(s.queue_items("qu-1", "", 0, 10, usize::MAX, 0.0).unwrap()), [b"b", b"c"]);
        assert_eq!(s.queue_len("qu-2", None, 0.0).unwrap(), 0);
        s.write_batch(&[
            put("qu-1", "z", &[b"1"], None),
            Write::QueueClear { queue_id: "qu-1".into(), partition: None },
        ])
        .unwrap();
        assert_eq!(s.queue_len("qu-1", None, 0.0).unwrap(), 0);
        s.write_batch(&[put("qu-1", "", &[b"1"], None), Write::QueueDelete { queue_id: "qu-1".into() }])
            .unwrap();
        assert!(s.get_queue("qu-1").unwrap().is_none());
        assert_eq!(s.queue_len("qu-1", None, 0.0).unwrap(), 0, "its items went with it");
        s.write_batch(&[Write::Queue(q("qu-4", "jobs", false))]).unwrap();
    }

    #[test]
    fn schedules_state_and_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let row = |last: Option<f64>| ScheduleRow {
            function_id: "fu1".into(),
            app_id: "ap1".into(),
            anchor: 100.0,
            last_fire: last,
            app_version: 1,
        };
        {
            let s = SqliteStore::open(&path).unwrap();
            s.write_batch(&[Write::Schedule(row(None))]).unwrap();
            assert_eq!(s.schedules().unwrap(), vec![row(None)]);
            let call = CallRow {
                call_id: "fc1".into(),
                function_id: "fu1".into(),
                kind: "spawn".into(),
                num_inputs: 1,
                created_at: 105.0,
                caller_app_id: None,
            };
            let input = PendingInputRow {
                call_id: "fc1".into(),
                function_id: "fu1".into(),
                idx: 0,
                input_id: "in1".into(),
                args: vec![1, 2],
                retry_count: 0,
            };
            s.write_batch(&[Write::ScheduledRun(Box::new(ScheduledRun {
                call,
                input,
                state: row(Some(105.0)),
            }))])
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schedules().unwrap(), vec![row(Some(105.0))]);
        assert_eq!(s.pending_inputs().unwrap().len(), 1);
        assert!(s.get_call("fc1").unwrap().is_some());
        s.write_batch(&[Write::ScheduleDelete { function_id: "fu1".into() }]).unwrap();
        assert!(s.schedules().unwrap().is_empty());
    }

    #[test]
    fn volumes_round_trip() {
        let s = SqliteStore::open_in_memory().unwrap();
        let v = |id: &str, name: &str, eph: bool| VolumeRow {
            volume_id: id.into(),
            name: name.into(),
            ephemeral: eph,
            created_at: 1.0,
            version: 0,
            manifest: String::new(),
        };
        s.write_batch(&[Write::Volume(v("vo-1", "data", false)), Write::Volume(v("vo-2", "", true))])
            .unwrap();
        assert!(s.write_batch(&[Write::Volume(v("vo-3", "data", false))]).is_err(), "names are unique");
        s.write_batch(&[Write::VolumeVersion {
            volume_id: "vo-1".into(),
            version: 1,
            manifest: "blake3:ab".into(),
        }])
        .unwrap();
        let got = s.volume_by_name("data").unwrap().unwrap();
        assert_eq!((got.version, got.manifest.as_str()), (1, "blake3:ab"));
        assert_eq!(s.list_volumes().unwrap().len(), 2);
        s.write_batch(&[Write::VolumeDelete { volume_id: "vo-1".into() }]).unwrap();
        assert!(s.get_volume("vo-1").unwrap().is_none());
        assert!(s.get_volume("vo-2").unwrap().is_some());
    }
}
