//! The Lua scripts of the Redis store (`lua/*.lua`, each one atomic step on the server, called with
//! EVALSHA; see the module docs of `store::redis` for what each does) and their compiled form.

use ::redis::Script;

const PRELUDE: &str = include_str!("lua/prelude.lua");
const CLAIM: &str = include_str!("lua/claim.lua");
const RENEW: &str = include_str!("lua/renew.lua");
const COMPLETE: &str = include_str!("lua/complete.lua");
const RELEASE: &str = include_str!("lua/release.lua");
const LOOKUP: &str = include_str!("lua/lookup.lua");
const LIST: &str = include_str!("lua/list.lua");
const PURGE: &str = include_str!("lua/purge.lua");
const TOKENS: &str = include_str!("lua/tokens.lua");

/// The scripts, compiled once per store (their SHA1 is what EVALSHA sends; a server that lost its
/// script cache, e.g. after a restart, gets the source again).
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) renew: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) lookup: Script,
    pub(super) list: Script,
    pub(super) purge: Script,
    pub(super) tokens: Script,
}

impl Scripts {
    /// `strict`: with a `#!lua` first line, so Redis 7+ enforces the rules of scripts that declare
    /// themselves (e.g. in a cluster, every key touched must hash to one slot). Redis 6 does not know
    /// that line, so the proxy sends plain scripts; tests send strict ones to prove the layout.
    pub(super) fn new(strict: bool) -> Self {
        let head = if strict { "#!lua\n" } else { "" };
        let s = |body: &str| Script::new(&format!("{head}{PRELUDE}{body}"));
        Self {
            claim: s(CLAIM),
            renew: s(RENEW),
            complete: s(COMPLETE),
            release: s(RELEASE),
            lookup: s(LOOKUP),
            list: s(LIST),
            purge: s(PURGE),
            tokens: s(TOKENS),
        }
    }
}

// === Options and names ===
