//! Criterion micro-benchmarks of the per-request work: key derivation, fingerprinting, record
//! encoding/decoding, and a store claim + complete on sled (`sync = "periodic"` and `"always"`) and in
//! memory. Run: `cargo bench --bench hot_paths`.

#![allow(clippy::unwrap_used)] // a benchmark: a failure should stop it loudly

use std::{hint::black_box, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use idemproxy::{
    clock::SystemClock,
    config::SyncPolicy,
    key::{fingerprint, FingerprintMode, IdempotencyKey, StoreKey},
    store::{memory::MemoryStore, record::Record, sled::open_default, Completed, NewResult, Store},
};

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sk_test_1234567890"),
    );
    h
}

const BODY: &[u8] = br#"{"amount":100,"currency":"EUR","note":"bench"}"#;

fn keys(c: &mut Criterion) {
    let h = headers();
    let scope = [http::header::AUTHORIZATION];
    let fph = [http::header::CONTENT_TYPE];
    c.bench_function("key/parse+derive", |b| {
        b.iter(|| {
            let k = IdempotencyKey::from_header(black_box(b"\"run-t1-123456\"")).unwrap();
            black_box(StoreKey::derive("default", &k, &scope, &h))
        })
    });
    c.bench_function("fingerprint/raw", |b| {
        b.iter(|| {
            black_box(fingerprint(
                FingerprintMode::Raw,
                &Method::POST,
                "/pay",
                &fph,
                &h,
                black_box(BODY),
            ))
        })
    });
    c.bench_function("fingerprint/json", |b| {
        b.iter(|| {
            black_box(fingerprint(
                FingerprintMode::Json,
                &Method::POST,
                "/pay",
                &fph,
                &h,
                black_box(BODY),
            ))
        })
    });
}

fn records(c: &mut Criterion) {
    let rec = Record::Completed(Completed {
        created_ms: 1,
        expires_ms: 2,
        fingerprint: idemproxy::key::Fingerprint([7; 32]),
        status: 201,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            (
                "date".into(),
                Bytes::from_static(b"Fri, 27 Nov 2026 08:00:00 GMT"),
            ),
        ],
        body: Bytes::from(vec![b'x'; 200]),
        body_omitted: false,
        seen_only: false,
    });
    let bytes = rec.encode();
    c.bench_function("record/encode", |b| b.iter(|| black_box(rec.encode())));
    c.bench_function("record/decode", |b| {
        b.iter(|| black_box(Record::decode(black_box(&bytes)).unwrap()))
    });
}

fn result() -> NewResult {
    NewResult {
        status: 201,
        headers: vec![(
            "content-type".into(),
            Bytes::from_static(b"application/json"),
        )],
        body: Bytes::from(vec![b'x'; 200]),
        body_omitted: false,
        seen_only: false,
    }
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cases: Vec<(&str, Arc<dyn Store>, Option<tempfile::TempDir>)> = vec![(
        "memory",
        Arc::new(MemoryStore::new(Arc::new(SystemClock))),
        None,
    )];
    for (name, sync) in [
        ("sled-periodic", SyncPolicy::Periodic),
        ("sled-always", SyncPolicy::Always),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = open_default(dir.path(), sync, Arc::new(SystemClock)).unwrap();
        cases.push((name, Arc::new(s), Some(dir)));
    }
    for (name, store, _dir) in &cases {
        let mut n: u64 = 0;
        c.bench_function(&format!("store/{name}/claim+complete"), |b| {
            b.iter(|| {
                n += 1;
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&n.to_be_bytes());
                let k = StoreKey { id, scope: [0; 32] };
                rt.block_on(async {
                    let o = store
                        .claim(
                            &k,
                            idemproxy::key::Fingerprint([1; 32]),
                            Duration::from_secs(60),
                        )
                        .await
                        .unwrap();
                    let idemproxy::store::ClaimOutcome::Claimed { token } = o else {
                        panic!("{o:?}")
                    };
                    store
                        .complete(&k, token, result(), Duration::from_secs(3600))
                        .await
                        .unwrap();
                })
            })
        });
    }
}

criterion_group!(benches, keys, records, stores);
criterion_main!(benches);
