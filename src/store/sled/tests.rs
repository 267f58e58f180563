//! Unit tests of the sled backend's own machinery (the shared behaviour is in `store::conformance`).

use super::{unflushed::*, *};
use crate::clock::ManualClock;
use crate::store::StoreUpkeep;

/// Opens the store at `dir` again. sled's IO threads may hold the directory lock for a moment after
/// the last handle is dropped (there is no event to wait for): the open is retried, bounded.
fn reopen(dir: &Path, sync: SyncPolicy, clock: &Arc<ManualClock>) -> SledStore {
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open_default(dir, sync, clock.clone()) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < give_up => {
                assert!(e.to_string().contains("lock"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// A claim left by a crash (no clean close) is swept after its lease by the walk over the records.
#[tokio::test]
async fn claims_left_by_a_crash_are_swept_after_their_lease() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let key = StoreKey {
        id: [3; 32],
        scope: [4; 32],
    };
    let lease = Duration::from_secs(30);
    {
        let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
        assert!(matches!(
            s.claim(&key, Fingerprint([1; 32]), lease).await.unwrap(),
            ClaimOutcome::Claimed { .. }
        ));
        // Dropped without `close`: like a crash after the claim was made durable.
    }
    let s = reopen(dir.path(), SyncPolicy::Always, &clock);
    clock.advance(lease.as_millis() as u64 - 1);
    assert_eq!(
        s.sweep().await.unwrap().expired,
        0,
        "swept before its lease"
    );
    clock.advance(1);
    assert_eq!(s.sweep().await.unwrap().expired, 1);
    assert!(s.is_empty());
}

/// A replay waits only for the flush of its own key's result: once `complete` returned, the
/// key is off the unflushed list (nothing leaks), and the replay answers at once.
#[tokio::test]
async fn completed_results_leave_the_unflushed_list() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let s = open_default(dir.path(), SyncPolicy::Always, clock).unwrap();
    let fp = Fingerprint([1; 32]);
    for i in 0..20u8 {
        let key = StoreKey {
            id: [i; 32],
            scope: [0; 32],
        };
        let ClaimOutcome::Claimed { token } =
            s.claim(&key, fp, Duration::from_secs(30)).await.unwrap()
        else {
            panic!("not claimed")
        };
        let result = NewResult {
            status: 201,
            headers: Vec::new(),
            body: bytes::Bytes::from_static(b"ok"),
            body_omitted: false,
            seen_only: false,
        };
        let ttl = Duration::from_secs(60);
        assert_eq!(
            s.complete(&key, token, result, ttl).await.unwrap(),
            Committed::Done
        );
        assert!(s.inner().unwrap().unflushed.lock().is_empty());
        assert!(matches!(
            s.claim(&key, fp, Duration::from_secs(30)).await.unwrap(),
            ClaimOutcome::Completed(c) if c.body.as_ref() == b"ok"
        ));
    }
}

/// Two `complete`s of one key that overlap (the key was purged or expired in between) each remove
/// only their own unflushed entry, and a kept entry (failed flush) stays for the replays.
#[test]
fn unflushed_entries_belong_to_their_writer() {
    let map = UnflushedMap::default();
    let key = [7u8; 64];
    let a = Unflushed::new(&map, key, 1);
    a.covered_by(10);
    let b = Unflushed::new(&map, key, 2);
    drop(a);
    assert_eq!(map.lock().get(&key), Some(&(2, 0)), "A removed B's entry");
    b.covered_by(11);
    b.keep();
    assert_eq!(
        map.lock().get(&key),
        Some(&(2, 0)),
        "a failed flush must stay listed"
    );
    remove_if(&map, &key, |e| e == (2, 0));
    assert!(map.lock().is_empty());
}

/// Claims a fresh key; its token.
async fn claimed(s: &SledStore, id: [u8; 32]) -> u64 {
    let key = StoreKey { id, scope: [0; 32] };
    match s
        .claim(&key, Fingerprint([1; 32]), Duration::from_secs(5))
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed { token } => token,
        o => panic!("not claimed: {o:?}"),
    }
}

/// Fencing tokens grow across a reopen (and across blocks of tokens).
#[tokio::test]
async fn tokens_grow_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let mut last = 0;
    for round in 0..3u8 {
        let s = reopen(dir.path(), SyncPolicy::Periodic, &clock);
        for i in 0..3u8 {
            let token = claimed(&s, [round * 3 + i; 32]).await;
            assert!(token > last, "token {token} after {last}");
            last = token;
        }
        s.inner().unwrap().tokens.lock().used = 1 << TOKEN_BITS; // the next claim takes a new block
        let token = claimed(&s, [99 - round; 32]).await;
        assert!(token > last, "token {token} of a new block after {last}");
        last = token;
        s.close(true);
        drop(s);
    }
}

