//! Queues (`flare.Queue`): durable FIFO queues of pickled values, split into partitions
//! by a string key (`""`: the default partition), by name or ephemeral, usable from
//! clients and from containers.
//!
//! The items live in the store only (tables `queues` and `queue_items`). Every write goes
//! through the store writer and its API call answers after the commit, so an acknowledged
//! `put` survives a crash. A `get` selects the oldest items of its partition and removes
//! them in one committed write before it answers, holding one of a few striped per-queue
//! locks across the select, the delete and the commit: two getters never receive the same
//! item (at most once).
//!
//! Blocking happens on the server: a `get` on an empty partition (a `put` on a full one)
//! waits on the queue's [`tokio::sync::Notify`], woken after a put (a get, a clear)
//! commits, for at most [`MAX_WAIT`] per request; clients re-issue the request for longer
//! waits (long poll). A waiter registers its interest before it looks, so no wakeup is lost.
//!
//! A partition lives `partition_ttl` seconds after its last put (every put sets the expiry
//! of all its items); expired items are never returned or counted, and are deleted every
//! [`EXPIRY_EVERY`].
//!
//! Limits (Modal's): a value is at most [`MAX_VALUE_BYTES`] pickled (413), a partition
//! holds at most [`MAX_PARTITION_ITEMS`] items, a queue at most [`MAX_PARTITIONS`]
//! partitions, a partition key is at most [`MAX_PARTITION_KEY`] bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::Json;
use flare_api::{mib, ApiError, B64};
use flare_store::{QueueItem, QueueRow, Write};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::named::{check_create, commit, read};
use super::Service;
use crate::http::body::{ApiBody, Valid};
use crate::http::{HttpError, Route};
use crate::{new_id, now_ts, ControlPlane};

/// Largest pickled value.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most items of one partition.
pub const MAX_PARTITION_ITEMS: usize = 5000;
/// Most partitions (with unexpired items) of one queue.
pub const MAX_PARTITIONS: u64 = 100_000;
/// Longest partition key, in bytes.
pub const MAX_PARTITION_KEY: usize = 64;
/// Longest wait of one request; clients re-issue theirs for longer waits.
pub const MAX_WAIT: Duration = Duration::from_secs(50);
/// How often expired items are deleted.
pub const EXPIRY_EVERY: Duration = Duration::from_secs(60);
/// Most value bytes one `get` or `peek` answer carries (it has at least one item).
const MAX_ANSWER_BYTES: usize = 32 << 20;
/// Most items of one `peek` page, and its default.
const MAX_PEEK_ITEMS: usize = 1000;
const DEFAULT_PEEK_ITEMS: usize = 100;

/// The service.
pub struct Queues;

impl Service for Queues {
    fn name(&self) -> &'static str {
        "queues"
    }

    fn routes(&self) -> Vec<Route> {
        vec![
            Route::post("/v1/queues", create).container(),
            Route::get("/v1/queues", list).container(),
            Route::delete("/v1/queues/{queue_id}", delete).container(),
            Route::post("/v1/queues/{queue_id}/put", put).container(),
            Route::post("/v1/queues/{queue_id}/get", get).container(),
            Route::get("/v1/queues/{queue_id}/len", len).container(),
            Route::post("/v1/queues/{queue_id}/peek", peek).container(),
            Route::post("/v1/queues/{queue_id}/clear", clear).container(),
            Route::post("/v1/queues/{queue_id}/heartbeat", heartbeat).container(),
        ]
    }
}

/// What a queue's waiters wait on.
#[derive(Default)]
struct Waiters {
    /// Items were put.
    items: Notify,
    /// Room was made (items taken or cleared).
    room: Notify,
}

/// The queues' state on the control plane: striped locks and the waiters of each queue
/// that has some.
#[derive(Default)]
pub struct QueueState {
    locks: super::named::Locks,
    waiters: Mutex<HashMap<String, Arc<Waiters>>>,
}

