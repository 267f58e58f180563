//! The `Store` operations on Redis: one script per operation.

use super::*;
use crate::store::{StoreAdmin, StoreUpkeep};

impl RedisStore {
    /// The claim itself (see `Store::claim`).
    async fn claim_or_write(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let s = &*self.inner;
        let (record_key, index) = (s.names.record(key), s.names.index(&key.id));
        let scope = hex::encode(key.scope);
        let mut floor = 0;
        // A takeover may need a block above the lapsed claim's token: two tries are enough (the
        // fresh block starts above it), the third guards against a counter that keeps going back.
        for _ in 0..3 {
            let token = s.token(floor).await?;
            let live = s.live_token(key).map(|t| t.to_string()).unwrap_or_default();
            let mut inv = s.scripts.claim.call();
            inv.key(&record_key)
                .key(&index)
                .arg(ms(lease).max(1))
                .arg(token)
                .arg(live)
                .arg(s.pin())
                .arg(&scope)
                .arg(&fp.0[..])
                .arg(ms(s.expiry_margin));
            // From here until the claim is returned, a drop (the client went away) or a failed
            // write may leave a claim in Redis that nothing acts on: it is released by its token.
            let mut sent = ReleaseOnDrop {
                inner: &self.inner,
                key: *key,
                token,
                armed: true,
            };
            let (reply, unacked) = match s.conn.write(&inv).await? {
                Written::Acked(v) => (strings(v)?, None),
                Written::Unacked { value, got } => (strings(value)?, Some(got)),
            };
            sent.armed = reply.first().map(Vec::as_slice) == Some(b"claimed");
            match reply.first().map(Vec::as_slice) {
                Some(b"claimed") => {
                    if let Some(got) = unacked {
                        // Not acknowledged by enough replicas: a failover could lose it, so the proxy
                        // must not act on it. Freed again where possible (else it lapses at its
                        // deadline).
                        let _ = s.release_token(key, token).await;
                        sent.armed = false;
                        return Err(s.conn.unacked(got));
                    }
                    s.own(key, token, lease);
                    sent.armed = false;
                    return Ok(ClaimOutcome::Claimed { token });
                }
                Some(b"low") => {
                    floor = num(reply.get(1).map_or(&[][..], Vec::as_slice))?;
                }
                Some(b"rec") if reply.len() == 9 => {
                    let now = num(&reply[1])?;
                    return match record(&reply[2..])? {
                        Some(Record::InFlight(f)) => Ok(ClaimOutcome::InFlight {
                            fingerprint: f.fingerprint,
                            retry_after: retry_after(f.deadline_ms, now),
                        }),
                        Some(Record::Completed(c)) => Ok(ClaimOutcome::Completed(c)),
                        None => Err(unexpected("claim answered an empty record")),
                    };
                }
                _ => return Err(unexpected("claim")),
            }
        }
        Err(other_err(
            "no fencing token above the lapsed claim's could be drawn".into(),
        ))
    }
}

/// A claim sent to Redis and not yet returned to its caller. Nothing has acted on it, so if the
/// `claim` call is dropped (the client went away) or its write fails, it is released by its token
/// from a task of its own: a no-op if the claim was never written. If that cannot reach Redis,
/// the claim, which has no owner renewing it, ends with its lease.
struct ReleaseOnDrop<'a> {
    inner: &'a Arc<Inner>,
    key: StoreKey,
    token: u64,
    armed: bool,
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (inner, key, token) = (Arc::clone(self.inner), self.key, self.token);
            rt.spawn(async move {
                let _ = inner.release_token(&key, token).await;
            });
        }
    }
}

