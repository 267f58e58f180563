//! The Lua scripts of the Redis store (`lua/*.lua`, each one atomic step on the server, called with
//! EVALSHA; see the module docs of `store::redis` for what each does) and their compiled form.

use ::redis::{Cmd, Script, ToRedisArgs};

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
    pub(super) claim: Lua,
    pub(super) renew: Lua,
    pub(super) complete: Lua,
    pub(super) release: Lua,
    pub(super) lookup: Lua,
    pub(super) list: Lua,
    pub(super) purge: Lua,
    pub(super) tokens: Lua,
}

/// One script: its source and its SHA1.
#[derive(Debug)]
pub(super) struct Lua {
    source: String,
    script: Script,
}

impl Lua {
    fn new(source: String) -> Self {
        Self {
            script: Script::new(&source),
            source,
        }
    }

    /// A call of this script, keys and arguments to follow.
    pub(super) fn call(&self) -> Call<'_> {
        Call::new(&self.script, &self.source)
    }
}

impl Scripts {
    /// `strict`: with a `#!lua` first line, so Redis 7+ enforces the rules of scripts that declare
    /// themselves (e.g. in a cluster, every key touched must hash to one slot). Redis 6 does not know
    /// that line, so the proxy sends plain scripts; tests send strict ones to prove the layout.
    pub(super) fn new(strict: bool) -> Self {
        let head = if strict { "#!lua\n" } else { "" };
        let s = |body: &str| Lua::new(format!("{head}{PRELUDE}{body}"));
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

/// One call of a script: its keys and arguments, sent as `EVALSHA` (alone, or in a pipeline with
/// `WAIT`, see `Conn::write`); a server that does not know the script gets its source first.
pub(super) struct Call<'a> {
    script: &'a Script,
    source: &'a str,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    pub(super) fn new(script: &'a Script, source: &'a str) -> Self {
        Self {
            script,
            source,
            keys: Vec::with_capacity(2),
            args: Vec::with_capacity(8),
        }
    }

    pub(super) fn key(&mut self, k: impl ToRedisArgs) -> &mut Self {
        self.keys.extend(k.to_redis_args());
        self
    }

    pub(super) fn arg(&mut self, a: impl ToRedisArgs) -> &mut Self {
        self.args.extend(a.to_redis_args());
        self
    }

    /// `EVALSHA sha numkeys keys... args...`.
    pub(super) fn evalsha(&self) -> Cmd {
        let mut c = ::redis::cmd("EVALSHA");
        c.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            c.arg(k.as_slice());
        }
        for a in &self.args {
            c.arg(a.as_slice());
        }
        c
    }

    /// `SCRIPT LOAD source` (after a `NOSCRIPT` answer).
    pub(super) fn load(&self) -> Cmd {
        let mut c = ::redis::cmd("SCRIPT");
        c.arg("LOAD").arg(self.source);
        c
    }
}
