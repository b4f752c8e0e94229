//! PostgreSQL: a new, empty database per test on the server `.ci/run` starts.

use crate::*;

/// A new, empty PostgreSQL database on the server `CACHE_TEST_POSTGRES_URL` names (which
/// `.ci/run` starts), for one test: its URL. `None` (with a note) when the variable is unset;
/// in CI that fails the test.
pub async fn postgres_database() -> Option<String> {
    let Ok(server) = std::env::var("CACHE_TEST_POSTGRES_URL") else {
        assert!(!in_ci(), "CACHE_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it");
        eprintln!("skipping: CACHE_TEST_POSTGRES_URL is not set");
        return None;
    };
    let (client, connection) =
        tokio_postgres::connect(&server, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let name = format!(
        "lc_e2e_{}_{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000_000_000
    );
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create a test database");
    let (base, _) = server.rsplit_once('/').expect("a URL naming a database");
    Some(format!("{base}/{name}"))
}
