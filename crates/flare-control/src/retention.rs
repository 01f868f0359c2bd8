//! What the control plane keeps in memory, and for how long: the outputs a caller has
//! not read yet, which inputs of a call have their final output, and when a call (or a
//! stopped app) leaves memory. Pure data structures and decisions, so they are tested
//! without a server.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use flare_api::Output;
use flare_proto::GenMark;

/// A call's outputs that its caller has not read yet.
///
/// Outputs are numbered by `seq` from 0; a read of `after = S` (the caller has every output
/// up to `S`) acknowledges them, so they leave memory. `total` counts every output ever
/// appended, acknowledged or not.
#[derive(Default)]
pub(crate) struct OutputLog {
    /// Seq of `kept[0]` (equivalently: how many outputs were acknowledged and dropped).
    first_seq: u64,
    kept: VecDeque<Output>,
    /// Final outputs (not generator items) among the acknowledged ones.
    delivered_finals: u64,
}

/// Why a page of outputs cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AlreadyDelivered {
    /// Outputs with a seq below this were acknowledged and dropped.
    pub first_kept: u64,
}

impl OutputLog {
    /// A log that starts with `outputs` (a persisted call loaded from the store).
    pub fn from_outputs(outputs: Vec<Output>) -> Self {
        OutputLog { first_seq: 0, kept: outputs.into(), delivered_finals: 0 }
    }

    /// Appends an output, numbering it; returns its seq.
    pub fn push(&mut self, mut out: Output) -> u64 {
        let seq = self.total();
        out.seq = seq;
        self.kept.push_back(out);
        seq
    }

    /// Every output ever appended.
    pub fn total(&self) -> u64 {
        self.first_seq + self.kept.len() as u64
    }

    /// Outputs held in memory.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Final outputs the caller has acknowledged.
    pub fn delivered_finals(&self) -> u64 {
        self.delivered_finals
    }

    /// The caller has every output up to `after` (inclusive): they are dropped. Returns how
    /// many were dropped.
    pub fn ack(&mut self, after: i64) -> usize {
        let mut n = 0;
        while self.kept.front().is_some_and(|o| (o.seq as i64) <= after) {
            let o = self.kept.pop_front().expect("front");
            if o.gen != Some(GenMark::Item) {
                self.delivered_finals += 1;
            }
            n += 1;
        }
        self.first_seq += n as u64;
        if n > 0 && self.kept.capacity() > 64 && self.kept.capacity() > 4 * self.kept.len() {
            self.kept.shrink_to(self.kept.len() * 2);
        }
        n
    }

    /// Outputs after `after`, at most `limit` and about `max_bytes` of payloads (always one
    /// if there is one), and whether the page reaches the last output.
    pub fn page(
        &self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Output>, bool), AlreadyDelivered> {
        let start = (after + 1).max(0) as u64;
        if start < self.first_seq {
            return Err(AlreadyDelivered { first_kept: self.first_seq });
        }
        let skip = (start - self.first_seq) as usize;
        let mut bytes = 0usize;
        let outs: Vec<Output> = self
            .kept
            .iter()
            .skip(skip)
            .take(limit)
            .take_while(|o| {
                let first = bytes == 0;
                bytes += o.data.as_ref().map(|d| d.0.len()).unwrap_or(0).max(1);
                first || bytes <= max_bytes
            })
            .cloned()
            .collect();
        let reaches_end = start + outs.len() as u64 >= self.total();
        Ok((outs, reaches_end))
    }
}

/// Which inputs of a call have their final output: everything below a watermark, plus
/// the few above it that finished out of order. Memory is bounded by how far out of order
/// inputs finish, not by how many the call has.
#[derive(Default)]
pub(crate) struct FinishedSet {
    below: u64,
    above: BTreeSet<u64>,
}

