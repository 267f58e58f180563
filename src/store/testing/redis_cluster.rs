//! A real Redis Cluster for tests: `n` primaries started by [`RedisServer::start_cluster_node`] and
//! joined by `redis-cli --cluster create` (every slot assigned), ready once every node says
//! `cluster_state:ok`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use super::redis_server::RedisServer;

/// A running cluster; its nodes stop when it is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// The primaries, in the order they were created.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` nodes (at least 3: `redis-cli` refuses fewer) and builds the cluster.
    pub fn start(primaries: usize) -> RedisCluster {
        let nodes: Vec<_> = (0..primaries)
            .map(|_| RedisServer::start_cluster_node())
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create (Debian's redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(20));
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and knows every other node.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.nodes.iter().all(|n| {
                let info = n.command("CLUSTER INFO");
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://` URLs of every node (seed nodes for a client).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}", n.addr()))
            .collect()
    }
}
