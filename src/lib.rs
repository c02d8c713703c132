//! Support for the workspace's integration tests and benchmark: a real server on a free port,
//! and a handler-run counter. Not published.

pub mod admin;
pub mod faulty;
pub mod orders;
pub mod postgres;
#[path = "../idempotency-actix/src/storage/redis/private_cluster.rs"]
mod private_cluster;
pub mod resp_proxy;
#[path = "../idempotency-actix/src/storage/postgres/test_database.rs"]
mod test_database;
pub mod tls;
pub mod work;

pub use private_cluster::{ClusterTls, PrivateRedisCluster};

use std::{
    fmt,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use actix_web::{
    body::MessageBody,
    dev::{ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse},
    rt::System,
    App, HttpServer,
};

/// Counts how many times handlers ran, shared by every worker of a server.
#[derive(Debug, Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    /// Records one run and returns the number of runs so far, this one included.
    pub fn record(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// How many runs were recorded.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// An actix-web server on 127.0.0.1 with an OS-chosen port, running on its own thread with
/// `workers` workers. Dropping it stops the server and joins the thread.
pub struct TestServer {
    address: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("address", &self.address)
            .finish()
    }
}

impl TestServer {
    /// Starts a server whose apps come from `factory`, as with `HttpServer::new`.
    pub fn start<F, T, B>(workers: usize, factory: F) -> std::io::Result<Self>
    where
        F: Fn() -> App<T> + Send + Clone + 'static,
        T: ServiceFactory<
                ServiceRequest,
                Config = (),
                Response = ServiceResponse<B>,
                Error = actix_web::Error,
                InitError = (),
            > + 'static,
        B: MessageBody + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            System::new().block_on(async move {
                let server = HttpServer::new(factory)
                    .workers(workers)
                    .disable_signals()
                    .shutdown_timeout(1)
                    .listen(listener)?
                    .run();
                let _ = sender.send(server.handle());
                server.await
            })
        });
        let handle = receiver
            .recv()
            .map_err(|_| std::io::Error::other("the test server failed to start"))?;
        Ok(Self {
            address,
            handle,
            thread: Some(thread),
        })
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// The address the server listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// Starts a server whose apps come from `factory` on a free port and says how its start-up
/// failed, explained by [`idempotency_actix::explain_startup_error`]; `None` when it started
/// (it is stopped again after a few seconds).
pub fn start_up_error<F, T, B>(workers: usize, factory: F) -> Option<std::io::Error>
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let outcome = std::thread::spawn(move || {
        System::new().block_on(async move {
            let server = HttpServer::new(factory)
                .workers(workers)
                .disable_signals()
                .shutdown_timeout(1)
                .bind("127.0.0.1:0")?
                .run();
            let handle = server.handle();
            match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
                Ok(ended) => ended,
                Err(_still_running) => {
                    handle.stop(false).await;
                    Ok(())
                }
            }
        })
    })
    .join();
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(idempotency_actix::explain_startup_error(error)),
        Err(_) => Some(std::io::Error::other("the server thread panicked")),
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // `stop` sends its command at once; the returned future only waits for completion.
        drop(self.handle.stop(false));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a client receives for `request`: the app's response, or the response an error from the
/// app renders as (the way the HTTP server would send it).
pub async fn respond<S, B>(app: &S, request: actix_http::Request) -> Received
where
    S: actix_web::dev::Service<
        actix_http::Request,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: MessageBody + 'static,
{
    let response = match app.call(request).await {
        Ok(response) => response.map_into_boxed_body().into_parts().1,
        Err(error) => error.error_response(),
    };
    let status = response.status();
    let headers = response.headers().clone();
    let body = actix_web::body::to_bytes(response.into_body())
        .await
        .unwrap_or_default();
    Received {
        status,
        headers,
        body,
    }
}

/// A response as a client sees it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The status.
    pub status: actix_web::http::StatusCode,
    /// The headers.
    pub headers: actix_web::http::header::HeaderMap,
    /// The body.
    pub body: bytes::Bytes,
}

impl Received {
    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the response is marked as a replay.
    pub fn is_replay(&self) -> bool {
        self.header(idempotency_actix::REPLAYED_HEADER) == Some("true")
    }

    /// The body parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `type` of a problem+json body, if it is one.
    pub fn problem_type(&self) -> Option<String> {
        if self.header("content-type") != Some("application/problem+json") {
            return None;
        }
        self.json()["type"].as_str().map(str::to_owned)
    }
}