/// The walk resumes where the last sweep stopped and wraps around, so every record is reached
/// even when one sweep cannot look at them all.
#[tokio::test]
async fn the_sweep_walk_resumes_and_wraps_around() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let s = open_default(dir.path(), SyncPolicy::Periodic, clock.clone()).unwrap();
    let ttl = Duration::from_secs(1);
    let n = SWEEP_BATCH + SWEEP_BATCH / 2;
    for i in 0..n as u32 {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let key = StoreKey { id, scope: [0; 32] };
        let ClaimOutcome::Claimed { token } =
            s.claim(&key, Fingerprint([1; 32]), ttl).await.unwrap()
        else {
            panic!("not claimed")
        };
        let result = NewResult {
            status: 200,
            headers: Vec::new(),
            body: bytes::Bytes::new(),
            body_omitted: false,
            seen_only: true,
        };
        s.complete(&key, token, result, ttl).await.unwrap();
    }
    clock.advance(1_000);
    let first = s.sweep().await.unwrap();
    assert_eq!((first.scanned, first.expired), (SWEEP_BATCH, SWEEP_BATCH));
    let second = s.sweep().await.unwrap();
    assert_eq!(second.expired, n - SWEEP_BATCH);
    assert!(s.is_empty());
}

/// A result larger than a log item may be is kept in chunks: replayed whole, never written to one of
/// sled's blob files (a failed blob write wedges sled for good), and its bytes are counted against
/// `max_size` and freed by the sweeper (no chunk left behind).
#[tokio::test]
async fn large_results_are_chunked_counted_and_swept_whole() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
    let key = StoreKey {
        id: [5; 32],
        scope: [0; 32],
    };
    let fp = Fingerprint([1; 32]);
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let ClaimOutcome::Claimed { token } = s.claim(&key, fp, Duration::from_secs(30)).await.unwrap()
    else {
        panic!("not claimed")
    };
    let result = NewResult {
        status: 200,
        headers: vec![("content-type".into(), bytes::Bytes::from_static(b"x/y"))],
        body: bytes::Bytes::from(body.clone()),
        body_omitted: false,
        seen_only: false,
    };
    let ttl = Duration::from_secs(60);
    s.complete(&key, token, result, ttl).await.unwrap();
    let used = s.stats().live_bytes.unwrap();
    assert!(used > 3_000_000, "chunks counted: {used}");
    let replay = |s: SledStore| async move {
        match s.claim(&key, fp, Duration::from_secs(30)).await.unwrap() {
            ClaimOutcome::Completed(c) => c,
            o => panic!("not a replay: {o:?}"),
        }
    };
    let a = replay(s.clone()).await;
    let b = replay(s.clone()).await;
    assert_eq!(a.body, body);
    assert_eq!(
        a.body.as_ptr(),
        b.body.as_ptr(),
        "two replays share one copy"
    );
    s.flush().await.unwrap();
    let blobs = std::fs::read_dir(dir.path().join("blobs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "sled wrote a blob file");
    drop((a, b));
    clock.advance(ttl.as_millis() as u64);
    assert_eq!(s.sweep().await.unwrap().expired, 1);
    assert_eq!(s.stats().live_bytes, Some(0), "every byte freed");
    assert!(s.inner().unwrap().chunks.is_empty(), "chunks left behind");
}

/// Chunks written by a `complete` that never installed its stub (a crash between the two) are
/// dropped when the store opens again.
#[tokio::test]
async fn orphan_chunks_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    {
        let s = open_default(dir.path(), SyncPolicy::Always, clock.clone()).unwrap();
        let inner = s.inner().unwrap();
        let log = |e: &super::wal::Entry<'_>| {
            inner.wal.append(e);
        };
        super::chunks::write(&inner.chunks, &log, &[9; 64], 77, &[1u8; 10_000]).unwrap();
        drop(inner);
        s.flush().await.unwrap();
        s.close(true);
    }
    let s = reopen(dir.path(), SyncPolicy::Always, &clock);
    assert!(s.inner().unwrap().chunks.is_empty());
    assert_eq!(s.stats().live_bytes, Some(0));
}

/// The `max_size` count survives a clean shutdown (saved, no scan at the next open) and a crash
/// (nothing saved, so the next open counts every record), and comes out the same both ways.
#[tokio::test]
async fn the_live_byte_count_is_exact_after_a_clean_stop_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let reopen = || reopen(dir.path(), SyncPolicy::Always, &clock);
    let s = reopen();
    for i in 0..10u8 {
        claimed(&s, [i; 32]).await;
    }
    let used = s.stats().live_bytes.unwrap();
    assert!(used > 0);
    s.close(true);
    drop(s);
    let s = reopen();
    let saved = lock_meta(&s);
    assert_eq!(s.stats().live_bytes, Some(used), "after a clean stop");
    assert!(!saved, "the saved count is taken out at open");
    claimed(&s, [42; 32]).await;
    let more = s.stats().live_bytes.unwrap();
    s.flush().await.unwrap();
    drop(s); // a crash: nothing saved
    let s = reopen();
    // Counted again in the background.
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while s.stats().live_bytes.is_none() {
        assert!(std::time::Instant::now() < give_up, "the count never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.stats().live_bytes, Some(more), "after a crash");
}

/// Whether a saved count is still in the meta tree.
fn lock_meta(s: &SledStore) -> bool {
    s.inner()
        .unwrap()
        .meta
        .get(b"live_bytes")
        .unwrap()
        .is_some()
}
