//! Placement throughput of the scheduler core (issue 4's bench target: >= 100,000
//! decisions/s with 1,000 workers and 10,000 pending containers).
//!
//! `cargo run --release -p flare-control --example placement_bench [-- --rounds N]`
//!
//! Builds 1,000 workers (most cpu-only, some declaring H100, A100-80GB or L4 GPUs, each
//! with a few cached images) and 10,000 pending containers of 200 functions (mixed cpu,
//! memory, GPU including fallback lists and "any", a few images, some that fit nowhere),
//! then places them the way the control plane does: function by function, computing each
//! worker's `same_function` count, calling `place` for every container and booking the
//! decision on the chosen view with `reserve`. The first container of a function that
//! fits nowhere also gets its `unplaceable_reason` (once per function, as the control
//! plane shows it). Every round starts from fresh views; the table reports each round and
//! the median. Writes `bench/results/placement.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use flare_control::scheduler::{place, unplaceable_reason, GpuRequest, ImageSet, Request, WorkerView};

const WORKERS: usize = 1_000;
const CONTAINERS: usize = 10_000;
const FUNCTIONS: usize = 200;
const IMAGES: usize = 12;

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

fn image(i: u64) -> String {
    format!("sha256:{:064x}", i.wrapping_mul(0x2545_F491_4F6C_DD1D))
}

fn workers(rng: &mut Rng) -> Vec<WorkerView> {
    (0..WORKERS)
        .map(|i| {
            // 15% GPU machines: 8x H100, 8x A100-80GB, or 4x L4 (some with L4 and A100 mixed).
            let gpus: BTreeMap<String, u32> = match rng.below(100) {
                0..=4 => [("H100".to_string(), 8)].into(),
                5..=9 => [("A100-80GB".to_string(), 8)].into(),
                10..=12 => [("L4".to_string(), 4)].into(),
                13..=14 => [("L4".to_string(), 2), ("A100-80GB".to_string(), 2)].into(),
                _ => BTreeMap::new(),
            };
            let (cores, mem_gib) = if gpus.is_empty() {
                (*rng.pick(&[8u64, 16, 32, 64]), *rng.pick(&[32u64, 64, 128, 256]))
            } else {
                (*rng.pick(&[64u64, 96, 128]), *rng.pick(&[512u64, 1024]))
            };
            let images: ImageSet = (0..rng.below(4)).map(|_| image(rng.below(IMAGES as u64))).collect();
            WorkerView {
                id: format!("wk-{i:04}"),
                cpu_millis_total: cores * 1000,
                cpu_millis_used: rng.below(cores * 250), // up to a quarter already in use
                memory_mb_total: mem_gib * 1024,
                memory_mb_used: 0,
                gpus_total: gpus,
                gpus_used: BTreeMap::new(),
                images,
                same_function: 0,
                accepting: rng.below(100) != 0, // ~1% draining
            }
        })
        .collect()
}

fn gpu(kind: &str, count: u32) -> GpuRequest {
    GpuRequest { kind: kind.into(), count }
}

/// One request per function, plus how many containers of it are pending.
fn functions(rng: &mut Rng) -> Vec<(Request, usize)> {
    let mut fns: Vec<(Request, usize)> = (0..FUNCTIONS)
        .map(|_| {
            let gpu = match rng.below(100) {
                0..=3 => vec![gpu("H100", 1)],
                4..=5 => vec![gpu("H100", *rng.pick(&[2u32, 4, 8]))],
                6..=7 => vec![gpu("H100", 1), gpu("A100-80GB", 1)],
                8..=9 => vec![gpu("L4", 1)],
                10 => vec![gpu("ANY", 1)],
                11 => vec![gpu("B200", 1)], // no worker has one: always unplaceable
                _ => vec![],
            };
            let req = Request {
                cpu_millis: *rng.pick(&[125u64, 250, 500, 1000, 2000, 4000]),
                memory_mb: *rng.pick(&[128u64, 256, 512, 1024, 4096, 16384]),
                gpu,
                image: Some(image(rng.below(IMAGES as u64))),
            };
            (req, 0)
        })
        .collect();
    // 10,000 pending containers spread unevenly over the functions (hot functions exist).
    for _ in 0..CONTAINERS {
        let f = if rng.below(4) == 0 { rng.below(10) } else { rng.below(FUNCTIONS as u64) } as usize;
        fns[f].1 += 1;
    }
    fns
}

struct Round {
    seconds: f64,
    placed: usize,
    unplaceable: usize,
    gpu_placed: usize,
    reasons: BTreeMap<String, usize>,
}

