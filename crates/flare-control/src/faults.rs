//! Fault policy: pure decisions from exit events and lost workers. `events.rs` and
//! `workers.rs` apply them to the state.
//!
//! - A container that dies before it is ready (not an import error, which fails the queue
//!   at once, see `events.rs`) may have hit a passing platform fault: the function tries a
//!   new container up to [`START_FAILURE_LIMIT`] times in a row, then its queue fails.
//!   An OOM kill while starting fails the queue at once.
//! - An input whose container exited: its own timeout is a `timeout` output; killed along
//!   with a sibling that timed out, or by a stop that raced it (scale-down), it runs again
//!   without using the user's retries (up to [`PLATFORM_RETRIES`]); an OOM kill or any other
//!   death is a `terminated` output. Every failure may still be retried per `retries=`.
//! - An input whose worker was lost runs again (up to [`PLATFORM_RETRIES`]), then fails
//!   with `internal_failure`.

use std::time::Duration;

use flare_proto::{ExceptionInfo, ExitReport, OutputStatus, RetryPolicy};

/// Containers of a function that may fail to start in a row before its queue fails.
pub(crate) const START_FAILURE_LIMIT: u32 = 3;
/// Inputs a platform fault may re-run before the input fails, beyond the user's retries.
pub(crate) const PLATFORM_RETRIES: u32 = 3;

/// What a container's exit means for its function's queue.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StartFault {
    /// Not a failure to start (it was ready, or it was stopped on purpose).
    None,
    /// A failure to start: the `n`th in a row; a new container is tried.
    TryAgain(u32),
    /// Too many in a row (or an OOM kill while starting): the queue fails with this.
    FailQueue(ExceptionInfo),
}

/// Decides [`StartFault`] for an exit; `failures` is the function's count of containers that
/// failed to start in a row before this one. Answers the new count too.
pub(crate) fn start_fault(was_starting: bool, report: &ExitReport, failures: u32) -> (u32, StartFault) {
    if !was_starting || report.requested {
        return (failures, StartFault::None);
    }
    let n = failures + 1;
    if n < START_FAILURE_LIMIT && !report.oom_killed {
        return (n, StartFault::TryAgain(n));
    }
    let msg = report.start_error.clone().unwrap_or_else(|| {
        if report.oom_killed {
            format!("container ran out of memory (OOM) while starting: limit {}", limit_text(report))
        } else {
            format!("container exited before it was ready ({})", report.status_text())
        }
    });
    (0, StartFault::FailQueue(ExceptionInfo::new("flare.exception.ExecutionError", msg)))
}

/// What happens to an input that was running in a container or on a worker that is gone.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum InputFate {
    /// Back to the front of its queue as a platform re-run (the user's retries untouched).
    Rerun,
    /// Fails with this output, unless the user's retry policy runs it again.
    Fail(OutputStatus, ExceptionInfo),
}

/// The fate of input `input_id` (with `platform_retries` used) of a container that exited;
/// `timeout_s` is its function's `timeout=`.
pub(crate) fn exited_input_fate(
    input_id: &str,
    platform_retries: u32,
    report: &ExitReport,
    timeout_s: u64,
) -> InputFate {
    if report.timed_out_input.as_deref() == Some(input_id) {
        let t = timeout_s;
        return InputFate::Fail(
            OutputStatus::Timeout,
            ExceptionInfo::new(
                "flare.exception.FunctionTimeoutError",
                format!("function timed out after {t} s (timeout={t}); its container was stopped"),
            ),
        );
    }
    if report.timed_out_input.is_some() || (report.requested && !report.oom_killed) {
        // Killed along with another input, or by a scale-down race: run again.
        if platform_retries < PLATFORM_RETRIES {
            return InputFate::Rerun;
        }
        return InputFate::Fail(
            OutputStatus::Terminated,
            ExceptionInfo::new("flare.exception.ExecutionError", "the container was stopped"),
        );
    }
    if report.oom_killed {
        return InputFate::Fail(
            OutputStatus::Terminated,
            ExceptionInfo::new(
                "flare.exception.OutOfMemoryError",
                format!(
                    "container was OOM-killed: out of memory (memory limit {}); raise memory= on the function",
                    limit_text(report)
                ),
            ),
        );
    }
    InputFate::Fail(
        OutputStatus::Terminated,
        ExceptionInfo::new(
            "flare.exception.ExecutionError",
            format!("the container running this input died ({})", report.status_text()),
        ),
    )
}

/// The fate of an input (with `platform_retries` used) whose worker was lost.
pub(crate) fn lost_input_fate(platform_retries: u32, worker_id: &str, why: &str) -> InputFate {
    if platform_retries < PLATFORM_RETRIES {
        return InputFate::Rerun;
    }
    InputFate::Fail(
        OutputStatus::InternalFailure,
        ExceptionInfo::new(
            "flare.exception.ExecutionError",
            format!("the input was lost with its worker {PLATFORM_RETRIES} times (last: worker {worker_id}: {why})"),
        ),
    )
}

