//! The life of a function container as a state machine: the phases it goes through, the
//! events that move it, and what the worker does on each ([`step`], pure). The async
//! loop in `run_container_in` turns I/O into [`Event`]s and performs the [`Action`]s.
//!
//! ```text
//!  Starting ──READY──► Idle ◄──outputs──► Busy          (inputs: Idle → Busy)
//!     │  └─INIT_FAILURE─► InitFailed ──exit──► Exited
//!     │                    Idle/Busy ──graceful stop──► Draining ──grace over──► Killed
//!     └─ stop, start timeout, protocol error ──► Killed ──exit──► Exited
//!  Idle/Busy/Draining ── stop (not graceful), input timeout, protocol error ──► Killed
//!  any phase ──exit──► Exited
//! ```
//!
//! Inputs in flight (with their deadlines) are tracked in every phase before `Killed`:
//! the earliest deadline past kills the container (the input timed out).

use std::collections::BTreeMap;
use std::time::Duration;

use flare_proto::{ExceptionInfo, GenMark, InputMsg, OutputMsg};
use tokio::time::Instant;

/// Time a container gets to exit after a graceful stop before it is killed.
pub(crate) const GRACE: Duration = Duration::from_secs(3);

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Spawned and sent INIT; waiting for READY until `deadline`.
    Starting { deadline: Instant },
    /// The runner reported that the function could not be loaded; it exits on its own
    /// (killed at `deadline` if it does not).
    InitFailed { deadline: Instant },
    /// Ready, no input in flight.
    Idle,
    /// Ready, inputs in flight.
    Busy,
    /// Asked to stop gracefully (SHUTDOWN sent); killed at `grace` if still running.
    Draining { grace: Instant },
    /// SIGKILL sent; waiting for the exit. `explain`: its death before READY is
    /// unexplained yet (the exit status and stderr tail become its start error).
    Killed { explain: bool },
    /// The container's init exited.
    Exited,
}

/// The state [`step`] moves: the phase and the inputs in flight with their deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct State {
    pub phase: Phase,
    pub inflight: BTreeMap<String, Instant>,
}

/// Something that happened to the container.
#[derive(Debug)]
pub(crate) enum Event {
    /// The runner sent READY.
    Ready,
    /// The runner sent INIT_FAILURE.
    InitFailure(ExceptionInfo),
    /// The runner sent outputs.
    Outputs(Vec<OutputMsg>),
    /// A frame broke the protocol (unreadable, unparseable, of an unexpected kind).
    ProtocolError,
    /// The control plane sent inputs.
    Inputs(Vec<InputMsg>),
    /// The control plane asked the container to stop.
    Stop { graceful: bool },
    /// The control plane's command channel closed (the worker is going away).
    CommandsClosed,
    /// The timer for [`State::next_deadline`] fired.
    Timer,
    /// The container's init exited (its pidfd became readable).
    Exited,
}

/// What the worker does.
#[derive(Debug)]
pub(crate) enum Action {
    /// Tell the control plane the container is ready.
    Ready,
    /// Forward the runner's INIT_FAILURE (after the logs so far).
    InitFailed(ExceptionInfo),
    /// Forward outputs (after the logs so far: prints made before a result go first).
    Forward(Vec<OutputMsg>),
    /// Write these inputs to the runner.
    SendInputs(Vec<InputMsg>),
    /// Ask the runner to exit (SHUTDOWN).
    SendShutdown,
    /// SIGKILL the container.
    Kill,
    /// The stop was asked for (report `requested`).
    MarkRequested,
    /// This input ran past its timeout (report `timed_out_input`).
    InputTimedOut(String),
    /// The container did not become ready in time (report `start_error`).
    StartTimedOut,
    /// It died before READY for no known reason: explain with its exit status and
    /// stderr tail (report `start_error`).
    ExplainEarlyExit,
}

impl State {
    pub fn starting(deadline: Instant) -> State {
        State { phase: Phase::Starting { deadline }, inflight: BTreeMap::new() }
    }

    /// When [`Event::Timer`] must fire next (`None`: no timer).
    pub fn next_deadline(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Starting { deadline } | Phase::InitFailed { deadline } => Some(deadline),
            Phase::Draining { grace } => Some(grace),
            Phase::Idle | Phase::Busy => None,
            Phase::Killed { .. } | Phase::Exited => return None,
        };
        self.inflight.values().copied().chain(phase).min()
    }

    /// Whether the container is on its way out (a protocol error then is expected).
    pub fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. } | Phase::Killed { .. } | Phase::Exited)
    }

    fn served(&self) -> Phase {
        if self.inflight.is_empty() {
            Phase::Idle
        } else {
            Phase::Busy
        }
    }
}

