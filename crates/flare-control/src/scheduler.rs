//! Pure placement and scaling decisions, unit-tested without any I/O.
//!
//! Placement is a function from (worker views, request) to a decision: [`place`] picks a
//! worker (and, for GPU requests, the GPU alternative it will get); [`unplaceable_reason`]
//! says in a few words why a request fits nowhere, for `flare container list`
//! (`waiting: <reason>`). [`parse_gpu`] turns Modal's `gpu="H100:2"` syntax into a
//! [`GpuRequest`]. The autoscaler's arithmetic is [`containers_to_start`].

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

pub use flare_proto::GpuRequest;

/// GPU type that matches any type a worker declares.
pub const ANY_GPU: &str = "ANY";
/// Most GPUs of one type one container may ask for (Modal's limit).
pub const MAX_GPU_COUNT: u32 = 8;

/// Resources a container asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    /// GPU alternatives in order of preference (`gpu=["H100", "A100-80GB"]`); empty = no GPU.
    pub gpu: Vec<GpuRequest>,
    /// Image key of the container; workers with it cached are preferred.
    pub image: Option<String>,
}

/// The image keys a worker has cached: a sorted set of 64-bit fingerprints, so that a
/// membership test during placement is a binary search over a few integers (the request's
/// key is hashed once per decision, not once per worker). A fingerprint collision can only
/// make the scheduler prefer a worker wrongly; it never affects fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSet(Vec<u64>);

/// Stable 64-bit fingerprint of an image key (SipHash with fixed keys).
pub fn image_fingerprint(key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl ImageSet {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, key: &str) {
        self.insert_fingerprint(image_fingerprint(key));
    }
    pub fn insert_fingerprint(&mut self, fp: u64) {
        if let Err(i) = self.0.binary_search(&fp) {
            self.0.insert(i, fp);
        }
    }
    pub fn remove(&mut self, key: &str) {
        if let Ok(i) = self.0.binary_search(&image_fingerprint(key)) {
            self.0.remove(i);
        }
    }
    pub fn contains(&self, key: &str) -> bool {
        self.contains_fingerprint(image_fingerprint(key))
    }
    pub fn contains_fingerprint(&self, fp: u64) -> bool {
        self.0.binary_search(&fp).is_ok()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: AsRef<str>> FromIterator<S> for ImageSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut v: Vec<u64> = iter.into_iter().map(|k| image_fingerprint(k.as_ref())).collect();
        v.sort_unstable();
        v.dedup();
        ImageSet(v)
    }
}

/// What the scheduler knows of one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    pub cpu_millis_total: u64,
    pub cpu_millis_used: u64,
    pub memory_mb_total: u64,
    pub memory_mb_used: u64,
    /// GPUs by upper-case type ("H100" -> 8); empty = no GPUs.
    pub gpus_total: BTreeMap<String, u32>,
    /// GPUs in use by type; a missing type = none in use.
    pub gpus_used: BTreeMap<String, u32>,
    /// Image keys cached on this worker.
    pub images: ImageSet,
    /// Containers of the requesting function already on this worker.
    pub same_function: u32,
    pub accepting: bool,
}

/// The scheduler's decision for a request that fits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Index into the worker slice given to [`place`].
    pub worker: usize,
    /// The GPU alternative granted, with a concrete type (an "ANY" request is resolved to
    /// the type the worker has free); `None` for a request without GPUs.
    pub gpu: Option<GpuRequest>,
}

impl WorkerView {
    fn cpu_free(&self) -> u64 {
        self.cpu_millis_total.saturating_sub(self.cpu_millis_used)
    }
    fn mem_free(&self) -> u64 {
        self.memory_mb_total.saturating_sub(self.memory_mb_used)
    }
    fn fits_cpu_mem(&self, r: &Request) -> bool {
        self.accepting && r.cpu_millis <= self.cpu_free() && r.memory_mb <= self.mem_free()
    }
    /// GPUs of `kind` not in use.
    pub fn gpus_free(&self, kind: &str) -> u32 {
        let total = self.gpus_total.get(kind).copied().unwrap_or(0);
        total.saturating_sub(self.gpus_used.get(kind).copied().unwrap_or(0))
    }
    /// The concrete type this worker would grant for `g` now, if it has `g.count` free.
    fn grant(&self, g: &GpuRequest) -> Option<&str> {
        if self.gpus_total.is_empty() {
            return None;
        }
        if g.kind == ANY_GPU {
            self.gpus_total.keys().find(|k| self.gpus_free(k) >= g.count).map(String::as_str)
        } else {
            let (k, _) = self.gpus_total.get_key_value(g.kind.as_str())?;
            (self.gpus_free(k) >= g.count).then_some(k.as_str())
        }
    }
    /// Whether this worker has `g.count` GPUs of the type at all (busy or not).
    fn has_gpu(&self, g: &GpuRequest) -> bool {
        if g.kind == ANY_GPU {
            self.gpus_total.values().any(|&n| n >= g.count)
        } else {
            self.gpus_total.get(g.kind.as_str()).is_some_and(|&n| n >= g.count)
        }
    }

