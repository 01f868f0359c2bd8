//! Container lifecycle events, broadcast to whoever subscribes (metering, later).
//!
//! Sent while the state lock is held, so their order is the order of the state's changes;
//! a broadcast send never blocks (a subscriber that falls behind loses the oldest events
//! and is told how many).

use tokio::sync::broadcast;

use super::Reservation;

/// Events kept for a subscriber that has not read them yet.
const BACKLOG: usize = 4096;

/// A change in a container's life.
#[derive(Clone, Debug, PartialEq)]
pub enum ContainerEvent {
    /// Placed on a worker and asked to start; its resources are booked from now on.
    Started {
        container_id: String,
        app_id: String,
        function_id: String,
        worker_id: String,
        cpu_millis: u64,
        memory_mb: u64,
        /// GPU type and count granted.
        gpu: Option<(String, u32)>,
        at: f64,
    },
    /// Ready for inputs.
    Ready { container_id: String, at: f64 },
    /// Asked to stop (scale-down, app stop, cancel, drain).
    Stopping { container_id: String, at: f64 },
    /// Gone (it exited, or its worker was lost); its resources are free again.
    Exited { container_id: String, at: f64 },
}

impl ContainerEvent {
    pub(crate) fn started(c: (&str, &str, &str, &str), r: &Reservation, at: f64) -> Self {
        let (container_id, app_id, function_id, worker_id) = c;
        ContainerEvent::Started {
            container_id: container_id.into(),
            app_id: app_id.into(),
            function_id: function_id.into(),
            worker_id: worker_id.into(),
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
            gpu: r.gpu.as_ref().map(|g| (g.kind.clone(), g.count)),
            at,
        }
    }
}

/// The sending side, in the state.
pub(crate) struct Lifecycle(broadcast::Sender<ContainerEvent>);

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle(broadcast::channel(BACKLOG).0)
    }
}

impl Lifecycle {
    pub(crate) fn emit(&self, ev: ContainerEvent) {
        // No subscriber: nothing to do.
        let _ = self.0.send(ev);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.0.subscribe()
    }
}