impl FinishedSet {
    /// Records `idx` as finished; false if it already was.
    pub fn insert(&mut self, idx: u64) -> bool {
        if idx < self.below || !self.above.insert(idx) {
            return false;
        }
        while self.above.first() == Some(&self.below) {
            self.above.pop_first();
            self.below += 1;
        }
        true
    }

    /// Entries held above the watermark.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.above.len()
    }
}

/// Whether a call may take `batch` more inputs now. `unconsumed`: inputs accepted whose
/// final output the caller has not acknowledged. A call whose caller reads outputs keeps at
/// most `window` of them (a batch is taken whole when nothing is outstanding, so one larger
/// than the window cannot stall). A call nobody reads yet (`spawn_map`) is not limited: its
/// outputs are what `FunctionCall.get()` returns later.
pub(crate) fn has_room(read_by_caller: bool, unconsumed: u64, batch: u64, window: u64) -> bool {
    !read_by_caller || unconsumed == 0 || unconsumed + batch <= window
}

/// Delivered calls stay this long after their last page was served (a client whose
/// response was lost reads it again).
pub(crate) const DELIVERED_KEEP: Duration = Duration::from_secs(15);
/// Done calls that nobody has read for this long leave memory (undelivered results).
pub(crate) const CALL_IDLE_EVICT: Duration = Duration::from_secs(600);
/// Calls of a stopped app whose caller did not read everything leave memory after this
/// long without a read (the outputs saying "the app was stopped" are undelivered).
pub(crate) const STOPPED_CALL_KEEP: Duration = Duration::from_secs(60);

/// What eviction looks at for one call.
pub(crate) struct CallFacts {
    /// Every input has its final output and no more inputs come.
    pub done: bool,
    /// Results are in the store (spawned calls): memory is only a cache.
    pub persisted: bool,
    /// When a page that reached the end of a done call was served.
    pub delivered_at: Option<Instant>,
    /// Last read or write by a caller.
    pub last_access: Instant,
    /// The function's app is stopped (or gone).
    pub app_stopped: bool,
}

/// Whether a call leaves memory now.
pub(crate) fn call_evictable(c: &CallFacts, now: Instant) -> bool {
    let idle = now.saturating_duration_since(c.last_access);
    if c.done {
        if let Some(t) = c.delivered_at {
            if c.app_stopped || now.saturating_duration_since(t) >= DELIVERED_KEEP {
                return true;
            }
        }
        if c.persisted && idle >= DELIVERED_KEEP {
            return true; // read again from the store when asked for
        }
        if idle >= CALL_IDLE_EVICT {
            return true;
        }
    }
    c.app_stopped && idle >= STOPPED_CALL_KEEP
}

