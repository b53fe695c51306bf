//! Mapper calls that can take long (a pin populates and mlocks the range; prepare writes zeros over holes),
//! run on their own thread and answered from there, so the session's other requests (above all the release
//! that answers a break) never wait behind them. The queue is short: a guest that queues more gets `EAGAIN`.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daxvisor_proto::agent::{Granted, Message, Progress};

use super::session::{mapper_error, send_frame, Outbox};
use daxvisor_mapper::{Mapper, OwnerId, PrepareProgress, RegionId};

/// Slow requests queued per VM before more are refused with `EAGAIN`.
pub const SLOW_QUEUE: usize = 8;

/// Least time between two progress notices of one prepare.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlowKind {
    Pin,
    /// A pin the VM's passthrough devices may DMA into.
    PinDma,
    Prepare,
}

/// One request for the slow thread, already checked against the session.
pub(crate) struct SlowJob {
    pub session: u64,
    pub request_id: u32,
    pub kind: SlowKind,
    pub owner: OwnerId,
    pub region: RegionId,
    /// The region id as the guest named it (echoed in the reply).
    pub region_wire: u64,
    pub off: u64,
    pub len: u64,
}

/// The `agent-slow` thread. Dropping it lets the thread finish its queue and stop.
pub(crate) struct SlowWorker {
    tx: SyncSender<SlowJob>,
}

impl SlowWorker {
    pub(crate) fn spawn(mapper: Mapper, out: Arc<dyn Outbox>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(SLOW_QUEUE);
        crate::threads::spawn(
            "agent-slow",
            crate::seccomp::ThreadKind::AgentService,
            move || serve(&mapper, out.as_ref(), &rx),
        )?;
        Ok(SlowWorker { tx })
    }

    /// Queues `job`; `false` when the queue is full.
    pub(crate) fn submit(&self, job: SlowJob) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("agent slow-request thread is gone");
                false
            }
        }
    }
}

fn serve(mapper: &Mapper, out: &dyn Outbox, rx: &Receiver<SlowJob>) {
    while let Ok(job) = rx.recv() {
        let reply = match job.kind {
            SlowKind::Pin | SlowKind::PinDma => match mapper.pin_with(
                job.owner,
                job.region,
                job.off,
                job.len,
                job.kind == SlowKind::PinDma,
            ) {
                Ok(pin) => {
                    tracing::info!(session = job.session, owner = %job.owner, %pin, region = %job.region, off = job.off, len = job.len, dma = job.kind == SlowKind::PinDma, "agent pin");
                    Message::Pinned(Granted {
                        id: pin.to_raw(),
                        region: job.region_wire,
                        offset: job.off,
                        len: job.len,
                    })
                }
                Err(e) => mapper_error(&e),
            },
            SlowKind::Prepare => {
                let mut last = Instant::now();
                let mut progress = |p: PrepareProgress| {
                    if last.elapsed() >= PROGRESS_INTERVAL {
                        last = Instant::now();
                        let msg = Message::PrepareProgress(Progress {
                            done: p.done,
                            total: p.total,
                        });
                        send_frame(out, job.session, job.request_id, &msg);
                    }
                };
                match mapper.prepare(job.owner, job.region, job.off, job.len, &mut progress) {
                    Ok(_) => Message::Ok { value: 0 },
                    Err(e) => mapper_error(&e),
                }
            }
        };
        send_frame(out, job.session, job.request_id, &reply);
    }
}
