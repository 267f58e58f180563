//! In-process bookkeeping shared by the backends: who waits on which key, and which claims belong to
//! live owners of this process.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

use tokio::sync::watch;

use crate::key::StoreKey;

/// Per-key change notifications for waiters (`on_in_flight = "wait"`), woken in-process.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    map: Mutex<HashMap<StoreKey, watch::Sender<()>>>,
}

/// A subscription to changes of one key; see [`super::Store::watch`].
#[derive(Debug)]
pub struct KeyWatch {
    rx: watch::Receiver<()>,
    key: StoreKey,
    owner: Arc<Watchers>,
}

impl KeyWatch {
    /// Resolves once the key has changed since the subscription was made.
    pub async fn changed(&mut self) {
        // Err means the sender was dropped, which only happens after it was notified: both mean "look again".
        let _ = self.rx.changed().await;
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut map = self.owner.map.lock();
        if let Some(tx) = map.get(&self.key) {
            // Only our own channel (a newer one may have replaced it after a notify), and only when no
            // one else waits on it: this receiver and the probe are still counted here.
            let probe = tx.subscribe();
            if probe.same_channel(&self.rx) && tx.receiver_count() <= 2 {
                map.remove(&self.key);
            }
        }
    }
}

impl Watchers {
    pub(crate) fn subscribe(self: &Arc<Self>, key: &StoreKey) -> KeyWatch {
        let mut map = self.map.lock();
        let tx = map.entry(*key).or_insert_with(|| watch::channel(()).0);
        KeyWatch {
            rx: tx.subscribe(),
            key: *key,
            owner: Arc::clone(self),
        }
    }

    pub(crate) fn notify(&self, key: &StoreKey) {
        if let Some(tx) = self.map.lock().remove(key) {
            tx.send_replace(());
        }
    }

    /// Wakes every watcher (they look again). For a backend whose change notifications come from
    /// elsewhere and may have been missed, e.g. while a Redis pub/sub connection was down.
    pub(crate) fn notify_all(&self) {
        let all: Vec<_> = self.map.lock().drain().map(|(_, tx)| tx).collect();
        for tx in all {
            tx.send_replace(());
        }
    }
}

/// Claims whose owner is alive in this process: fencing token → what the backend keeps about the claim
/// (the memory store: the key it holds; the sled store: the key and the claim's stored bytes, so
/// `complete` can swap them without reading first). A claim past its lease is taken over or swept
/// only if its token is not here.
#[derive(Debug)]
pub(crate) struct LiveOwners<T = StoreKey>(Mutex<HashMap<u64, T>>);

impl<T> Default for LiveOwners<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T: Clone> LiveOwners<T> {
    pub(crate) fn insert(&self, token: u64, owner: T) {
        self.0.lock().insert(token, owner);
    }
    pub(crate) fn remove(&self, token: u64) -> Option<T> {
        self.0.lock().remove(&token)
    }
    pub(crate) fn get(&self, token: u64) -> Option<T> {
        self.0.lock().get(&token).cloned()
    }
    pub(crate) fn contains(&self, token: u64) -> bool {
        self.0.lock().contains_key(&token)
    }
    pub(crate) fn len(&self) -> usize {
        self.0.lock().len()
    }
}
