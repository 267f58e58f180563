//! Live owners of this process: fencing-token blocks, the claims held, and the renewal task that keeps
//! each claim's lease.

use super::*;

impl Inner {
    pub(super) fn pin(&self) -> String {
        pin_arg(self.pin.as_ref())
    }

    /// The next fencing token, larger than `floor`.
    pub(super) async fn token(&self, floor: u64) -> Result<u64, StoreError> {
        let mut t = self.tokens.lock().await;
        if t.next == 0 || t.next > t.last || t.next <= floor {
            let mut inv = self.scripts.tokens.call();
            inv.key(self.names.tokens())
                .arg(TOKEN_BLOCK)
                .arg(floor.max(t.high));
            let last = num(&bytes(self.conn.write_acked(&inv).await?)?)?;
            t.next = last.saturating_sub(TOKEN_BLOCK) + 1;
            t.last = last;
        }
        let token = t.next;
        t.next += 1;
        t.high = t.high.max(token);
        Ok(token)
    }

    /// Starts renewing the lease of a fresh claim.
    pub(super) fn own(&self, key: &StoreKey, token: u64, lease: Duration) {
        let renewal = Renewal {
            conn: self.conn.clone(),
            scripts: Arc::clone(&self.scripts),
            record: self.names.record(key),
            index: self.names.index(&key.id),
            token,
            lease,
            margin_ms: ms(self.expiry_margin),
            pin: self.pin.clone(),
        };
        let task = tokio::spawn(renewal.run());
        let mut owners = self.owners.lock();
        owners.by_key.insert(*key, token);
        owners.by_token.insert(token, (*key, task.abort_handle()));
    }

    pub(super) fn disown(&self, token: u64) {
        self.owners.lock().remove(token);
    }

    pub(super) fn live_token(&self, key: &StoreKey) -> Option<u64> {
        self.owners.lock().by_key.get(key).copied()
    }
}

/// The task that keeps a live owner's claim: pushes its deadline every `lease / 3`.
pub(super) struct Renewal {
    pub(super) conn: Conn,
    pub(super) scripts: Arc<Scripts>,
    pub(super) record: String,
    pub(super) index: String,
    pub(super) token: u64,
    pub(super) lease: Duration,
    pub(super) margin_ms: u64,
    pub(super) pin: Option<Arc<dyn Clock>>,
}

impl Renewal {
    pub(super) async fn run(self) {
        let every = (self.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let mut inv = self.scripts.renew.call();
            inv.key(&self.record)
                .key(&self.index)
                .arg(self.token)
                .arg(ms(self.lease))
                .arg(pin_arg(self.pin.as_ref()))
                .arg(self.margin_ms);
            match self.conn.write_acked(&inv).await.and_then(int) {
                Ok(1) => {}
                Ok(_) => {
                    tracing::debug!(
                        token = self.token,
                        "claim no longer held (taken over, purged or expired): renewal stops"
                    );
                    return;
                }
                // Keep trying: the lease still has two renewals' worth of time left.
                Err(e) => tracing::warn!(token = self.token, error = %e, "could not renew a lease"),
            }
        }
    }
}