    /// Books a placed container's resources on this view (what the control plane does
    /// after a decision, so the next decision sees them): cpu, memory, the granted GPUs,
    /// and one more container of the function.
    pub fn reserve(&mut self, r: &Request, gpu: Option<&GpuRequest>) {
        self.cpu_millis_used += r.cpu_millis;
        self.memory_mb_used += r.memory_mb;
        if let Some(g) = gpu {
            *self.gpus_used.entry(g.kind.clone()).or_insert(0) += g.count;
        }
        self.same_function += 1;
    }

    /// Gives back what [`WorkerView::reserve`] booked.
    pub fn release(&mut self, r: &Request, gpu: Option<&GpuRequest>) {
        self.cpu_millis_used = self.cpu_millis_used.saturating_sub(r.cpu_millis);
        self.memory_mb_used = self.memory_mb_used.saturating_sub(r.memory_mb);
        if let Some(g) = gpu {
            if let Some(n) = self.gpus_used.get_mut(&g.kind) {
                *n = n.saturating_sub(g.count);
            }
        }
        self.same_function = self.same_function.saturating_sub(1);
    }
}

/// Ranking of a fitting worker; smaller is better. Field order is priority order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    /// Non-GPU requests: 0 on a worker without GPUs, 1 on a GPU worker (keeps GPU
    /// machines' cpu and memory for GPU containers). Always 0 for GPU requests.
    gpu_tier: u8,
    /// 0 when the image is cached (or the request names none), else 1.
    image_missing: u8,
    /// Containers of the same function already there (spread).
    same_function: u32,
    /// Negated free cpu: most free cpu wins.
    cpu_taken: std::cmp::Reverse<u64>,
}

/// Picks where a new container goes, or `None` if it fits nowhere (see
/// [`unplaceable_reason`]).
///
/// A worker fits when it is accepting and has the cpu, memory and (for a GPU request) the
/// GPUs free. GPU alternatives are tried in order and the first one that fits on any
/// worker wins (Modal's fallback semantics): `["H100", "A100-80GB"]` takes an A100 only
/// when no H100 is free anywhere. A GPU container only ever lands on a worker that has
/// the type. Among fitting workers the order is:
/// 1. for a non-GPU request, workers without GPUs before workers with GPUs;
/// 2. image cached before not cached;
/// 3. fewest containers of the same function (spread);
/// 4. most free cpu;
/// 5. lowest index (deterministic).
pub fn place(workers: &[WorkerView], r: &Request) -> Option<Placement> {
    let image_fp = r.image.as_deref().map(image_fingerprint);
    let rank = |w: &WorkerView, gpu_tier: u8| Rank {
        gpu_tier,
        image_missing: match image_fp {
            Some(fp) if !w.images.contains_fingerprint(fp) => 1,
            _ => 0,
        },
        same_function: w.same_function,
        cpu_taken: std::cmp::Reverse(w.cpu_free()),
    };
    if r.gpu.is_empty() {
        let mut best: Option<(Rank, usize)> = None;
        for (i, w) in workers.iter().enumerate() {
            if !w.fits_cpu_mem(r) {
                continue;
            }
            let k = rank(w, u8::from(!w.gpus_total.is_empty()));
            if best.is_none_or(|(b, _)| k < b) {
                best = Some((k, i));
            }
        }
        return best.map(|(_, worker)| Placement { worker, gpu: None });
    }
    for alt in &r.gpu {
        let mut best: Option<(Rank, usize, &str)> = None;
        for (i, w) in workers.iter().enumerate() {
            if !w.fits_cpu_mem(r) {
                continue;
            }
            let Some(kind) = w.grant(alt) else { continue };
            let k = rank(w, 0);
            if best.is_none_or(|(b, _, _)| k < b) {
                best = Some((k, i, kind));
            }
        }
        if let Some((_, worker, kind)) = best {
            return Some(Placement {
                worker,
                gpu: Some(GpuRequest { kind: kind.to_string(), count: alt.count }),
            });
        }
    }
    None
}

