//! A real `redis-server` for tests: the crate's own launcher (`store::testing`, under the `testing`
//! feature, which the tests always have).

pub use idemproxy::store::testing::redis_server::*;