/// When a failed input runs again under the user's retry policy (`retry_count`: retries
/// used so far), or `None` if it does not. A stopped function retries nothing.
pub(crate) fn retry_delay(policy: Option<&RetryPolicy>, retry_count: u32, active: bool) -> Option<Duration> {
    let policy = policy?;
    if retry_count >= policy.max_retries || !active {
        return None;
    }
    Some(Duration::from_secs_f64(policy.delay(retry_count + 1)))
}

/// The memory limit of an OOM message.
fn limit_text(report: &ExitReport) -> String {
    report
        .memory_limit
        .map(|b| format!("{} MiB", b / (1024 * 1024)))
        .unwrap_or_else(|| "the machine's memory".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn died(code: i32) -> ExitReport {
        ExitReport { code: Some(code), ..Default::default() }
    }

    #[test]
    fn start_failures_retry_then_fail_the_queue() {
        let r = ExitReport { start_error: Some("no python".into()), ..died(1) };
        assert_eq!(start_fault(true, &r, 0), (1, StartFault::TryAgain(1)));
        assert_eq!(start_fault(true, &r, 1), (2, StartFault::TryAgain(2)));
        let (n, f) = start_fault(true, &r, 2);
        assert_eq!(n, 0, "the count starts over once the queue failed");
        let StartFault::FailQueue(e) = f else { panic!("{f:?}") };
        assert_eq!(e.message, "no python");
        // Without a start error the exit status is the message.
        let StartFault::FailQueue(e) = start_fault(true, &died(3), 2).1 else { panic!() };
        assert!(e.message.contains("exit code 3"), "{}", e.message);
    }

    #[test]
    fn oom_while_starting_fails_at_once_and_stops_are_not_failures() {
        let oom = ExitReport { oom_killed: true, memory_limit: Some(256 << 20), ..Default::default() };
        let StartFault::FailQueue(e) = start_fault(true, &oom, 0).1 else { panic!() };
        assert!(e.message.contains("OOM") && e.message.contains("256 MiB"), "{}", e.message);
        let stopped = ExitReport { requested: true, ..Default::default() };
        assert_eq!(start_fault(true, &stopped, 1), (1, StartFault::None));
        assert_eq!(start_fault(false, &died(1), 1), (1, StartFault::None));
    }

    #[test]
    fn inputs_of_exited_containers() {
        let timed = ExitReport { timed_out_input: Some("in-1".into()), ..Default::default() };
        let InputFate::Fail(s, e) = exited_input_fate("in-1", 0, &timed, 30) else { panic!() };
        assert_eq!(s, OutputStatus::Timeout);
        assert!(e.message.contains("after 30 s"));
        // Its siblings run again, up to the platform limit.
        assert_eq!(exited_input_fate("in-2", 0, &timed, 30), InputFate::Rerun);
        let InputFate::Fail(s, _) = exited_input_fate("in-2", PLATFORM_RETRIES, &timed, 30) else { panic!() };
        assert_eq!(s, OutputStatus::Terminated);
        // A stop racing the input: run again.
        let stopped = ExitReport { requested: true, ..Default::default() };
        assert_eq!(exited_input_fate("in-1", 1, &stopped, 30), InputFate::Rerun);
        // OOM names the limit; other deaths the status.
        let oom = ExitReport { oom_killed: true, requested: true, ..Default::default() };
        let InputFate::Fail(_, e) = exited_input_fate("in-1", 0, &oom, 30) else { panic!() };
        assert_eq!(e.type_name, "flare.exception.OutOfMemoryError");
        assert!(e.message.contains("the machine's memory"));
        let sig = ExitReport { signal: Some(9), ..Default::default() };
        let InputFate::Fail(s, e) = exited_input_fate("in-1", 0, &sig, 30) else { panic!() };
        assert_eq!(s, OutputStatus::Terminated);
        assert!(e.message.contains("killed by signal 9"));
    }

    #[test]
    fn inputs_of_lost_workers() {
        assert_eq!(lost_input_fate(0, "w1", "gone"), InputFate::Rerun);
        let InputFate::Fail(s, e) = lost_input_fate(PLATFORM_RETRIES, "w1", "gone") else { panic!() };
        assert_eq!(s, OutputStatus::InternalFailure);
        assert!(e.message.contains("worker w1: gone"));
    }

    #[test]
    fn user_retries() {
        let p = RetryPolicy { max_retries: 2, backoff_coefficient: 2.0, initial_delay: 1.0, max_delay: 10.0 };
        assert_eq!(retry_delay(None, 0, true), None);
        assert_eq!(retry_delay(Some(&p), 0, true), Some(Duration::from_secs_f64(p.delay(1))));
        assert!(retry_delay(Some(&p), 1, true).is_some());
        assert_eq!(retry_delay(Some(&p), 2, true), None, "retries used up");
        assert_eq!(retry_delay(Some(&p), 0, false), None, "a stopped function retries nothing");
    }
}