/// A queue's waiters, held while waiting; the last one out removes the entry.
struct Watch<'a> {
    state: &'a QueueState,
    queue_id: String,
    w: Option<Arc<Waiters>>,
}

impl Watch<'_> {
    fn get(&self) -> &Waiters {
        self.w.as_deref().expect("held until drop")
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut m = self.state.waiters.lock().unwrap_or_else(|e| e.into_inner());
        self.w = None;
        if m.get(&self.queue_id).is_some_and(|w| Arc::strong_count(w) == 1) {
            m.remove(&self.queue_id);
        }
    }
}

impl QueueState {
    fn watch(&self, queue_id: &str) -> Watch<'_> {
        let mut m = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let w = m.entry(queue_id.to_string()).or_default().clone();
        Watch { state: self, queue_id: queue_id.to_string(), w: Some(w) }
    }

    fn wake(&self, queue_id: &str, items: bool, room: bool) {
        let m = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = m.get(queue_id) {
            if items {
                w.items.notify_waiters();
            }
            if room {
                w.room.notify_waiters();
            }
        }
    }
}

/// Deletes expired items every [`EXPIRY_EVERY`] (through the store writer).
pub(crate) fn spawn_expiry(cp: &ControlPlane) {
    let cp = cp.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(EXPIRY_EVERY);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            cp.persist().write(Write::QueueExpire { before: now_ts() });
        }
    });
}

async fn existing(cp: &ControlPlane, queue_id: &str) -> Result<QueueRow, ApiError> {
    let id = queue_id.to_string();
    read(cp, move |s| s.get_queue(&id)).await?.ok_or_else(|| no_queue(queue_id))
}

fn no_queue(queue_id: &str) -> ApiError {
    ApiError::not_found(format!("no queue {queue_id}"))
}

/// A partition key: `""` is the default partition.
fn check_partition(p: &str) -> Result<(), ApiError> {
    if p.len() > MAX_PARTITION_KEY {
        return Err(ApiError::invalid(format!(
            "a queue partition key is at most {MAX_PARTITION_KEY} bytes; this one is {} bytes",
            p.len()
        )));
    }
    Ok(())
}

/// A wait in seconds: finite, not negative; capped at [`MAX_WAIT`].
fn check_wait(what: &str, secs: f64) -> Result<Duration, ApiError> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(ApiError::invalid(format!("{what} is a number of seconds, 0 or more; got {secs}")));
    }
    Ok(Duration::from_secs_f64(secs).min(MAX_WAIT))
}

/// Waits for `n` (registered before the caller looked) or the deadline; whether the
/// deadline passed.
async fn wait(n: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>, deadline: Instant) -> bool {
    tokio::select! {
        _ = n => false,
        _ = tokio::time::sleep_until(deadline) => true,
    }
}

#[derive(Deserialize)]
struct CreateQueue {
    #[serde(default)]
    name: String,
    #[serde(default)]
    create_if_missing: bool,
    #[serde(default)]
    ephemeral: bool,
}

impl ApiBody for CreateQueue {
    fn validate(&self) -> Result<(), ApiError> {
        check_create("queue", &self.name, self.ephemeral)
    }
}

#[derive(Serialize)]
struct QueueInfo {
    queue_id: String,
    name: String,
    ephemeral: bool,
    created_at: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    len: Option<u64>,
}

impl QueueInfo {
    fn of(q: QueueRow) -> Self {
        QueueInfo {
            queue_id: q.queue_id,
            name: q.name,
            ephemeral: q.ephemeral,
            created_at: q.created_at,
            created: None,
            len: None,
        }
    }
}