/// `H100` for one GPU, `H100:2` for more; `any` style for "ANY".
pub fn format_gpu(g: &GpuRequest) -> String {
    if g.count == 1 {
        g.kind.clone()
    } else {
        format!("{}:{}", g.kind, g.count)
    }
}

fn format_gpus(alts: &[GpuRequest]) -> String {
    alts.iter().map(format_gpu).collect::<Vec<_>>().join(" or ")
}

/// Cores with at least one decimal: 4000 -> "4.0", 250 -> "0.25".
fn format_cpu(millis: u64) -> String {
    let s = format!("{}.{:03}", millis / 1000, millis % 1000);
    let t = s.trim_end_matches('0');
    if t.ends_with('.') {
        format!("{t}0")
    } else {
        t.to_string()
    }
}

/// Why `r` fits on no worker, in a few words for `flare container list`
/// (`waiting: <reason>`). Constraints are checked in order (workers, GPU type, GPUs free,
/// cpu, memory) and the first one no worker satisfies is named, e.g. `no workers`,
/// `no worker with gpu=H100`, `no worker with gpu=H100:2 free (all busy)`,
/// `no worker with 4.0 cpu free`, `no worker with 65536 MiB memory free`.
/// Meant for requests [`place`] rejected; for one that fits it returns "fits".
pub fn unplaceable_reason(workers: &[WorkerView], r: &Request) -> String {
    if workers.is_empty() {
        return "no workers".into();
    }
    let mut cands: Vec<&WorkerView> = workers.iter().filter(|w| w.accepting).collect();
    if cands.is_empty() {
        return "no accepting workers (all draining)".into();
    }
    let mut gpu_label = String::new();
    if !r.gpu.is_empty() {
        let gpus = format_gpus(&r.gpu);
        cands.retain(|w| r.gpu.iter().any(|g| w.has_gpu(g)));
        if cands.is_empty() {
            return format!("no worker with gpu={gpus}");
        }
        cands.retain(|w| r.gpu.iter().any(|g| w.grant(g).is_some()));
        if cands.is_empty() {
            return format!("no worker with gpu={gpus} free (all busy)");
        }
        gpu_label = format!("gpu={gpus} free and ");
    }
    let cpu = format_cpu(r.cpu_millis);
    let mem = r.memory_mb;
    let cpu_ok = |w: &&WorkerView| r.cpu_millis <= w.cpu_free();
    let mem_ok = |w: &&WorkerView| r.memory_mb <= w.mem_free();
    let any_cpu_total = cands.iter().any(|w| r.cpu_millis <= w.cpu_millis_total);
    let any_mem_total = cands.iter().any(|w| r.memory_mb <= w.memory_mb_total);
    if !any_cpu_total {
        return format!("no worker with {gpu_label}{cpu} cpu");
    }
    if !any_mem_total {
        return format!("no worker with {gpu_label}{mem} MiB memory");
    }
    match (cands.iter().any(cpu_ok), cands.iter().any(mem_ok), cands.iter().any(|w| cpu_ok(w) && mem_ok(w))) {
        (false, _, _) => format!("no worker with {gpu_label}{cpu} cpu free"),
        (_, false, _) => format!("no worker with {gpu_label}{mem} MiB memory free"),
        (_, _, false) => format!("no worker with {gpu_label}{cpu} cpu and {mem} MiB memory free"),
        _ => "fits".into(),
    }
}

