//! The model-based case: random operations on every store, each checked against a plain model of
//! the state machine.

use super::*;

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

pub fn model_based() {
    // One redis-server for all cases (a runner instead of `proptest!` so it outlives them); without
    // one, the model runs on the other stores.
    let _redis = (!skip_redis()).then(shared_redis);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        run_model(&ops);
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

fn run_model(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (s, clock, _d) in stores() {
            let mut model = [M::Absent; 3];
            let mut stale = [0u64; 3];
            let mut seq = 0u8;
            for op in ops {
                let now = clock.now_ms();
                match *op {
                    Op::Claim(i) => {
                        let k = key(i, 0);
                        let got = s.claim(&k, Fingerprint([1; 32]), LEASE).await.unwrap();
                        let m = &mut model[i as usize];
                        let free = match *m {
                            M::Absent => true,
                            M::InFlight {
                                deadline, alive, ..
                            } => deadline <= now && !alive,
                            M::Done { expires, .. } => expires <= now,
                        };
                        match (free, got) {
                            (true, ClaimOutcome::Claimed { token }) => {
                                if let M::InFlight { token: old, .. } = *m {
                                    stale[i as usize] = old;
                                }
                                *m = M::InFlight {
                                    token,
                                    deadline: now + LEASE.as_millis() as u64,
                                    alive: true,
                                };
                            }
                            (false, ClaimOutcome::InFlight { .. }) => {
                                assert!(matches!(m, M::InFlight { .. }))
                            }
                            (false, ClaimOutcome::Completed(c)) => {
                                assert!(
                                    matches!(*m, M::Done { body, .. } if c.body.as_ref() == [body])
                                );
                            }
                            (free, got) => {
                                panic!("{}: free={free} model={m:?} got={got:?}", s.backend())
                            }
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
                        let r = NewResult {
                            body: Bytes::from(vec![seq]),
                            ..result("")
                        };
                        let got = s.complete(&k, t, r, TTL).await.unwrap();
                        let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                        assert_eq!(
                            got == Committed::Done,
                            want,
                            "{}: complete {op:?} model={m:?}",
                            s.backend()
                        );
                        if want {
                            *m = M::Done {
                                body: seq,
                                expires: now + TTL.as_millis() as u64,
                            };
                        }
                    }
                    Op::Release(i) => {
                        let k = key(i, 0);
                        let m = &mut model[i as usize];
                        let t = match *m {
                            M::InFlight { token, .. } => token,
                            _ => stale[i as usize],
                        };
                        let got = s.release(&k, t).await.unwrap();
                        let want = matches!(*m, M::InFlight { token, .. } if token == t && t != 0);
                        assert_eq!(got == Committed::Done, want, "{}", s.backend());
                        if want {
                            *m = M::Absent;
                        }
                    }
                    Op::Abandon(i) => {
                        if let M::InFlight {
                            token,
                            ref mut alive,
                            ..
                        } = model[i as usize]
                        {
                            s.abandon(token);
                            *alive = false;
                        }
                    }
                    Op::Advance(ms) => clock.advance(u64::from(ms)),
                    Op::Purge(i) => {
                        let n = s.purge(&key(i, 0).id).await.unwrap();
                        let m = &mut model[i as usize];
                        assert_eq!(n > 0, *m != M::Absent, "{}", s.backend());
                        if let M::InFlight { token, .. } = *m {
                            stale[i as usize] = token;
                        }
                        *m = M::Absent;
                    }
                    Op::Sweep => {
                        s.sweep().await.unwrap();
                        // Redis expires natively, in real time (far beyond a test case): its
                        // sweep removes nothing, and reads already hide what lapsed.
                        let swept = if s.backend() == "redis" {
                            &mut [][..]
                        } else {
                            &mut model[..]
                        };
                        for m in swept {
                            let gone = match *m {
                                M::InFlight {
                                    deadline, alive, ..
                                } => deadline <= now && !alive,
                                M::Done { expires, .. } => expires <= now,
                                M::Absent => false,
                            };
                            if gone {
                                *m = M::Absent;
                            }
                        }
                    }
                }
                // Reads agree with the model after every step.
                for i in 0..3u8 {
                    let now = clock.now_ms();
                    let got = s.lookup(&key(i, 0)).await.unwrap();
                    match (model[i as usize], &got) {
                        (M::Done { body, expires }, Some(Record::Completed(c)))
                            if expires > now =>
                        {
                            assert_eq!(c.body.as_ref(), [body]);
                        }
                        (M::Done { expires, .. }, None) if expires <= now => {}
                        (M::InFlight { token, .. }, Some(Record::InFlight(f))) => {
                            assert_eq!(f.token, token)
                        }
                        (M::Absent, None) => {}
                        (m, g) => panic!("{}: model {m:?} store {g:?} after {op:?}", s.backend()),
                    }
                }
            }
        }
    });
}