async fn create(
    State(cp): State<ControlPlane>,
    Valid(req): Valid<CreateQueue>,
) -> Result<Json<QueueInfo>, HttpError> {
    let new = |name: String| QueueRow {
        queue_id: new_id("qu"),
        name,
        ephemeral: req.ephemeral,
        created_at: now_ts(),
    };
    if req.ephemeral {
        let q = new(String::new());
        cp.leases().touch(super::leases::Kind::Queue, &q.queue_id);
        commit(&cp, vec![Write::Queue(q.clone())]).await?;
        return Ok(Json(QueueInfo { created: Some(true), ..QueueInfo::of(q) }));
    }
    let _g = cp.queues().locks.lock(&format!("name:{}", req.name)).await;
    let name = req.name.clone();
    if let Some(q) = read(&cp, move |s| s.queue_by_name(&name)).await? {
        return Ok(Json(QueueInfo { created: Some(false), ..QueueInfo::of(q) }));
    }
    if !req.create_if_missing {
        return Err(ApiError::not_found(format!("no queue named {:?}", req.name)).into());
    }
    let q = new(req.name.clone());
    commit(&cp, vec![Write::Queue(q.clone())]).await?;
    tracing::info!(queue_id = %q.queue_id, name = %q.name, "queue created");
    Ok(Json(QueueInfo { created: Some(true), ..QueueInfo::of(q) }))
}

#[derive(Serialize)]
struct QueueList {
    queues: Vec<QueueInfo>,
}

async fn list(State(cp): State<ControlPlane>) -> Result<Json<QueueList>, HttpError> {
    let rows = read(&cp, |s| s.list_queues(now_ts())).await?;
    let queues = rows.into_iter().map(|(q, n)| QueueInfo { len: Some(n), ..QueueInfo::of(q) }).collect();
    Ok(Json(QueueList { queues }))
}

async fn delete(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    let q = {
        let _g = cp.queues().locks.lock(&queue_id).await;
        let q = existing(&cp, &queue_id).await?;
        commit(&cp, vec![Write::QueueDelete { queue_id: queue_id.clone() }]).await?;
        q
    };
    cp.leases().forget(&queue_id);
    // Its waiters wake up to find it gone.
    cp.queues().wake(&queue_id, true, true);
    tracing::info!(queue_id = %q.queue_id, name = %q.name, "queue deleted");
    Ok(Json(flare_api::Empty {}))
}

/// Deletes an ephemeral queue whose client went away (see [`super::leases`]).
pub(super) async fn delete_orphan(cp: &ControlPlane, queue_id: &str) -> Result<(), ApiError> {
    {
        let _g = cp.queues().locks.lock(queue_id).await;
        commit(cp, vec![Write::QueueDelete { queue_id: queue_id.to_string() }]).await?;
    }
    cp.queues().wake(queue_id, true, true);
    tracing::info!(queue_id = %queue_id, "ephemeral queue deleted: no heartbeat from its client");
    Ok(())
}

/// The client of an ephemeral queue is still there (see [`super::leases`]).
async fn heartbeat(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    if existing(&cp, &queue_id).await?.ephemeral {
        cp.leases().touch(super::leases::Kind::Queue, &queue_id);
    }
    Ok(Json(flare_api::Empty {}))
}

#[derive(Deserialize)]
struct PutReq {
    values: Vec<B64>,
    #[serde(default)]
    partition: String,
    /// Seconds the partition lives after this put (absent: no expiry).
    #[serde(default)]
    partition_ttl: Option<f64>,
    /// Seconds to wait for room in a full partition (0: answer at once).
    #[serde(default)]
    timeout: f64,
}