/// Parses one GPU spec in Modal's syntax: `TYPE` or `TYPE:COUNT`, case-insensitive
/// (`"H100"`, `"h100:2"`, `"A100-80GB:8"`, `"any"`). The type is upper-cased; `ANY`
/// matches any type. COUNT is 1 to 8 (default 1).
pub fn parse_gpu(spec: &str) -> Result<GpuRequest, String> {
    let s = spec.trim();
    if s.is_empty() {
        return Err("empty GPU spec: expected a type like \"H100\" or \"A100-80GB:2\"".into());
    }
    let (kind, count) = match s.split_once(':') {
        None => (s, 1),
        Some((kind, n)) => {
            let count: u32 = n.trim().parse().map_err(|_| {
                format!("invalid GPU count {n:?} in {spec:?}: expected an integer from 1 to {MAX_GPU_COUNT}")
            })?;
            (kind.trim(), count)
        }
    };
    if kind.is_empty() {
        return Err(format!("missing GPU type in {spec:?}: expected e.g. \"H100:2\""));
    }
    if let Some(c) = kind.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!(
            "invalid character {c:?} in GPU type {kind:?}: use letters, digits, '-', '_' or '.' (e.g. \"A100-80GB\")"
        ));
    }
    if !(1..=MAX_GPU_COUNT).contains(&count) {
        return Err(format!("GPU count in {spec:?} must be from 1 to {MAX_GPU_COUNT}, got {count}"));
    }
    Ok(GpuRequest { kind: kind.to_ascii_uppercase(), count })
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
    want.min(room.max(s.min_containers.saturating_sub(s.live)))
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
            ..Default::default()
        }
    }

    fn gw(id: &str, gpus: &[(&str, u32)]) -> WorkerView {
        let mut v = w(id, 0, 0);
        v.gpus_total = gpus.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        v
    }

    fn g(kind: &str, count: u32) -> GpuRequest {
        GpuRequest { kind: kind.into(), count }
    }

    fn cpu(cpu_millis: u64, memory_mb: u64) -> Request {
        Request { cpu_millis, memory_mb, ..Default::default() }
    }

    fn gpu(alts: &[(&str, u32)]) -> Request {
        Request { gpu: alts.iter().map(|(k, n)| g(k, *n)).collect(), ..cpu(500, 128) }
    }

    fn at(worker: usize) -> Option<Placement> {
        Some(Placement { worker, gpu: None })
    }

    fn at_gpu(worker: usize, kind: &str, count: u32) -> Option<Placement> {
        Some(Placement { worker, gpu: Some(g(kind, count)) })
    }

    #[test]
    fn places_by_fit_then_spread() {
        let r = cpu(500, 128);
        assert_eq!(place(&[w("a", 1800, 0), w("b", 0, 0)], &r), at(1));
        assert_eq!(place(&[w("a", 0, 2), w("b", 1000, 0)], &r), at(1));
        assert_eq!(place(&[w("a", 1600, 0)], &r), None);
        let mut off = w("a", 0, 0);
        off.accepting = false;
        assert_eq!(place(&[off], &r), None);
        // Memory is a constraint too; ties go to the lowest index.
        let mut full = w("a", 0, 0);
        full.memory_mb_used = 4000;
        assert_eq!(place(&[full, w("b", 0, 0)], &r), at(1));
        assert_eq!(place(&[w("a", 0, 0), w("b", 0, 0)], &r), at(0));
        assert_eq!(place(&[], &r), None);
    }

    #[test]
    fn spread_then_most_free_cpu() {
        let r = cpu(100, 1);
        let mut ws = vec![w("a", 0, 0), w("b", 500, 0), w("c", 0, 0)];
        let mut order = vec![];
        for _ in 0..6 {
            let p = place(&ws, &r).unwrap();
            ws[p.worker].reserve(&r, None);
            order.push(p.worker);
        }
        // One each first (most free cpu first), then round again.
        assert_eq!(order, vec![0, 2, 1, 0, 2, 1]);
        assert_eq!(ws[0].cpu_millis_used, 200);
        assert_eq!(ws[0].same_function, 2);
        ws[0].release(&r, None);
        assert_eq!((ws[0].cpu_millis_used, ws[0].same_function), (100, 1));
    }

    #[test]
    fn gpu_fit_by_type_and_count() {
        let ws = [w("cpu", 0, 0), gw("a100", &[("A100-80GB", 1)]), gw("h100", &[("H100", 8)])];
        assert_eq!(place(&ws, &gpu(&[("H100", 1)])), at_gpu(2, "H100", 1));
        assert_eq!(place(&ws, &gpu(&[("H100", 8)])), at_gpu(2, "H100", 8));
        assert_eq!(place(&ws, &gpu(&[("A100-80GB", 1)])), at_gpu(1, "A100-80GB", 1));
        // More than any worker has, or a type nobody has: nowhere, never on a cpu worker.
        assert_eq!(place(&ws, &gpu(&[("A100-80GB", 2)])), None);
        assert_eq!(place(&ws, &gpu(&[("L4", 1)])), None);
        // Busy GPUs do not fit.
        let mut busy = ws.clone();
        busy[2].gpus_used.insert("H100".into(), 7);
        assert_eq!(place(&busy, &gpu(&[("H100", 1)])), at_gpu(2, "H100", 1));
        assert_eq!(place(&busy, &gpu(&[("H100", 2)])), None);
        // A GPU worker without the cpu for it does not fit either.
        busy[2].cpu_millis_used = 1800;
        assert_eq!(place(&busy, &gpu(&[("H100", 1)])), None);
    }

    #[test]
    fn gpu_reserve_books_gpus() {
        let mut ws = [gw("h", &[("H100", 2)])];
        let r = gpu(&[("H100", 1)]);
        for _ in 0..2 {
            let p = place(&ws, &r).unwrap();
            ws[p.worker].reserve(&r, p.gpu.as_ref());
        }
        assert_eq!(ws[0].gpus_used.get("H100"), Some(&2));
        assert_eq!(place(&ws, &r), None);
        ws[0].release(&r, Some(&g("H100", 1)));
        assert_eq!(place(&ws, &r), at_gpu(0, "H100", 1));
    }

    #[test]
    fn gpu_fallback_list_in_order() {
        let mut ws = [gw("a", &[("A100-80GB", 4)]), gw("h", &[("H100", 1)])];
        let r = gpu(&[("H100", 1), ("A100-80GB", 1)]);
        // The first alternative wins whenever it fits anywhere, even if listed later.
        assert_eq!(place(&ws, &r), at_gpu(1, "H100", 1));
        ws[1].gpus_used.insert("H100".into(), 1);
        assert_eq!(place(&ws, &r), at_gpu(0, "A100-80GB", 1));
        ws[0].gpus_used.insert("A100-80GB".into(), 4);
        assert_eq!(place(&ws, &r), None);
        // The first fitting alternative wins over a better-ranked worker for a later one.
        let mut ws = [gw("a", &[("A100-80GB", 4)]), gw("h", &[("H100", 1)])];
        ws[0].images.insert("img");
        let r = Request { image: Some("img".into()), ..r };
        assert_eq!(place(&ws, &r), at_gpu(1, "H100", 1));
    }

    #[test]
    fn gpu_any_resolves_to_a_concrete_type() {
        let mut ws = [w("cpu", 0, 0), gw("x", &[("A10G", 1), ("L4", 4)])];
        assert_eq!(place(&ws, &gpu(&[("ANY", 1)])), at_gpu(1, "A10G", 1));
        assert_eq!(place(&ws, &gpu(&[("ANY", 2)])), at_gpu(1, "L4", 2));
        ws[1].gpus_used.insert("A10G".into(), 1);
        assert_eq!(place(&ws, &gpu(&[("ANY", 1)])), at_gpu(1, "L4", 1));
        assert_eq!(place(&ws, &gpu(&[("ANY", 8)])), None);
    }

    #[test]
    fn cpu_requests_prefer_workers_without_gpus() {
        let r = cpu(500, 128);
        let mut ws = [gw("g", &[("H100", 8)]), w("c", 1000, 3)];
        // The GPU worker has more free cpu and fewer containers, the cpu worker still wins.
        assert_eq!(place(&ws, &r), at(1));
        ws[1].cpu_millis_used = 2000;
        assert_eq!(place(&ws, &r), at(0));
    }

    #[test]
    fn image_cached_preferred_before_spread() {
        let mut ws = [w("a", 0, 0), w("b", 1000, 2), w("c", 0, 0)];
        ws[1].images = ["img-1", "img-2"].into_iter().collect();
        let r = Request { image: Some("img-2".into()), ..cpu(500, 128) };
        assert_eq!(place(&ws, &r), at(1));
        // Not cached anywhere: the image is no criterion.
        let other = Request { image: Some("img-9".into()), ..r.clone() };
        assert_eq!(place(&ws, &other), at(0));
        // Cached but full: the next best worker.
        ws[1].cpu_millis_used = 1800;
        assert_eq!(place(&ws, &r), at(0));
        // Two with it cached: spread among them.
        ws[2].images.insert("img-2");
        ws[1].cpu_millis_used = 0;
        assert_eq!(place(&ws, &r), at(2));
    }

    #[test]
    fn image_set_basics() {
        let mut s: ImageSet = ["b", "a", "b"].into_iter().collect();
        assert_eq!(s.len(), 2);
        assert!(s.contains("a") && s.contains("b") && !s.contains("c"));
        s.insert("c");
        s.insert("c");
        s.remove("a");
        assert_eq!(s.len(), 2);
        assert!(!s.contains("a") && s.contains("c"));
        assert!(ImageSet::new().is_empty());
    }

    #[test]
    fn reasons() {
        let r = cpu(500, 128);
        assert_eq!(unplaceable_reason(&[], &r), "no workers");
        let mut off = w("a", 0, 0);
        off.accepting = false;
        assert_eq!(unplaceable_reason(&[off.clone()], &r), "no accepting workers (all draining)");
        let ws = [w("cpu", 0, 0), gw("h", &[("H100", 1)])];
        assert_eq!(unplaceable_reason(&ws, &gpu(&[("A100", 1)])), "no worker with gpu=A100");
        assert_eq!(unplaceable_reason(&ws, &gpu(&[("H100", 2)])), "no worker with gpu=H100:2");
        assert_eq!(
            unplaceable_reason(&ws, &gpu(&[("H200", 1), ("A100-80GB", 2)])),
            "no worker with gpu=H200 or A100-80GB:2"
        );
        let mut busy = ws.clone();
        busy[1].gpus_used.insert("H100".into(), 1);
        assert_eq!(
            unplaceable_reason(&busy, &gpu(&[("H100", 1)])),
            "no worker with gpu=H100 free (all busy)"
        );
        // A draining worker's GPUs do not count.
        let mut drained = ws.clone();
        drained[1].accepting = false;
        assert_eq!(unplaceable_reason(&drained, &gpu(&[("H100", 1)])), "no worker with gpu=H100");
        let mut hot = ws.clone();
        hot[1].cpu_millis_used = 1800;
        assert_eq!(
            unplaceable_reason(&hot, &gpu(&[("H100", 1)])),
            "no worker with gpu=H100 free and 0.5 cpu free"
        );
        assert_eq!(unplaceable_reason(&ws, &cpu(4000, 1)), "no worker with 4.0 cpu");
        assert_eq!(unplaceable_reason(&ws, &cpu(1000, 65536)), "no worker with 65536 MiB memory");
        let full = [w("a", 1000, 0), w("b", 1800, 0)];
        assert_eq!(unplaceable_reason(&full, &cpu(1250, 1)), "no worker with 1.25 cpu free");
        let mut m = [w("a", 0, 0), w("b", 1800, 0)];
        m[0].memory_mb_used = 4000;
        m[1].memory_mb_used = 4000;
        assert_eq!(unplaceable_reason(&m, &cpu(100, 1024)), "no worker with 1024 MiB memory free");
        m[1].memory_mb_used = 0;
        assert_eq!(
            unplaceable_reason(&m, &cpu(1000, 1024)),
            "no worker with 1.0 cpu and 1024 MiB memory free"
        );
        assert_eq!(unplaceable_reason(&ws, &r), "fits");
        // Every request place() rejects gets a real reason.
        for req in [gpu(&[("H100", 2)]), cpu(4000, 1), cpu(100, 5000)] {
            assert_eq!(place(&ws, &req), None);
            assert_ne!(unplaceable_reason(&ws, &req), "fits");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_cpu(4000), "4.0");
        assert_eq!(format_cpu(250), "0.25");
        assert_eq!(format_cpu(125), "0.125");
        assert_eq!(format_cpu(0), "0.0");
        assert_eq!(format_gpu(&g("H100", 1)), "H100");
        assert_eq!(format_gpu(&g("H100", 4)), "H100:4");
    }

    #[test]
    fn parses_gpu_specs() {
        assert_eq!(parse_gpu("H100"), Ok(g("H100", 1)));
        assert_eq!(parse_gpu("h100:2"), Ok(g("H100", 2)));
        assert_eq!(parse_gpu("A100-80GB:8"), Ok(g("A100-80GB", 8)));
        assert_eq!(parse_gpu("any"), Ok(g("ANY", 1)));
        assert_eq!(parse_gpu(" l4 : 3 "), Ok(g("L4", 3)));
        for (bad, needle) in [
            ("", "empty GPU spec"),
            ("  ", "empty GPU spec"),
            ("H100:0", "from 1 to 8, got 0"),
            ("H100:9", "from 1 to 8, got 9"),
            ("H100:two", "invalid GPU count \"two\""),
            ("H100:-1", "invalid GPU count"),
            ("H100:", "invalid GPU count"),
            (":2", "missing GPU type"),
            ("H100 x2", "invalid character ' '"),
            ("H100:2:3", "invalid GPU count \"2:3\""),
        ] {
            let err = parse_gpu(bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
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
