//! The `Store` operations on sled: claim, complete, release, lookup, list and purge, built on the
//! key-level primitives of `records`.

use super::*;
use crate::store::{StoreAdmin, StoreUpkeep};

/// The operations themselves; the `Store` impl below passes their errors through [`SledStore::settled`].
impl SledStore {
    /// Passes `r` on; a failure that came from sled asks the flusher for a flush, which fails too if
    /// sled is broken and then starts a reopen (see `reopen`). The space guard's refusals are not
    /// sled's and change nothing.
    pub(super) fn settled<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Backend { source, .. }) = &r {
            if source.downcast_ref::<sled::Error>().is_some() {
                if let Ok(inner) = self.inner() {
                    inner.checkpointer.request();
                }
            }
        }
        r
    }

    pub(super) async fn do_claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        // Read first: retries and duplicates (replays, 409s) are answered from the read alone, with no
        // token, no live-owner entry and no failed write; a first-seen key then costs one
        // compare-and-swap expecting what was read. A key sled never had is not read from sled at all
        // (see `key_filter`), and the compare-and-swap is decided in memory (see `overlay`).
        let mut cur = s.get(&kb)?;
        loop {
            let now = s.clock.now_ms();
            let lapsed_stub = cur
                .as_deref()
                .and_then(Stub::parse)
                .is_some_and(|st| st.expires_ms <= now);
            if let Some(bytes) = cur.as_ref().filter(|_| !lapsed_stub) {
                // A replay's body is shared, not copied per replay (see `read_record`).
                let rec = s.read_record(&kb, bytes)?;
                if !s.lapsed(&rec, now) {
                    return Ok(match rec {
                        Record::InFlight(f) => ClaimOutcome::InFlight {
                            fingerprint: f.fingerprint,
                            retry_after: retry_after(f.deadline_ms, now),
                        },
                        Record::Completed(c) => {
                            // A result whose flush is still pending is not replayed before it is
                            // durable: never answer with what a crash could take back. A `complete`
                            // still between its CAS and its sequence number (0) waits for a flush
                            // that starts after this read.
                            if s.sync == SyncPolicy::Always {
                                let pending = s.unflushed.lock().get(&kb).copied();
                                let waited = match pending {
                                    None => Ok(()),
                                    Some(entry @ (_, seq)) => {
                                        let seq = if seq == 0 { s.covering(&kb) } else { seq };
                                        let r = s.wal.durable(seq).await;
                                        if r.is_ok() {
                                            // Durable now, whoever wrote it: settle a kept entry.
                                            remove_if(&s.unflushed, &kb, |e| e == entry);
                                        }
                                        r
                                    }
                                };
                                // A result that is not durable is not replayed (rule 14: only
                                // durable results are acknowledged); the retry gets a store error
                                // and comes back once the store works again.
                                waited?;
                            }
                            ClaimOutcome::Completed(c)
                        }
                    });
                }
            }
            let token = s.next_token()?;
            let rec = Record::InFlight(InFlight {
                token,
                created_ms: now,
                deadline_ms: now.saturating_add(lease.as_millis() as u64),
                fingerprint: fp,
            });
            let encoded = sled::IVec::from(rec.encode());
            // `max_size`: only a claim that grows the store is refused (a takeover of a lapsed
            // record of at least its size is not).
            let sizes = (
                cur.as_ref().map_or(0, |c| record_size(c.len())),
                record_size(encoded.len()),
            );
            s.size.admit(sizes.1.saturating_sub(sizes.0))?;
            s.space.admit(sizes.1, CLAIM_RESERVE)?;
            // Live before it is written: the sweeper must never see this claim without its owner
            // (with a lease of a few ms it could otherwise delete it as lapsed).
            s.live.insert(token, (*key, encoded.clone()));
            let swapped = s.swap(&kb, cur.as_ref(), Some(encoded.clone()));
            let seq = match swapped {
                Ok(Ok(seq)) => seq,
                Ok(Err(current)) => {
                    s.live.remove(token);
                    cur = current; // a record exists, or changed since it was read: look at it
                    continue;
                }
                Err(e) => {
                    s.live.remove(token);
                    return Err(e);
                }
            };
            // Until the claim is durable and returned, nothing has acted on it: if its sync fails,
            // or this future is dropped while it waits (the client went away), the claim is taken
            // back, so the client's retry is forwarded at once instead of refused for a lease.
            let mut take_back = TakeBack {
                inner: s,
                key,
                claim: encoded,
                before: cur,
                token,
                armed: true,
            };
            if let Err(e) = s.durable_claim(seq).await {
                take_back.run();
                return Err(e);
            }
            take_back.armed = false;
            return Ok(ClaimOutcome::Claimed { token });
        }
    }

    pub(super) async fn do_complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        let mut known = s.live.get(token).map(|(_, bytes)| bytes);
        loop {
            let Some((cur, f)) = s.current_claim(&kb, token, known.take())? else {
                return Ok(Committed::Stale);
            };
            let rec = Record::Completed(Completed {
                created_ms: f.created_ms,
                expires_ms: s.clock.now_ms().saturating_add(ttl.as_millis() as u64),
                fingerprint: f.fingerprint,
                status: result.status,
                headers: result.headers.clone(),
                body: result.body.clone(),
                body_omitted: result.body_omitted,
                seen_only: result.seen_only,
            });
            let mut encoded = rec.encode();
            // `max_size` is checked on claims; a result that would still take the store past it is
            // kept without its body (its replays say `Idempotency-Replay: omitted`, as for a body
            // over `max_response_body`): the request never runs twice, and the store stays bounded
            // by `max_size` plus the heads of the results in flight.
            let grow = record_size(encoded.len()).saturating_sub(record_size(cur.len()));
            let rec = match (s.size.admit(grow), rec) {
                (Err(_), Record::Completed(mut c)) if !c.body.is_empty() => {
                    tracing::warn!(
                        bytes = c.body.len(),
                        "store.max_size reached: result recorded without its body"
                    );
                    c.body = bytes::Bytes::new();
                    c.body_omitted = true;
                    let rec = Record::Completed(c);
                    encoded = rec.encode();
                    rec
                }
                (_, rec) => rec,
            };
            s.space.admit(record_size(encoded.len()), RESULT_RESERVE)?;
            // A large record goes to chunks, behind a stub (see `chunks`: sled must never write a
            // blob). The chunks are written first; if the stub is not installed they are deleted.
            let chunked = encoded.len() > INLINE_MAX;
            if chunked {
                let stub = Stub {
                    created_ms: f.created_ms,
                    expires_ms: rec.expiry_ms(),
                    token,
                    len: u32::try_from(encoded.len())
                        .map_err(|_| backend_err(std::io::Error::other("record over 4 GiB")))?,
                };
                chunks::write(
                    &s.chunks,
                    &|e| {
                        s.wal.append(e);
                    },
                    &kb,
                    token,
                    &encoded,
                )?;
                encoded = stub.encode();
            }
            // Listed as unflushed before the CAS, so a replay that sees the result also sees the
            // entry; removed (by the guard) once the flush returned, or if this write did not happen.
            let pending =
                (s.sync == SyncPolicy::Always).then(|| Unflushed::new(&s.unflushed, kb, token));
            let swapped = s.cas(&kb, Some(&cur), Some(encoded));
            if chunked && !matches!(swapped, Ok(Some(_))) {
                chunks::drop_logged(&s.chunks, &s.wal, &kb, token)?;
            }
            let Some(seq) = swapped? else {
                continue;
            };
            if let Some(p) = &pending {
                p.covered_by(seq);
            }
            s.live.remove(token);
            let durable = s.durable(seq).await;
            if let (Err(_), Some(p)) = (&durable, pending) {
                p.keep();
            }
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    pub(super) async fn do_release(
        &self,
        key: &StoreKey,
        token: u64,
    ) -> Result<Committed, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let kb = key.to_bytes();
        let mut known = s.live.get(token).map(|(_, bytes)| bytes);
        s.space.admit(0, RESULT_RESERVE)?;
        loop {
            let Some((cur, _)) = s.current_claim(&kb, token, known.take())? else {
                return Ok(Committed::Stale);
            };
            let Some(seq) = s.cas(&kb, Some(&cur), None)? else {
                continue;
            };
            s.live.remove(token);
            let durable = s.durable(seq).await;
            s.watchers.notify(key);
            durable?;
            return Ok(Committed::Done);
        }
    }

    pub(super) async fn do_lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let now = s.clock.now_ms();
        let kb = key.to_bytes();
        let Some(bytes) = s.get(&kb)? else {
            return Ok(None);
        };
        let rec = s.read_record(&kb, &bytes)?;
        Ok((!matches!(&rec, Record::Completed(c) if c.expires_ms <= now)).then_some(rec))
    }

    pub(super) async fn do_list(
        &self,
        id: &[u8; 32],
    ) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        let now = s.clock.now_ms();
        let mut out = Vec::new();
        s.apply()?;
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            let Some(key) = StoreKey::from_bytes(&k) else {
                continue;
            };
            let rec = s.read_record(&key.to_bytes(), &v)?;
            if !matches!(&rec, Record::Completed(c) if c.expires_ms <= now) {
                out.push((key, rec));
            }
        }
        Ok(out)
    }

    pub(super) async fn do_purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let inner = self.inner()?;
        let s = &*inner;
        s.space.admit(0, RESULT_RESERVE)?;
        let mut n = 0;
        s.apply()?;
        for item in s.records.scan_prefix(id) {
            let (k, v) = item?;
            if s.cas(
                &<[u8; 64]>::try_from(k.as_ref()).map_err(backend_err_len)?,
                Some(&v),
                None,
            )?
            .is_some()
            {
                n += 1;
                if let Some(key) = StoreKey::from_bytes(&k) {
                    s.watchers.notify(&key);
                }
            }
        }
        s.durable(s.wal.appended()).await?;
        Ok(n)
    }
}

