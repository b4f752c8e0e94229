//! PostgreSQL: a new, empty database per test on the server `.ci/run` starts, and a cluster
//! of a test's own for tests that stop and start the server.

use std::path::PathBuf;
use std::process::Command;

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

/// A PostgreSQL cluster of one test's own (Debian's binaries, run as the `postgres` user in a
/// folder it owns, on a port the kernel picked): one the test may stop with `-m immediate`
/// and start again on the same port, which the shared server must never be. Stopped when
/// dropped, and its folder removed.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivateCluster {
    /// Initialises and starts a cluster; `None` (with a note) when PostgreSQL's binaries are
    /// missing. In CI that fails the test: `.ci/run` installs them.
    pub fn start() -> Option<PrivateCluster> {
        let newest = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").is_file())
            .max_by_key(|bin| bin.parent().and_then(|version| version.file_name()?.to_str()?.parse::<u32>().ok()));
        let Some(bin) = newest else {
            assert!(
                !in_ci(),
                "PostgreSQL's binaries (/usr/lib/postgresql/*/bin/initdb) are missing: .ci/run installs them"
            );
            eprintln!("skipping: PostgreSQL's binaries are missing");
            return None;
        };
        // tempfile's folder is mode 700: the postgres user must own it.
        let dir = tempfile::Builder::new().prefix("pg.").tempdir_in("/tmp").expect("a folder for the cluster");
        must_succeed(Command::new("chown").arg("postgres").arg(dir.path()));
        let mut cluster = PrivateCluster { dir, bin, port: 0 };
        must_succeed(cluster.tool("initdb").arg("-D").arg(cluster.data()).args(["-A", "trust"]));
        // Another process may take the picked port before the server binds it: pick again.
        for attempt in 1..=5 {
            cluster.port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if cluster.pg_ctl_start() {
                return Some(cluster);
            }
            assert!(attempt < 5, "PostgreSQL did not start:\n{}", cluster.log());
        }
        unreachable!("five attempts")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as a crash would (`pg_ctl -m immediate`: no checkpoint, every session
    /// cut, unlogged tables emptied when it starts again).
    pub fn stop_immediately(&self) {
        must_succeed(self.tool("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]));
    }

    /// Starts the stopped server again on the same port (crash recovery runs first).
    pub fn start_again(&self) {
        assert!(self.pg_ctl_start(), "PostgreSQL did not start again:\n{}", self.log());
    }

    /// Freezes the server (SIGSTOP to it and its processes): connections are still accepted
    /// and what is sent acknowledged by the kernel, but nothing is answered, as from a server
    /// stuck or a host swapping to death.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Lets a frozen server run again.
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    fn signal_all(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).expect("the server runs");
        let postmaster = pid_file.lines().next().expect("a pid").trim().to_owned();
        // Its children, from /proc (`stat`'s fourth field is the parent; the second, the
        // command, is in parentheses and may hold spaces).
        let children: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|entry| {
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                (parent == postmaster).then(|| entry.file_name().to_string_lossy().into_owned())
            })
            .collect();
        must_succeed(Command::new("kill").arg(format!("-{signal}")).arg(&postmaster).args(&children));
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// One of PostgreSQL's programs, run as the `postgres` user (it refuses root).
    fn tool(&self, name: &str) -> Command {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(self.bin.join(name));
        command
    }

    fn pg_ctl_start(&self) -> bool {
        let options = format!("-k {} -p {} -c listen_addresses=127.0.0.1", self.dir.path().display(), self.port);
        let mut command = self.tool("pg_ctl");
        command.arg("-D").arg(self.data()).args(["-w", "-t", "60", "-l"]).arg(self.dir.path().join("log"));
        command.args(["-o", &options, "start"]);
        command.output().is_ok_and(|output| output.status.success())
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if std::fs::exists(self.data().join("postmaster.pid")).unwrap_or(false) {
            let _ = std::panic::catch_unwind(|| self.thaw());
        }
        let _ = self.tool("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]).output();
    }
}

/// Runs `command`; a failure fails the test with its output.
fn must_succeed(command: &mut Command) {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
