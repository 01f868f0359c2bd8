//! Group commit and tickets, over a store whose commits can be held back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_api::AppMode;
use flare_store::*;

use super::*;
use crate::ControlPlane;

/// A store that records the size of each batch and can hold batches until released.
struct Gated {
    inner: SqliteStore,
    batches: Mutex<Vec<usize>>,
    gate: Mutex<bool>,
    cv: std::sync::Condvar,
    /// Batches waiting at the gate.
    waiting: std::sync::atomic::AtomicUsize,
    /// The next batch panics (a writer that dies).
    panic: std::sync::atomic::AtomicBool,
}

impl Gated {
    fn new(inner: SqliteStore) -> Arc<Self> {
        Arc::new(Gated {
            inner,
            batches: Mutex::default(),
            gate: Mutex::new(false),
            cv: Default::default(),
            waiting: Default::default(),
            panic: Default::default(),
        })
    }
    fn hold(&self) {
        *self.gate.lock().unwrap() = true;
    }
    fn release(&self) {
        *self.gate.lock().unwrap() = false;
        self.cv.notify_all();
    }
    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

impl Store for Gated {
    fn write_batch(&self, writes: &[Write]) -> flare_store::Result<()> {
        let mut held = self.gate.lock().unwrap();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while *held {
            held = self.cv.wait(held).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        drop(held);
        assert!(!self.panic.load(Ordering::SeqCst), "the store writer dies (test)");
        self.batches.lock().unwrap().push(writes.len());
        self.inner.write_batch(writes)
    }
    fn put_app(&self, a: &AppRow) -> flare_store::Result<()> {
        self.inner.put_app(a)
    }
    fn set_app_state(&self, id: &str, s: &str) -> flare_store::Result<()> {
        self.inner.set_app_state(id, s)
    }
    fn get_app(&self, id: &str) -> flare_store::Result<Option<AppRow>> {
        self.inner.get_app(id)
    }
    fn deployed_app_by_name(&self, n: &str) -> flare_store::Result<Option<AppRow>> {
        self.inner.deployed_app_by_name(n)
    }
    fn list_apps(&self) -> flare_store::Result<Vec<AppRow>> {
        self.inner.list_apps()
    }
    fn put_function(&self, f: &FunctionRow) -> flare_store::Result<()> {
        self.inner.put_function(f)
    }
    fn functions_of_app(&self, id: &str) -> flare_store::Result<Vec<FunctionRow>> {
        self.inner.functions_of_app(id)
    }
    fn put_mount(&self, id: &str, t: f64) -> flare_store::Result<bool> {
        self.inner.put_mount(id, t)
    }
    fn put_call(&self, c: &CallRow) -> flare_store::Result<()> {
        self.inner.put_call(c)
    }
    fn get_call(&self, id: &str) -> flare_store::Result<Option<CallRow>> {
        self.inner.get_call(id)
    }
    fn put_input(&self, i: &PendingInputRow) -> flare_store::Result<()> {
        self.inner.put_input(i)
    }
    fn put_output(&self, c: &str, o: &OutputRow, f: bool) -> flare_store::Result<()> {
        self.inner.put_output(c, o, f)
    }
    fn outputs_after(&self, c: &str, a: i64, l: usize) -> flare_store::Result<Vec<OutputRow>> {
        self.inner.outputs_after(c, a, l)
    }
    fn count_final_outputs(&self, c: &str) -> flare_store::Result<u64> {
        self.inner.count_final_outputs(c)
    }
    fn pending_inputs(&self) -> flare_store::Result<Vec<PendingInputRow>> {
        self.inner.pending_inputs()
    }
    fn set_call_done(&self, c: &str, t: f64) -> flare_store::Result<()> {
        self.inner.set_call_done(c, t)
    }
    fn expire_calls(&self, t: f64) -> flare_store::Result<u64> {
        self.inner.expire_calls(t)
    }
    fn append_logs(&self, l: &[LogRow]) -> flare_store::Result<()> {
        self.inner.append_logs(l)
    }
    fn logs_after(&self, a: &str, after: i64, l: usize) -> flare_store::Result<Vec<LogRow>> {
        self.inner.logs_after(a, after, l)
    }
    fn max_log_seq(&self, a: &str) -> flare_store::Result<Option<u64>> {
        self.inner.max_log_seq(a)
    }
    fn log_bytes(&self, a: &str) -> flare_store::Result<u64> {
        self.inner.log_bytes(a)
    }
    fn trim_logs(&self, a: &str, k: u64, n: &dyn Fn(u64, u64) -> String) -> flare_store::Result<u64> {
        self.inner.trim_logs(a, k, n)
    }
    fn expire_logs(&self, t: f64, n: &dyn Fn(u64, u64) -> String) -> flare_store::Result<Vec<String>> {
        self.inner.expire_logs(t, n)
    }
    fn get_dict(&self, id: &str) -> flare_store::Result<Option<flare_store::DictRow>> {
        self.inner.get_dict(id)
    }
    fn dict_by_name(&self, n: &str) -> flare_store::Result<Option<flare_store::DictRow>> {
        self.inner.dict_by_name(n)
    }
    fn list_dicts(&self) -> flare_store::Result<Vec<(flare_store::DictRow, u64)>> {
        self.inner.list_dicts()
    }
    fn dict_get(&self, id: &str, k: &[u8]) -> flare_store::Result<Option<Vec<u8>>> {
        self.inner.dict_get(id, k)
    }
    fn dict_contains(&self, id: &str, k: &[u8]) -> flare_store::Result<bool> {
        self.inner.dict_contains(id, k)
    }
    fn dict_len(&self, id: &str) -> flare_store::Result<u64> {
        self.inner.dict_len(id)
    }
    fn dict_entries(
        &self,
        id: &str,
        a: i64,
        l: usize,
        b: usize,
        k: bool,
    ) -> flare_store::Result<Vec<flare_store::DictEntry>> {
        self.inner.dict_entries(id, a, l, b, k)
    }
    // ---- queues ----
    fn get_queue(&self, id: &str) -> flare_store::Result<Option<flare_store::QueueRow>> {
        self.inner.get_queue(id)
    }
    fn queue_by_name(&self, n: &str) -> flare_store::Result<Option<flare_store::QueueRow>> {
        self.inner.queue_by_name(n)
    }
    fn list_queues(&self, now: f64) -> flare_store::Result<Vec<(flare_store::QueueRow, u64)>> {
        self.inner.list_queues(now)
    }
    fn queue_items(
        &self,
        id: &str,
        p: &str,
        a: i64,
        l: usize,
        b: usize,
        now: f64,
    ) -> flare_store::Result<Vec<flare_store::QueueItem>> {
        self.inner.queue_items(id, p, a, l, b, now)
    }
    fn queue_len(&self, id: &str, p: Option<&str>, now: f64) -> flare_store::Result<u64> {
        self.inner.queue_len(id, p, now)
    }
    fn queue_partitions(&self, id: &str, now: f64) -> flare_store::Result<u64> {
        self.inner.queue_partitions(id, now)
    }
    fn schedules(&self) -> flare_store::Result<Vec<ScheduleRow>> {
        self.inner.schedules()
    }
    fn get_volume(&self, id: &str) -> flare_store::Result<Option<flare_store::VolumeRow>> {
        self.inner.get_volume(id)
    }
    fn volume_by_name(&self, n: &str) -> flare_store::Result<Option<flare_store::VolumeRow>> {
        self.inner.volume_by_name(n)
    }
    fn list_volumes(&self) -> flare_store::Result<Vec<flare_store::VolumeRow>> {
        self.inner.list_volumes()
    }
}

fn app(id: &str) -> AppRow {
    AppRow {
        app_id: id.into(),
        name: id.into(),
        mode: "deployed".into(),
        state: "deployed".into(),
        version: 1,
        created_at: 1.0,
    }
}

/// Writes queued while a commit runs go into the next transaction together; a ticket
/// resolves once its writes are in the store.
#[test]
fn writes_queued_during_a_commit_are_one_batch() {
    let store = Gated::new(SqliteStore::open_in_memory().unwrap());
    let p = Persist::start(store.clone()).unwrap();
    store.hold();
    p.write(Write::App(app("a0")));
    // Once the writer has taken a0 and waits at the gate, these queue behind it.
    while store.waiting.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 1..=5 {
        p.write(Write::App(app(&format!("a{i}"))));
    }
    let ticket = p.ticket();
    store.release();
    ticket.wait_blocking().unwrap();
    assert_eq!(store.batches(), vec![1, 5]);
    for i in 0..=5 {
        assert!(
            store.get_app(&format!("a{i}")).unwrap().is_some(),
            "a{i} is stored once its ticket resolved"
        );
    }
    assert_eq!(p.stats().batches.load(Ordering::Relaxed), 2);
    assert_eq!(p.stats().writes.load(Ordering::Relaxed), 6);
}

/// A ticket awaited in async code resolves too, and reports a lost write.
#[tokio::test]
async fn tickets_resolve_in_async_code_with_the_result() {
    let store = Gated::new(SqliteStore::open_in_memory().unwrap());
    let p = Persist::start(store.clone()).unwrap();
    p.write(Write::App(app("a1")));
    p.ticket().wait().await.unwrap();
    assert!(store.get_app("a1").unwrap().is_some());
    // NOT NULL violated: the write is lost and the ticket says so; the good write survives.
    p.write(Write::App(AppRow { created_at: f64::NAN, ..app("bad") }));
    p.write(Write::App(app("a2")));
    assert!(p.ticket().wait().await.is_err());
    assert!(store.get_app("a2").unwrap().is_some());
}

/// A durable API call waits for its commit without holding the state lock.
#[tokio::test]
async fn durable_calls_wait_for_the_commit_outside_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let store = Gated::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let cp = ControlPlane::new(store.clone(), dir.path()).unwrap();
    store.hold();
    let cp2 = cp.clone();
    let creating = std::thread::spawn(move || cp2.create_app("dep", AppMode::Deployed).unwrap().0);
    // The app is in memory and the call waits for the store; the lock is free meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if cp.inner.state.try_lock().is_ok_and(|st| st.apps.values().any(|a| a.app.name == "dep")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the app never showed up in memory");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(!creating.is_finished(), "create_app answered before its commit");
    assert!(cp.inner.state.try_lock().is_ok(), "the state lock is held while waiting for the store");
    assert!(store.list_apps().unwrap().is_empty());
    store.release();
    let row = creating.join().unwrap();
    assert_eq!(store.get_app(&row.app_id).unwrap().unwrap().name, "dep");
}

/// A writer that dies does not leave a waiter waiting: its tickets, and later ones, fail.
#[tokio::test]
async fn tickets_fail_when_the_writer_dies() {
    let store = Gated::new(SqliteStore::open_in_memory().unwrap());
    let p = Persist::start(store.clone()).unwrap();
    store.panic.store(true, Ordering::SeqCst);
    p.write(Write::App(app("a1")));
    assert!(p.ticket().wait().await.is_err());
    p.write(Write::App(app("a2")));
    assert!(p.ticket().wait_blocking().is_err());
}
