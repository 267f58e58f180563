//! Unit tests of the Redis store's names, replies and setup (the shared conformance suite runs
//! against a real `redis-server`).

use super::*;
use crate::store::StoreUpkeep;

fn names(prefix: &str) -> Names {
    Names {
        prefix: prefix.into(),
    }
}

#[test]
fn every_key_of_an_id_shares_one_hash_tag() {
    let n = names("idemproxy:");
    let k = StoreKey {
        id: [0xab; 32],
        scope: [0x01; 32],
    };
    let tag = format!("{{{}}}", hex::encode(k.id));
    for name in [n.record(&k), n.index(&k.id)] {
        assert!(name.starts_with("idemproxy:"), "{name}");
        // Redis Cluster hashes the first {…} of a key name.
        let first = &name[name.find('{').unwrap()..=name.find('}').unwrap()];
        assert_eq!(first, tag, "{name}");
    }
    assert_eq!(
        n.record(&k),
        format!("{}{}", n.record_prefix(&k.id), hex::encode(k.scope))
    );
}

#[test]
fn channels_roundtrip_and_the_pattern_is_escaped() {
    let n = names("a*b?[c]:");
    let k = StoreKey {
        id: [7; 32],
        scope: [9; 32],
    };
    assert_eq!(n.parse_channel(n.channel(&k).as_bytes()), Some(k));
    assert_eq!(
        n.channel(&k),
        format!("{}{}", n.channel_prefix(&k.id), hex::encode(k.scope))
    );
    assert_eq!(n.pattern(), r"a\*b\?\[c\]:changed:*");
    assert_eq!(n.parse_channel(b"a*b?[c]:changed:zz"), None);
    assert_eq!(
        names("other:").parse_channel(n.channel(&k).as_bytes()),
        None
    );
}

#[test]
fn bad_prefixes_urls_and_a_missing_runtime_are_errors_not_panics() {
    let open = |url: &str, prefix: &str| RedisStore::open(&RedisOptions::new(url, prefix));
    assert!(matches!(
        open("redis://127.0.0.1:1/0", "a{b}:"),
        Err(StoreError::Backend {
            backend: "redis",
            ..
        })
    ));
    // No tokio runtime here.
    assert!(open("redis://127.0.0.1:1/0", "ok:").is_err());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(open("redis://[nope", "ok:").is_err());
        // Lazy: opening succeeds with nothing listening; operations then fail fast.
        let s = open("redis://127.0.0.1:1/0", "ok:").unwrap();
        assert!(s.ping().await.is_err());
    });
}

#[test]
fn records_are_rebuilt_from_their_fields() {
    let f = |s: &[&[u8]]| s.iter().map(|b| b.to_vec()).collect::<Vec<_>>();
    let fp = [3u8; 32];
    assert_eq!(
        record(&f(&[b"f", b"7", b"10", b"20", b"", &fp, b""])).unwrap(),
        Some(Record::InFlight(InFlight {
            token: 7,
            created_ms: 10,
            deadline_ms: 20,
            fingerprint: Fingerprint(fp),
        }))
    );
    assert_eq!(
        record(&f(&[b"", b"", b"", b"", b"", b"", b""])).unwrap(),
        None
    );
    assert!(matches!(
        record(&f(&[b"x", b"", b"", b"", b"", b"", b""])),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        record(&f(&[b"c", b"1", b"2", b"", b"3", &fp, b"\x09"])),
        Err(StoreError::Corrupt(DecodeError::Version(9)))
    ));
}
