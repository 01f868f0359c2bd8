//! Pure placement and scaling decisions, unit-tested without any I/O.

/// Resources a container asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

/// What the scheduler knows of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    pub cpu_millis_total: u64,
    pub cpu_millis_used: u64,
    pub memory_mb_total: u64,
    pub memory_mb_used: u64,
    /// Containers of the requesting function already on this worker.
    pub same_function: u32,
    pub accepting: bool,
}

impl WorkerView {
    fn fits(&self, r: Request) -> bool {
        self.accepting
            && self.cpu_millis_used + r.cpu_millis <= self.cpu_millis_total
            && self.memory_mb_used + r.memory_mb <= self.memory_mb_total
    }
}

/// Picks the worker for a new container: among those that fit, the one with the fewest
/// containers of the same function (spread), then the most free cpu. `None` = fits nowhere.
pub fn place(workers: &[WorkerView], r: Request) -> Option<usize> {
    workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.fits(r))
        .min_by_key(|(_, w)| (w.same_function, u64::MAX - (w.cpu_millis_total - w.cpu_millis_used)))
        .map(|(i, _)| i)
}

/// Inputs to the autoscaler for one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleInput {
    pub backlog: u64,
    pub in_flight: u64,
    /// Containers alive or starting (not stopping).
    pub live: u32,
    pub starting: u32,
    pub target_inputs: u32,
    pub min_containers: u32,
    pub max_containers: Option<u32>,
    pub buffer_containers: u32,
}

/// How many containers to start now.
pub fn containers_to_start(s: ScaleInput, max_starting: u32) -> u32 {
    let demand = s.backlog + s.in_flight;
    let target = u64::from(s.target_inputs.max(1));
    let mut desired = demand.div_ceil(target) as u32;
    if demand > 0 {
        desired += s.buffer_containers;
    }
    desired = desired.max(s.min_containers);
    if let Some(max) = s.max_containers {
        desired = desired.min(max);
    }
    // Only start for queued work (or the floor); cap containers starting at once.
    let want = desired.saturating_sub(s.live);
    let room = max_starting.saturating_sub(s.starting);
    if s.backlog == 0 && s.live >= s.min_containers {
        return 0;
    }
    want.min(room.max(if s.live < s.min_containers { s.min_containers - s.live } else { 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, cpu_used: u64, same: u32) -> WorkerView {
        WorkerView {
            id: id.into(),
            cpu_millis_total: 2000,
            cpu_millis_used: cpu_used,
            memory_mb_total: 4096,
            memory_mb_used: 0,
            same_function: same,
            accepting: true,
        }
    }

    #[test]
    fn places_by_fit_then_spread() {
        let r = Request { cpu_millis: 500, memory_mb: 128 };
        assert_eq!(place(&[w("a", 1800, 0), w("b", 0, 0)], r), Some(1));
        assert_eq!(place(&[w("a", 0, 2), w("b", 1000, 0)], r), Some(1));
        assert_eq!(place(&[w("a", 1600, 0)], r), None);
        let mut off = w("a", 0, 0);
        off.accepting = false;
        assert_eq!(place(&[off], r), None);
    }

    fn s(backlog: u64, in_flight: u64, live: u32, starting: u32) -> ScaleInput {
        ScaleInput {
            backlog,
            in_flight,
            live,
            starting,
            target_inputs: 1,
            min_containers: 0,
            max_containers: None,
            buffer_containers: 0,
        }
    }

    #[test]
    fn scales_from_zero_and_caps() {
        assert_eq!(containers_to_start(s(0, 0, 0, 0), 4), 0);
        assert_eq!(containers_to_start(s(1, 0, 0, 0), 4), 1);
        assert_eq!(containers_to_start(s(100, 0, 0, 0), 4), 4);
        assert_eq!(containers_to_start(s(100, 0, 3, 3), 4), 1);
        let mut x = s(100, 0, 0, 0);
        x.max_containers = Some(2);
        assert_eq!(containers_to_start(x, 4), 2);
    }

    #[test]
    fn keeps_min_and_buffer() {
        let mut x = s(0, 0, 0, 0);
        x.min_containers = 2;
        assert_eq!(containers_to_start(x, 1), 2);
        let mut x = s(1, 1, 2, 0);
        x.buffer_containers = 1;
        assert_eq!(containers_to_start(x, 4), 1);
        let mut x = s(4, 0, 1, 0);
        x.target_inputs = 4;
        assert_eq!(containers_to_start(x, 4), 0);
    }
}