/// Whether a stopped app's remaining in-memory state (its record and log ring) goes now:
/// its containers are gone and the tail of its logs had time to reach the store.
pub(crate) fn stopped_app_evictable(
    containers: usize,
    idle_since: Instant,
    keep: Duration,
    now: Instant,
) -> bool {
    containers == 0 && now.saturating_duration_since(idle_since) >= keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_proto::{OutputStatus, B64};

    fn out(idx: u64, gen: Option<GenMark>, data: &'static [u8]) -> Output {
        Output {
            idx,
            seq: 0,
            input_id: format!("in-{idx}"),
            status: OutputStatus::Success,
            data: Some(B64(bytes::Bytes::from_static(data))),
            gen,
            exception: None,
            retry_count: 0,
        }
    }

    #[test]
    fn acknowledged_outputs_leave_memory() {
        let mut log = OutputLog::default();
        for i in 0..10 {
            assert_eq!(log.push(out(i, None, b"x")), i);
        }
        assert_eq!(log.ack(-1), 0);
        let (page, end) = log.page(-1, 4, 1 << 20).unwrap();
        assert_eq!(page.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert!(!end);
        assert_eq!(log.ack(3), 4);
        assert_eq!((log.kept(), log.total(), log.delivered_finals()), (6, 10, 4));
        // The same read again (a lost response) still works; an older one does not.
        assert_eq!(log.page(3, 100, 1 << 20).unwrap().0.len(), 6);
        assert!(matches!(log.page(1, 100, 1 << 20), Err(AlreadyDelivered { first_kept: 4 })));
        assert_eq!(log.ack(2), 0, "acks never go back");
        let (rest, end) = log.page(3, 100, 1 << 20).unwrap();
        assert!(end);
        assert_eq!(rest.last().unwrap().seq, 9);
        assert_eq!(log.ack(9), 6);
        assert_eq!((log.kept(), log.total()), (0, 10));
        assert_eq!(log.push(out(10, None, b"x")), 10, "numbering goes on after acks");
    }

    #[test]
    fn generator_items_are_not_final_outputs() {
        let mut log = OutputLog::default();
        log.push(out(0, Some(GenMark::Item), b"a"));
        log.push(out(0, Some(GenMark::Item), b"b"));
        log.push(out(0, Some(GenMark::Done), b""));
        log.ack(2);
        assert_eq!(log.delivered_finals(), 1);
    }

    #[test]
    fn pages_are_cut_by_bytes_but_hold_one_output() {
        let mut log = OutputLog::default();
        log.push(out(0, None, b"0123456789"));
        log.push(out(1, None, b"0123456789"));
        let (page, end) = log.page(-1, 100, 5).unwrap();
        assert_eq!((page.len(), end), (1, false));
    }

    #[test]
    fn finished_set_stays_small_for_in_order_inputs() {
        let mut f = FinishedSet::default();
        for i in 0..100_000 {
            assert!(f.insert(i));
        }
        assert_eq!(f.held(), 0);
        assert!(!f.insert(5), "a second final output of an input is refused");
        assert!(f.insert(100_002));
        assert_eq!(f.held(), 1);
        assert!(f.insert(100_000));
        assert!(f.insert(100_001));
        assert_eq!(f.held(), 0);
        assert!(!f.insert(100_002));
    }

    #[test]
    fn back_pressure_only_for_calls_being_read() {
        assert!(has_room(false, 1_000_000, 1000, 20_000), "spawn_map: nobody reads yet");
        assert!(has_room(true, 19_000, 1000, 20_000));
        assert!(!has_room(true, 19_001, 1000, 20_000));
        assert!(has_room(true, 0, 50_000, 20_000), "an oversized batch alone is taken");
    }

    #[test]
    fn eviction_decisions() {
        let t0 = Instant::now();
        let later = |s: u64| t0 + Duration::from_secs(s);
        let facts = |done, persisted, delivered: Option<u64>, app_stopped| CallFacts {
            done,
            persisted,
            delivered_at: delivered.map(later),
            last_access: t0,
            app_stopped,
        };
        // A running call stays, however old.
        assert!(!call_evictable(&facts(false, false, None, false), later(100_000)));
        // Delivered: a short grace, none once the app stopped.
        assert!(!call_evictable(&facts(true, false, Some(0), false), later(5)));
        assert!(call_evictable(&facts(true, false, Some(0), false), later(15)));
        assert!(call_evictable(&facts(true, false, Some(0), true), later(0)));
        // Done but never read: kept for a reader that comes late.
        assert!(!call_evictable(&facts(true, false, None, false), later(300)));
        assert!(call_evictable(&facts(true, false, None, false), later(600)));
        // Spawned calls: the store has them.
        assert!(call_evictable(&facts(true, true, None, false), later(15)));
        // A stopped app's calls that were not read to the end: a minute.
        assert!(!call_evictable(&facts(false, false, None, true), later(30)));
        assert!(call_evictable(&facts(false, false, None, true), later(60)));
        // Stopped apps.
        let keep = Duration::from_secs(60);
        assert!(!stopped_app_evictable(1, t0, keep, later(1000)));
        assert!(!stopped_app_evictable(0, t0, keep, later(30)));
        assert!(stopped_app_evictable(0, t0, keep, later(60)));
    }
}
