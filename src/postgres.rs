//! PostgreSQL for the tests: a database of their own, and the demo server as a real process.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use idempotency_actix::{PostgresStore, PostgresStoreBuilder};
use sqlx::{Connection, PgConnection};

pub use crate::test_database::postgres_url_or_skip;

/// A database created for one test on the server at `server_url`, dropped (connections and
/// all) when this is dropped.
#[derive(Debug)]
pub struct FreshDatabase {
    server_url: String,
    name: String,
}

impl FreshDatabase {
    /// Creates it.
    pub async fn create(server_url: &str, test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!(
            "t_{}_{}_{nanos}",
            test.chars().take(30).collect::<String>(),
            std::process::id()
        )
        .to_ascii_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let mut connection = PgConnection::connect(server_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {server_url}: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        Self {
            server_url: server_url.to_owned(),
            name,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        match self.server_url.rsplit_once('/') {
            Some((server, _database)) => format!("{server}/{}", self.name),
            None => format!("{}/{}", self.server_url, self.name),
        }
    }

    /// A store on it, with its schema (20 connections: enough for the concurrent tests).
    pub async fn store(&self) -> PostgresStore {
        self.store_with(|builder| builder.max_connections(20)).await
    }

    /// A store on it configured by `configure`, with its schema.
    pub async fn store_with(
        &self,
        configure: impl FnOnce(PostgresStoreBuilder) -> PostgresStoreBuilder,
    ) -> PostgresStore {
        let store = configure(PostgresStore::builder(&self.url()))
            .build()
            .unwrap_or_else(|e| panic!("store: {e}"));
        store
            .ensure_schema()
            .await
            .unwrap_or_else(|e| panic!("schema: {e}"));
        store
    }

    /// Runs one statement that returns a number (a count, say).
    pub async fn number(&self, statement: &str) -> i64 {
        let mut connection = PgConnection::connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        sqlx::query_scalar(statement)
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"))
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        // Drop cannot await: a thread with a runtime of its own drops the database.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut connection = PgConnection::connect(&server_url)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut connection)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "could not drop the test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

/// The demo server of `cargo run --example orders` as a real process (the `orders_demo` binary,
/// `env!("CARGO_BIN_EXE_orders_demo")` in a test), with the given environment, on a free port;
/// killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct DemoProcess {
    child: Child,
    address: String,
}

impl DemoProcess {
    /// Starts it and waits until it listens.
    pub fn start(binary: &str, environment: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        command
            .env("BIND", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .envs(environment.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("the demo server: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("the demo server has no stdout"));
        let mut lines = BufReader::new(stdout).lines();
        let address = lines
            .find_map(|line| {
                line.ok()?
                    .strip_prefix("listening on http://")
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("the demo server stopped before it listened"));
        Self { child, address }
    }

    /// The URL of `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Sends it SIGTERM (a graceful shutdown) without waiting for it to exit.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(
            sent.is_ok_and(|status| status.success()),
            "kill -TERM failed"
        );
    }

    /// Waits until it exited; whether it exited successfully.
    pub fn wait(&mut self) -> bool {
        self.child.wait().is_ok_and(|status| status.success())
    }

    /// Kills it with SIGKILL: no shutdown, no cleanup.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ten concurrent requests with one key, spread over `demos`: exactly one creates an order
/// (the others get 409 or its replay), and the demos count one order.
pub async fn duplicates_over_demos_create_one_order(demos: &[DemoProcess], key: &str) {
    let answers = futures_util::future::join_all((0..10).map(|n| {
        let url = demos[n % demos.len()].url("/orders");
        async move {
            crate::post_keyed(
                &crate::work::fresh_client(),
                &url,
                key,
                r#"{"item":"book"}"#,
            )
            .await
        }
    }))
    .await;
    crate::the_one_created(&answers);
    assert_eq!(crate::order_count(&demos[0].url("/orders/count")).await, 1);
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
