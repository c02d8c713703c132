//! A private three-node Redis Cluster for tests, started and removed by the test.
//!
//! The crate's unit tests (the store conformance suite) and the workspace's integration tests
//! (which include this very file) both use it, so it needs nothing but the standard library.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const NODES: usize = 3;

/// Three `redis-server --cluster-enabled yes` on free ports, in a temporary directory, joined
/// into one cluster (every slot served, no replicas). Dropping it kills the servers and removes
/// the directory.
#[derive(Debug)]
pub struct PrivateRedisCluster {
    ports: Vec<u16>,
    /// The nodes' TLS ports, for a cluster started with [`start_tls`](Self::start_tls).
    tls_ports: Vec<u16>,
    servers: Vec<Child>,
    dir: PathBuf,
}

/// The files a TLS cluster's nodes use: their certificate and key (valid for `127.0.0.1`, as
/// server and as client, since the nodes talk TLS to each other too) and the CA that signed it.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The nodes' certificate (PEM).
    pub certificate: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM).
    pub ca: PathBuf,
}

impl PrivateRedisCluster {
    /// Whether `redis-server` and `redis-cli` are installed.
    pub fn available() -> bool {
        ["redis-server", "redis-cli"].iter().all(|program| {
            Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success())
        })
    }

    /// Starts a cluster for `test`, or returns `None` after a loud message when `redis-server`
    /// or `redis-cli` is missing. Under `IDEMPOTENCY_REQUIRE_REDIS=1` a missing Redis fails the
    /// test instead; a cluster that does not come up always does.
    pub fn start_or_skip(test: &str) -> Option<Self> {
        if !Self::available() {
            if std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("{test}: IDEMPOTENCY_REQUIRE_REDIS=1 but redis-server or redis-cli is not installed");
            }
            eprintln!(
                "\n*** SKIPPED {test}: no redis-server/redis-cli to start a Redis Cluster ***\n"
            );
            return None;
        }
        match Self::start() {
            Ok(cluster) => Some(cluster),
            Err(error) => panic!("{test}: the private Redis Cluster did not start: {error}"),
        }
    }

    /// Starts the three nodes, creates the cluster with `redis-cli --cluster create`, and waits
    /// until every node reports `cluster_state:ok`. A port taken between being found free and
    /// being bound is retried with other ports.
    pub fn start() -> io::Result<Self> {
        Self::start_with(None)
    }

    /// As [`start`](Self::start), with every node on a TLS port too (`tls-cluster yes`: the
    /// cluster bus is TLS, and clients that connect with TLS are told the TLS ports).
    pub fn start_tls(tls: &ClusterTls) -> io::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ClusterTls>) -> io::Result<Self> {
        let mut last_error = io::Error::other("never tried");
        for _ in 0..3 {
            match Self::start_once(tls) {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    fn start_once(tls: Option<&ClusterTls>) -> io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "idempotency-redis-cluster-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Self {
            ports: Vec::new(),
            tls_ports: Vec::new(),
            servers: Vec::new(),
            dir,
        };
        // Client, cluster-bus and TLS ports, all free at once (the listeners are held until
        // then).
        let listeners = (0..NODES * 3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|address| address.port()))
            .collect::<io::Result<Vec<_>>>()?;
        drop(listeners);
        for ports in ports.chunks(3) {
            let (port, bus, tls_port) = (ports[0], ports[1], ports[2]);
            let config = cluster.dir.join(format!("nodes-{port}.conf"));
            let log = cluster.dir.join(format!("redis-{port}.log"));
            let mut server = Command::new("redis-server");
            if let Some(tls) = tls {
                server
                    .args(["--tls-port", &tls_port.to_string(), "--tls-cluster", "yes"])
                    .arg("--tls-cert-file")
                    .arg(&tls.certificate)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]);
                cluster.tls_ports.push(tls_port);
            }
            let server = server
                .args(["--port", &port.to_string()])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(&config)
                .arg("--dir")
                .arg(&cluster.dir)
                .arg("--logfile")
                .arg(&log)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdout(Stdio::null())
                .spawn()?;
            cluster.servers.push(server);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_until(Duration::from_secs(5), || {
                Ok(command(port, &["PING"])? == "PONG")
            })?;
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !created.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            )));
        }
        for &port in &cluster.ports {
            wait_until(Duration::from_secs(20), || {
                Ok(command(port, &["CLUSTER", "INFO"])?.contains("cluster_state:ok"))
            })?;
        }
        Ok(cluster)
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The nodes' TLS URLs (`rediss://`), for a cluster started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_urls(&self) -> Vec<String> {
        self.tls_ports
            .iter()
            .map(|port| format!("rediss://127.0.0.1:{port}"))
            .collect()
    }

    /// The nodes' URLs, comma-separated (the way `IDEMPOTENCY_REDIS_CLUSTER_URLS` takes them).
    pub fn urls_joined(&self) -> String {
        self.urls().join(",")
    }

    /// The nodes' client ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> io::Result<Vec<u64>> {
        self.ports
            .iter()
            .map(|&port| {
                command(port, &["DBSIZE"])?
                    .parse()
                    .map_err(|_| io::Error::other("DBSIZE did not answer a number"))
            })
            .collect()
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Retries `ready` until it answers `true`, for at most `limit`.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> io::Result<bool>) -> io::Result<()> {
    let give_up = Instant::now() + limit;
    loop {
        let outcome = ready();
        if matches!(outcome, Ok(true)) {
            return Ok(());
        }
        if Instant::now() >= give_up {
            return Err(match outcome {
                Err(error) => error,
                Ok(_) => io::Error::new(io::ErrorKind::TimedOut, "the cluster is not ready"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one command to the node on `port` and returns its simple, integer or bulk-string
/// answer as text.
fn command(port: u16, args: &[&str]) -> io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let line = line.trim_end();
    match line.split_at_checked(1) {
        Some(("+" | ":", value)) => Ok(value.to_owned()),
        Some(("$", length)) => {
            let length: usize = length
                .parse()
                .map_err(|_| io::Error::other(format!("unexpected answer {line}")))?;
            let mut value = vec![0; length + 2];
            reader.read_exact(&mut value)?;
            value.truncate(length);
            String::from_utf8(value).map_err(io::Error::other)
        }
        _ => Err(io::Error::other(format!("unexpected answer {line}"))),
    }
}
