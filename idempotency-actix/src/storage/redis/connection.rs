//! Where the store's commands go: one Redis server, or a Redis Cluster.

use std::time::Duration;

use redis::{
    aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture,
    RedisResult, Value,
};

/// A connection to the store's Redis: commands on one key go to the node that owns the key.
#[derive(Clone)]
pub(super) enum Connection {
    /// One server, through a connection manager that reconnects after a failure.
    Node(ConnectionManager),
    /// A cluster: each command goes to the node owning its key's hash slot, following
    /// `MOVED`/`ASK` redirections; nodes are reconnected after a failure.
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(connection) => connection.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(connection) => connection.get_db(),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Certificates for `rediss://` beyond the platform's roots: a private CA, a client
/// certificate for mutual TLS.
#[derive(Clone, Default)]
pub(super) struct Certificates {
    #[cfg(feature = "redis-tls")]
    pub(super) given: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A client key must not reach a log.
        #[cfg(feature = "redis-tls")]
        if self.given.is_some() {
            return f.write_str("Certificates(given)");
        }
        f.write_str("Certificates(platform)")
    }
}

impl Certificates {
    /// The connection to `node`, with these certificates when it is a TLS one.
    fn applied_to(&self, node: ConnectionInfo) -> RedisResult<ConnectionInfo> {
        #[cfg(feature = "redis-tls")]
        if let Some(given) = &self.given {
            if !matches!(node.addr, redis::ConnectionAddr::TcpTls { .. }) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "TLS certificates were given for a URL without TLS (use rediss://)",
                )));
            }
            return Client::build_with_tls(node, given.clone())
                .map(|client| client.get_connection_info().clone());
        }
        Ok(node)
    }
}

/// What the store connects to, checked when the store is built.
#[derive(Clone)]
pub(super) enum Target {
    Node(ConnectionInfo),
    #[cfg(feature = "redis-cluster")]
    Cluster(Vec<ConnectionInfo>, Certificates),
    /// A connection the application made and handed over: the store makes none of its own,
    /// so it has no subscriber, and waiting duplicates poll.
    Given(Connection),
}

/// How long connecting and each command may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) connection: Duration,
    pub(super) response: Duration,
}

impl Target {
    pub(super) fn node(url: &str, certificates: &Certificates) -> RedisResult<Self> {
        certificates
            .applied_to(url.into_connection_info()?)
            .map(Self::Node)
    }

    #[cfg(feature = "redis-cluster")]
    pub(super) fn cluster<I, S>(urls: I, certificates: &Certificates) -> RedisResult<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes = urls
            .into_iter()
            .map(|url| url.as_ref().into_connection_info())
            .collect::<RedisResult<Vec<_>>>()?;
        if nodes.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster store needs the URL of at least one node",
            )));
        }
        for node in &nodes {
            certificates.applied_to(node.clone())?;
        }
        Ok(Self::Cluster(nodes, certificates.clone()))
    }

    /// The connection the store's commands use (the protocol the URLs ask for, RESP2 by
    /// default).
    pub(super) async fn connect(&self, timeouts: Timeouts) -> RedisResult<Connection> {
        choose_cryptography();
        match self {
            Self::Given(connection) => Ok(connection.clone()),
            Self::Node(node) => {
                let client = Client::open(node.clone())?;
                ConnectionManager::new_with_config(client, manager_settings(timeouts))
                    .await
                    .map(Connection::Node)
            }
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(nodes, certificates) => cluster_client(nodes, certificates, timeouts)
                .build()?
                .get_async_connection()
                .await
                .map(Connection::Cluster),
        }
    }

    /// A RESP3 connection whose push messages (published messages, and the library's notice of
    /// a lost connection) go to `pushes`: the store's subscriber.
    pub(super) async fn subscribe(
        &self,
        timeouts: Timeouts,
        pushes: impl AsyncPushSender,
    ) -> RedisResult<Connection> {
        choose_cryptography();
        match self {
            Self::Given(_) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a store on a connection it was given has no URL to subscribe with",
            ))),
            Self::Node(node) => {
                let mut node = node.clone();
                node.redis.protocol = ProtocolVersion::RESP3;
                let settings = manager_settings(timeouts).set_push_sender(pushes);
                ConnectionManager::new_with_config(Client::open(node)?, settings)
                    .await
                    .map(Connection::Node)
            }
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(nodes, certificates) => cluster_client(nodes, certificates, timeouts)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes)
                .build()?
                .get_async_connection()
                .await
                .map(Connection::Cluster),
        }
    }
}

/// The redis crate builds its TLS configuration with rustls' process-wide cryptography
/// provider, which rustls picks by itself only when one provider is compiled in: an
/// application whose other dependencies bring rustls' default (aws-lc-rs) too would panic at
/// the first `rediss://` connection. Where the application chose none, this store's (ring) is
/// installed; one the application installs first is kept.
///
/// The store's is ring, which builds with a C compiler alone (aws-lc-rs also wants CMake);
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange. An application that
/// wants that installs aws-lc-rs itself, before its first connection.
fn choose_cryptography() {
    #[cfg(feature = "redis-tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        #[allow(deprecated)]
        let ring = rustls::crypto::ring::default_provider();
        let _already_chosen = ring.install_default();
    }
}

/// Every command gives up after the response timeout and a lost connection is remade at once,
/// so an outage costs a request about a second, not the manager's default two-minute backoff.
fn manager_settings(timeouts: Timeouts) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(timeouts.connection)
        .set_response_timeout(timeouts.response)
        .set_number_of_retries(1)
        .set_max_delay(100)
}

/// The cluster client's default retries wait at least 1.28 s each; a request of ours gives up
/// after the response timeout, so redirections and reconnections are retried within it.
#[cfg(feature = "redis-cluster")]
fn cluster_client(
    nodes: &[ConnectionInfo],
    certificates: &Certificates,
    timeouts: Timeouts,
) -> redis::cluster::ClusterClientBuilder {
    let builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(timeouts.connection)
        .response_timeout(timeouts.response)
        .retries(3)
        .min_retry_wait(5)
        .max_retry_wait(100);
    #[cfg(feature = "redis-tls")]
    if let Some(given) = &certificates.given {
        return builder.certs(given.clone());
    }
    let _ = certificates;
    builder
}
