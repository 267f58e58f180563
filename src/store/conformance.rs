//! One test suite, run against every [`Store`] implementation: the state machine of `store/mod.rs`,
//! fencing, leases, TTL, sweeping, watches, and a model-based random test against a plain model.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use proptest::prelude::*;

use super::{
    memory::MemoryStore, sled::open_default, ClaimOutcome, Committed, NewResult, Record, Store,
};
use crate::{
    clock::{Clock, ManualClock},
    config::SyncPolicy,
    key::{Fingerprint, StoreKey},
};

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

fn key(n: u8, scope: u8) -> StoreKey {
    StoreKey {
        id: [n; 32],
        scope: [scope; 32],
    }
}

fn result(body: &'static str) -> NewResult {
    NewResult {
        status: 201,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(body.as_bytes()),
        body_omitted: false,
        seen_only: false,
    }
}

/// A fresh store of each kind, with its clock; the tempdir lives as long as the store.
type Fixture = (Arc<dyn Store>, Arc<ManualClock>, Option<tempfile::TempDir>);

fn stores() -> Vec<Fixture> {
    let mut out: Vec<Fixture> = Vec::new();
    let c = Arc::new(ManualClock::new(1_000_000));
    out.push((Arc::new(MemoryStore::new(c.clone())), c, None));
    for sync in [SyncPolicy::Always, SyncPolicy::Periodic] {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(ManualClock::new(1_000_000));
        let s = open_default(dir.path(), sync, c.clone()).unwrap();
        out.push((Arc::new(s), c, Some(dir)));
    }
    out
}

