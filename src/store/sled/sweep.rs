//! Sweeping: there is no expiry index (it cost a third tree write per request, on the right-most leaf,
//! whose keys grow with time). The sweeper walks `records` in key order from where the last sweep
//! stopped, a bounded slice per sweep, wrapping around, and deletes what has lapsed (a completed record
//! past its TTL, or a claim past its lease whose owner is not alive in this process — which covers
//! claims left by a crash, found without any scan at open). Reads check expiry themselves, so a lapsed
//! record is never replayed while it waits for the sweeper; the walk only bounds disk use.

use super::Inner;
use crate::store::{Record, StoreError, StoreKey, SweepStats};

/// Fewest records one sweep looks at: a sweep is a bounded slice of the walk over `records` (about
/// 1 µs per record here), so it never holds up shutdown for long.
pub(super) const SWEEP_BATCH: u64 = 50_000;

/// A larger store gets larger slices, so one lap of the walk takes at most this many sweeps (5 minutes
/// at the default `sweep_interval`): an expired record stays on disk at most that long after its TTL,
/// however fast keys arrive.
const LAP_SWEEPS: u64 = 60;

/// Where the sweeper's walk over `records` stands.
#[derive(Debug, Clone, Default)]
pub(super) struct Walk {
    /// Where the next sweep resumes (`None`: from the start).
    pub(super) from: Option<sled::IVec>,
    /// Records looked at since the walk last passed the end of the tree.
    pub(super) lap: u64,
    /// Records one sweep looks at: the size of the last lap ÷ LAP_SWEEPS, at least SWEEP_BATCH.
    pub(super) batch: u64,
}

impl Inner {
    /// One slice of the walk over `records`: from where the last sweep stopped to the end, then from
    /// the start back to there, at most `walk.batch` records. On an error the walk stays where it was.
    pub(super) fn sweep_blocking(&self) -> Result<SweepStats, StoreError> {
        // The walk is over sled: changes still in the overlay are applied first.
        self.apply()?;
        let now = self.clock.now_ms();
        let mut stats = SweepStats::default();
        let mut walk = self.walk.lock().clone();
        let from = walk.from.clone();
        let range = self.records.range(from.clone().unwrap_or_default()..);
        let mut next = self.sweep_range(range, now, walk.batch, &mut stats)?;
        if next.is_none() {
            // Past the end: a lap is over, and its size sets the slices of the next one.
            let lap = walk.lap + stats.scanned;
            walk.batch = (lap / LAP_SWEEPS).max(SWEEP_BATCH);
            walk.lap = 0;
            let before = stats.scanned;
            if let Some(from) = from {
                next = self.sweep_range(self.records.range(..from), now, walk.batch, &mut stats)?;
            }
            walk.lap = stats.scanned - before;
        } else {
            walk.lap += stats.scanned;
        }
        walk.from = next;
        *self.walk.lock() = walk;
        Ok(stats)
    }

    /// Sweeps the records of `range` until the batch is used up; returns the key to resume from then.
    fn sweep_range(
        &self,
        range: sled::Iter,
        now: u64,
        batch: u64,
        stats: &mut SweepStats,
    ) -> Result<Option<sled::IVec>, StoreError> {
        for item in range {
            let (k, v) = item?;
            if stats.scanned >= batch {
                return Ok(Some(k));
            }
            stats.scanned += 1;
            let lapsed = match Record::peek_lapse(&v) {
                Some((Some(token), deadline)) => deadline <= now && !self.live.contains(token),
                Some((None, expires)) => expires <= now,
                None => false,
            };
            let Ok(key) = <[u8; 64]>::try_from(k.as_ref()) else {
                continue;
            };
            if lapsed && self.swap(&key, Some(&v), None)?.is_ok() {
                stats.expired += 1;
                if let Some(key) = StoreKey::from_bytes(&k) {
                    self.watchers.notify(&key);
                }
            }
        }
        Ok(None)
    }
}