#[async_trait]
impl Store for SledStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.settled(self.do_claim(key, fp, lease).await)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        self.settled(self.do_complete(key, token, result, ttl).await)
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        self.settled(self.do_release(key, token).await)
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.shared.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        // The owner died: its claim is no longer protected by a live owner, so after its lease a
        // retry takes it over or the sweeper's walk deletes it.
        self.shared.live.remove(token);
    }
}

#[async_trait]
impl StoreAdmin for SledStore {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.settled(self.do_lookup(key).await)
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        self.settled(self.do_list(id).await)
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        self.settled(self.do_purge(id).await)
    }
}

#[async_trait]
impl StoreUpkeep for SledStore {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        // Deleting writes too (sled logs it): not on a disk that is about full.
        let inner = self.inner()?;
        inner.space.admit(0, RESULT_RESERVE)?;
        let swept = tokio::task::spawn_blocking(move || inner.sweep_blocking())
            .await
            .map_err(backend_err)?;
        self.settled(swept)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner()?.wal.durable_now().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = self.inner()?;
        if inner.wal.failed() {
            return Err(backend_err(std::io::Error::other("a write to disk failed")));
        }
        if let Some(d) = inner.stalled() {
            return Err(backend_err(std::io::Error::other(format!(
                "a flush to disk has not returned for {d:?}"
            ))));
        }
        // Not ready while new keys would be refused for want of space.
        inner.space.admit(0, CLAIM_RESERVE)?;
        inner.records.get([0u8; 1])?;
        Ok(())
    }

    async fn close(&self, clean: bool) {
        SledStore::close(self, clean);
    }

    fn backend(&self) -> &'static str {
        "sled"
    }

    fn stats(&self) -> crate::store::BackendStats {
        let Ok(inner) = self.inner() else {
            return crate::store::BackendStats::default();
        };
        let f = inner.wal.stats();
        crate::store::BackendStats {
            size_on_disk: inner.db.size_on_disk().ok(),
            // Unknown while the records are counted again after a crash.
            live_bytes: inner.size.is_ready().then(|| inner.size.used()),
            max_size: Some(inner.size.max()),
            flushes: f.flushes,
            durable_writes: f.writes,
        }
    }
}
