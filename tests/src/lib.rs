//! The end-to-end harness: starts the real binaries (a coordinator process, cachectl,
//! cache-worker) and real peers (the Docker engines, the AWS CLI, moto's S3 and STS,
//! PostgreSQL, Prometheus), and builds aws-sdk-s3 clients from the credentials the coordinator
//! hands out. One module a concern; everything is re-exported here, so a test names
//! `tests::DockerEngine` wherever it lives.

mod engines;
mod fault_proxy;
mod fixtures;
mod postgres;
mod processes;
mod prometheus;
mod stores;

pub use self::engines::*;
pub use self::fault_proxy::*;
pub use self::fixtures::*;
pub use self::postgres::*;
pub use self::processes::*;
pub use self::prometheus::*;
pub use self::stores::*;

/// Whether this run is CI's, where a missing peer (engine, AWS CLI) fails the test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}