impl Inner {
    /// Frees `key` if `token` still holds it (see `Store::release`).
    pub(super) async fn release_token(
        &self,
        key: &StoreKey,
        token: u64,
    ) -> Result<Committed, StoreError> {
        let mut inv = self.scripts.release.call();
        inv.key(self.names.record(key))
            .key(self.names.index(&key.id))
            .arg(token)
            .arg(hex::encode(key.scope))
            .arg(self.names.channel(key));
        if int(self.conn.write_retrying(&inv).await?)? != 1 {
            return Ok(Committed::Stale);
        }
        self.watchers.notify(key);
        Ok(Committed::Done)
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        match self.claim_or_write(key, fp, lease).await {
            // Redis refuses writes once `maxmemory` is reached (noeviction), and a claim writes (its
            // token, and the record if the key is new). Retries are still answered from a read:
            // replays and 409s go on, and only a new key gets `store-full`.
            Err(StoreError::Full(why)) => match self.lookup(key).await {
                Ok(Some(Record::Completed(c))) => Ok(ClaimOutcome::Completed(c)),
                Ok(Some(Record::InFlight(f))) => Ok(ClaimOutcome::InFlight {
                    fingerprint: f.fingerprint,
                    retry_after: Duration::from_secs(1),
                }),
                Ok(None) | Err(_) => Err(StoreError::Full(why)),
            },
            other => other,
        }
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        // The owner is done whatever happens next: if the write fails, the claim lapses at its deadline.
        s.disown(token);
        let response = Record::Completed(Completed {
            created_ms: 0,
            expires_ms: 0,
            fingerprint: Fingerprint([0; 32]),
            status: result.status,
            headers: result.headers,
            body: result.body,
            body_omitted: result.body_omitted,
            seen_only: result.seen_only,
        })
        .encode();
        let mut inv = s.scripts.complete.call();
        inv.key(s.names.record(key))
            .key(s.names.index(&key.id))
            .arg(token)
            .arg(ms(ttl))
            .arg(s.pin())
            .arg(response)
            .arg(hex::encode(key.scope))
            .arg(s.names.channel(key));
        if int(s.conn.write_retrying(&inv).await?)? != 1 {
            return Ok(Committed::Stale);
        }
        // Waiters in this process need not wait for the round trip through pub/sub.
        s.watchers.notify(key);
        Ok(Committed::Done)
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        let s = &*self.inner;
        s.disown(token);
        s.release_token(key, token).await
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.inner.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        // Renewals stop: the claim now lives only until its deadline, as if this process had died.
        self.inner.disown(token);
    }
}

#[async_trait]
impl StoreAdmin for RedisStore {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.lookup.call();
        inv.key(s.names.record(key)).arg(s.pin());
        let reply = strings(s.conn.eval(&inv).await?)?;
        if reply.len() != 9 {
            return Err(unexpected("lookup"));
        }
        let now = num(&reply[1])?;
        Ok(record(&reply[2..])?
            .filter(|r| !matches!(r, Record::Completed(c) if c.expires_ms <= now)))
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.list.call();
        inv.key(s.names.index(id))
            .arg(s.pin())
            .arg(s.names.record_prefix(id));
        let reply = strings(s.conn.eval(&inv).await?)?;
        let Some((now, entries)) = reply.split_first() else {
            return Err(unexpected("list"));
        };
        let now = num(now)?;
        if entries.len() % 8 != 0 {
            return Err(unexpected("list entries"));
        }
        let mut out = Vec::with_capacity(entries.len() / 8);
        for entry in entries.chunks_exact(8) {
            let mut key = StoreKey {
                id: *id,
                scope: [0; 32],
            };
            hex::decode_to_slice(&entry[0], &mut key.scope)
                .map_err(|_| corrupt("scope in a redis index"))?;
            match record(&entry[1..])? {
                Some(Record::Completed(c)) if c.expires_ms <= now => {}
                Some(rec) => out.push((key, rec)),
                None => {}
            }
        }
        out.sort_by_key(|e| e.0);
        Ok(out)
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let s = &*self.inner;
        let mut inv = s.scripts.purge.call();
        inv.key(s.names.index(id))
            .arg(s.names.record_prefix(id))
            .arg(s.names.channel_prefix(id));
        let scopes = strings(s.conn.write_acked(&inv).await?)?;
        for scope in &scopes {
            let mut key = StoreKey {
                id: *id,
                scope: [0; 32],
            };
            if hex::decode_to_slice(scope, &mut key.scope).is_ok() {
                s.watchers.notify(&key);
            }
        }
        Ok(scopes.len() as u64)
    }
}

#[async_trait]
impl StoreUpkeep for RedisStore {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        // Redis expires every key by itself (see the module docs).
        Ok(SweepStats::default())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Writes are acknowledged by Redis; their durability is its `appendfsync` setting.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.conn.ping().await
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}
