//! Key-level primitives on `records`: reads through the overlay, compare-and-swap under the key's
//! lock (logged to the write-ahead log), fencing tokens and the waits for durability.

use super::*;

impl Inner {
    /// Gives up on a database whose flush is stuck: its flusher thread is not waited for and the
    /// database is never dropped (sled's drop flushes, and would block forever).
    pub(super) fn leak(&self) {
        std::mem::forget(self.db.clone());
        std::mem::forget(self.records.clone());
        std::mem::forget(self.chunks.clone());
        self.checkpointer.detach();
        self.wal.detach();
    }

    /// How long a sync of the log, or a checkpoint, has been stuck (see [`wal::STALL`]).
    pub(super) fn stalled(&self) -> Option<Duration> {
        self.wal.stalled().or_else(|| self.checkpointer.stalled())
    }

    /// A record that no longer counts: completed past its TTL, or a claim past its lease whose owner is
    /// not alive in this process.
    pub(super) fn lapsed(&self, rec: &Record, now: u64) -> bool {
        match rec {
            Record::InFlight(f) => f.deadline_ms <= now && !self.live.contains(f.token),
            Record::Completed(c) => c.expires_ms <= now,
        }
    }

    /// Waits until the log entries up to `seq` are durable (no-op with `sync = "periodic"`).
    pub(super) async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.wal.durable(seq).await,
            SyncPolicy::Periodic => Ok(()),
        }
    }

    /// [`durable`](Self::durable) for a claim's own write (its owner is counted as live).
    pub(super) async fn durable_claim(&self, seq: u64) -> Result<(), StoreError> {
        match self.sync {
            SyncPolicy::Always => self.wal.durable_claim(seq).await,
            SyncPolicy::Periodic => Ok(()),
        }
    }

    /// The stored claim of `token` (its raw bytes, for the compare-and-swap), or `None` when the
    /// record is no longer that claim (taken over, purged, expired): the token is then stale and no
    /// longer counted as a live owner.
    pub(super) fn claim_of(
        &self,
        key: &[u8; 64],
        token: u64,
    ) -> Result<Option<(sled::IVec, InFlight)>, StoreError> {
        let cur = self.get(key)?;
        if let Some(bytes) = cur.filter(|b| !chunks::is_stub(b)) {
            if let Record::InFlight(f) = Record::decode(&bytes)? {
                if f.token == token {
                    return Ok(Some((bytes, f)));
                }
            }
        }
        self.live.remove(token);
        Ok(None)
    }

    /// The next fencing token (> 0).
    pub(super) fn next_token(&self) -> Result<u64, StoreError> {
        let mut t = self.tokens.lock();
        if t.used == 1 << TOKEN_BITS {
            t.block += 1;
            t.used = 0;
            // Logged before any claim of the block: that claim's sync covers it.
            self.wal.append(&Entry::TokenBlock(t.block));
            self.block
                .store(t.block, std::sync::atomic::Ordering::SeqCst);
        }
        t.used += 1;
        Ok((t.block << TOKEN_BITS) | t.used)
    }

    /// The claim of `token` as this process wrote it (`known`, no read needed: the compare-and-swap that
    /// follows checks it is still there), or else as read from the tree (see `claim_of`).
    pub(super) fn current_claim(
        &self,
        key: &[u8; 64],
        token: u64,
        known: Option<sled::IVec>,
    ) -> Result<Option<(sled::IVec, InFlight)>, StoreError> {
        if let Some(bytes) = known {
            if let Record::InFlight(f) = Record::decode(&bytes)? {
                return Ok(Some((bytes, f)));
            }
        }
        self.claim_of(key, token)
    }

    /// One compare-and-swap; `Ok(None)` when another writer got there first, else the sequence
    /// number of its log entry.
    pub(super) fn cas(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<Vec<u8>>,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.swap(key, old, new.map(sled::IVec::from))?.ok())
    }

    /// One compare-and-swap on `records`, decided in memory (see `overlay`), with what follows one
    /// that took effect: its log entry (under the key's lock, so the log has the key's changes in
    /// order), the `max_size` count moved by the exact sizes swapped (chunks included), and the chunks
    /// of a replaced stub deleted. `Ok` holds the log entry's sequence number; the inner `Err` the
    /// current value when another writer got there first.
    pub(super) fn swap(
        &self,
        key: &[u8; 64],
        old: Option<&sled::IVec>,
        new: Option<sled::IVec>,
    ) -> Result<Result<u64, Option<sled::IVec>>, StoreError> {
        let sizes = (
            old.map_or(0, |v| weigh(v)),
            new.as_ref().map_or(0, |v| weigh(v)),
        );
        let mut shard = self.overlay.shard(key);
        let current = match shard.get(key) {
            Some(v) => v.clone(),
            // Under the key's lock the filter is exact for this key (see `key_filter`).
            None if self.filter.may_contain(key) => self.records.get(key)?,
            None => None,
        };
        if current.as_deref() != old.map(|o| o.as_ref()) {
            return Ok(Err(current));
        }
        if current.is_none() && new.is_some() {
            // Before the key can reach sled (the overlay is applied under this lock).
            self.filter.insert(key, &self.records, &self.overlay);
        }
        let mut hold = self.size.write();
        let seq = self.wal.append(&Entry::Record {
            key,
            value: new.as_deref(),
        });
        if hold.counting() {
            // A background count walks sled: it must see this change now.
            shard.remove(key);
            match &new {
                Some(v) => self.records.insert(key, v.clone())?,
                None => self.records.remove(key)?,
            };
        } else {
            shard.insert(*key, new);
        }
        drop(shard);
        self.size.swapped(&mut hold, key, sizes.0, sizes.1);
        drop(hold);
        if let Some(stub) = old.and_then(|o| Stub::parse(o)) {
            chunks::drop_logged(&self.chunks, &self.wal, key, stub.token)?;
        }
        Ok(Ok(seq))
    }

    /// The current value of `key`: the overlay's, or else sled's (not read when the filter knows the
    /// key was never stored).
    pub(super) fn get(&self, key: &[u8; 64]) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v);
        }
        if !self.filter.may_contain(key) {
            return Ok(None);
        }
        Ok(self.records.get(key)?)
    }

    /// Applies the overlay to sled (before a walk over `records`).
    pub(super) fn apply(&self) -> Result<(), StoreError> {
        self.overlay.apply(&self.records)?;
        Ok(())
    }

    /// The sequence number that covers a change of `key` made so far, even one still between its
    /// decision and its log entry (the key's lock waits for that).
    pub(super) fn covering(&self, key: &[u8; 64]) -> u64 {
        let _shard = self.overlay.shard(key);
        self.wal.appended()
    }

    /// Decodes a stored value: an inline record (its body a slice of sled's buffer), or a stub
    /// whose chunks are assembled once and shared by the replays that read it meanwhile.
    pub(super) fn read_record(
        &self,
        key: &[u8; 64],
        bytes: &sled::IVec,
    ) -> Result<Record, StoreError> {
        let whole = match Stub::parse(bytes) {
            Some(stub) => self.assembled.share(key, stub.token, || {
                chunks::read(&self.chunks, key, &stub).map(bytes::Bytes::from)
            })?,
            None => bytes::Bytes::from_owner(bytes.clone()),
        };
        Ok(Record::decode_shared(&whole)?)
    }
}
