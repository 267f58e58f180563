//! The store conformance suite (`idemproxy::store::testing::conformance`), run against every backend:
//! the in-memory store, sled with `sync = "always"` and `"periodic"`, and Redis on a real
//! `redis-server` (its cases are skipped, and say so, when `redis-server` is not on the PATH).

use idemproxy::store::testing::conformance as suite;

/// One test per case of the suite.
macro_rules! cases {
    ($flavor:tt: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test $flavor]
            async fn $name() {
                suite::$name().await;
            }
        )*
    };
}

cases! {
    (flavor = "current_thread"):
    claim_complete_replay,
    release_frees_the_key_and_stale_release_does_nothing,
    live_owner_keeps_its_claim_past_the_lease,
    takeover_after_lease_and_late_owner_is_fenced,
    ttl_expiry_and_sweep,
    scopes_are_separate_and_purge_takes_all,
    watch_fires_on_complete_and_release,
    sled_keeps_records_across_reopen_and_claims_survive_with_their_deadline,
    sweeper_keeps_disk_bounded_under_churn,
    a_claim_dropped_before_it_returns_leaves_the_key_free,
}

cases! {
    (flavor = "multi_thread", worker_threads = 4):
    concurrent_claimers_exactly_one_wins,
}

cases! {
    (flavor = "multi_thread", worker_threads = 2):
    redis_live_owner_renews_and_a_dead_owner_is_taken_over_by_another_replica,
    redis_concurrent_claimers_on_two_replicas_exactly_one_wins,
    redis_watch_fires_when_another_replica_completes_releases_or_purges,
    redis_records_carry_a_native_expiry_and_ttls_use_the_server_clock,
    redis_outage_fails_fast_then_recovers_and_wakes_waiters,
    redis_every_script_stays_in_one_cluster_slot,
    redis_a_claim_dropped_while_redis_holds_it_is_released,
}

#[test]
fn model_based() {
    suite::model_based();
}