/// One transition: the state after `event` at time `now`, and what to do.
pub(crate) fn step(mut s: State, event: Event, now: Instant) -> (State, Vec<Action>) {
    use Phase::*;
    let live = !matches!(s.phase, Killed { .. } | Exited);
    let kill = |mut s: State, explain: bool| {
        s.phase = Killed { explain };
        s.inflight.clear();
        s
    };
    match event {
        Event::Exited => {
            let explain = matches!(s.phase, Starting { .. } | Killed { explain: true });
            s.phase = Exited;
            s.inflight.clear();
            (s, if explain { vec![Action::ExplainEarlyExit] } else { vec![] })
        }
        _ if matches!(s.phase, Exited) => (s, vec![]),
        Event::Ready => match s.phase {
            Starting { .. } | InitFailed { .. } => {
                s.phase = s.served();
                (s, vec![Action::Ready])
            }
            Idle | Busy | Draining { .. } => (s, vec![Action::Ready]),
            Killed { .. } | Exited => (s, vec![]),
        },
        Event::InitFailure(exception) => {
            s.phase = match s.phase {
                Starting { deadline } => InitFailed { deadline },
                Killed { .. } => Killed { explain: false },
                other => other,
            };
            (s, vec![Action::InitFailed(exception)])
        }
        Event::Outputs(outputs) => {
            for o in &outputs {
                if o.gen != Some(GenMark::Item) {
                    s.inflight.remove(&o.input_id);
                }
            }
            if matches!(s.phase, Busy) {
                s.phase = s.served();
            }
            (s, vec![Action::Forward(outputs)])
        }
        Event::ProtocolError => match s.phase {
            Killed { .. } | Exited => (s, vec![]),
            Starting { .. } => (kill(s, true), vec![Action::Kill]),
            _ => (kill(s, false), vec![Action::Kill]),
        },
        Event::Inputs(inputs) if live => {
            for i in &inputs {
                let t = Duration::from_millis(i.timeout_ms.max(1));
                s.inflight.insert(i.input_id.clone(), now + t);
            }
            if matches!(s.phase, Idle) {
                s.phase = s.served();
            }
            (s, vec![Action::SendInputs(inputs)])
        }
        Event::Inputs(_) => (s, vec![]),
        Event::Stop { graceful } => match s.phase {
            Idle | Busy if graceful => {
                s.phase = Draining { grace: now + GRACE };
                (s, vec![Action::MarkRequested, Action::SendShutdown])
            }
            Draining { .. } if graceful => (s, vec![Action::MarkRequested, Action::SendShutdown]),
            Killed { .. } => (s, vec![Action::MarkRequested, Action::Kill]),
            _ => (kill(s, false), vec![Action::MarkRequested, Action::Kill]),
        },
        Event::CommandsClosed => match s.phase {
            Killed { .. } => (s, vec![Action::MarkRequested, Action::Kill]),
            _ => (kill(s, false), vec![Action::MarkRequested, Action::Kill]),
        },
        Event::Timer => {
            if !live {
                return (s, vec![]);
            }
            let expired = s.inflight.iter().filter(|(_, d)| **d <= now).min_by_key(|(_, d)| **d);
            if let Some((id, _)) = expired {
                let id = id.clone();
                return (kill(s, false), vec![Action::InputTimedOut(id), Action::Kill]);
            }
            match s.phase {
                Draining { grace } if grace <= now => (kill(s, false), vec![Action::Kill]),
                Starting { deadline } | InitFailed { deadline } if deadline <= now => {
                    (kill(s, false), vec![Action::StartTimedOut, Action::Kill])
                }
                _ => (s, vec![]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_proto::OutputStatus;

    fn names(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Ready => "ready",
                Action::InitFailed(_) => "init_failed",
                Action::Forward(_) => "forward",
                Action::SendInputs(_) => "send_inputs",
                Action::SendShutdown => "shutdown",
                Action::Kill => "kill",
                Action::MarkRequested => "requested",
                Action::InputTimedOut(_) => "input_timed_out",
                Action::StartTimedOut => "start_timed_out",
                Action::ExplainEarlyExit => "explain",
            })
            .collect()
    }

    fn input(id: &str, timeout_ms: u64) -> InputMsg {
        InputMsg { input_id: id.into(), call_id: "c".into(), idx: 0, args: Default::default(), timeout_ms }
    }

    fn output(id: &str, gen: Option<GenMark>) -> OutputMsg {
        OutputMsg {
            input_id: id.into(),
            status: OutputStatus::Success,
            gen,
            data: Default::default(),
            exception: None,
        }
    }

    struct T {
        s: State,
        t0: Instant,
    }

    impl T {
        fn new() -> T {
            let t0 = Instant::now();
            T { s: State::starting(t0 + Duration::from_secs(60)), t0 }
        }
        fn ready() -> T {
            let mut t = T::new();
            t.go(Event::Ready, 0);
            assert_eq!(t.s.phase, Phase::Idle);
            t
        }
        /// Applies `e` at t0 + `ms`; returns the actions' names.
        fn go(&mut self, e: Event, ms: u64) -> Vec<&'static str> {
            let (s, a) = step(self.s.clone(), e, self.t0 + Duration::from_millis(ms));
            self.s = s;
            names(&a)
        }
    }

    #[test]
    fn start_ready_busy_idle() {
        let mut t = T::new();
        assert_eq!(t.s.next_deadline(), Some(t.t0 + Duration::from_secs(60)));
        assert_eq!(t.go(Event::Ready, 5), ["ready"]);
        assert_eq!(t.s.phase, Phase::Idle);
        assert_eq!(t.s.next_deadline(), None);
        assert_eq!(t.go(Event::Inputs(vec![input("a", 1000), input("b", 500)]), 10), ["send_inputs"]);
        assert_eq!(t.s.phase, Phase::Busy);
        assert_eq!(t.s.next_deadline(), Some(t.t0 + Duration::from_millis(510)));
        // A generator item keeps its input in flight; a final output ends it.
        assert_eq!(t.go(Event::Outputs(vec![output("b", Some(GenMark::Item))]), 20), ["forward"]);
        assert_eq!(t.s.phase, Phase::Busy);
        assert_eq!(t.go(Event::Outputs(vec![output("b", Some(GenMark::Done))]), 30), ["forward"]);
        assert_eq!(t.s.phase, Phase::Busy);
        assert_eq!(t.go(Event::Outputs(vec![output("a", None)]), 40), ["forward"]);
        assert_eq!(t.s.phase, Phase::Idle);
        assert!(t.s.inflight.is_empty());
        // A timer that fires early does nothing.
        assert_eq!(t.go(Event::Timer, 50), Vec::<&str>::new());
        assert_eq!(t.s.phase, Phase::Idle);
        // A second READY is passed on (as before), the phase stays.
        assert_eq!(t.go(Event::Ready, 60), ["ready"]);
        assert_eq!(t.s.phase, Phase::Idle);
    }

    #[test]
    fn stop_while_starting_kills() {
        for graceful in [true, false] {
            let mut t = T::new();
            assert_eq!(t.go(Event::Stop { graceful }, 1), ["requested", "kill"]);
            assert_eq!(t.s.phase, Phase::Killed { explain: false });
            assert_eq!(t.s.next_deadline(), None);
            assert_eq!(t.go(Event::Exited, 2), Vec::<&str>::new(), "a requested stop needs no explanation");
            assert_eq!(t.s.phase, Phase::Exited);
        }
    }

    #[test]
    fn exit_while_starting_is_explained() {
        let mut t = T::new();
        assert_eq!(t.go(Event::Exited, 1), ["explain"]);
        assert_eq!(t.s.phase, Phase::Exited);
        // After a protocol error while starting too.
        let mut t = T::new();
        assert_eq!(t.go(Event::ProtocolError, 1), ["kill"]);
        assert_eq!(t.s.phase, Phase::Killed { explain: true });
        assert_eq!(t.go(Event::Exited, 2), ["explain"]);
    }

    #[test]
    fn start_timeout() {
        let mut t = T::new();
        assert_eq!(t.go(Event::Timer, 59_999), Vec::<&str>::new());
        assert_eq!(t.go(Event::Timer, 60_000), ["start_timed_out", "kill"]);
        assert_eq!(t.s.phase, Phase::Killed { explain: false });
        assert_eq!(t.go(Event::Exited, 60_001), Vec::<&str>::new());
    }

    #[test]
    fn init_failure_then_exit() {
        let mut t = T::new();
        let e = ExceptionInfo::new("ImportError", "no module x");
        assert_eq!(t.go(Event::InitFailure(e), 5), ["init_failed"]);
        assert!(matches!(t.s.phase, Phase::InitFailed { .. }));
        // Its start deadline still applies.
        assert_eq!(t.s.next_deadline(), Some(t.t0 + Duration::from_secs(60)));
        assert_eq!(t.go(Event::Exited, 10), Vec::<&str>::new(), "the init failure explains it");
        // Or it hangs: killed at the start deadline.
        let mut t = T::new();
        t.go(Event::InitFailure(ExceptionInfo::new("ImportError", "x")), 5);
        assert_eq!(t.go(Event::Timer, 60_000), ["start_timed_out", "kill"]);
        // Or it is stopped.
        let mut t = T::new();
        t.go(Event::InitFailure(ExceptionInfo::new("ImportError", "x")), 5);
        assert_eq!(t.go(Event::Stop { graceful: true }, 6), ["requested", "kill"]);
    }

    #[test]
    fn exit_while_busy() {
        let mut t = T::ready();
        t.go(Event::Inputs(vec![input("a", 1000)]), 1);
        assert_eq!(t.s.phase, Phase::Busy);
        assert_eq!(t.go(Event::Exited, 2), Vec::<&str>::new());
        assert_eq!(t.s.phase, Phase::Exited);
        assert!(t.s.inflight.is_empty());
        assert_eq!(t.s.next_deadline(), None);
        // Nothing more happens after the exit.
        assert_eq!(t.go(Event::Inputs(vec![input("b", 1)]), 3), Vec::<&str>::new());
        assert_eq!(t.go(Event::Stop { graceful: false }, 3), Vec::<&str>::new());
        assert_eq!(t.go(Event::Timer, 5000), Vec::<&str>::new());
    }

    #[test]
    fn input_timeout_kills() {
        let mut t = T::ready();
        t.go(Event::Inputs(vec![input("slow", 1000), input("slower", 2000)]), 0);
        assert_eq!(t.go(Event::Timer, 999), Vec::<&str>::new());
        let (s, a) = step(t.s.clone(), Event::Timer, t.t0 + Duration::from_millis(2500));
        // The earliest input past its deadline is the one that timed out.
        assert!(matches!(&a[..], [Action::InputTimedOut(id), Action::Kill] if id == "slow"));
        assert_eq!(s.phase, Phase::Killed { explain: false });
        assert!(s.inflight.is_empty());
        t.s = s;
        // The kill is not repeated by later timers or frames.
        assert_eq!(t.go(Event::Timer, 3000), Vec::<&str>::new());
        assert_eq!(t.go(Event::ProtocolError, 3000), Vec::<&str>::new());
        assert_eq!(t.go(Event::Exited, 3001), Vec::<&str>::new());
        // A zero timeout still gives the input a millisecond.
        let mut t = T::ready();
        t.go(Event::Inputs(vec![input("z", 0)]), 0);
        assert_eq!(t.s.next_deadline(), Some(t.t0 + Duration::from_millis(1)));
    }

    #[test]
    fn drain_then_exit_or_kill() {
        let mut t = T::ready();
        t.go(Event::Inputs(vec![input("a", 10_000)]), 0);
        assert_eq!(t.go(Event::Stop { graceful: true }, 100), ["requested", "shutdown"]);
        assert_eq!(t.s.phase, Phase::Draining { grace: t.t0 + Duration::from_millis(100) + GRACE });
        // In-flight inputs still finish and are forwarded while draining.
        assert_eq!(t.go(Event::Outputs(vec![output("a", None)]), 200), ["forward"]);
        assert!(matches!(t.s.phase, Phase::Draining { .. }));
        // A second graceful stop asks again but keeps the first grace period.
        assert_eq!(t.go(Event::Stop { graceful: true }, 300), ["requested", "shutdown"]);
        assert_eq!(t.s.phase, Phase::Draining { grace: t.t0 + Duration::from_millis(100) + GRACE });
        // Inputs are still written while draining (the control plane sends none then).
        assert_eq!(t.go(Event::Inputs(vec![input("late", 1000)]), 350), ["send_inputs"]);
        assert_eq!(t.go(Event::Exited, 400), Vec::<&str>::new());

        // The grace period runs out.
        let mut t = T::ready();
        t.go(Event::Stop { graceful: true }, 0);
        assert_eq!(t.go(Event::Timer, 2999), Vec::<&str>::new());
        assert_eq!(t.go(Event::Timer, 3000), ["kill"]);
        assert_eq!(t.s.phase, Phase::Killed { explain: false });
        // A hard stop while draining.
        let mut t = T::ready();
        t.go(Event::Stop { graceful: true }, 0);
        assert_eq!(t.go(Event::Stop { graceful: false }, 1), ["requested", "kill"]);
        assert_eq!(t.s.phase, Phase::Killed { explain: false });
    }

    #[test]
    fn hard_stop_protocol_error_and_closed_commands() {
        for phase_busy in [false, true] {
            let mut t = T::ready();
            if phase_busy {
                t.go(Event::Inputs(vec![input("a", 1000)]), 0);
            }
            assert_eq!(t.go(Event::Stop { graceful: false }, 1), ["requested", "kill"]);
            assert_eq!(t.s.phase, Phase::Killed { explain: false });

            let mut t = T::ready();
            assert_eq!(t.go(Event::ProtocolError, 1), ["kill"]);
            assert_eq!(t.s.phase, Phase::Killed { explain: false });
            assert!(t.s.stopping());

            let mut t = T::ready();
            assert_eq!(t.go(Event::CommandsClosed, 1), ["requested", "kill"]);
            assert_eq!(t.s.phase, Phase::Killed { explain: false });
        }
        let mut t = T::new();
        assert_eq!(t.go(Event::CommandsClosed, 1), ["requested", "kill"]);
        assert_eq!(t.go(Event::Exited, 2), Vec::<&str>::new());
    }

    #[test]
    fn inputs_before_ready_are_tracked() {
        let mut t = T::new();
        assert_eq!(t.go(Event::Inputs(vec![input("early", 100)]), 0), ["send_inputs"]);
        assert!(matches!(t.s.phase, Phase::Starting { .. }));
        assert_eq!(t.s.next_deadline(), Some(t.t0 + Duration::from_millis(100)));
        assert_eq!(t.go(Event::Ready, 10), ["ready"]);
        assert_eq!(t.s.phase, Phase::Busy);
    }

    #[test]
    fn stopping() {
        let t = T::ready();
        assert!(!t.s.stopping());
        let mut t = T::ready();
        t.go(Event::Stop { graceful: true }, 0);
        assert!(t.s.stopping());
    }

    /// Every phase against every event: the invariants hold.
    #[test]
    fn every_phase_and_event() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(100);
        let phases = [
            Phase::Starting { deadline: later },
            Phase::InitFailed { deadline: later },
            Phase::Idle,
            Phase::Busy,
            Phase::Draining { grace: later },
            Phase::Killed { explain: false },
            Phase::Killed { explain: true },
            Phase::Exited,
        ];
        let events = || {
            vec![
                Event::Ready,
                Event::InitFailure(ExceptionInfo::new("E", "x")),
                Event::Outputs(vec![output("a", None)]),
                Event::ProtocolError,
                Event::Inputs(vec![input("b", 1000)]),
                Event::Stop { graceful: true },
                Event::Stop { graceful: false },
                Event::CommandsClosed,
                Event::Timer,
                Event::Exited,
            ]
        };
        for phase in phases {
            for event in events() {
                let mut inflight = BTreeMap::new();
                if phase == Phase::Busy {
                    inflight.insert("a".to_owned(), later);
                }
                let before = State { phase, inflight };
                let what = format!("{phase:?} + {event:?}");
                let exited = matches!(event, Event::Exited);
                let timer = matches!(event, Event::Timer);
                let (after, actions) = step(before.clone(), event, t0 + Duration::from_millis(1));
                let names = names(&actions);
                // The exit ends everything; nothing follows it.
                if exited || phase == Phase::Exited {
                    assert_eq!(after.phase, Phase::Exited, "{what}");
                    assert!(after.inflight.is_empty(), "{what}");
                    assert!(names.iter().all(|n| *n == "explain"), "{what}: {names:?}");
                }
                // A killed container is never live again and tracks no inputs.
                if matches!(phase, Phase::Killed { .. }) {
                    assert!(matches!(after.phase, Phase::Killed { .. } | Phase::Exited), "{what}");
                    assert!(after.inflight.is_empty(), "{what}");
                }
                // Killing always lands in Killed; Killed always came with a kill (or was there).
                if names.contains(&"kill") {
                    assert!(matches!(after.phase, Phase::Killed { .. }), "{what}");
                }
                if matches!(after.phase, Phase::Killed { .. }) && !matches!(phase, Phase::Killed { .. }) {
                    assert!(names.contains(&"kill"), "{what}: {names:?}");
                }
                // Busy means inputs in flight, Idle none.
                match after.phase {
                    Phase::Busy => assert!(!after.inflight.is_empty(), "{what}"),
                    Phase::Idle => assert!(after.inflight.is_empty(), "{what}"),
                    _ => {}
                }
                // A timer before every deadline changes nothing.
                if timer {
                    assert_eq!(after, before, "{what}");
                    assert!(names.is_empty(), "{what}");
                }
            }
        }
    }
}