fn round(ws: &mut [WorkerView], fns: &[(Request, usize)]) -> Round {
    let mut placed = 0;
    let mut unplaceable = 0;
    let mut gpu_placed = 0;
    let mut reasons = BTreeMap::new();
    let t = Instant::now();
    for (req, pending) in fns {
        // The control plane computes each worker's count of this function's containers.
        for w in ws.iter_mut() {
            w.same_function = 0;
        }
        let mut reason_given = false;
        for _ in 0..*pending {
            match place(ws, req) {
                Some(p) => {
                    ws[p.worker].reserve(req, p.gpu.as_ref());
                    placed += 1;
                    gpu_placed += usize::from(p.gpu.is_some());
                }
                None => {
                    unplaceable += 1;
                    if !reason_given {
                        reason_given = true;
                        *reasons.entry(unplaceable_reason(ws, req)).or_insert(0) += 1;
                    }
                }
            }
        }
    }
    Round { seconds: t.elapsed().as_secs_f64(), placed, unplaceable, gpu_placed, reasons }
}

fn main() {
    let mut rounds_n = 5usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        rounds_n = args.get(i + 1).and_then(|s| s.parse().ok()).expect("--rounds N");
    }
    let mut rng = Rng(0x5EED_F1A2E);
    let base = workers(&mut rng);
    let fns = functions(&mut rng);
    let decisions: usize = fns.iter().map(|f| f.1).sum();
    let gpu_workers = base.iter().filter(|w| !w.gpus_total.is_empty()).count();
    let gpu_requests: usize = fns.iter().filter(|f| !f.0.gpu.is_empty()).map(|f| f.1).sum();
    println!(
        "placement bench: {} workers ({gpu_workers} with GPUs), {decisions} pending containers \
         ({gpu_requests} asking for GPUs) of {} functions, {rounds_n} rounds",
        base.len(),
        fns.len()
    );
    println!(
        "{:>6} {:>10} {:>10} {:>13} {:>8} {:>8} {:>12}",
        "round", "decisions", "seconds", "decisions/s", "placed", "gpu", "unplaceable"
    );
    let mut results = Vec::new();
    for i in 0..rounds_n {
        let mut ws = base.clone();
        let r = round(&mut ws, &fns);
        println!(
            "{:>6} {:>10} {:>10.4} {:>13.0} {:>8} {:>8} {:>12}",
            i + 1,
            decisions,
            r.seconds,
            decisions as f64 / r.seconds,
            r.placed,
            r.gpu_placed,
            r.unplaceable
        );
        results.push(r);
    }
    let mut secs: Vec<f64> = results.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let best = secs[0];
    let last = results.last().expect("at least one round");
    println!(
        "median {:.4} s = {:.0} decisions/s (best {:.0}/s); target >= 100000/s",
        median,
        decisions as f64 / median,
        decisions as f64 / best
    );
    println!("waiting reasons (first unplaceable container of each function):");
    for (reason, n) in &last.reasons {
        println!("  {n:>4} x {reason}");
    }

    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let reasons_json: Vec<String> = last
        .reasons
        .iter()
        .map(|(k, v)| format!("    {{\"reason\": \"{}\", \"functions\": {v}}}", esc(k)))
        .collect();
    let rounds_json: Vec<String> = results.iter().map(|r| format!("{:.6}", r.seconds)).collect();
    let json = format!(
        "{{\n  \"benchmark\": \"placement\",\n  \"workers\": {},\n  \"gpu_workers\": {gpu_workers},\n  \
         \"functions\": {},\n  \"decisions\": {decisions},\n  \"gpu_requests\": {gpu_requests},\n  \
         \"rounds\": {rounds_n},\n  \"round_seconds\": [{}],\n  \"median_seconds\": {median:.6},\n  \
         \"decisions_per_s_median\": {:.0},\n  \"decisions_per_s_best\": {:.0},\n  \"placed\": {},\n  \
         \"gpu_placed\": {},\n  \"unplaceable\": {},\n  \"cpus\": {},\n  \"reasons\": [\n{}\n  ]\n}}\n",
        base.len(),
        fns.len(),
        rounds_json.join(", "),
        decisions as f64 / median,
        decisions as f64 / best,
        last.placed,
        last.gpu_placed,
        last.unplaceable,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        reasons_json.join(",\n"),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/placement.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).expect("create bench/results");
    }
    std::fs::write(&out, json).expect("write placement.json");
    println!("wrote {}", out.canonicalize().unwrap_or(out).display());
}