fn token(o: ClaimOutcome) -> u64 {
    match o {
        ClaimOutcome::Claimed { token } => token,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

#[tokio::test]
async fn claim_complete_replay() {
    for (s, _, _d) in stores() {
        let k = key(1, 0);
        let fp = Fingerprint([9; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::InFlight {
                fingerprint,
                retry_after,
            } => {
                assert_eq!(fingerprint, fp);
                assert_eq!(retry_after, LEASE);
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        assert_eq!(
            s.complete(&k, t, result("a"), TTL).await.unwrap(),
            Committed::Done
        );
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::Completed(c) => {
                assert_eq!(c.body, Bytes::from_static(b"a"));
                assert_eq!(c.fingerprint, fp);
                assert_eq!(c.status, 201);
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        // A second complete with the same token is stale: the record is no longer in flight.
        assert_eq!(
            s.complete(&k, t, result("b"), TTL).await.unwrap(),
            Committed::Stale
        );
        assert!(matches!(s.lookup(&k).await.unwrap(), Some(Record::Completed(c)) if c.body == "a"));
    }
}

#[tokio::test]
async fn release_frees_the_key_and_stale_release_does_nothing() {
    for (s, _, _d) in stores() {
        let k = key(2, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert_eq!(s.release(&k, t + 1000).await.unwrap(), Committed::Stale);
        assert!(matches!(
            s.lookup(&k).await.unwrap(),
            Some(Record::InFlight(_))
        ));
        assert_eq!(s.release(&k, t).await.unwrap(), Committed::Done);
        assert_eq!(s.lookup(&k).await.unwrap(), None);
        let t2 = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert!(t2 > t, "{}: tokens must increase", s.backend());
    }
}

#[tokio::test]
async fn live_owner_keeps_its_claim_past_the_lease() {
    for (s, clock, _d) in stores() {
        let k = key(3, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        clock.advance(LEASE.as_millis() as u64 * 5);
        match s.claim(&k, fp, LEASE).await.unwrap() {
            ClaimOutcome::InFlight { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            o => panic!("{}: {o:?}", s.backend()),
        }
        assert_eq!(s.sweep().await.unwrap().expired, 0, "{}", s.backend());
        assert_eq!(
            s.complete(&k, t, result("a"), TTL).await.unwrap(),
            Committed::Done
        );
    }
}

#[tokio::test]
async fn takeover_after_lease_and_late_owner_is_fenced() {
    for (s, clock, _d) in stores() {
        let k = key(4, 0);
        let fp = Fingerprint([1; 32]);
        let t1 = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.abandon(t1); // the owner dies
        clock.advance(LEASE.as_millis() as u64 - 1);
        assert!(matches!(
            s.claim(&k, fp, LEASE).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
        clock.advance(1);
        let t2 = token(s.claim(&k, fp, LEASE).await.unwrap());
        assert!(t2 > t1);
        // The late first owner can neither record nor release.
        assert_eq!(
            s.complete(&k, t1, result("late"), TTL).await.unwrap(),
            Committed::Stale
        );
        assert_eq!(s.release(&k, t1).await.unwrap(), Committed::Stale);
        assert_eq!(
            s.complete(&k, t2, result("taker"), TTL).await.unwrap(),
            Committed::Done
        );
        assert_eq!(
            s.complete(&k, t1, result("late"), TTL).await.unwrap(),
            Committed::Stale
        );
        match s.lookup(&k).await.unwrap() {
            Some(Record::Completed(c)) => assert_eq!(c.body, "taker"),
            o => panic!("{}: {o:?}", s.backend()),
        }
    }
}

#[tokio::test]
async fn ttl_expiry_and_sweep() {
    for (s, clock, _d) in stores() {
        let k = key(5, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.complete(&k, t, result("a"), TTL).await.unwrap();
        clock.advance(TTL.as_millis() as u64 - 1);
        assert!(s.lookup(&k).await.unwrap().is_some());
        clock.advance(1);
        // Expired but not yet swept: never replayed.
        assert_eq!(s.lookup(&k).await.unwrap(), None);
        assert!(s.list(&k.id).await.unwrap().is_empty());
        let stats = s.sweep().await.unwrap();
        assert_eq!(stats.expired, 1, "{}", s.backend());
        token(s.claim(&k, fp, LEASE).await.unwrap());
    }
}

#[tokio::test]
async fn scopes_are_separate_and_purge_takes_all() {
    for (s, _, _d) in stores() {
        let (a, b) = (key(6, 1), key(6, 2));
        let fp = Fingerprint([1; 32]);
        let ta = token(s.claim(&a, fp, LEASE).await.unwrap());
        let tb = token(s.claim(&b, fp, LEASE).await.unwrap());
        s.complete(&a, ta, result("A"), TTL).await.unwrap();
        s.complete(&b, tb, result("B"), TTL).await.unwrap();
        assert_eq!(s.list(&a.id).await.unwrap().len(), 2);
        assert!(s.list(&[7; 32]).await.unwrap().is_empty());
        assert_eq!(s.purge(&a.id).await.unwrap(), 2);
        assert_eq!(s.lookup(&a).await.unwrap(), None);
        token(s.claim(&b, fp, LEASE).await.unwrap());
    }
}

#[tokio::test]
async fn watch_fires_on_complete_and_release() {
    for (s, _, _d) in stores() {
        let k = key(8, 0);
        let fp = Fingerprint([1; 32]);
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        let mut w = s.watch(&k);
        let s2 = Arc::clone(&s);
        let done = tokio::spawn(async move { s2.complete(&k, t, result("a"), TTL).await.unwrap() });
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("watch fired");
        assert_eq!(done.await.unwrap(), Committed::Done);
        let k2 = key(9, 0);
        let t = token(s.claim(&k2, fp, LEASE).await.unwrap());
        let mut w = s.watch(&k2);
        s.release(&k2, t).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("watch fired");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_exactly_one_wins() {
    for (s, _, _d) in stores() {
        let k = key(10, 0);
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), ClaimOutcome::Claimed { .. }) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "{}", s.backend());
    }
}

#[tokio::test]
async fn sled_keeps_records_across_reopen_and_claims_survive_with_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(5_000_000));
    let (k, inflight) = (key(11, 0), key(12, 0));
    let fp = Fingerprint([1; 32]);
    {
        let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
        let t = token(s.claim(&k, fp, LEASE).await.unwrap());
        s.complete(&k, t, result("kept"), TTL).await.unwrap();
        token(s.claim(&inflight, fp, LEASE).await.unwrap());
        s.close();
    }
    let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
    assert!(
        matches!(s.claim(&k, fp, LEASE).await.unwrap(), ClaimOutcome::Completed(c) if c.body == "kept")
    );
    // The dead process's claim holds until its recorded deadline, then can be taken over.
    assert!(matches!(
        s.claim(&inflight, fp, LEASE).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(LEASE.as_millis() as u64);
    token(s.claim(&inflight, fp, LEASE).await.unwrap());
}

#[tokio::test]
async fn sweeper_keeps_disk_bounded_under_churn() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let s = open_default(dir.path(), SyncPolicy::Periodic, clock.clone()).unwrap();
    for round in 0..5u8 {
        for i in 0..200u8 {
            let k = StoreKey {
                id: [round; 32],
                scope: [i; 32],
            };
            let t = token(s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap());
            s.complete(&k, t, result("x"), Duration::from_secs(1))
                .await
                .unwrap();
        }
        clock.advance(1_000);
        let st = s.sweep().await.unwrap();
        assert_eq!(st.expired, 200);
        assert_eq!(s.len(), 0);
    }
}

/// Operations of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    Complete(u8),
    Release(u8),
    StaleComplete(u8),
    Abandon(u8),
    Advance(u16),
    Purge(u8),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Claim),
        (0u8..3).prop_map(Op::Complete),
        (0u8..3).prop_map(Op::Release),
        (0u8..3).prop_map(Op::StaleComplete),
        (0u8..3).prop_map(Op::Abandon),
        (0u16..15_000).prop_map(Op::Advance),
        (0u8..3).prop_map(Op::Purge),
        Just(Op::Sweep),
    ]
}

/// The model: per key, nothing, a claim (token, deadline, owner alive) or a result (body, expiry).
#[derive(Debug, Clone, Copy, PartialEq)]
enum M {
    Absent,
    InFlight {
        token: u64,
        deadline: u64,
        alive: bool,
    },
    Done {
        body: u8,
        expires: u64,
    },
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn model_based(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for (s, clock, _d) in stores() {
                let mut model = [M::Absent; 3];
                let mut stale = [0u64; 3];
                let mut seq = 0u8;
                for op in &ops {
                    let now = clock.now_ms();
                    match *op {
                        Op::Claim(i) => {
                            let k = key(i, 0);
                            let got = s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap();
                            let m = &mut model[i as usize];
                            let free = match *m {
                                M::Absent => true,
                                M::InFlight { deadline, alive, .. } => deadline <= now && !alive,
                                M::Done { expires, .. } => expires <= now,
                            };
                            match (free, got) {
                                (true, ClaimOutcome::Claimed { token }) => {
                                    if let M::InFlight { token: old, .. } = *m { stale[i as usize] = old; }
                                    *m = M::InFlight { token, deadline: now + LEASE.as_millis() as u64, alive: true };
                                }
                                (false, ClaimOutcome::InFlight { .. }) => assert!(matches!(m, M::InFlight { .. })),
                                (false, ClaimOutcome::Completed(c)) => {
                                    assert!(matches!(*m, M::Done { body, .. } if c.body.as_ref() == [body]));
                                }
                                (free, got) => panic!("{}: free={free} model={m:?} got={got:?}", s.backend()),
                            }
                        }
                        Op::Complete(i) | Op::StaleComplete(i) => {
                            let k = key(i, 0);
                            let m = &mut model[i as usize];
                            let t = match (op, *m) {
                                (Op::Complete(_), M::InFlight { token, .. }) => token,
                                _ => stale[i as usize],
                            };
                            seq = seq.wrapping_add(1);
                            let r = NewResult { body: Bytes::from(vec![seq]), ..result("") };
                            let got = s.complete(&k, t, r, TTL).await.unwrap();
                            let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                            assert_eq!(got == Committed::Done, want, "{}: complete {op:?} model={m:?}", s.backend());
                            if want { *m = M::Done { body: seq, expires: now + TTL.as_millis() as u64 }; }
                        }
                        Op::Release(i) => {
                            let k = key(i, 0);
                            let m = &mut model[i as usize];
                            let t = match *m { M::InFlight { token, .. } => token, _ => stale[i as usize] };
                            let got = s.release(&k, t).await.unwrap();
                            let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                            assert_eq!(got == Committed::Done, want, "{}", s.backend());
                            if want { *m = M::Absent; }
                        }
                        Op::Abandon(i) => {
                            if let M::InFlight { token, ref mut alive, .. } = model[i as usize] {
                                s.abandon(token);
                                *alive = false;
                            }
                        }
                        Op::Advance(ms) => clock.advance(u64::from(ms)),
                        Op::Purge(i) => {
                            let n = s.purge(&key(i, 0).id).await.unwrap();
                            let m = &mut model[i as usize];
                            assert_eq!(n > 0, *m != M::Absent, "{}", s.backend());
                            if let M::InFlight { token, .. } = *m { stale[i as usize] = token; }
                            *m = M::Absent;
                        }
                        Op::Sweep => {
                            s.sweep().await.unwrap();
                            for m in &mut model {
                                let gone = match *m {
                                    M::InFlight { deadline, alive, .. } => deadline <= now && !alive,
                                    M::Done { expires, .. } => expires <= now,
                                    M::Absent => false,
                                };
                                if gone { *m = M::Absent; }
                            }
                        }
                    }
                    // Reads agree with the model after every step.
                    for i in 0..3u8 {
                        let now = clock.now_ms();
                        let got = s.lookup(&key(i, 0)).await.unwrap();
                        match (model[i as usize], &got) {
                            (M::Done { body, expires }, Some(Record::Completed(c))) if expires > now => {
                                assert_eq!(c.body.as_ref(), [body]);
                            }
                            (M::Done { expires, .. }, None) if expires <= now => {}
                            (M::InFlight { token, .. }, Some(Record::InFlight(f))) => assert_eq!(f.token, token),
                            (M::Absent, None) => {}
                            (m, g) => panic!("{}: model {m:?} store {g:?} after {op:?}", s.backend()),
                        }
                    }
                }
            }
        });
    }
}