impl ApiBody for PutReq {
    fn validate(&self) -> Result<(), ApiError> {
        check_partition(&self.partition)?;
        check_wait("timeout", self.timeout)?;
        if let Some(ttl) = self.partition_ttl {
            if !ttl.is_finite() || ttl <= 0.0 {
                return Err(ApiError::invalid(format!(
                    "partition_ttl is a number of seconds over 0; got {ttl}"
                )));
            }
        }
        if self.values.len() > MAX_PARTITION_ITEMS {
            return Err(ApiError::invalid(format!(
                "a queue partition holds at most {MAX_PARTITION_ITEMS} items; this put has {}",
                self.values.len()
            )));
        }
        for v in &self.values {
            if v.0.len() > MAX_VALUE_BYTES {
                return Err(ApiError::too_large(format!(
                    "a queue item is at most {} pickled; this one is {}",
                    mib(MAX_VALUE_BYTES),
                    mib(v.0.len())
                )));
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Written {
    /// How many items were put.
    written: usize,
    /// Whether the partition had no room for them before the timeout (nothing was put).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    full: bool,
}

async fn put(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
    Valid(req): Valid<PutReq>,
) -> Result<Json<Written>, HttpError> {
    let deadline = Instant::now() + check_wait("timeout", req.timeout)?;
    let n = req.values.len();
    let watch = cp.queues().watch(&queue_id);
    let mut values: Vec<Vec<u8>> = req.values.into_iter().map(|v| v.0.to_vec()).collect();
    loop {
        let room = watch.get().room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        {
            let _g = cp.queues().locks.lock(&queue_id).await;
            let now = now_ts();
            let (id, p) = (queue_id.clone(), req.partition.clone());
            // One trip to the store threads: the queue exists, its partition's length.
            let (len, partitions) = read(&cp, move |s| {
                if s.get_queue(&id)?.is_none() {
                    return Ok(None);
                }
                let len = s.queue_len(&id, Some(&p), now)?;
                let parts = if len == 0 { s.queue_partitions(&id, now)? } else { 0 };
                Ok(Some((len, parts)))
            })
            .await?
            .ok_or_else(|| no_queue(&queue_id))?;
            if len == 0 && partitions >= MAX_PARTITIONS {
                return Err(ApiError::exhausted(format!(
                    "a queue has at most {MAX_PARTITIONS} partitions with items; this one is full"
                ))
                .into());
            }
            if len as usize + n <= MAX_PARTITION_ITEMS {
                if n > 0 {
                    let w = Write::QueuePut {
                        queue_id: queue_id.clone(),
                        partition: req.partition.clone(),
                        values: std::mem::take(&mut values),
                        expires_at: req.partition_ttl.map(|t| now + t),
                    };
                    commit(&cp, vec![w]).await?;
                    cp.queues().wake(&queue_id, true, false);
                }
                return Ok(Json(Written { written: n, full: false }));
            }
        }
        if Instant::now() >= deadline {
            return Ok(Json(Written { written: 0, full: true }));
        }
        // Woken or timed out: look once more either way.
        wait(room.as_mut(), deadline).await;
    }
}

#[derive(Deserialize)]
struct GetReq {
    /// Most items to take (at least one is waited for).
    #[serde(default = "one")]
    n: usize,
    #[serde(default)]
    partition: String,
    /// Seconds to wait for an item (0: answer at once).
    #[serde(default)]
    timeout: f64,
}

fn one() -> usize {
    1
}

impl ApiBody for GetReq {
    fn validate(&self) -> Result<(), ApiError> {
        check_partition(&self.partition)?;
        check_wait("timeout", self.timeout)?;
        if self.n == 0 || self.n > MAX_PARTITION_ITEMS {
            return Err(ApiError::invalid(format!("n is 1 to {MAX_PARTITION_ITEMS}; got {}", self.n)));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Value {
    seq: i64,
    value: B64,
}

#[derive(Serialize)]
struct Values {
    values: Vec<Value>,
}

fn values_of(items: Vec<QueueItem>) -> Vec<Value> {
    items.into_iter().map(|it| Value { seq: it.seq, value: B64(it.value.into()) }).collect()
}

async fn get(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
    Valid(req): Valid<GetReq>,
) -> Result<Json<Values>, HttpError> {
    let deadline = Instant::now() + check_wait("timeout", req.timeout)?;
    let watch = cp.queues().watch(&queue_id);
    loop {
        let put = watch.get().items.notified();
        tokio::pin!(put);
        put.as_mut().enable();
        {
            let _g = cp.queues().locks.lock(&queue_id).await;
            let (id, p, n) = (queue_id.clone(), req.partition.clone(), req.n);
            let items = read(&cp, move |s| match s.get_queue(&id)? {
                None => Ok(None),
                Some(_) => s.queue_items(&id, &p, 0, n, MAX_ANSWER_BYTES, now_ts()).map(Some),
            })
            .await?
            .ok_or_else(|| no_queue(&queue_id))?;
            if !items.is_empty() {
                let seqs = items.iter().map(|it| it.seq).collect();
                let w =
                    Write::QueueRemove { queue_id: queue_id.clone(), partition: req.partition.clone(), seqs };
                commit(&cp, vec![w]).await?;
                cp.queues().wake(&queue_id, false, true);
                return Ok(Json(Values { values: values_of(items) }));
            }
        }
        if Instant::now() >= deadline {
            return Ok(Json(Values { values: Vec::new() }));
        }
        // Woken or timed out: look once more either way.
        wait(put.as_mut(), deadline).await;
    }
}

#[derive(Deserialize)]
struct LenQuery {
    #[serde(default)]
    partition: String,
    #[serde(default)]
    total: bool,
}

#[derive(Serialize)]
struct Len {
    len: u64,
}

async fn len(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
    Query(q): Query<LenQuery>,
) -> Result<Json<Len>, HttpError> {
    check_partition(&q.partition)?;
    existing(&cp, &queue_id).await?;
    let len = read(&cp, move |s| {
        let p = (!q.total).then_some(q.partition.as_str());
        s.queue_len(&queue_id, p, now_ts())
    })
    .await?;
    Ok(Json(Len { len }))
}

#[derive(Deserialize)]
struct PeekReq {
    #[serde(default)]
    partition: String,
    /// Only items after this `seq`.
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
    /// Seconds to wait for an item after `after` (0: answer at once).
    #[serde(default)]
    timeout: f64,
}

impl ApiBody for PeekReq {
    fn validate(&self) -> Result<(), ApiError> {
        check_partition(&self.partition)?;
        check_wait("timeout", self.timeout)?;
        Ok(())
    }
}

#[derive(Serialize)]
struct Page {
    values: Vec<Value>,
    /// The `after` of the next page; absent when there was nothing after `after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

async fn peek(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
    Valid(req): Valid<PeekReq>,
) -> Result<Json<Page>, HttpError> {
    let deadline = Instant::now() + check_wait("timeout", req.timeout)?;
    let limit = req.limit.unwrap_or(DEFAULT_PEEK_ITEMS).clamp(1, MAX_PEEK_ITEMS);
    let watch = cp.queues().watch(&queue_id);
    loop {
        let put = watch.get().items.notified();
        tokio::pin!(put);
        put.as_mut().enable();
        existing(&cp, &queue_id).await?;
        let (id, p, after) = (queue_id.clone(), req.partition.clone(), req.after);
        let items =
            read(&cp, move |s| s.queue_items(&id, &p, after, limit, MAX_ANSWER_BYTES, now_ts())).await?;
        if !items.is_empty() || Instant::now() >= deadline {
            let next = items.last().map(|it| it.seq);
            return Ok(Json(Page { values: values_of(items), next }));
        }
        wait(put.as_mut(), deadline).await;
    }
}

#[derive(Deserialize)]
struct ClearReq {
    #[serde(default)]
    partition: String,
    /// Every partition.
    #[serde(default)]
    all: bool,
}

impl ApiBody for ClearReq {
    fn validate(&self) -> Result<(), ApiError> {
        check_partition(&self.partition)?;
        if self.all && !self.partition.is_empty() {
            return Err(ApiError::invalid("clear takes a partition or all, not both"));
        }
        Ok(())
    }
}

async fn clear(
    State(cp): State<ControlPlane>,
    Path(queue_id): Path<String>,
    Valid(req): Valid<ClearReq>,
) -> Result<Json<flare_api::Empty>, HttpError> {
    {
        let _g = cp.queues().locks.lock(&queue_id).await;
        existing(&cp, &queue_id).await?;
        let partition = (!req.all).then_some(req.partition);
        commit(&cp, vec![Write::QueueClear { queue_id: queue_id.clone(), partition }]).await?;
    }
    cp.queues().wake(&queue_id, false, true);
    Ok(Json(flare_api::Empty {}))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::StatusCode;
    use serde_json::{json, Value};

    use crate::http::{harden, router, SitePolicy};
    use crate::services::named::testing::*;

    #[test]
    fn partition_keys_and_waits_are_checked() {
        assert!(super::check_partition("").is_ok() && super::check_partition(&"k".repeat(64)).is_ok());
        let e = super::check_partition(&"é".repeat(33)).unwrap_err();
        assert!(e.message.contains("66 bytes"), "{}", e.message);
        assert_eq!(super::check_wait("t", 0.25).unwrap(), Duration::from_millis(250));
        assert_eq!(super::check_wait("t", 1e9).unwrap(), super::MAX_WAIT, "capped");
        assert!(super::check_wait("t", -1.0).is_err() && super::check_wait("t", f64::NAN).is_err());
        assert!(super::check_wait("t", f64::INFINITY).is_err());
    }

    /// Waiters register before they look: a wakeup between the look and the wait is kept.
    #[tokio::test]
    async fn a_wakeup_before_the_wait_is_not_lost() {
        let state = super::QueueState::default();
        {
            let watch = state.watch("qu-1");
            let n = watch.get().items.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            state.wake("qu-1", true, false); // a put commits after the getter looked
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            assert!(!super::wait(n.as_mut(), deadline).await, "woken, not timed out");
        }
        assert!(state.waiters.lock().unwrap().is_empty());
    }

    fn values(v: &Value) -> Vec<Vec<u8>> {
        v["values"].as_array().unwrap().iter().map(|x| unb64(&x["value"])).collect()
    }

    /// Every route, FIFO per partition, limits, blocking gets woken by puts with each
    /// item taken once, and what was acknowledged survives a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn queue_routes_round_trip_block_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&db).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());

        let (s, v) = call(&api, "POST", "/v1/queues", Some(json!({"name": "jobs"}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("jobs"), "{v}");
        let (_, v) =
            call(&api, "POST", "/v1/queues", Some(json!({"name": "jobs", "create_if_missing": true}))).await;
        assert_eq!(v["created"], json!(true), "{v}");
        let id = v["queue_id"].as_str().unwrap().to_string();
        let (s, _) = call(&api, "POST", "/v1/queues", Some(json!({"name": "bad name"}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let p = |op: &str| format!("/v1/queues/{id}/{op}");

        let (s, v) = call(&api, "POST", &p("put"), Some(json!({"values": [b64(b"a"), b64(b"b")]}))).await;
        assert_eq!((s, &v["written"]), (StatusCode::OK, &json!(2)), "{v}");
        call(&api, "POST", &p("put"), Some(json!({"values": [b64(b"x")], "partition": "p"}))).await;
        let (_, v) = call(&api, "GET", &p("len"), None).await;
        assert_eq!(v["len"], json!(2));
        let (_, v) = call(&api, "GET", &format!("{}?total=true", p("len")), None).await;
        assert_eq!(v["len"], json!(3));
        let (_, v) = call(&api, "POST", &p("peek"), Some(json!({"limit": 10}))).await;
        assert_eq!(values(&v), [b"a", b"b"]);
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({}))).await;
        assert_eq!(values(&v), [b"a"]);
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"n": 5}))).await;
        assert_eq!(values(&v), [b"b"]);
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"partition": "p"}))).await;
        assert_eq!(values(&v), [b"x"]);
        let t = std::time::Instant::now();
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"timeout": 0.1}))).await;
        assert!(values(&v).is_empty());
        assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(2));

        // Limits.
        let (s, v) =
            call(&api, "POST", &p("put"), Some(json!({"values": [], "partition": "k".repeat(65)}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let big = vec![1u8; super::MAX_VALUE_BYTES + 1];
        let (s, v) = call(&api, "POST", &p("put"), Some(json!({"values": [b64(&big)]}))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("1.0 MiB"), "{v}");
        let many: Vec<String> = (0..super::MAX_PARTITION_ITEMS).map(|_| b64(b"1")).collect();
        let (_, v) = call(&api, "POST", &p("put"), Some(json!({"values": many, "partition": "full"}))).await;
        assert_eq!(v["written"], json!(super::MAX_PARTITION_ITEMS), "{v}");
        let (_, v) = call(
            &api,
            "POST",
            &p("put"),
            Some(json!({"values": [b64(b"1")], "partition": "full", "timeout": 0.1})),
        )
        .await;
        assert_eq!((&v["written"], &v["full"]), (&json!(0), &json!(true)), "{v}");
        let (_, _) = call(&api, "POST", &p("clear"), Some(json!({"partition": "full"}))).await;
        let (_, v) = call(&api, "GET", &format!("{}?partition=full", p("len")), None).await;
        assert_eq!(v["len"], json!(0));

        // Eight blocked getters, then eight puts: each item goes to exactly one getter.
        let mut getters = Vec::new();
        for _ in 0..8 {
            let (api, path) = (api.clone(), p("get"));
            getters.push(tokio::spawn(async move {
                let (s, v) = call(&api, "POST", &path, Some(json!({"timeout": 20}))).await;
                assert_eq!(s, StatusCode::OK, "{v}");
                values(&v)
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..8u8 {
            call(&api, "POST", &p("put"), Some(json!({"values": [b64(&[i])]}))).await;
        }
        let mut got = Vec::new();
        for g in getters {
            let v = tokio::time::timeout(Duration::from_secs(10), g).await.unwrap().unwrap();
            assert_eq!(v.len(), 1);
            got.push(v[0][0]);
        }
        got.sort();
        assert_eq!(got, (0..8u8).collect::<Vec<_>>());
        assert!(cp.queues().waiters.lock().unwrap().is_empty(), "the last waiter out removes the entry");

        // A partition's items expire partition_ttl after its last put.
        call(
            &api,
            "POST",
            &p("put"),
            Some(json!({"values": [b64(b"t")], "partition": "ttl", "partition_ttl": 0.2})),
        )
        .await;
        let (_, v) = call(&api, "GET", &format!("{}?partition=ttl", p("len")), None).await;
        assert_eq!(v["len"], json!(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({"partition": "ttl"}))).await;
        assert!(values(&v).is_empty(), "{v}");

        // A getter blocked on a deleted queue hears about it.
        let (_, v) = call(&api, "POST", "/v1/queues", Some(json!({"ephemeral": true}))).await;
        let eph = v["queue_id"].as_str().unwrap().to_string();
        let (api2, path) = (api.clone(), format!("/v1/queues/{eph}/get"));
        let blocked =
            tokio::spawn(async move { call(&api2, "POST", &path, Some(json!({"timeout": 20}))).await.0 });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, v) = call(&api, "GET", "/v1/queues", None).await;
        assert_eq!(v["queues"].as_array().unwrap().len(), 2, "{v}");
        let (s, _) = call(&api, "DELETE", &format!("/v1/queues/{eph}"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), blocked).await.unwrap().unwrap(),
            StatusCode::NOT_FOUND
        );

        call(&api, "POST", &p("put"), Some(json!({"values": [b64(b"kept")]}))).await;
        drop(api);
        drop(cp);
        let store = std::sync::Arc::new(flare_store::SqliteStore::open(&db).unwrap());
        let cp = crate::ControlPlane::new(store, dir.path()).unwrap();
        let api = harden(router(cp.clone()), &cp, SitePolicy::default());
        let (_, v) = call(&api, "POST", &p("get"), Some(json!({}))).await;
        assert_eq!(values(&v), [b"kept"]);
        let (s, _) = call(&api, "POST", &p("clear"), Some(json!({"all": true}))).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "DELETE", &format!("/v1/queues/{id}"), None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(&api, "POST", "/v1/queues", Some(json!({"name": "jobs"}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}