/// The Redis the tests use (`IDEMPOTENCY_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), or
/// `None` after a loud message when none answers. Under `IDEMPOTENCY_REQUIRE_REDIS=1` a missing
/// Redis fails the test instead.
pub async fn redis_url_or_skip(test: &str) -> Option<String> {
    let url = std::env::var("IDEMPOTENCY_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    if redis_answers(&url).await {
        return Some(url);
    }
    if std::env::var("IDEMPOTENCY_REQUIRE_REDIS").as_deref() == Ok("1") {
        panic!("{test}: IDEMPOTENCY_REQUIRE_REDIS=1 but no Redis answers at {url}");
    }
    eprintln!("\n*** SKIPPED {test}: no Redis at {url} (set IDEMPOTENCY_TEST_REDIS_URL) ***\n");
    None
}

/// Whether a Redis server answers PING at `url`.
pub async fn redis_answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut connection)
        .await
        .is_ok()
}

/// Deletes, when dropped, every key under a prefix on a Redis server: the tests leave nothing in
/// the Redis they share (records, counters, freed reservations).
#[derive(Debug)]
pub struct RedisCleanup {
    url: String,
    prefix: String,
}

impl RedisCleanup {
    /// Cleans up the keys under `prefix` on the Redis at `url` when dropped.
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    fn delete_prefixed(&self) -> redis::RedisResult<usize> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        use redis::Commands;
        let keys: Vec<String> = connection
            .scan_match::<_, String>(format!("{}*", self.prefix))?
            .collect();
        let mut deleted = 0;
        for batch in keys.chunks(500) {
            deleted += redis::cmd("DEL")
                .arg(batch)
                .query::<usize>(&mut connection)?;
        }
        Ok(deleted)
    }
}

impl Drop for RedisCleanup {
    fn drop(&mut self) {
        if let Err(error) = self.delete_prefixed() {
            eprintln!(
                "could not delete the test keys under {}: {error}",
                self.prefix
            );
        }
    }
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("test:{test}:{}:{nanos}:", std::process::id())
}

/// A private `redis-server` on a free port, for tests that stop and start Redis. Killed on drop.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// Picks a free port without starting anything yet (Redis is "unreachable" there).
    pub fn reserve_port() -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(Self { port, child: None })
    }

    /// Whether `redis-server` is installed.
    pub fn available() -> bool {
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it answers.
    pub async fn start(&mut self) -> std::io::Result<()> {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()?;
        self.child = Some(child);
        for _ in 0..100 {
            if redis_answers(&self.url()).await {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(std::io::Error::other("redis-server did not come up"))
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of the sample named exactly `series` (name and labels) in a Prometheus scrape.
pub fn prometheus_sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// What the demo's `GET /orders/count` at `url` says, over a real connection.
pub async fn order_count(url: &str) -> u64 {
    let answer = work::fresh_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("count: {e}"));
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    body["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {body}"))
}

/// The one answer among concurrent duplicates that ran the handler (201, not a replay); every
/// other answer is 409 or a replay of it.
pub fn the_one_created(answers: &[Received]) -> &Received {
    let created: Vec<&Received> = answers
        .iter()
        .filter(|answer| {
            answer.status == actix_web::http::StatusCode::CREATED && !answer.is_replay()
        })
        .collect();
    let [created] = created[..] else {
        panic!("not exactly one request ran: {answers:?}");
    };
    for answer in answers {
        assert!(
            answer.status == actix_web::http::StatusCode::CONFLICT || answer.body == created.body,
            "{answer:?}"
        );
    }
    created
}

/// Sends `body` as `application/json` to `url` over a real connection with the idempotency key
/// `key`, and returns what the client received.
pub async fn post_keyed(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: impl Into<reqwest::Body>,
) -> Received {
    let response = client
        .post(url)
        .header("Idempotency-Key", key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    received(response).await
}

/// What a client received over a real connection.
pub async fn received(response: reqwest::Response) -> Received {
    let status = actix_web::http::StatusCode::from_u16(response.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = actix_web::http::header::HeaderMap::new();
    for (name, value) in response.headers() {
        let name = actix_web::http::header::HeaderName::from_bytes(name.as_str().as_bytes());
        let value = actix_web::http::header::HeaderValue::from_bytes(value.as_bytes());
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    let body = response.bytes().await.unwrap_or_default();
    Received {
        status,
        headers,
        body,
    }
}
