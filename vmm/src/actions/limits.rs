//! Per-region settings the operator changes while the VM runs: the flush rate limits of the region's device,
//! its reclaim policy, and punching the ranges guests offered back.

use daxvisor_devices::virtio::pmem::FlushLimits;

use super::{ActionError, Actions};
use crate::events::{EventKind, NewEvent};
use crate::reclaim::{ReclaimOutcome, ReclaimPolicy};

impl Actions {
    /// Replace the region's flush limits; returns the limits now in force. Zero-sized buckets are refused.
    pub fn set_rate_limit(
        &self,
        region: &str,
        limits: FlushLimits,
    ) -> Result<FlushLimits, ActionError> {
        let reg = self.region(region)?;
        for (name, b) in [("ops", limits.ops), ("bytes", limits.bytes)] {
            if b.is_some_and(|b| b.size == 0 || b.refill.is_zero()) {
                return Err(ActionError::Invalid(format!(
                    "rate limit {name}: size and refill_ms must be at least 1"
                )));
            }
        }
        reg.rate_limit.set(limits);
        let now = reg.rate_limit.limits();
        self.events.push(NewEvent {
            kind: EventKind::RateLimitSet,
            region: Some(region.to_owned()),
            message: format!("flush rate limit of {region}: {}", describe(&now)),
            ..NewEvent::default()
        });
        Ok(now)
    }

    /// Set the region's reclaim policy; `auto` also punches the offers already listed.
    pub fn set_reclaim_policy(
        &self,
        region: &str,
        policy: ReclaimPolicy,
    ) -> Result<(), ActionError> {
        let reg = self.region(region)?;
        self.reclaim.set_policy(reg.id, policy);
        Ok(())
    }

    /// Punch every offered range of the region now (holders asked first; a refused offer stays listed). May
    /// wait for holders: call it off any thread that must stay responsive.
    pub fn reclaim_now(&self, region: &str) -> Result<Vec<ReclaimOutcome>, ActionError> {
        let reg = self.region(region)?;
        Ok(self.reclaim.reclaim_region(reg.id))
    }
}

/// Limits in words, as the event log and `daxvisor-ctl` say them.
pub fn describe(l: &FlushLimits) -> String {
    let b = |what: &str, b: Option<daxvisor_devices::virtio::pmem::BucketConfig>| match b {
        Some(b) => format!("{what} {} per {} ms", b.size, b.refill.as_millis()),
        None => format!("{what} unlimited"),
    };
    format!("{}, {}", b("requests", l.ops), b("bytes", l.bytes))
}
