//! An in-memory [`Store`]: the reference model of the state machine, for tests. Not durable.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use parking_lot::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    retry_after,
    watch::{LiveOwners, Watchers},
    ClaimOutcome, Committed, Completed, InFlight, KeyWatch, NewResult, Record, Store, StoreError,
    SweepStats,
};
use crate::store::{StoreAdmin, StoreUpkeep};
use crate::{
    clock::Clock,
    key::{Fingerprint, StoreKey},
};

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<StoreKey, Record>>,
    next_token: Mutex<u64>,
    live: LiveOwners,
    watchers: Arc<Watchers>,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    /// An empty store on the given clock.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            records: Mutex::default(),
            next_token: Mutex::new(0),
            live: LiveOwners::default(),
            watchers: Arc::default(),
            clock,
        }
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<StoreKey, Record>> {
        self.records.lock()
    }

    /// A claim is dead when its lease is over and its owner is not alive here.
    fn lapsed(&self, rec: &Record, now: u64) -> bool {
        match rec {
            Record::InFlight(f) => f.deadline_ms <= now && !self.live.contains(f.token),
            Record::Completed(c) => c.expires_ms <= now,
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = self.clock.now_ms();
        let mut records = self.records();
        match records.get(key) {
            Some(rec) if !self.lapsed(rec, now) => {
                return Ok(match rec {
                    Record::InFlight(f) => ClaimOutcome::InFlight {
                        fingerprint: f.fingerprint,
                        retry_after: retry_after(f.deadline_ms, now),
                    },
                    Record::Completed(c) => ClaimOutcome::Completed(c.clone()),
                })
            }
            _ => {}
        }
        let token = {
            let mut t = self.next_token.lock();
            *t += 1;
            *t
        };
        records.insert(
            *key,
            Record::InFlight(InFlight {
                token,
                created_ms: now,
                deadline_ms: now.saturating_add(lease.as_millis() as u64),
                fingerprint: fp,
            }),
        );
        self.live.insert(token, *key);
        Ok(ClaimOutcome::Claimed { token })
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: u64,
        result: NewResult,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        self.live.remove(token);
        let now = self.clock.now_ms();
        let mut records = self.records();
        let Some(Record::InFlight(f)) = records.get(key) else {
            return Ok(Committed::Stale);
        };
        if f.token != token {
            return Ok(Committed::Stale);
        }
        let rec = Record::Completed(Completed {
            created_ms: f.created_ms,
            expires_ms: now.saturating_add(ttl.as_millis() as u64),
            fingerprint: f.fingerprint,
            status: result.status,
            headers: result.headers,
            body: result.body,
            body_omitted: result.body_omitted,
            seen_only: result.seen_only,
        });
        records.insert(*key, rec);
        drop(records);
        self.watchers.notify(key);
        Ok(Committed::Done)
    }

    async fn release(&self, key: &StoreKey, token: u64) -> Result<Committed, StoreError> {
        self.live.remove(token);
        let mut records = self.records();
        match records.get(key) {
            Some(Record::InFlight(f)) if f.token == token => {
                records.remove(key);
                drop(records);
                self.watchers.notify(key);
                Ok(Committed::Done)
            }
            _ => Ok(Committed::Stale),
        }
    }

    fn watch(&self, key: &StoreKey) -> KeyWatch {
        self.watchers.subscribe(key)
    }

    fn abandon(&self, token: u64) {
        self.live.remove(token);
    }
}

#[async_trait]
impl StoreAdmin for MemoryStore {
    async fn lookup(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now_ms();
        Ok(self
            .records()
            .get(key)
            .filter(|r| !matches!(r, Record::Completed(c) if c.expires_ms <= now))
            .cloned())
    }

    async fn list(&self, id: &[u8; 32]) -> Result<Vec<(StoreKey, Record)>, StoreError> {
        let now = self.clock.now_ms();
        Ok(self
            .records()
            .iter()
            .filter(|(k, r)| {
                &k.id == id && !matches!(r, Record::Completed(c) if c.expires_ms <= now)
            })
            .map(|(k, r)| (*k, r.clone()))
            .collect())
    }

    async fn purge(&self, id: &[u8; 32]) -> Result<u64, StoreError> {
        let keys: Vec<StoreKey> = self
            .records()
            .keys()
            .filter(|k| &k.id == id)
            .copied()
            .collect();
        let mut records = self.records();
        for k in &keys {
            records.remove(k);
        }
        drop(records);
        for k in &keys {
            self.watchers.notify(k);
        }
        Ok(keys.len() as u64)
    }
}

#[async_trait]
impl StoreUpkeep for MemoryStore {
    async fn sweep(&self) -> Result<SweepStats, StoreError> {
        let now = self.clock.now_ms();
        let mut records = self.records();
        let before = records.len();
        records.retain(|_, r| !self.lapsed(r, now));
        Ok(SweepStats {
            expired: (before - records.len()) as u64,
            scanned: before as u64,
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
