//! Key and channel names of the Redis store (the layout is in the module docs of `store::redis`).

use super::*;

/// Key and channel names (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct Names {
    pub(super) prefix: String,
}

impl Names {
    pub(super) fn record_prefix(&self, id: &[u8; 32]) -> String {
        format!("{}{{{}}}:", self.prefix, hex::encode(id))
    }
    pub(super) fn record(&self, key: &StoreKey) -> String {
        format!("{}{}", self.record_prefix(&key.id), hex::encode(key.scope))
    }
    pub(super) fn index(&self, id: &[u8; 32]) -> String {
        format!("{}scopes", self.record_prefix(id))
    }
    pub(super) fn channel_prefix(&self, id: &[u8; 32]) -> String {
        format!("{}changed:{}:", self.prefix, hex::encode(id))
    }
    pub(super) fn channel(&self, key: &StoreKey) -> String {
        format!("{}{}", self.channel_prefix(&key.id), hex::encode(key.scope))
    }
    pub(super) fn tokens(&self) -> String {
        format!("{}token", self.prefix)
    }
    /// The PSUBSCRIBE pattern that matches every channel of this prefix (glob characters escaped).
    pub(super) fn pattern(&self) -> String {
        let mut p = String::with_capacity(self.prefix.len() + 10);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push_str("changed:*");
        p
    }
    /// The key a channel name stands for.
    pub(super) fn parse_channel(&self, channel: &[u8]) -> Option<StoreKey> {
        let rest = channel
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b"changed:")?;
        if rest.len() != 129 || rest[64] != b':' {
            return None;
        }
        let mut key = StoreKey {
            id: [0; 32],
            scope: [0; 32],
        };
        hex::decode_to_slice(&rest[..64], &mut key.id).ok()?;
        hex::decode_to_slice(&rest[65..], &mut key.scope).ok()?;
        Some(key)
    }
}
